"""The method-comparison table on the synthetic world: FedAvg, FedProx, MOON, CreamFL, FedAFD and
FedAFD's ablations, at Dirichlet alpha 0.1 and 0.5, over several seeds (mean +- std).

Each run is a real `mmfed train` (experiment `compare` plus the method's preset) in its own process;
finished runs (with a summary.json) are reused, so the script can be stopped and restarted.

    python eval/compare_methods.py [--seeds 0 1 2] [--alphas 0.1 0.5] [--methods fedavg fedafd ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runs import cell, table_header, train_run, values

METHODS: dict[str, list[str]] = {
    "fedavg": ["experiment=compare"],
    "fedprox": ["experiment=compare", "algorithm=fedprox"],
    "moon": ["experiment=compare", "algorithm=moon"],
    "creamfl": ["experiment=[compare,creamfl]"],
    "fedafd": ["experiment=[compare,fedafd]"],
    "fedafd-no-adversarial": ["experiment=[compare,fedafd_no_adversarial]"],
    "fedafd-no-fusion": ["experiment=[compare,fedafd_no_fusion]"],
    "fedafd-uniform": ["experiment=[compare,fedafd_uniform]"],
}
COLUMNS = {
    "i2t R@1": "test/retrieval/i2t/R@1",
    "t2i R@1": "test/retrieval/t2i/R@1",
    "RSum": "test/retrieval/rsum",
    "img acc (global)": "test/classification/image/acc",
    "txt acc (global)": "test/classification/text/acc",
    "img acc (clients)": "local/image/classification/image/acc/mean",
    "txt acc (clients)": "local/text/classification/text/acc/mean",
}


def run(method: str, alpha: float, seed: int, root: Path) -> dict:
    overrides = [*METHODS[method], f"partition.alpha={alpha}", f"seed={seed}"]
    return train_run(root / f"{method}-a{alpha}-s{seed}", overrides, f"{method:22} alpha={alpha} seed={seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("eval/results/compare_methods"))
    args = parser.parse_args()
    runs = args.out / "runs"
    lines = [
        f"Synthetic world, experiment `compare` (3 image + 3 text + 3 paired clients, 3,000 training rows, "
        f"5 rounds x 1 local epoch, 600 public pairs), test split 1,000 images x 5 captions; "
        f"seeds {args.seeds}; "
        "mean ± std over seeds. 'global': the server model; 'clients': each client's own model on its "
        "local test split, averaged over clients of that kind.",
        "",
    ]
    table = {}
    for alpha in args.alphas:
        lines += table_header(f"Dirichlet alpha = {alpha}", ["method", *COLUMNS])
        for method in args.methods:
            summaries = [run(method, alpha, seed, runs) for seed in args.seeds]
            row = {name: values(summaries, key) for name, key in COLUMNS.items()}
            table[f"{method}@{alpha}"] = row
            lines.append(f"| {method} | " + " | ".join(cell(v) for v in row.values()) + " |")
        lines.append("")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "table.json").write_text(json.dumps(table, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
