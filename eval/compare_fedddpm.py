"""FedAvg vs FedDDPM vs FedDDPM+ on the synthetic world, at Dirichlet alpha 0.05 and 0.5, over seeds:
test image accuracy of the global model (mean ± std) and what the diffusion-generated auxiliary data
cost (client diffusion training, uploaded model bytes, server sampling and correction time).

Each run is a real `mmfed train` (experiment `compare` plus the method's preset, model selection on
validation image accuracy) in its own process; finished runs (with a summary.json) are reused, so
the script can be stopped and restarted. FedDDPM and FedDDPM+ of one (alpha, seed) train the same
client diffusion models: clients keep them in a shared cache (`cache_dir` of the client task) and
FedDDPM+ reuses FedDDPM's, reporting the training time measured when they were trained.

Sample quality: a "judge" CNN trained centrally on real images of another synthetic world (seed
1234) classifies every FedDDPM run's auxiliary set; its per-class accuracy on the generated images
says how recognisable the classes are (the judge's accuracy on the real test split is the ceiling).

    OMP_NUM_THREADS=1 python eval/compare_fedddpm.py [--seeds 0 1 2] [--alphas 0.05 0.5] [--jobs 2]
        [--scale small|large] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runs import cell, table_header, train_run  # eval/runs.py (the scripts run as `python eval/<script>.py`)

from mmfed.utils.io import summary_metric

COMMON = ["evaluation.selection_metric=classification/image/acc"]
METHODS: dict[str, list[str]] = {
    "fedavg": ["experiment=compare"],
    "fedddpm": ["experiment=[compare,fedddpm]"],
    # 5 rounds: a window of one round lets the rule fire up to twice (rounds 3 and 5)
    "fedddpm+": ["experiment=[compare,fedddpm_plus]", "algorithm.server_steps.fedddpm.window=1"],
}
# Diffusion settings per scale. small: what fits the 2-core CPU (the class_diffusion defaults);
# large: a wider U-Net trained 10x longer, for a GPU.
SCALES: dict[str, list[str]] = {
    "small": [],
    "large": [
        "algorithm.client_tasks.diffusion.block_out_channels=[32,64,64]",
        "algorithm.client_tasks.diffusion.max_steps=4000",
        "algorithm.client_tasks.diffusion.batch_size=64",
        "algorithm.server_steps.fedddpm.total_samples=2000",
        "algorithm.server_steps.fedddpm.sampling_steps=50",
    ],
}
JUDGE_WORLD = {"seed": 1234, "n_train": 12000}


def run(method: str, alpha: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    suffix = "" if args.scale == "small" else f"-{args.scale}"
    folder = args.out / "runs" / f"{method}-a{alpha}-s{seed}{suffix}"
    overrides = [
        *METHODS[method],
        *COMMON,
        f"partition.alpha={alpha}",
        f"seed={seed}",
        f"device={args.device}",
    ]
    if method != "fedavg":
        cache = args.out / "runs" / f"diffusion_cache_{args.scale}"
        overrides += [*SCALES[args.scale], f"algorithm.client_tasks.diffusion.cache_dir={cache}"]
    result = train_run(folder, overrides, f"{method:9} alpha={alpha} seed={seed}")
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    result["corrections"] = sum(r.get("server/fedddpm/fired", 0.0) for r in records)
    result["run_dir"] = str(folder)
    return result


# ----------------------------------------------------------------------------- sample quality
def judge(args: argparse.Namespace) -> tuple[Any, float, list[float]]:
    """A CNN trained on real images (another world), its real test accuracy overall and per class."""
    import torch
    import torch.nn.functional as F

    import mmfed  # noqa: F401
    from mmfed.data.synthetic import SyntheticWorld
    from mmfed.models.encoders import SmallCNN
    from mmfed.utils.seeding import numpy_rng, seed_torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    path = args.out / "runs" / "judge.pt"
    seed_torch(0, "judge")
    encoder = SmallCNN()
    model = torch.nn.Sequential(encoder, torch.nn.Linear(encoder.output_dim, 10))
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        train = SyntheticWorld(**JUDGE_WORLD).split("train")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for epoch in range(10):
            order = torch.from_numpy(numpy_rng(0, "judge", epoch).permutation(len(train)))
            for start in range(0, len(order), 64):
                rows = order[start : start + 64]
                loss = F.cross_entropy(model(encoder.prepare(train.images[rows])), train.image_labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    test = SyntheticWorld().split("test")  # the runs' test split (world seed 0)
    accuracy, per_class = judge_accuracy(model, encoder, test.images, test.image_labels)
    return (model, encoder), accuracy, per_class


def judge_accuracy(model: Any, encoder: Any, images: Any, labels: Any) -> tuple[float, list[float]]:
    import torch

    with torch.no_grad():
        predicted = torch.cat(
            [model(encoder.prepare(images[i : i + 500])).argmax(1) for i in range(0, len(images), 500)]
        )
    correct = (predicted == labels).float()
    per_class = [
        float(correct[labels == c].mean()) * 100 if (labels == c).any() else float("nan") for c in range(10)
    ]
    return float(correct.mean()) * 100, per_class


def aux_quality(run_dir: str, judged: Any) -> tuple[float, list[float], list[int]]:
    """The judge's accuracy on a run's auxiliary set: overall, per class, and the class counts."""
    import torch

    from mmfed.utils.io import load_torch

    state = load_torch(Path(run_dir) / "checkpoints" / "prepared.pt")["server"]["fedddpm"]
    labels = state["aux_labels"]
    accuracy, per_class = judge_accuracy(*judged, state["aux_images"], labels)
    return accuracy, per_class, torch.bincount(labels, minlength=10).tolist()


# ----------------------------------------------------------------------------- table
def mean(values: list[float]) -> str:
    values = [v for v in values if v == v]
    return f"{statistics.mean(values):.0f}" if values else "-"


COLUMNS = {
    "img acc (test)": ("test/classification/image/acc", 1, 1.0),
    "txt acc (test)": ("test/classification/text/acc", 1, 1.0),
    "RSum (test)": ("test/retrieval/rsum", 1, 1.0),
    "corrections": ("corrections", 1, 1.0),
    "client diffusion s": ("cost/client_diffusion_seconds", 0, 1.0),
    "upload MB": ("cost/upload_bytes", 2, 1e-6),
    "sampling s": ("cost/sampling_seconds", 1, 1.0),
    "correction s": ("cost/correction_seconds", 1, 1.0),
    "run wall s": ("wall_seconds", 0, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--scale", default="small", choices=list(SCALES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one thread)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/compare_fedddpm"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per run: --jobs runs share the machine
    grid = [(a, s) for a in args.alphas for s in args.seeds]
    began = time.perf_counter()
    results: dict[tuple[str, float, int], dict[str, Any]] = {}
    # FedDDPM+ after FedDDPM: its clients then find their diffusion models in the cache.
    waves = [[m for m in args.methods if m != "fedddpm+"], [m for m in args.methods if m == "fedddpm+"]]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for wave in waves:
            jobs = {(m, a, s): pool.submit(run, m, a, s, args) for m in wave for a, s in grid}
            results.update({key: job.result() for key, job in jobs.items()})
    elapsed = time.perf_counter() - began

    command = "OMP_NUM_THREADS=1 python eval/compare_fedddpm.py " + " ".join(sys.argv[1:])
    lines = [
        f"`{command.strip()}` (scale `{args.scale}`, device `{args.device}`). Synthetic world, experiment "
        "`compare` (3 image + 3 text + 3 paired clients, 3,000 training rows, 5 rounds x 1 local epoch), "
        f"seeds {args.seeds}, mean ± std over seeds; model selection on validation image accuracy, "
        "test split 1,000 images. Costs are totals per run (summary.json); FedDDPM+ reuses FedDDPM's "
        "client models from the cache but reports their measured training time.",
        "",
    ]
    table: dict[str, Any] = {}
    for alpha in args.alphas:
        lines += table_header(f"Dirichlet alpha = {alpha}", ["method", *COLUMNS])
        for method in args.methods:
            summaries = [results[(method, alpha, seed)] for seed in args.seeds]
            row = {
                name: [
                    float(summary_metric(s, key, 0.0 if key.startswith("cost/") else float("nan"))) * scale
                    for s in summaries
                ]
                for name, (key, _, scale) in COLUMNS.items()
            }
            table[f"{method}@{alpha}"] = row
            cells = [cell(values, COLUMNS[name][1]) for name, values in row.items()]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")

    if "fedddpm" in args.methods:
        judged, judge_acc, judge_per_class = judge(args)
        lines += [
            "**Sample quality**: accuracy (%) of the judge CNN (trained on real images of another world; "
            f"{judge_acc:.1f}% on the real test split) on each FedDDPM run's auxiliary set, per class "
            "(mean over seeds; '-': class not generated); n = generated images per run.",
            "",
            "| alpha | n | all | " + " | ".join(f"c{c}" for c in range(10)) + " |",
            "|---" * 13 + "|",
            "| real test | 1000 | "
            + f"{judge_acc:.1f} | "
            + " | ".join(f"{v:.0f}" for v in judge_per_class)
            + " |",
        ]
        for alpha in args.alphas:
            quality = [aux_quality(results[("fedddpm", alpha, s)]["run_dir"], judged) for s in args.seeds]
            per_class = [[q[1][c] for q in quality] for c in range(10)]
            table[f"quality@{alpha}"] = {"all": [q[0] for q in quality], "per_class": per_class}
            lines.append(
                f"| {alpha} | {sum(sum(q[2]) for q in quality) // len(quality)} | "
                + cell([q[0] for q in quality])
                + " | "
                + " | ".join(mean(v) for v in per_class)
                + " |"
            )
        lines.append("")
    trained = sum(r.get("_wall", 0.0) for r in results.values())  # each run's wall time when it was trained
    lines.append(
        f"Run time: {trained / 60:.1f} min summed over the runs as they were trained; this invocation "
        f"{elapsed / 60:.1f} min (finished runs are reused)."
    )
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "table" if args.scale == "small" else f"table_{args.scale}"
    (args.out / f"{name}.md").write_text(text + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(table, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
