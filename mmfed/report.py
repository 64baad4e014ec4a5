"""Plots of a run's metrics over rounds, from `metrics.jsonl` (so `mmfed report` can redo them)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402

PANELS = {
    "retrieval": (
        "val/retrieval/i2t/R@1",
        "val/retrieval/t2i/R@1",
        "val/retrieval/i2t/R@5",
        "val/retrieval/t2i/R@5",
    ),
    "rsum": ("val/retrieval/rsum",),
    "classification": ("val/classification/image/acc", "val/classification/text/acc"),
    "train_loss": ("train/image/loss", "train/text/loss", "train/paired/loss"),
    "traffic": ("bytes_up", "bytes_down"),
}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} an mmfed run folder?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from error
    return records


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write one PNG per panel into RUN_DIR/plots; returns the files written."""
    records = read_metrics(run_dir)
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for panel, keys in PANELS.items():
        present = [k for k in keys if any(k in r for r in records)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
        for key in present:
            points = [(r["round"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=key.removeprefix("val/"))
        ax.set_xlabel("round")
        ax.set_title(f"{Path(run_dir).name}: {panel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
