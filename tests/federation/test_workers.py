"""`workers=N`: the embedded engine runs a stage's clients over N forked worker processes.

Clients are independent within a stage, so a run with workers gives the numbers of the same run
in one process at the workers' thread count (1 here: tests/conftest.py), bit for bit, including a
method with client state (MOON keeps each client's previous model in the client-state store), a
client that raises (reported as in one process) and a worker process that dies (its stage's
clients are failures, the run ends with one line, nothing hangs).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.cli import compose, main
from mmfed.config import ConfigError
from mmfed.federation.embedded import resolve_workers
from mmfed.federation.launch import train
from mmfed.models.multimodal import MultimodalModel
from tests.federation.test_failures import _records, boom

SMOKE = ["experiment=smoke", "quiet=true", "rounds=2"]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="fedavg"),
        pytest.param(["algorithm=moon"], id="moon-client-state"),
        pytest.param(["min_replies=2", boom(raise_cid="text-0", raise_round=1)], id="a-client-raises"),
    ],
)
def test_workers_give_the_one_process_numbers(tmp_path: Path, one_thread: None, extra: list[str]) -> None:
    runs = {
        n: train(compose([*SMOKE, *extra, f"workers={n}", f"run_dir={tmp_path / str(n)}"])) for n in (1, 2)
    }
    assert _records(tmp_path / "2") == _records(tmp_path / "1")
    for summary in runs.values():
        summary.pop("wall_seconds")
    assert runs[2] == runs[1]
    if extra and extra[0] == "min_replies=2":
        (failure,) = _records(tmp_path / "2")[0]["failures"]
        assert (failure["cid"], failure["node"], failure["error"]) == (
            "text-0",
            "embedded",
            "RuntimeError: boom text-0 round 1",
        )
    if extra == ["algorithm=moon"]:
        assert any((tmp_path / "2" / "client_state").rglob("round_*.pt"))  # the parent saved the state


class Die(LossTerm):
    """Ends the worker process running client `cid` in round 1 (a kill, an out-of-memory)."""

    def __init__(self, cid: str = "") -> None:
        super().__init__()
        self.cid = cid

    def begin(self, round_: ClientRound) -> None:
        if round_.cid == self.cid and round_.round == 1:
            os._exit(3)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        return {}


def test_a_dead_worker_fails_its_stage_with_one_line(
    tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture[str]
) -> None:
    die = f"+algorithm.loss_terms.die={{_target_:{Die.__module__}.Die,cid:image-0}}"
    argv = ["train", *SMOKE, "rounds=1", "workers=2", die, f"run_dir={tmp_path / 'run'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmfed: error: round 1 (fit): ") and "worker process lost" in err, err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("workers=0", r"config key 'workers': must be an integer >= 1 or 'auto', got 0"),
        ("workers=two", r"config key 'workers': must be an integer >= 1 or 'auto', got 'two'"),
        ("workers=true", r"config key 'workers': must be an integer >= 1 or 'auto', got True"),
    ],
)
def test_bad_workers_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose([override])


def test_workers_are_the_embedded_engines() -> None:
    refused = r"config key 'workers': worker processes are the embedded engine's"
    with pytest.raises(ConfigError, match=refused):
        compose(["workers=2", "engine=flower"])
    compose(["workers=auto", "engine=flower"])  # auto: Flower places the clients, nothing to refuse


def test_auto_is_one_worker_per_usable_core() -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert resolve_workers("auto") == max(1, cores or 1)
    assert resolve_workers(3) == 3
    with pytest.raises(ValueError, match="workers must be an integer >= 1 or 'auto', got 0"):
        resolve_workers(0)


def test_the_default_federation_uses_one_worker_per_core_and_presets_one_process() -> None:
    assert compose([]).workers == "auto"
    assert compose(["experiment=smoke"]).workers == 1


def test_a_stage_of_one_client_goes_to_a_worker_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Else that client would train at the main process's thread count, unlike every other one."""
    from mmfed.federation.embedded import EmbeddedEngine

    sizes: list[int] = []
    parallel = EmbeddedEngine._run_parallel

    def spy(self: EmbeddedEngine, stage: str, round_: int, payloads: dict) -> dict:
        sizes.append(len(payloads))
        return parallel(self, stage, round_, payloads)

    monkeypatch.setattr(EmbeddedEngine, "_run_parallel", spy)
    train(compose([*SMOKE, "rounds=1", "clients_per_round=1", "workers=2", f"run_dir={tmp_path / 'run'}"]))
    assert 1 in sizes
