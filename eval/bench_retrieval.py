"""Retrieval R@K at the COCO-5K shape, as a ratio to its floor: one full similarity matmul.

Everything R@1/5/10 needs beyond the N_img x N_txt scores is a comparison and a count per query,
so the time of the one full ``images @ texts.T`` (measured here, in the same process) is the floor
any exact method pays. Variants, interleaved repetition by repetition (median of ``--repeats``):

- ``floor``: ``images @ texts.T`` once (the whole matrix at once, 0.5 GB at COCO-5K);
- ``torch``: ``retrieval_recall(backend="torch")``: both directions, exact, pessimistic ties;
- ``torch+1k``: ``retrieval_protocol(backend="torch")``: the same plus the five COCO 1K folds;
- ``faiss``: ``retrieval_recall(backend="faiss")`` (IndexFlatIP top-k search);
- ``naive`` (``--naive``): the reference-code way, the full matrix and an argsort per query.

Times are wall and CPU (``time.process_time``: what this process computed, less sensitive to other
jobs on a shared machine); each is reported as a ratio to the floor of the same repetition
round. Extra peak memory is the rise of the resident set's high-water mark (Linux
``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs`` before each variant) above
the resident size before it. Writes a table to stdout and JSON to eval/results/bench_retrieval/.

    python eval/bench_retrieval.py [--images 5000] [--captions-per-image 5] [--dim 512] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mmfed  # noqa: F401  (the torchvision guard, before torchmetrics)
from mmfed.metrics import retrieval_protocol, retrieval_recall

RESULTS = Path(__file__).resolve().parent / "results" / "bench_retrieval"


def _status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _measure(run: Callable[[], Any]) -> tuple[float, float, float | None, Any]:
    """(wall s, CPU s, extra peak MB or None, result) of one call."""
    can_reset = _reset_peak()
    before = _status_kb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _status_kb("VmHWM")
    extra = (peak - before) / 1024 if can_reset and peak is not None and before is not None else None
    return wall, cpu, extra, result


def coco_like(images: int, per_image: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit image embeddings, captions = their image + noise (R@K well inside (0, 100))."""
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(images, dim, generator=gen), dim=-1)
    text_to_image = torch.arange(images).repeat_interleave(per_image)
    noise = torch.randn(len(text_to_image), dim, generator=gen)
    text = torch.nn.functional.normalize(image[text_to_image] + 0.8 * noise, dim=-1)
    return image, text, text_to_image


def naive(image: torch.Tensor, text: torch.Tensor, text_to_image: torch.Tensor) -> dict[str, float]:
    """The reference-code way: the whole matrix, an argsort per query (R@1 only, index-order ties)."""
    scores = image @ text.T  # [N_img, N_txt]
    order = scores.argsort(dim=1, descending=True)
    first_hit = (text_to_image[order] == torch.arange(len(image))[:, None]).float().argmax(dim=1)
    order_t = scores.T.argsort(dim=1, descending=True)
    return {
        "i2t/R@1": float((first_hit < 1).float().mean() * 100),
        "t2i/R@1": float((order_t[:, 0] == text_to_image).float().mean() * 100),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--naive", action="store_true", help="also time the full-matrix argsort")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    image, text, t2i = coco_like(args.images, args.captions_per_image, args.dim)
    chunk = args.chunk_size
    variants: dict[str, Callable[[], Any]] = {
        "floor": lambda: image @ text.T,
        "torch": lambda: retrieval_recall(image, text, t2i, chunk_size=chunk, backend="torch"),
        "torch+1k": lambda: retrieval_protocol(image, text, t2i, chunk_size=chunk, backend="torch"),
    }
    if not args.no_faiss:
        variants["faiss"] = lambda: retrieval_recall(image, text, t2i, chunk_size=chunk, backend="faiss")
    if args.naive:
        variants["naive"] = lambda: naive(image, text, t2i)
    for run in variants.values():  # warm-up: first-call allocations, faiss/torch lazy init
        run()

    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    wall_ratios: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ratios: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[float]] = {name: [] for name in variants}
    results: dict[str, Any] = {}
    for _ in range(args.repeats):
        this_round: dict[str, tuple[float, float]] = {}
        for name, run in variants.items():
            wall, cpu, extra, result = _measure(run)
            if name != "floor":  # the floor's result is the 0.5 GB matrix: dropped at once
                results[name] = result
            del result
            this_round[name] = (wall, cpu)
            walls[name].append(wall)
            cpus[name].append(cpu)
            if extra is not None:
                peaks[name].append(extra)
        for name, (wall, cpu) in this_round.items():
            wall_ratios[name].append(wall / this_round["floor"][0])
            cpu_ratios[name].append(cpu / this_round["floor"][1])

    exact = results["torch"]
    if "faiss" in results and results["faiss"] != exact:
        raise SystemExit(f"faiss and torch disagree: {results['faiss']} vs {exact}")
    rows = {
        name: {
            "wall_s": statistics.median(walls[name]),
            "cpu_s": statistics.median(cpus[name]),
            "wall_x_floor": statistics.median(wall_ratios[name]),
            "cpu_x_floor": statistics.median(cpu_ratios[name]),
            "extra_peak_mb": max(peaks[name]) if peaks[name] else None,
            "wall_all": walls[name],
            "cpu_all": cpus[name],
        }
        for name in variants
    }
    shape = f"{args.images} images x {args.captions_per_image} captions, D={args.dim}"
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"{shape}; {machine}; median of {args.repeats} interleaved repetitions")
    print("| variant | wall s | x floor (wall) | CPU s | x floor (CPU) | extra peak MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        peak = "n/a" if row["extra_peak_mb"] is None else f"{row['extra_peak_mb']:.0f}"
        print(
            f"| {name} | {row['wall_s']:.2f} | {row['wall_x_floor']:.2f} | {row['cpu_s']:.2f} "
            f"| {row['cpu_x_floor']:.2f} | {peak} |"
        )
    print("torch R@K:", json.dumps({k: round(v, 2) for k, v in exact.items()}))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"coco{args.images}x{args.captions_per_image}-d{args.dim}-t{torch.get_num_threads()}.json"
    payload = {
        "shape": shape,
        "torch_threads": torch.get_num_threads(),
        "chunk_size": chunk,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "variants": rows,
        "recall": exact,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
