"""How long the default `mmfed train` takes, beside a fixed calibration workload timed in the same script.

Runs ``mmfed train quiet=true seed=S`` (plus any overrides) once per seed, each in a fresh process
and a throw-away run folder, and times the whole command (imports, data, rounds, final test,
plots). The calibration workload of `eval/profile_round.py` (one thread: 40 512^3 float32 matmuls
and 20 small-CNN training steps, median of 5) is timed before the first run, between runs and after
the last, so each run's time is also given in calibration units (its wall time over the median
calibration), a figure that survives the machine's speed drifting between sessions.

    python eval/bench_train.py [--seeds 0 1 2] [--label NAME] [override ...]

Writes ``eval/results/bench_train/<label>.md`` and ``.json`` (per run: wall, rounds, seconds per
round, rounds per minute, calibration units, and the test RSum / image accuracy, so a faster run
with other numbers is visible).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_round import calibration  # noqa: E402  (eval/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train"


def one_run(seed: int, overrides: list[str]) -> dict[str, float]:
    """`mmfed train` for one seed in a fresh process: wall seconds and what summary.json says."""
    folder = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        command = [sys.executable, "-m", "mmfed.cli", "train", "quiet=true", f"seed={seed}"]
        command += [*overrides, f"run_dir={folder / 'run'}"]
        began = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        summary = json.loads((folder / "run" / "summary.json").read_text())
        lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
        rounds = [json.loads(line)["wall_seconds"] for line in lines]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "seed": seed,
        "wall_s": wall,
        "rounds": len(rounds),
        "rounds_s": sum(rounds),
        "round_median_s": statistics.median(rounds),
        "rounds_per_min": 60 * len(rounds) / wall,
        "test_rsum": summary.get("test/retrieval/rsum", float("nan")),
        "test_image_acc": summary.get("test/classification/image/acc", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--label", default="default")
    parser.add_argument("overrides", nargs="*", help="mmfed train overrides (default: none)")
    args = parser.parse_args()
    calibrations = [calibration()["wall_s"]]
    runs = []
    for seed in args.seeds:
        runs.append(one_run(seed, args.overrides))
        calibrations.append(calibration()["wall_s"])
        print(f"seed {seed}: {runs[-1]['wall_s']:.1f} s, calibration {calibrations[-1]:.3f} s", flush=True)
    unit = statistics.median(calibrations)
    for run in runs:
        run["calibration_units"] = run["wall_s"] / unit
    lines = [
        f"`python eval/bench_train.py --seeds {' '.join(map(str, args.seeds))} {' '.join(args.overrides)}`"
        f" on {platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; calibration "
        f"{unit:.3f} s (median of {', '.join(f'{c:.3f}' for c in calibrations)})",
        "",
        "| seed | `mmfed train` wall | rounds | round median s | rounds / min | calibration units "
        "| test RSum | test image acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        minutes, seconds = divmod(run["wall_s"], 60)
        lines.append(
            f"| {run['seed']} | {int(minutes)} min {seconds:04.1f} s | {run['rounds_s']:.1f} s | "
            f"{run['round_median_s']:.2f} | {run['rounds_per_min']:.2f} | {run['calibration_units']:.1f} | "
            f"{run['test_rsum']:.2f} | {run['test_image_acc']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.label}.md").write_text(table + "\n")
    record = {"calibration_s": calibrations, "overrides": args.overrides, "runs": runs}
    (RESULTS / f"{args.label}.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
