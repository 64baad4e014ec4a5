"""Plots of a run over rounds, from `metrics.jsonl` and `summary.json` (so `mmfed report` can redo them).

What each figure says, so it can be trusted at a glance: the curves are **validation** values (the
split the best round is chosen on), and say so in title, legend and y label; a dashed line marks the
best round; a star at that round is the **test** value of the model chosen there (the only use of
the test split), also written in the curve's legend entry; a dotted line is the chance level of the
test split where one line per curve stays readable (RSum, classification). Traffic is drawn per
direction in MB (10^6 bytes) per round, as bars, so equal up and down traffic shows as two bars
rather than one line hiding another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from mmfed.console import CHANCE_PREFIX  # noqa: E402  (summary.json: chance level of a test metric)
from mmfed.utils.io import TEST_PREFIX, read_metrics_file, upgrade_summary  # noqa: E402


@dataclass(frozen=True)
class Panel:
    axes: tuple[tuple[str, tuple[str, ...]], ...]  # (subplot title, metrics.jsonl keys: one curve each)
    ylabel: str
    title: str
    test_values: bool = True  # star the test value of the chosen model (summary: "test/" + key less "val/")
    chance: bool = False  # dotted chance line per curve (summary "chance/<key less val/>")


PANELS: dict[str, Panel] = {
    "retrieval": Panel(
        tuple(
            (title, tuple(f"val/retrieval/{d}/R@{k}" for k in (1, 5, 10)))
            for title, d in (("image to text", "i2t"), ("text to image", "t2i"))
        ),
        "recall@K (%)",
        "validation retrieval recall",
    ),
    "rsum": Panel(
        (("", ("val/retrieval/rsum",)),), "RSum: R@1+5+10 both ways (%)", "validation RSum", chance=True
    ),
    "classification": Panel(
        (("", ("val/classification/image/acc", "val/classification/text/acc")),),
        "top-1 accuracy (%)",
        "validation accuracy of the global heads",
        chance=True,
    ),
    "train_loss": Panel(
        (("", ("train/image/loss", "train/text/loss", "train/paired/loss")),),
        "local objective (sum of loss terms)",
        "clients' loss on their training data, mean over the clients of a kind",
        test_values=False,
    ),
}
TRAFFIC = {"bytes_up": "up: clients to server", "bytes_down": "down: server to clients"}
COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} an mmfed run folder?")
    return read_metrics_file(path)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json of a finished run, of either format, in the current keys (test/...); empty for a
    run still going (no test values to draw yet)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON object ({error.msg})") from error
    return upgrade_summary(summary) if isinstance(summary, dict) else summary


def _label(key: str) -> str:
    """``val/retrieval/i2t/R@1`` -> ``val i2t R@1``; ``train/image/loss`` -> ``image clients``."""
    if key.startswith("train/"):
        return f"{key.split('/')[1]} clients"
    parts = key.split("/")
    return " ".join([parts[0], *parts[2:]]) if parts[0] == "val" else key


def _mark_best(ax: Any, summary: dict[str, Any]) -> int | None:
    best = summary.get("best_round")
    if not best:
        return None
    selection = summary.get("selection_metric", "the selection metric")
    ax.axvline(best, color="0.4", linestyle="--", linewidth=1, label=f"best round {best} (val {selection})")
    return int(best)


def _figure(title: str, run_dir: Path, ylabel: str, subtitles: list[str]) -> tuple[Figure, list[Any]]:
    fig, axes = plt.subplots(
        1,
        len(subtitles),
        figsize=(6.4 if len(subtitles) == 1 else 9.6, 3.8),
        dpi=110,
        sharey=True,
        squeeze=False,
    )
    fig.suptitle(f"{run_dir.name}: {title}", fontsize=10)
    for ax, subtitle in zip(axes[0], subtitles, strict=True):
        if subtitle:
            ax.set_title(subtitle, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    return fig, list(axes[0])


def _draw(ax: Any, panel: Panel, keys: list[str], records: list[dict], summary: dict[str, Any]) -> None:
    """The validation curves of `keys`, the best round, the chosen model's test stars, chance lines."""
    best = _mark_best(ax, summary)
    starred = chance_drawn = False
    for color, key in zip(COLORS, keys, strict=False):
        points = [(r["round"], r[key]) for r in records if key in r]
        metric = key.removeprefix("val/")
        test_key = TEST_PREFIX + metric
        label = _label(key)
        if panel.test_values and best is not None and test_key in summary:
            label += f" (test {summary[test_key]:.1f})"
            ax.plot([best], [summary[test_key]], color=color, marker="*", markersize=11, linestyle="none")
            starred = True
        ax.plot(*zip(*points, strict=True), color=color, marker="o", markersize=3, label=label)
        if panel.chance and CHANCE_PREFIX + metric in summary:
            ax.axhline(summary[CHANCE_PREFIX + metric], color=color, linestyle=":", linewidth=1.2)
            chance_drawn = True
    handles, labels = ax.get_legend_handles_labels()
    if starred:
        handles.append(Line2D([], [], color="0.3", marker="*", markersize=9, linestyle="none"))
        labels.append(f"test, model of round {best}")
    if chance_drawn:
        handles.append(Line2D([], [], color="0.3", linestyle=":"))
        labels.append("chance (test split)")
    ax.legend(handles, labels, fontsize=7, loc="best")


def panel_figure(
    name: str, records: list[dict], summary: dict[str, Any], run_dir: str | Path
) -> Figure | None:
    """The figure of one panel of `PANELS` (None when the run logged none of its keys); `summary` of
    either format."""
    summary = upgrade_summary(summary)
    panel = PANELS[name]
    groups = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in panel.axes]
    groups = [(title, keys) for title, keys in groups if keys]
    if not groups:
        return None
    fig, axes = _figure(panel.title, Path(run_dir), panel.ylabel, [title for title, _ in groups])
    for ax, (_, keys) in zip(axes, groups, strict=True):
        _draw(ax, panel, keys, records, summary)
    fig.tight_layout()
    return fig


def traffic_figure(records: list[dict], run_dir: str | Path) -> Figure | None:
    """Bytes per round and direction, in MB (10^6 bytes), as side-by-side bars."""
    present = [k for k in TRAFFIC if any(k in r for r in records)]
    if not present:
        return None
    fig, (ax,) = _figure("traffic per round", Path(run_dir), "MB per round (10^6 bytes)", [""])
    width = 0.8 / len(present)
    for i, key in enumerate(present):
        rounds = [r["round"] for r in records if key in r]
        megabytes = [r[key] / 1e6 for r in records if key in r]
        offset = (i - (len(present) - 1) / 2) * width
        ax.bar([x + offset for x in rounds], megabytes, width=width, color=COLORS[i], label=TRAFFIC[key])
    formatter = ScalarFormatter(useOffset=False)  # no "1e7" above the axis: the ticks are the MB
    formatter.set_scientific(False)
    ax.yaxis.set_major_formatter(formatter)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write one PNG per panel (and traffic.png) into RUN_DIR/plots; returns the files written."""
    records = read_metrics(run_dir)
    summary = read_summary(run_dir)
    out = Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    figures = {name: panel_figure(name, records, summary, run_dir) for name in PANELS}
    figures["traffic"] = traffic_figure(records, run_dir)
    written: list[Path] = []
    for name, fig in figures.items():
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
