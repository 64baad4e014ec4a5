"""TensorBoard and W&B (offline) loggers: every metrics.jsonl scalar, same name, step = round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.loggers import Loggers, TensorBoardLogger, WandbLogger, logger_names, scalars

RECORDS = [
    {"round": 1, "wall_seconds": 0.5, "val/retrieval/rsum": 12.5, "clients_bytes": {"image-0": {"up": 7}},
     "failures": [], "note": "text"},
    {"round": 2, "wall_seconds": 0.25, "val/retrieval/rsum": 20.0, "clients_bytes": {"image-0": {"up": 9}},
     "failures": [{"cid": "x"}], "note": "text"},
]  # fmt: skip


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline, and any attempt to log in fails the test."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    def no_login(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to log in to W&B")

    monkeypatch.setattr(wandb, "login", no_login)


def test_scalars_keep_names_flatten_nesting_and_skip_non_numbers() -> None:
    assert scalars(RECORDS[1]) == {
        "round": 2.0,
        "wall_seconds": 0.25,
        "val/retrieval/rsum": 20.0,
        "clients_bytes/image-0/up": 9.0,
    }


def test_logger_names() -> None:
    assert logger_names(None) == []
    assert logger_names("tensorboard") == ["tensorboard"]
    assert logger_names(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="logger='mlflow' is not one of tensorboard, wandb"):
        logger_names(["mlflow"])


def test_tensorboard_events_read_back(tmp_path: Path) -> None:
    loggers = Loggers([TensorBoardLogger(tmp_path)])
    for record in RECORDS:
        loggers.log(record, record["round"])
    loggers.close()
    events = _events(tmp_path / "tensorboard")
    assert events["val/retrieval/rsum"] == [(1, 12.5), (2, 20.0)]
    assert events["clients_bytes/image-0/up"] == [(1, 7.0), (2, 9.0)]
    assert "note" not in events and "failures" not in events


def test_wandb_offline_writes_a_local_run(tmp_path: Path, offline_wandb: None) -> None:
    logger = WandbLogger(tmp_path, {"seed": 0})
    for record in RECORDS:
        logger.log(scalars(record), record["round"])
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    assert b"val/retrieval/rsum" in data


@pytest.mark.slow
def test_a_run_logs_every_metric_to_tensorboard_and_wandb(tmp_path: Path, offline_wandb: None) -> None:
    from mmfed.cli import main

    run_dir = tmp_path / "run"
    code = main(
        ["train", "experiment=smoke", "rounds=2", "quiet=true", f"run_dir={run_dir}",
         "logger=[tensorboard,wandb]"]
    )  # fmt: skip
    assert code == 0
    events = _events(run_dir / "tensorboard")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for name, value in scalars(line).items():
            assert (line["round"], pytest.approx(value, rel=1e-6)) in events[name], name
    assert set(events) == {name for line in lines for name in scalars(line)}
    assert list((run_dir / "wandb").glob("offline-run-*"))
