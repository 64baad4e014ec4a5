"""A tiny federation end to end: run folder contents, determinism, kill-and-resume, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfed.cli import compose, main
from mmfed.federation.run import train

pytestmark = pytest.mark.slow
TINY = ["experiment=smoke", "quiet=true"]


def _summary(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary


def test_tiny_federation_writes_a_complete_run_folder(tmp_path: Path) -> None:
    cfg = compose([*TINY, f"run_dir={tmp_path / 'run'}", "layout.image=2", "clients_per_round=3"])
    summary = train(cfg)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "partition.json",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "plots/retrieval.png",
        "plots/classification.png",
    ):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["clients"] == 3.0
        assert record["bytes_down"] > 0 and record["bytes_up"] > 0
        assert record["bytes_up"] == sum(c["up"] for c in record["clients_bytes"].values())
        assert {
            "val/retrieval/i2t/R@1",
            "val/retrieval/t2i/R@1",
            "val/retrieval/rsum",
            "val/classification/image/acc",
            "val/classification/text/acc",
        } <= record.keys()
        assert "train/paired/contrastive" in record and "train/image/image_ce" in record
    for key in (
        "test/retrieval/i2t/R@1",
        "test/retrieval/t2i/R@1",
        "test/retrieval/rsum",
        "test/classification/image/acc",
        "test/classification/text/acc",
        "chance/retrieval/rsum",
        "val/retrieval/rsum",
        "rounds",
        "wall_seconds",
        "bytes_up",
        "bytes_down",
    ):
        assert key in summary, key
    assert not any(k.startswith(("retrieval/", "classification/")) for k in summary)  # every split named
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in records)
    (run / "plots" / "rsum.png").unlink()
    assert main(["report", str(run)]) == 0  # `mmfed report` redraws the plots
    assert (run / "plots" / "rsum.png").stat().st_size > 0
    partition = json.loads((run / "partition.json").read_text())
    assert [c["kind"] for c in partition["clients"]] == ["image", "image", "text", "paired"]


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path) -> None:
    a = train(compose([*TINY, f"run_dir={tmp_path / 'a'}"]))
    b = train(compose([*TINY, f"run_dir={tmp_path / 'b'}"]))
    c = train(compose([*TINY, f"run_dir={tmp_path / 'c'}", "seed=1"]))
    for run in (a, b, c):
        run.pop("wall_seconds")
    assert a == b
    assert a != c


def test_a_killed_run_resumes_to_the_same_final_metrics(tmp_path: Path) -> None:
    """SIGKILL a real `mmfed train` process mid-run, resume it, compare with an uninterrupted run."""
    overrides = [*TINY, "rounds=5"]
    train(compose([*overrides, f"run_dir={tmp_path / 'whole'}"]))

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "mmfed.cli", "train", *overrides, f"run_dir={killed}"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 5, f"the run was not interrupted mid-way ({done} rounds recorded)"
    assert not (killed / "summary.json").exists()

    resumed = subprocess.run([*command, "resume=true"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _summary(killed) == _summary(tmp_path / "whole")
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5]


def test_existing_run_folder_is_not_overwritten_and_resume_checks_the_config(tmp_path: Path, capsys) -> None:
    run_dir = f"run_dir={tmp_path / 'run'}"
    train(compose([*TINY, run_dir, "rounds=1"]))
    assert main(["train", *TINY, run_dir]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *TINY, run_dir, "resume=true", "partition.alpha=0.9"]) == 2
    assert "partition.alpha=0.9 (saved: 0.5)" in capsys.readouterr().err  # resume reads the saved config
    assert main(["train", *TINY, f"run_dir={tmp_path / 'none'}", "resume=true"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nonsense=1", "config key 'nonsense'"),
        ("training.lr=fast", "config key 'training.lr'"),
        ("partition=bogus", "Available options in 'partition'"),
        ("partition.alpha=-1", "config key 'partition': alpha must be > 0, got -1.0"),
        ("training.optimizer=rmsprop", "config key 'training': optimizer='rmsprop' is not one of 'sgd'"),
        ("clients_per_round=9", "clients_per_round=9 must be between 1 and 3"),
        ("engine=ray", "config key 'engine': 'ray' is not one of embedded"),
        ("evaluation.selection_metric=acc", "config key 'evaluation.selection_metric'"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(
    tmp_path: Path, capsys, override: str, message: str
) -> None:
    assert main(["train", *TINY, f"run_dir={tmp_path / 'run'}", "rounds=1", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfed: error:") and len(err.splitlines()) == 1, err
    assert message in err, err
