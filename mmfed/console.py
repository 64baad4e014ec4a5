"""What `mmfed train` prints: progress while it runs, a short table when it ends.

Why a module: the run writes everything to its folder (metrics.jsonl, summary.json); the terminal
only needs to say how the run is going and, at the end, the result that counts (test metrics of the
model chosen on validation) beside its chance level, and where the files are.

Progress: on a terminal, tqdm bars (rounds, clients of a stage). Not on a terminal (a log file, a
pipe, CI), no bars (they would turn into hundreds of lines) but one line per round on stderr.
``quiet=true`` drops both, leaving the final table (and warnings): a quiet log.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("mmfed")

# The test metrics of the table, in this order (those the run reports; summary.json: test/<metric>).
TABLE_METRICS = (
    "retrieval/i2t/R@1",
    "retrieval/i2t/R@5",
    "retrieval/i2t/R@10",
    "retrieval/t2i/R@1",
    "retrieval/t2i/R@5",
    "retrieval/t2i/R@10",
    "retrieval/rsum",
    "classification/image/acc",
    "classification/text/acc",
)
CHANCE_PREFIX = "chance/"  # summary.json: chance level of test/<metric>, e.g. chance/retrieval/rsum
LOCAL_METRICS = ("classification/image/acc", "classification/text/acc", "retrieval/rsum")


def bar_disabled(wanted: bool = True) -> bool | None:
    """tqdm's ``disable`` argument: True when no bar is wanted; else None, which tqdm reads as
    "a bar on a terminal only", so a log file never fills with bar refreshes."""
    return None if wanted else True


def interactive() -> bool:
    """Whether progress goes to a terminal (tqdm writes to stderr)."""
    return sys.stderr.isatty()


def configure_progress(quiet: bool) -> None:
    """Progress for `mmfed train`: bars on a terminal, else one log line per round; none if quiet.

    Libraries' own bars (e.g. loading a teacher) follow tqdm's TQDM_DISABLE default, set here
    whenever bars are off.
    """
    if quiet or not interactive():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # the per-round lines of Run.train: only where no bar shows the round
    log.setLevel(logging.INFO if not quiet and not interactive() else logging.WARNING)


def stage_label(stage: str, round_: int) -> str:
    """How a client stage is named in bars and warnings ("round 3 fit", "final evaluation")."""
    if stage == "fit":
        return f"round {round_} fit"
    if stage == "evaluate":
        return "final evaluation (clients' local test splits)"
    if stage == "prepare":
        return "prepare stage (before round 1)"
    return f"round {round_} {stage}"


def _seconds(value: float) -> str:
    minutes, seconds = divmod(float(value), 60)
    return f"{int(minutes)} min {seconds:04.1f} s" if minutes else f"{seconds:.1f} s"


def _megabytes(value: float) -> str:
    return f"{value / 1e6:.1f} MB"


def format_summary(summary: dict[str, Any], run_dir: str | Path, total_seconds: float | None = None) -> str:
    """The end-of-run table: test metrics of the best-validation round beside chance, time, files.

    `summary` of either format (an old run's `mmfed report`: test metrics unprefixed)."""
    from mmfed.utils.io import TEST_PREFIX, upgrade_summary

    summary = upgrade_summary(summary)
    run = Path(run_dir)
    rounds, best = summary.get("rounds"), summary.get("best_round")
    selection = summary.get("selection_metric", "")
    best_value = summary.get(f"val/{selection}")
    took = f"rounds {_seconds(summary.get('wall_seconds', 0.0))}"
    if total_seconds is not None:
        took += f"; {_seconds(total_seconds)} with data, final test and plots"
    lines = [f"mmfed train: {rounds} rounds done ({took})"]
    chosen = f"the global model of round {best} of {rounds}"
    if best_value is not None:
        chosen += f", best validation {selection} = {best_value:.2f}"
    lines.append(f"test split, {chosen}:")
    rows = [key for key in TABLE_METRICS if TEST_PREFIX + key in summary]  # metric names less test/
    rows += sorted(
        name
        for name in (k.removeprefix(TEST_PREFIX) for k in summary if k.startswith(TEST_PREFIX))
        if name not in TABLE_METRICS and name.endswith(("/rsum", "/acc"))  # named protocols: coco-1k/...
    )
    width = max((len(k) for k in rows), default=6)
    if rows:
        lines.append(f"  {'metric':<{width}}  {'test':>7}  {'chance':>7}")
        for key in rows:
            chance = summary.get(CHANCE_PREFIX + key)
            shown = f"{chance:7.2f}" if isinstance(chance, int | float) else f"{'':>7}"
            lines.append(f"  {key:<{width}}  {float(summary[TEST_PREFIX + key]):7.2f}  {shown}")
    else:
        lines.append("  (the global model reports no test metric: see the per-client lines)")
    local = [
        (kind, metric)
        for kind in ("image", "text", "paired")
        for metric in LOCAL_METRICS
        if f"local/{kind}/{metric}/mean" in summary
    ]
    if local:
        lines.append("clients on their local test splits (mean ± std over the clients of a kind):")
        for kind, metric in local:
            mean, std = summary[f"local/{kind}/{metric}/mean"], summary.get(f"local/{kind}/{metric}/std", 0.0)
            lines.append(f"  {kind:<6}  {metric:<{width}}  {mean:7.2f} ± {std:.2f}")
    if "bytes_up" in summary:
        lines.append(
            f"traffic: {_megabytes(summary['bytes_up'])} up, {_megabytes(summary['bytes_down'])} down"
        )
    lines.append(f"run folder: {run}  (summary.json: every number; metrics.jsonl: per round)")
    plots = sorted((run / "plots").glob("*.png"))
    if plots:
        lines.append(f"plots: {run / 'plots'}/  ({', '.join(p.name for p in plots)})")
    return "\n".join(lines)
