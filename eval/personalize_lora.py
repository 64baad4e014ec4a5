"""Global vs LoRA-personalized models on each client's local test split, synthetic world.

For each Dirichlet alpha and seed: a FedAvg federation (experiment `compare`), then
`mmfed personalize` on it (a personal head + LoRA adapters per client, base weights frozen). The
table gives, per client kind, the local-test score of the global model and of the personalized
model (accuracy for image and text clients, mean of i2t/t2i R@1 on the client's own pairs for paired
clients): mean +- std over seeds of the mean over that kind's clients, how many clients improved,
and the adapters' size (parameters, fraction of the adapted encoders' parameters, file bytes).

Every step is a real CLI call in its own process; finished steps are reused, so the script can be
stopped and restarted.

    python eval/personalize_lora.py [--seeds 0 1 2] [--alphas 0.1 0.5] [--personalize epochs=5 rank=8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

KINDS = {"image": "image acc (%)", "text": "text acc (%)", "paired": "R@1 local pairs (%)"}


def call(args: list[str], what: str) -> None:
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mmfed.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {result.stderr.strip()[-800:]}")
    print(f"  {what}: {time.perf_counter() - began:.0f} s", flush=True)


def run(alpha: float, seed: int, root: Path, personalize: list[str]) -> dict:
    folder = root / f"fedavg-a{alpha}-s{seed}"
    if not (folder / "summary.json").exists():
        command = ["train", "experiment=compare", f"partition.alpha={alpha}", f"seed={seed}", "quiet=true"]
        command += [f"run_dir={folder}"] + (["resume=true"] if folder.exists() else [])
        call(command, f"federation alpha={alpha} seed={seed}")
    summary = folder / "personalized" / "summary.json"
    if not summary.exists() or json.loads(summary.read_text())["settings"] != _settings(personalize):
        call(["personalize", str(folder), *personalize], f"personalize alpha={alpha} seed={seed}")
    return json.loads(summary.read_text())


def _settings(overrides: list[str]) -> dict:
    from mmfed.personalize import settings_from

    return settings_from(overrides)[1]


def cell(values: list[float]) -> str:
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {std:.1f}"


def table(
    results: dict[float, list[dict]], seeds: list[int], run_config: dict, personalize: list[str]
) -> str:
    data, rounds = run_config["data"], run_config["rounds"]
    settings = _settings(personalize)
    lines = [
        f"Synthetic world, experiment `compare` ({data['n_train']:,} training rows, 3 image + 3 text + 3 "
        f"paired clients, FedAvg {rounds} rounds x {run_config['training']['local_epochs']} local epoch), "
        f"best-validation global model; personalization: {settings['epochs']} epochs, lr {settings['lr']}, "
        f"LoRA rank {settings['rank']}, alpha {settings['alpha']}, default targets. Local test split = 10% "
        f"of each client's rows. Seeds {seeds}: mean ± std over seeds of the mean over the kind's clients.",
        "",
        "| Dirichlet α | clients | metric | global | personalized | clients better / same / worse "
        "| adapter params | adapter / encoder | adapter file |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for alpha, summaries in results.items():
        for kind, metric in KINDS.items():
            rows = [[r for r in s["clients"].values() if r["kind"] == kind] for s in summaries]
            rows = [r for r in rows if r]
            if not rows:
                continue
            glob = [statistics.mean(c["global"] for c in r) for r in rows]
            pers = [statistics.mean(c["personalized"] for c in r) for r in rows]
            pairs = [(c["personalized"], c["global"]) for r in rows for c in r]
            changes = [
                sum(p > g for p, g in pairs),
                sum(p == g for p, g in pairs),
                sum(p < g for p, g in pairs),
            ]
            first = rows[0][0]
            lines.append(
                f"| {alpha} | {kind} | {metric} | {cell(glob)} | {cell(pers)} "
                f"| {changes[0]} / {changes[1]} / {changes[2]} "
                f"| {first['adapter_params']:,} | {100 * first['adapter_fraction']:.1f} % "
                f"| {first['adapter_file_bytes'] / 1024:.0f} KiB |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--personalize", nargs="*", default=[], help="personalize overrides, key=value")
    parser.add_argument("--out", type=Path, default=Path("eval/results/personalize_lora"))
    args = parser.parse_args()
    runs = args.out / "runs"
    began = time.perf_counter()
    results = {a: [run(a, s, runs, args.personalize) for s in args.seeds] for a in args.alphas}
    first = runs / f"fedavg-a{args.alphas[0]}-s{args.seeds[0]}" / "config.yaml"
    text = table(results, args.seeds, yaml.safe_load(first.read_text()), args.personalize)
    text += (
        f"\n\nTotal wall time {time.perf_counter() - began:.0f} s (this machine, runs reused where present)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
