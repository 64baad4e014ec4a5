"""A real Flower deployment on loopback: one SuperLink, two SuperNodes, `flwr run` of flower_app/.

TLS is on (a CA and a server certificate made here), SuperNodes authenticate with registered keys
(an unregistered one is turned away), and the SuperLink installs nothing at runtime. The federation
(image, text and paired clients on two SuperNodes) trains two rounds and must give the metrics of
the embedded engine. Every process the test starts gets its own process group, which is stopped at
the end, also when the test fails, and checked to be gone.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mmfed.cli import compose
from mmfed.federation.run import train
from tests.federation.test_flower_simulation import _close

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OVERRIDES = "experiment=smoke quiet=true"


# ----------------------------------------------------------------------------- certificates and keys
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_tls(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (what openssl would make)."""
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, sign_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(sign_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mmfed test CA")])
    ca_cert = certificate("mmfed test CA", ca_key, ca_name, ca_key, ca=True)
    server_cert = certificate("localhost", server_key, ca_name, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    return {
        "ca": _write(folder / "ca.crt", ca_cert.public_bytes(pem)),
        "cert": _write(folder / "server.pem", server_cert.public_bytes(pem)),
        "key": _write(
            folder / "server.key",
            server_key.private_bytes(
                pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
            ),
        ),
    }


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode key pair in OpenSSH format (as `ssh-keygen -t ecdsa -b 384` writes it)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return _write(folder / name, private), _write(folder / f"{name}.pub", public)


# ----------------------------------------------------------------------------- processes
def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _alive_in_group(pgid: int) -> list[int]:
    """Processes (not zombies) in process group `pgid`, from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


class Processes:
    """Starts commands in their own process groups; `stop_all` ends each group by its id."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.folder,
            start_new_session=True,
        )
        self.started.append((name, process))
        return process

    def log(self, name: str, whole: bool = False) -> str:
        """The process's log: its last 3,000 characters (for failure messages), or all of it."""
        path = self.folder / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if whole else text[-3000:]

    def stop_all(self) -> list[int]:
        """SIGTERM every group, SIGKILL what is left after 15 s; returns pids still alive after that."""
        for _, process in self.started:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive_in_group(p.pid) for _, p in self.started):
            time.sleep(0.2)
        for _, process in self.started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _, process in self.started:
            process.wait(timeout=30)
        time.sleep(0.5)
        return [pid for _, p in self.started for pid in _alive_in_group(p.pid)]


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    flwr_home = tmp_path / "flwr_home"
    flwr_home.mkdir()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec etc. of this venv
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "OMP_NUM_THREADS": "1",  # each client process trains with one thread, as the reference run here
    }
    started = Processes(tmp_path, env)
    try:
        yield started
    finally:
        left = started.stop_all()
        assert not left, f"processes left behind: {left}"


def wait_for(condition, seconds: float, what: str, processes: Processes, name: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} within {seconds:.0f}s; {name} log:\n{processes.log(name)}")


def _https_status(port: int, ca: Path) -> int | None:
    try:
        context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/", context=context, timeout=5):
            return 200
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _plain_http_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP status came back: the port speaks plain HTTP
    except OSError:
        return False


# ----------------------------------------------------------------------------- the test
def test_two_supernodes_over_tls_train_two_rounds_like_the_embedded_engine(
    tmp_path: Path, processes: Processes, one_thread: None
) -> None:
    assert shutil.which("flower-superlink", path=str(BIN)), "flwr's commands are not in this venv"
    tls = make_tls(tmp_path)
    link_port, *node_ports = free_ports(4)
    (tmp_path / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "mmfed-test"\n\n[superlink.mmfed-test]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{tls["ca"]}"\n'
    )
    flwr = str(BIN / "flwr")
    processes.start(
        "superlink",
        str(BIN / "flower-superlink"),
        *(
            "--ssl-ca-certfile",
            str(tls["ca"]),
            "--ssl-certfile",
            str(tls["cert"]),
            "--ssl-keyfile",
            str(tls["key"]),
        ),
        *("--port", str(link_port), "--enable-supernode-auth", "--disable-runtime-dependency-installation"),
    )
    wait_for(
        lambda: _https_status(link_port, tls["ca"]) is not None, 60, "SuperLink up", processes, "superlink"
    )
    assert not _plain_http_answers(link_port), "the SuperLink answers plain HTTP: TLS is off"

    keys = [make_node_key(tmp_path, f"supernode_{i}") for i in range(2)]
    for _, public in keys:
        registered = subprocess.run(
            [flwr, "supernode", "register", str(public), "mmfed-test"],
            env=processes.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered

    supernode = [str(BIN / "flower-supernode"), "--root-certificates", str(tls["ca"])]
    supernode += ["--superlink", f"127.0.0.1:{link_port}"]
    for i, (private, _) in enumerate(keys):
        processes.start(
            f"supernode_{i}",
            *supernode,
            *("--port", str(node_ports[i]), "--auth-supernode-private-key", str(private)),
            *("--node-config", f"partition-id={i} num-partitions=2"),
        )
    stranger, _ = make_node_key(tmp_path, "stranger")
    intruder = processes.start(
        "stranger",
        *supernode,
        *("--port", str(node_ports[2]), "--auth-supernode-private-key", str(stranger), "--max-retries", "1"),
        *("--node-config", "partition-id=0 num-partitions=2"),
    )

    run_dir = tmp_path / "run"
    flwr_run = processes.start(
        "flwr_run",
        flwr,
        "run",
        str(REPO / "flower_app"),
        "mmfed-test",
        "--stream",
        "--run-config",
        f"overrides='{OVERRIDES}' run-dir='{run_dir}'",
    )
    summary_file = run_dir / "summary.json"  # `flwr run --stream` returns when the run ends
    wait_for(lambda: flwr_run.poll() is not None, 420, "the run ended", processes, "flwr_run")
    assert summary_file.exists(), f"no summary; flwr run:\n{processes.log('flwr_run')}"
    assert intruder.wait(timeout=60) != 0, "an unregistered SuperNode was let in"
    assert "Failed to activate SuperNode" in processes.log("stranger")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["clients"] == 3.0 and record["failures"] == []
        assert {
            "train/image/loss",
            "train/text/loss",
            "train/paired/loss",
            "val/retrieval/rsum",
        } <= record.keys()
        assert record["bytes_up"] == sum(c["up"] for c in record["clients_bytes"].values()) > 0
    hosts = processes.log("flwr_run", whole=True)
    assert "hosts image-0, paired-0" in hosts and "hosts text-0" in hosts, hosts

    reference = train(compose([*OVERRIDES.split(), f"run_dir={tmp_path / 'embedded'}"]))
    deployed = json.loads(summary_file.read_text())
    for summary in (reference, deployed):
        summary.pop("wall_seconds")
    assert _close(deployed, reference), (deployed, reference)
