"""The exact (published) ensemble score at scale: time against its matmul floor, extra peak memory.

FedAFD's SED and CreamFL's representation ensemble score each of K clients' N public features
against the N global features: log softmax over all N rows, i.e. K products [N, D] x [D, N]. The
reference code materialises each N x N fp32 matrix (10 GB at N = 50,000) and runs out of memory;
mmfed's `aggregate` computes it chunk by chunk of rows. This benchmark, in one invocation:

- time: `aggregate` (fp16 features as received, unit features, T = 1: normalisation, logits,
  bounded log-sum-exp, softmax over clients, weighted sum) against the floor it cannot beat, the K
  plain matmuls of the same row blocks into a reused [chunk, N] buffer (fp32 inputs prepared in
  advance, nothing else). Median of `--reps` interleaved repetitions; the ratio is exact / floor.
- memory: `aggregate` once more in a fresh subprocess; extra peak = the process's high-water RSS
  after the call minus its RSS just before it, with the high-water mark reset to the current RSS
  right before the call (Linux `/proc/self/clear_refs`), so input creation does not count. Not
  `getrusage`'s ru_maxrss: that survives fork + exec, so a child started by this (large) process
  would report the parent's RSS at fork time (a run here read 1,644 MB "extra" that way; the reset
  high-water mark read 342 MB). `--memory-clients` K for this run (default: `--clients`).
The machine's load average is recorded before and after (the timings are only as steady as it).

    python eval/bench_distill.py [--n 50000] [--clients 10] [--dim 512] [--reps 5]
        [--memory-clients K] [--chunk 1024] [--threads T] [--out eval/results/bench_distill]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def _inputs(n: int, clients: int, dim: int) -> tuple[list[Any], Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    anchor = torch.randn(n, dim, generator=gen)
    reps = []
    for _ in range(clients):  # client features near the global ones, sent as fp16
        reps.append((anchor + torch.randn(n, dim, generator=gen)).half())
    return reps, anchor


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _high_water_mb() -> float:
    """This process's peak RSS (VmHWM, kB), which `_reset_high_water` can reset."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark's memory figure needs Linux)")


def _reset_high_water() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _memory(n: int, clients: int, dim: int, chunk: int) -> dict[str, float]:
    from mmfed.algorithms.distill import aggregate

    reps, anchor = _inputs(n, clients, dim)
    reset = _reset_high_water()
    before = _rss_mb()
    began = time.perf_counter()
    target, weights = aggregate(reps, anchor, chunk_size=chunk)
    seconds = time.perf_counter() - began
    peak = _high_water_mb()
    return {
        "seconds": seconds,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "extra_peak_mb": peak - before,
        "high_water_reset": reset,  # False: the peak may include input creation (an upper bound)
        "checksum": float(target.abs().mean() + weights.max()),
    }


def _timing(n: int, clients: int, dim: int, chunk: int, reps_count: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from mmfed.algorithms.distill import aggregate

    reps, anchor = _inputs(n, clients, dim)
    keys = F.normalize(anchor, dim=-1)
    rows32 = [F.normalize(r.float(), dim=-1) for r in reps]  # the floor gets its inputs ready-made
    buffer = torch.empty(chunk, n)

    def floor() -> None:
        for rows in rows32:
            for start in range(0, n, chunk):
                block = rows[start : start + chunk]
                torch.matmul(block, keys.T, out=buffer[: len(block)])

    def exact() -> None:
        aggregate(reps, anchor, chunk_size=chunk)

    times: dict[str, list[float]] = {"floor": [], "exact": []}
    for _ in range(reps_count):
        for name, run in (("floor", floor), ("exact", exact)):
            began = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - began)
            print(f"  {name:5} {times[name][-1]:8.2f} s", flush=True)
    return {
        "seconds": times,
        "median_floor_s": statistics.median(times["floor"]),
        "median_exact_s": statistics.median(times["exact"]),
        "ratio_exact_to_floor": statistics.median(times["exact"]) / statistics.median(times["floor"]),
        "ratio_per_rep": [e / f for e, f in zip(times["exact"], times["floor"], strict=True)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--memory-clients", type=int)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--out", type=Path, default=Path("eval/results/bench_distill"))
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps(_memory(args.n, args.clients, args.dim, args.chunk)))
        return
    memory_clients = args.memory_clients or args.clients
    load_before = os.getloadavg()
    print(
        f"N={args.n} D={args.dim} chunk={args.chunk} threads={torch.get_num_threads()} "
        f"load {load_before[0]:.1f} on {os.cpu_count()} cpus"
    )
    print(f"timing: K={args.clients}, {args.reps} interleaved reps")
    timing = _timing(args.n, args.clients, args.dim, args.chunk, args.reps)
    print(f"memory: K={memory_clients}, fresh subprocess")
    command = [sys.executable, __file__, "--memory-only", "--n", str(args.n), "--dim", str(args.dim)]
    command += ["--clients", str(memory_clients), "--chunk", str(args.chunk)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    memory = json.loads(out.stdout.strip().splitlines()[-1])
    load_after = os.getloadavg()
    naive_mb = args.n * args.n * 4 / 2**20
    result = {
        "config": {
            "n": args.n,
            "dim": args.dim,
            "chunk": args.chunk,
            "timing_clients": args.clients,
            "memory_clients": memory_clients,
            "reps": args.reps,
            "threads": torch.get_num_threads(),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_avg_before": list(load_before),
            "load_avg_after": list(load_after),
        },
        "timing": timing,
        "memory": memory,
        "naive_nxn_fp32_mb_per_client": naive_mb,
    }
    print(
        f"time   exact / floor (K plain [N,D]x[D,N] matmuls): x{timing['ratio_exact_to_floor']:.3f} "
        f"(median {timing['median_exact_s']:.1f} s vs {timing['median_floor_s']:.1f} s; goal <= 1.3)"
    )
    print(
        f"memory extra peak RSS: {memory['extra_peak_mb']:.0f} MB at K={memory_clients} (goal <= 1024 MB; "
        f"the reference's N x N fp32 matrix alone: {naive_mb:,.0f} MB per client)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"n{args.n}_k{args.clients}_d{args.dim}.json"
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
