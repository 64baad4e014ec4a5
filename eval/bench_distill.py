"""Aggregating client representations of public data: chunked (mmfed) vs naive full-matrix.

The naive variant is how the CreamFL reference code scores a client's representations: for each
client a full N x N similarity matrix against the other modality's global features, a contrastive
score per row (positive minus log-sum-exp over all N), softmax over clients, weighted sum. mmfed's
`aggregate` scores the paired item only, chunk by chunk: O(chunk x K x D) memory. Each variant runs
in its own subprocess so its peak resident memory is its own; the ratio is from one run.

    python eval/bench_distill.py [--n 50000] [--clients 10] [--dim 512] [--naive-max 20000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _run(variant: str, n: int, clients: int, dim: int) -> dict[str, float]:
    import torch

    import mmfed  # noqa: F401
    from mmfed.algorithms.distill import aggregate

    gen = torch.Generator().manual_seed(0)
    reps = [torch.randn(n, dim, generator=gen).half() for _ in range(clients)]  # as received: fp16
    anchor = torch.randn(n, dim, generator=gen)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    if variant == "chunked":
        target, _ = aggregate(reps, anchor, temperature=0.1)
    else:
        g = torch.nn.functional.normalize(anchor, dim=-1)
        scores = []
        for r in reps:
            sim = torch.nn.functional.normalize(r.float(), dim=-1) @ g.T / 0.1  # [N, N]
            scores.append(sim.diagonal() - torch.logsumexp(sim, dim=1))
            del sim
        weights = torch.softmax(torch.stack(scores), dim=0)  # [K, N]
        target = (weights[..., None] * torch.stack([r.float() for r in reps])).sum(0)
    seconds = time.perf_counter() - began
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {"seconds": seconds, "extra_peak_mb": extra, "checksum": float(target.float().abs().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--naive-max", type=int, default=20000, help="largest N for the naive variant")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_run(args.variant, args.n[0], args.clients, args.dim)))
        return
    print(f"{args.clients} clients, D={args.dim}, fp16 representations")
    print(f"{'N':>7} {'variant':8} {'seconds':>8} {'extra MB':>9}")
    for n in args.n:
        rows = {}
        for variant in ("chunked", "naive"):
            if variant == "naive" and n > args.naive_max:
                need = n * n * 4 / 2**20
                print(
                    f"{n:7d} {variant:8} {'-':>8} {'-':>9} (not run: an N x N fp32 matrix is {need:,.0f} MB)"
                )
                continue
            command = [
                sys.executable,
                __file__,
                "--variant",
                variant,
                "--n",
                str(n),
                "--clients",
                str(args.clients),
                "--dim",
                str(args.dim),
            ]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            row = rows[variant]
            print(f"{n:7d} {variant:8} {row['seconds']:8.2f} {row['extra_peak_mb']:9.0f}", flush=True)
        if len(rows) == 2:
            c, v = rows["chunked"], rows["naive"]
            print(
                f"{n:7d} naive/chunked: time x{v['seconds'] / c['seconds']:.1f}, "
                f"memory x{v['extra_peak_mb'] / max(c['extra_peak_mb'], 1):.1f}"
            )


if __name__ == "__main__":
    main()
