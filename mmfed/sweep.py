"""`mmfed train -m seed=0,1,2 algorithm=fedavg,fedprox`: every combination, each in its own run folder.

Hydra's override grammar (``a=1,2``, ``range(0,3)``, ``choice(...)``) is expanded by Hydra's basic
sweeper into the cartesian product, in command-line order. Run i goes to
``<sweep_dir>/<ii>_<its swept overrides>`` (``sweep_dir`` null: ``runs/sweep-<time>``); runs
are trained one after another in this process. A run that fails (a bad value in one combination,
an error while training) is recorded with its one-line error (the traceback in its folder's
``error.txt``) and the sweep goes on. ``<sweep_dir>/sweep.json`` (rewritten after every run, so an
interrupted sweep keeps its record) lists every run's overrides, status, time and test score, plus
the `mmfed compare` table of the finished runs, which is also printed (curves and compare.json
in ``<sweep_dir>/compare``). Exit code 0 when every run
finished, 1 when some failed.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any

from mmfed.config import ConfigError
from mmfed.utils.io import save_json, summary_metric

RESERVED = ("run_dir", "name")  # set per run by the sweep


def expand(overrides: list[str]) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """(fixed overrides, every combination's full overrides, every combination's swept overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from mmfed.validation import parse_overrides

    parsed = parse_overrides(overrides)
    for override in parsed:
        if override.key_or_group in RESERVED:
            raise ConfigError(
                f"config key '{override.key_or_group}' cannot be set in a sweep (each run gets "
                "<sweep_dir>/<NN>_<overrides>); set sweep_dir=... instead"
            )
    swept = [i for i, o in enumerate(parsed) if o.is_sweep_override()]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    combos = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    return fixed, combos, [[combo[i] for i in swept] for combo in combos]


def folder_name(index: int, swept: list[str]) -> str:
    label = ",".join(item.lstrip("+~").replace("/", ".") for item in swept)
    return f"{index:02d}_{label}" if label else f"{index:02d}"


def run_sweep(overrides: list[str], config_path: str | None = None) -> int:
    from mmfed.compare import compare, format_table
    from mmfed.composition import compose
    from mmfed.composition import one_line as _one_line
    from mmfed.federation.launch import train

    fixed, combos, swept = expand(overrides)
    base = compose(fixed, config_path)  # bad fixed overrides stop here, before any run
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(str(base.sweep_dir)) if base.sweep_dir else Path("runs") / f"sweep-{stamp}"
    record_file = sweep_dir / "sweep.json"
    if record_file.exists() and not base.resume:
        raise ConfigError(
            f"config key 'sweep_dir': {sweep_dir} already holds a sweep; choose another sweep_dir "
            "or pass resume=true to continue its runs"
        )
    if base.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    record: dict[str, Any] = {"sweep_dir": str(sweep_dir), "overrides": overrides, "runs": []}
    for index, (combo, items) in enumerate(zip(combos, swept, strict=True)):
        folder = sweep_dir / folder_name(index, items)
        entry: dict[str, Any] = {"index": index, "overrides": items, "run_dir": str(folder)}
        print(f"sweep run {index + 1}/{len(combos)}: {' '.join(items) or '(no swept keys)'}", flush=True)
        began = time.perf_counter()
        try:
            placed = [f"run_dir='{folder}'", f"name='{folder.name}'", f"sweep_dir='{sweep_dir}'"]
            cfg = compose([*combo, *placed], config_path)  # sweep_dir recorded: a resumed sweep matches
            summary = train(cfg)
            metric = summary.get("selection_metric")
            entry.update(status="ok", selection_metric=metric, test=summary_metric(summary, metric))
        except Exception as error:  # one run's failure must not stop the sweep
            entry.update(status="failed", error=_one_line(error))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.txt").write_text(traceback.format_exc())
            print(f"  failed: {entry['error']}", flush=True)
        entry["seconds"] = round(time.perf_counter() - began, 3)
        record["runs"].append(entry)
        save_json(record, record_file)
    finished = [e["run_dir"] for e in record["runs"] if e["status"] == "ok"]
    print(format_status(record))
    if finished:
        comparison, _ = compare(finished, sweep_dir / "compare")  # table, compare.json, curves
        record["compare"] = comparison
        save_json(record, record_file)
        print(format_table(comparison))
    print(f"sweep folder: {sweep_dir} ({len(finished)} of {len(combos)} runs finished; {record_file.name})")
    return 0 if len(finished) == len(combos) else 1


def format_status(record: dict[str, Any]) -> str:
    """One Markdown row per run: its swept overrides, status (or error) and test score."""
    lines = ["| # | overrides | status | test | seconds |", "|---|---|---|---|---|"]
    for entry in record["runs"]:
        if entry["status"] == "ok":
            score = entry.get("test")
            status = "ok"
            test = f"{entry['selection_metric']} {score:.2f}" if isinstance(score, (int, float)) else "-"
        else:
            status, test = f"failed: {entry['error']}", "-"
        items = " ".join(entry["overrides"])
        lines.append(f"| {entry['index']} | {items} | {status} | {test} | {entry['seconds']:.1f} |")
    return "\n".join(lines)
