"""The cost of a diffusion-guided round with a cold and with a warm teacher-feature cache.

Runs (each a real `mmfed train` process, experiment `compare`, `--rounds` rounds):
- fedavg: the unguided reference;
- <method> cold: an empty cache folder: round 1 fits the teacher maps on public data and computes every
  client sample's features (TDCL: under every class prompt); later rounds compute only captions not
  drawn before;
- <method> warm: the same cache after `mmfed teacher extract` of the train and public splits: no
  round may run a teacher forward pass (checked: the script fails otherwise).
Per round it reports wall seconds, teacher forward batches, cache hits and misses, and ratios to the
FedAvg round measured in the same invocation.

    python eval/bench_guided_round.py [--teacher PATH] [--method feddifrc|semanticfl|feddifrc_tdcl]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from runs import train_run


def rounds_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def teacher_counts(record: dict, step: str) -> tuple[float, float, float]:
    prefix = f"server/{step}/teacher/"
    return (record[prefix + "forward_batches"], record[prefix + "hits"], record[prefix + "misses"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--teacher", type=Path, default=None, help="teacher folder (default: mmfed's pretrained)"
    )
    parser.add_argument("--method", default="feddifrc", choices=["feddifrc", "feddifrc_tdcl", "semanticfl"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("eval/results/bench_guided_round"))
    args = parser.parse_args()
    import mmfed  # noqa: F401
    from mmfed.teacher.model import default_teacher

    teacher = Path(args.teacher or default_teacher()).expanduser().resolve()
    step = "anchors" if args.method == "semanticfl" else "teacher_space"
    runs = args.out / "runs"  # run folders and the cache (ignored by git); table.md and result.json beside
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    cache = runs / "cache"
    common = [
        "experiment=compare",
        f"rounds={args.rounds}",
        f"teacher.model={teacher}",
        f"teacher.cache_dir={cache}",
    ]
    guided = [f"experiment=[compare,{args.method}]", *common[1:]]
    train_run(runs / "fedavg", common, "fedavg")
    train_run(runs / "cold", guided, f"{args.method} cold cache")
    for split in ("train", "public"):
        subprocess.run(
            [sys.executable, "-m", "mmfed.cli", "teacher", "extract", *guided, f"split={split}", "quiet=true"]
            + ["features=text,image,image_classes,prompts"],
            check=True,
            capture_output=True,
        )
    train_run(runs / "warm", guided, f"{args.method} warm cache")

    reference = [r["wall_seconds"] for r in rounds_of(runs / "fedavg")]
    lines = [
        f"`{args.method}` vs FedAvg, experiment `compare`, teacher {teacher.name}, {platform.node()} "
        f"({platform.processor() or platform.machine()}), one invocation of "
        f"`python eval/bench_guided_round.py "
        f"--method {args.method}`.",
        "",
        "| run | round | wall s | x FedAvg round | teacher forward batches | cache hits | cache misses |",
        "|---|---|---|---|---|---|---|",
    ]
    result: dict[str, list[dict]] = {"fedavg": [{"wall_seconds": s} for s in reference]}
    for run in ("cold", "warm"):
        result[run] = []
        for index, record in enumerate(rounds_of(runs / run)):
            batches, hits, misses = teacher_counts(record, step)
            wall = record["wall_seconds"]
            ratio = wall / reference[index]
            result[run].append(
                {"wall_seconds": wall, "forward_batches": batches, "hits": hits, "misses": misses}
            )
            lines.append(
                f"| {run} | {index + 1} | {wall:.1f} | {ratio:.2f} | {batches:.0f} | {hits:.0f} "
                f"| {misses:.0f} |"
            )
            if run == "warm" and batches:
                raise SystemExit(f"warm round {index + 1} ran {batches:.0f} teacher batches; expected none")
    for index, wall in enumerate(reference):
        lines.append(f"| fedavg | {index + 1} | {wall:.1f} | 1.00 | - | - | - |")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
