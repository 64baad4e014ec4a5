"""Diffusion-guided training on the synthetic world: FedAvg vs FedDifRC (TDCL, NDCR, both) vs
SemanticFL, with the pretrained domain teacher (`mmfed teacher pretrain`) and with a random teacher
of the same architecture, at Dirichlet alpha 0.1 and 0.5, over several seeds (mean ± std).

Each run is a real `mmfed train` (experiment `compare` plus the method's preset) in its own process;
finished runs are reused, so the script can be stopped and restarted. Teacher features go to one
cache folder per teacher (under the output folder), shared by every run with that teacher: the first
run of a teacher pays the extraction, later runs read the cache (the table reports both).

    python eval/compare_guided.py [--teacher PATH] [--seeds 0 1 2] [--alphas 0.1 0.5] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runs import cell, table_header, train_run, values

METHODS: dict[str, list[str]] = {
    "fedavg": ["experiment=compare"],
    "feddifrc-tdcl": ["experiment=[compare,feddifrc_tdcl]"],
    # our option, not the paper's: contrast only what the class prompt changes (mmfed/algorithms/feddifrc.py)
    "feddifrc-tdcl-centered": [
        "experiment=[compare,feddifrc_tdcl]",
        "algorithm.loss_terms.tdcl.center_classes=true",
    ],
    "feddifrc-ndcr": ["experiment=[compare,feddifrc_ndcr]"],
    "feddifrc": ["experiment=[compare,feddifrc]"],
    "semanticfl": ["experiment=[compare,semanticfl]"],
}
GUIDED = [m for m in METHODS if m != "fedavg"]
COLUMNS = {
    "i2t R@1": "test/retrieval/i2t/R@1",
    "t2i R@1": "test/retrieval/t2i/R@1",
    "RSum": "test/retrieval/rsum",
    "img acc": "test/classification/image/acc",
    "txt acc": "test/classification/text/acc",
}


def random_twin(pretrained: Path, out: Path) -> Path:
    """A teacher with the pretrained one's architecture, tokenizer and scheduler but random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import mmfed  # noqa: F401  (torchvision guard before diffusers)

    if (out / "model_index.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pretrained, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        cls.from_config(cls.load_config(pretrained / sub)).save_pretrained(tmp / sub)
    config = CLIPTextConfig.from_pretrained(pretrained / "text_encoder")
    CLIPTextModel(config).save_pretrained(tmp / "text_encoder")
    tmp.rename(out)
    return out


def run(method: str, teacher: str, folder_of: dict[str, Path], alpha: float, seed: int, root: Path) -> dict:
    tag = method if method == "fedavg" else f"{method}-{teacher}"
    overrides = [
        *METHODS[method],
        f"partition.alpha={alpha}",
        f"seed={seed}",
        f"teacher.model={folder_of[teacher]}",
        f"teacher.cache_dir={root / ('cache-' + teacher)}",
    ]
    return train_run(root / f"{tag}-a{alpha}-s{seed}", overrides, f"{tag:26} alpha={alpha} seed={seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=None, help="pretrained teacher (default: mmfed's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--teachers", nargs="+", default=["pretrained", "random"], choices=["pretrained", "random"]
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel (each gets cores / jobs threads)"
    )
    parser.add_argument("--out", type=Path, default=Path("eval/results/compare_guided"))
    args = parser.parse_args()
    import mmfed  # noqa: F401
    from mmfed.teacher.model import default_teacher

    pretrained = Path(args.teacher or default_teacher()).expanduser().resolve()
    if not (pretrained / "model_index.json").exists():
        raise SystemExit(f"no teacher at {pretrained}: run `mmfed teacher pretrain` first")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"  # run folders, caches and the random teacher (ignored by git)
    runs.mkdir(parents=True, exist_ok=True)
    folder_of = {"pretrained": pretrained, "random": random_twin(pretrained, runs / "random-teacher")}
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // args.jobs)))
    jobs = [
        (method, teacher, alpha, seed)
        for alpha in args.alphas
        for method in args.methods
        for teacher in (["pretrained"] if method == "fedavg" else args.teachers)
        for seed in args.seeds
    ]
    # the first run of each teacher fills its cache alone (no two processes extracting the same features)
    firsts = {t: next(j for j in jobs if j[1] == t and j[0] != "fedavg") for t in args.teachers}
    results = {}
    for job in firsts.values():
        results[job] = run(job[0], job[1], folder_of, job[2], job[3], runs)
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            job: pool.submit(run, *job[:2], folder_of, *job[2:], runs) for job in jobs if job not in results
        }
        results |= {job: future.result() for job, future in futures.items()}
    lines = [
        "Synthetic world, experiment `compare` (3 image + 3 text + 3 paired clients, 3,000 training rows, "
        f"5 rounds x 1 local epoch, 600 public pairs), test split; seeds {args.seeds}; mean ± std. "
        f"Pretrained teacher: {pretrained}; random: the same architecture with random weights.",
        "",
    ]
    table = {}
    for alpha in args.alphas:
        lines += table_header(f"Dirichlet alpha = {alpha}", ["method", "teacher", *COLUMNS, "wall s / run"])
        for method in args.methods:
            for teacher in ["pretrained"] if method == "fedavg" else args.teachers:
                summaries = [results[(method, teacher, alpha, seed)] for seed in args.seeds]
                row = {name: values(summaries, key) for name, key in COLUMNS.items()}
                row["wall"] = [s["_wall"] for s in summaries]
                table[f"{method}/{teacher}@{alpha}"] = row
                shown = "-" if method == "fedavg" else teacher
                lines.append(f"| {method} | {shown} | " + " | ".join(cell(v) for v in row.values()) + " |")
        lines.append("")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
