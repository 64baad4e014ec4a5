"""`mmfed train engine=flower` on Flower's simulation engine (Ray) gives the embedded engine's metrics.

Both engines run the same server stages and client function; the only numeric difference left is
torch's thread count, which changes the order of float reductions in training: Ray runs each client
with `flower.num_cpus` threads (1 here), so the embedded run is made with one thread too. With
different thread counts the losses agree to ~1e-4 and a retrieval rank can flip (README).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mmfed.cli import compose
from mmfed.federation.run import train

pytestmark = pytest.mark.slow
TINY = ["experiment=smoke", "quiet=true", "flower.num_cpus=1"]


def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("wall_seconds")
    return records


def _summary(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary


def test_flower_simulation_gives_the_embedded_metrics(tmp_path: Path, one_thread: None) -> None:
    """... and, run as a command into a log (not quiet), prints what the embedded engine prints:
    a line per round and the table, no Flower DEBUG lines, deprecation notices or Ray warnings."""
    train(compose([*TINY, f"run_dir={tmp_path / 'embedded'}"]))
    command = [
        "train",
        *[o for o in TINY if o != "quiet=true"],
        "engine=flower",
        f"run_dir={tmp_path / 'flower'}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "mmfed.cli", *command], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.splitlines() == [line for line in done.stderr.splitlines() if "mmfed: round " in line]
    assert len(done.stderr.splitlines()) == 2, done.stderr  # rounds 1 and 2
    assert "test split, the global model of round" in done.stdout and len(done.stdout.splitlines()) < 25

    flower, embedded = _summary(tmp_path / "flower"), _summary(tmp_path / "embedded")
    # the writing process's threads differ (this test process runs one; the command torch's default)
    assert flower.pop("environment")["packages"] == embedded.pop("environment")["packages"]
    assert _close(flower, embedded), _differences(flower, embedded)
    records = _records(tmp_path / "flower")
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["failures"] == [] and r["clients"] == 3.0 for r in records)
    assert {"train/image/loss", "train/text/loss", "train/paired/loss"} <= records[-1].keys()
    for mine, theirs in zip(records, _records(tmp_path / "embedded"), strict=True):
        assert mine.keys() == theirs.keys()
        assert _close(mine, theirs), _differences(mine, theirs)
    for name in ("config.yaml", "partition.json", "checkpoints/best.pt", "plots/rsum.png"):
        assert (tmp_path / "flower" / name).exists(), name


def _close(a: Any, b: Any) -> bool:
    """Equal structure; numbers within float tolerance (1e-6 relative)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """The keys where `a` and `b` differ (what a failed `_close` reports)."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{path}/{k}: only on one side" for k in a.keys() ^ b.keys()]
        return found + [d for k in a.keys() & b.keys() for d in _differences(a[k], b[k], f"{path}/{k}")]
    return [] if _close(a, b) else [f"{path}: {a!r} != {b!r}"]
