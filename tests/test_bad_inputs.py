"""The catalogue of bad inputs a user can hit: each gets one line naming the bad thing, exit code 2,
and nothing written. The CLI runs in-process (`main`); only the run-folder lock needs a second process.

Shapes: config values rejected by `mmfed config` and `mmfed train` alike (nothing written); a run
folder that cannot be used; damaged files of a finished run read back by eval / personalize / resume;
strict JSON in everything a run writes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import pytest

from mmfed.cli import main
from mmfed.utils.io import CorruptFileError, load_json, read_jsonl, save_json

SMOKE = ["experiment=smoke", "quiet=true"]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if not line.startswith("WARNING")]  # logged warnings come first
    assert len(lines) == 1 and lines[0].startswith("mmfed: error: "), err
    return lines[0]


# ---- config values: `mmfed config` and `mmfed train` reject the same ----------------------------------
CONFIG_CASES = [
    ("experiment=bogus", r"config key 'experiment': no preset 'bogus' .*presets: compare, creamfl"),
    ("experiment=[smoke,bogus]", r"no preset 'bogus'.*smoke"),
    ("experiment=null", r"config key 'experiment': null is not a preset; '~experiment' drops the default"),
    ("rounds=0", r"config key 'rounds': must be >= 1, got 0"),
    ("rounds=-1", r"config key 'rounds': must be >= 1, got -1"),
    ("rounds=two", r"config key 'rounds': 'two' is not an integer"),
    ("seed=abc", r"config key 'seed': 'abc' is not an integer"),
    ("seed=1.5", r"config key 'seed': 1.5 is not an integer"),
    ("name=../../x", r"config key 'name': '../../x' is not a plain folder name"),
    ("name=a/b", r"config key 'name': 'a/b' is not a plain folder name"),
    ("model.embed_dim=0", r"config key 'model.embed_dim': must be an integer >= 1, got 0"),
    ("model.embed_dim=-4", r"config key 'model.embed_dim'"),
    ("model.init_temperature=0", r"config key 'model.init_temperature': must be a number > 0, got 0"),
    ("model.init_temperature=-0.1", r"config key 'model.init_temperature'"),
    ("training.grad_clip=-1", r"config key 'training': grad_clip must be >= 0, got -1"),
    ("training.lr=0", r"config key 'training': lr must be > 0"),
    ("training.lr=nan", r"config key 'training': lr must be > 0, got nan"),
    ("training.weight_decay=-1", r"config key 'training': weight_decay must be >= 0"),
    ("training.local_epochs=0", r"config key 'training': local_epochs must be > 0"),
    ("partition.alpha=-1", r"config key 'partition': alpha must be > 0, got -1.0"),
    ("partition.alpha=0", r"config key 'partition': alpha must be > 0"),
    ("layout.image=-1", r"config key 'layout': layout.image must be >= 0"),
    ("evaluation.ks=[0]", r"config key 'evaluation': ks=\[0\] must list ranks >= 1"),
    ("evaluation.batch_size=0", r"config key 'evaluation': batch_size must be > 0"),
    ("device=gpu7", r"config key 'device': 'gpu7' is not a device"),
    ("engine=ray", r"config key 'engine': 'ray' is not one of embedded, flower"),
    ("resume=maybe", r"config key 'resume': 'maybe' is not true or false"),
    ("quiet=2", r"config key 'quiet': 2 is not true or false"),
    ("min_replies=0", r"config key 'min_replies': must be >= 1, got 0"),
    ("clients_per_round=0", r"config key 'clients_per_round': must be >= 1, got 0"),
    ("threads=0", r"config key 'threads': must be >= 1, got 0"),
    ("client_timeout=-3", r"config key .client_timeout.: client_timeout must be a number of seconds > 0"),
    ("+partition_by_kind.audio={_target_:mmfed.data.partition.IIDPartitioner}", r"partition_by_kind.audio"),
    ("flower.num_cpus=0", r"config key 'flower': num_cpus must be > 0"),
    ("teacher.timestep=-1", r"config key 'teacher': teacher.timestep must be >= 0"),
    ("nonsense=1", r"config key 'nonsense'"),
    ("training.lr=fast", r"config key 'training.lr'"),
    ("partition=bogus", r"Could not find 'partition/bogus'"),
    ("name=a=b", r"^mmfed: error: override 'name=a=b': '=' in a value needs quotes; .*name='a=b'"),
    ("rounds=(3", r"^mmfed: error: override 'rounds=\(3': Error parsing override"),
]


@pytest.mark.parametrize("command", ["config", "train"])
@pytest.mark.parametrize(("override", "message"), CONFIG_CASES)
def test_bad_config_values_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, override: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    assert main([command, *SMOKE, f"run_dir={run_dir}", override]) == 2
    assert re.search(message, _error(capsys))
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [  # built only by `train` (a server step's constructor): still before anything is written
        ("algorithm.server_steps.fedavg.aggregation=mode", r"aggregation='mode' is not one of 'mean'"),
        ("algorithm.server_steps.fedavg.trim_fraction=0.5", r"trim_fraction must be in \[0, 0.5\)"),
        ("algorithm.server_steps.fedavg.max_update_norm=-1", r"max_update_norm must be > 0"),
        ("clients_per_round=9", r"clients_per_round=9 must be between 1 and 3"),
    ],
)
def test_train_only_checks_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    run_dir = tmp_path / "run"
    assert main(["train", *SMOKE, f"run_dir={run_dir}", override]) == 2
    assert re.search(message, _error(capsys))
    assert not run_dir.exists()


def test_a_value_with_an_equals_sign_is_one_line_whose_quoted_form_composes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hydra cannot parse ``run_dir=a=b`` (it was a traceback); the error's shell form composes."""
    import shlex

    wanted = tmp_path / "a=b"
    for command in (["config"], ["train"], ["train", "-m", "seed=0,1"]):
        assert main([*command, *SMOKE, f"run_dir={wanted}"]) == 2
        line = _error(capsys)
        assert line.startswith(f"mmfed: error: override 'run_dir={wanted}': '=' in a value needs quotes")
    advised = shlex.split(re.search(r"\(in a shell: (.*)\)$", line).group(1))
    assert main(["config", *SMOKE, *advised]) == 0
    assert f"run_dir: {wanted}\n" in capsys.readouterr().out


def test_good_presets_and_lists_of_presets_compose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "experiment=[smoke]"]) == 0
    assert "embed_dim: 16" in capsys.readouterr().out


# ---- the run folder -----------------------------------------------------------------------------------
def test_run_dir_that_is_a_file_or_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", *SMOKE, f"run_dir={afile}"]) == 2
    assert re.search(rf"run_dir {re.escape(str(afile))} is a file, not a folder", _error(capsys))
    assert main(["train", *SMOKE, f"run_dir={afile / 'run'}"]) == 2
    assert re.search(rf"is under {re.escape(str(afile))}, which is a file", _error(capsys))
    assert afile.read_text() == "x"


def test_read_only_or_full_run_dir(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmfed.federation.folder as folder

    run_dir = tmp_path / "ro" / "run"
    (tmp_path / "ro").mkdir()
    # (tests may run as root, which writes anywhere: the permission answer is what is faked)
    monkeypatch.setattr(folder.os, "access", lambda path, mode: Path(path) != tmp_path / "ro")
    assert main(["train", *SMOKE, f"run_dir={run_dir}"]) == 2
    assert re.search(rf"folder {re.escape(str(tmp_path / 'ro'))} is not writable", _error(capsys))
    monkeypatch.undo()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(folder.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    assert main(["train", *SMOKE, f"run_dir={run_dir}"]) == 2
    assert re.search(r"the disk holding .* is full \(0 MiB free\)", _error(capsys))
    assert not run_dir.exists()


def test_a_failed_write_names_the_file(tmp_path: Path) -> None:
    import errno

    from mmfed.federation.folder import describe_os_error

    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.pt"))
    assert describe_os_error(full) == (
        f"cannot write {tmp_path / 'x.pt'}: no space left on the disk; free space or choose another "
        "run_dir=..."
    )
    denied = PermissionError(errno.EACCES, "Permission denied", "/etc/x")
    assert describe_os_error(denied).startswith("/etc/x: permission denied")


def _hold_lock(folder: str, ready, release) -> None:  # runs in a forked child
    from mmfed.federation.folder import RunLock

    RunLock(Path(folder)).acquire()
    ready.set()
    release.wait(60)
    os._exit(0)


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    child = context.Process(target=_hold_lock, args=(str(run_dir), ready, release))
    child.start()
    try:
        assert ready.wait(30)
        assert main(["train", *SMOKE, f"run_dir={run_dir}", "rounds=1"]) == 2
        message = _error(capsys)
        assert re.search(rf"run folder .*run is in use by pid {child.pid} on host \S+ \(since ", message)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written
    finally:
        release.set()
        child.join(30)


def test_stale_temp_files_are_removed_and_a_dead_pretrain_folder_too(tmp_path: Path) -> None:
    from mmfed.federation.folder import RunLock
    from mmfed.utils.io import remove_dead_temp_dirs

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    leftovers = [run_dir / ".metrics.jsonl.abc.tmp", run_dir / "checkpoints" / ".last.pt.x1.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    keep = run_dir / "notes.tmp"  # not an atomic_write temp name
    keep.write_text("mine")
    lock = RunLock(run_dir).acquire()
    try:
        assert sorted(lock.clean()) == sorted(leftovers)
    finally:
        lock.release()
    assert keep.exists() and not any(p.exists() for p in leftovers)
    dead = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    killed = tmp_path / f".synthetic-sd.tmp-{dead.pid}-abcd"
    alive = tmp_path / f".synthetic-sd.tmp-{os.getpid()}-efgh"
    for path in (killed, alive):
        (path / "unet").mkdir(parents=True)
    assert remove_dead_temp_dirs(tmp_path, ".synthetic-sd.tmp-") == [killed]
    assert alive.exists()


# ---- a finished run's files, damaged ------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *SMOKE, f"run_dir={run_dir}", "rounds=1"]) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


DAMAGES = {
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)]),
    "garbage": lambda path: path.write_bytes(b"\x00\xffnot what it should be\x13" * 9),
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize(
    ("file", "args"),
    [
        ("checkpoints/best.pt", ["personalize", "{run}", "epochs=1"]),
        ("checkpoints/last.pt", ["personalize", "{run}", "epochs=1", "checkpoint=last"]),
        ("checkpoints/last.pt", ["train", *SMOKE, "run_dir={run}", "resume=true", "rounds=2"]),
        ("config.yaml", ["personalize", "{run}", "epochs=1"]),
        ("config.yaml", ["train", *SMOKE, "run_dir={run}", "resume=true", "rounds=2"]),
        ("config.yaml", ["eval", "{run}", "protocol=cifar10"]),
        ("metrics.jsonl", ["train", *SMOKE, "run_dir={run}", "resume=true", "rounds=2"]),
        ("partition.json", ["train", *SMOKE, "run_dir={run}", "resume=true", "rounds=2"]),
    ],
)
def test_a_damaged_run_file_is_one_line_naming_it(
    run_copy: Path, capsys: pytest.CaptureFixture[str], file: str, args: list[str], damage: str
) -> None:
    path = run_copy / file
    if damage == "empty" and file == "metrics.jsonl":
        pytest.skip("an empty metrics.jsonl is a valid log of no rounds")
    DAMAGES[damage](path)
    before = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert main([arg.format(run=run_copy) for arg in args]) == 2
    message = _error(capsys)
    assert str(path) in message, message
    assert re.search(r"empty|not|truncated|damaged|does not", message), message
    after = {p: p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before  # refused before writing anything


def test_a_checkpoint_of_another_shape_names_the_file(run_copy: Path, capsys) -> None:
    import torch

    torch.save({"image_encoder.nothing": torch.zeros(2)}, run_copy / "checkpoints" / "best.pt")
    assert main(["personalize", str(run_copy), "epochs=1"]) == 2
    assert re.search(r"checkpoint .*best.pt does not fit the model of .*config.yaml", _error(capsys))
    torch.save([1, 2, 3], run_copy / "checkpoints" / "best.pt")
    assert main(["personalize", str(run_copy), "epochs=1"]) == 2
    assert re.search(r"checkpoint .*best.pt does not hold model weights", _error(capsys))


def test_a_config_yaml_of_something_else_names_the_file(run_copy: Path, capsys) -> None:
    (run_copy / "config.yaml").write_text("just: a mapping\n")
    assert main(["personalize", str(run_copy), "epochs=1"]) == 2
    message = _error(capsys)
    assert re.search(r"config file .*config.yaml is not an mmfed run config \(no key 'seed'\)", message)


def test_resume_with_another_seed_is_refused_and_the_folder_keeps_its_config(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = (run_copy / "config.yaml").read_bytes()
    assert main(["train", *SMOKE, f"run_dir={run_copy}", "seed=1"]) == 2
    assert "already holds a run" in _error(capsys)
    assert main(["train", *SMOKE, f"run_dir={run_copy}", "seed=1", "resume=true"]) == 2
    assert "seed=1 (saved: 0)" in _error(capsys)
    assert (run_copy / "config.yaml").read_bytes() == config


# ---- strict JSON --------------------------------------------------------------------------------------
def test_every_json_a_run_writes_is_strict(finished_run: Path) -> None:
    files = [*finished_run.rglob("*.json"), *finished_run.rglob("*.jsonl")]
    assert {p.name for p in files} >= {"summary.json", "partition.json", "metrics.jsonl"}
    for path in files:
        if path.suffix == ".jsonl":
            assert read_jsonl(path)
        else:
            load_json(path)  # the strict parser: NaN / Infinity are errors


def test_non_finite_numbers_are_written_as_null_and_refused_on_read(tmp_path: Path) -> None:
    save_json({"rsum": float("-inf"), "loss": [1.0, float("nan")], "ok": 2.5}, tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"rsum": None, "loss": [1.0, None], "ok": 2.5}
    (tmp_path / "b.json").write_text('{"rsum": -Infinity}')
    with pytest.raises(CorruptFileError, match=r"b.json is not valid JSON \(non-standard JSON constant"):
        load_json(tmp_path / "b.json")
    assert math.isnan(json.loads("NaN"))  # (what Python's own parser would have let through)


def test_no_module_writes_json_around_the_strict_writer() -> None:
    package = Path(__file__).resolve().parent.parent / "mmfed"
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py")
        if path.name != "io.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"json\.dump\(|write_text\(json\.dumps|write\(json\.dumps", line)
    ]
    assert not offenders, offenders


# ---- a diverged client --------------------------------------------------------------------------------
def test_diverged_clients_fail_the_round_naming_round_clients_and_tensor(tmp_path: Path, capsys) -> None:
    assert main(["train", *SMOKE, f"run_dir={tmp_path / 'run'}", "rounds=1", "training.lr=1e6"]) == 2
    message = _error(capsys)
    assert re.search(r"round 1 \(fit\): \d of 3 clients replied, fewer than min_replies=all", message)
    tensor = r"'weights/\S+' \(NaN in \d+ of \d+ values\)"
    assert re.search(rf"(text|paired)-0: sent a non-finite tensor {tensor}", message)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # nothing averaged, nothing saved
