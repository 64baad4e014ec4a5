"""What the comparison scripts share: run one `mmfed train` in its own process (reused when its
summary exists, resumed when it was interrupted), read its metrics and format mean ± std cells.

The scripts run as ``python eval/<script>.py``, so this module is importable as ``runs``. Summaries
written before the ``test/`` prefix (test metrics unprefixed) are read too: `values` goes through
`mmfed.utils.io.summary_metric`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mmfed.utils.io import summary_metric


def train_run(folder: Path, overrides: list[str], label: str) -> dict:
    """The summary of the run in `folder`, training it first (``quiet=true``) unless it finished.

    The wall time of the training process is kept in ``wall_seconds.txt`` and returned as ``_wall``.
    """
    summary = folder / "summary.json"
    wall = folder / "wall_seconds.txt"
    if not summary.exists():
        command = [sys.executable, "-m", "mmfed.cli", "train", *overrides, "quiet=true", f"run_dir={folder}"]
        if folder.exists():
            command.append("resume=true")
        began = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{label} failed: {result.stderr.strip()[-800:]}")
        seconds = time.perf_counter() - began
        wall.write_text(f"{seconds:.1f}\n")
        print(f"  {label}: {seconds:.0f} s", flush=True)
    result = json.loads(summary.read_text())
    if wall.exists():
        result["_wall"] = float(wall.read_text())
    return result


def values(summaries: list[dict], key: str) -> list[float]:
    """`key` (``test/retrieval/rsum``, ``local/...``; a bare ``retrieval/rsum`` means its test value) of
    each summary that has it, old or new format."""
    found = (summary_metric(summary, key) for summary in summaries)
    return [float(value) for value in found if value is not None]


def cell(values: list[float], digits: int = 1) -> str:
    """``mean ± std`` (population std over seeds) of the measured values (NaN: not measured), or ``-``."""
    values = [v for v in values if v == v]
    if not values:
        return "-"
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def table_header(title: str, columns: list[str]) -> list[str]:
    """The lines that open one markdown table of a comparison: a bold title, a blank line, the header."""
    return [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
