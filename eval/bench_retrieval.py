"""Retrieval search cost at the COCO-5K shape: chunked torch and faiss against a naive full matrix.

Each variant runs in its own subprocess so its peak resident memory (ru_maxrss) is its own. The
naive variant is the reference-code way: one full N_img x N_txt score matrix, argsort per query.
Reports times and peak memory as ratios to the chunked torch backend, from one run on one machine.

    python eval/bench_retrieval.py [--images 5000] [--captions-per-image 5] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _variant(name: str, images: int, per_image: int, dim: int) -> dict[str, float]:
    import torch

    import mmfed  # noqa: F401
    from mmfed.metrics import retrieval_recall

    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(images, dim, generator=gen), dim=-1)
    text_to_image = torch.arange(images).repeat_interleave(per_image)
    text = torch.nn.functional.normalize(
        image[text_to_image] + 0.8 * torch.randn(len(text_to_image), dim, generator=gen), dim=-1
    )
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    if name == "naive":
        scores = image @ text.T  # [N_img, N_txt]: the whole matrix at once
        order = scores.argsort(dim=1, descending=True)
        first_hit = (text_to_image[order] == torch.arange(images)[:, None]).float().argmax(dim=1)
        i2t_r1 = float((first_hit < 1).float().mean() * 100)
        order_t = scores.T.argsort(dim=1, descending=True)
        t2i_r1 = float((order_t[:, 0] == text_to_image).float().mean() * 100)
        result = {"i2t/R@1": i2t_r1, "t2i/R@1": t2i_r1}
    else:
        result = retrieval_recall(image, text, text_to_image, backend=name)
    seconds = time.perf_counter() - began
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return {
        "seconds": seconds,
        "extra_peak_mb": peak_mb,
        "i2t/R@1": result["i2t/R@1"],
        "t2i/R@1": result["t2i/R@1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_variant(args.variant, args.images, args.captions_per_image, args.dim)))
        return
    rows = {}
    for name in ("torch", "faiss", "naive"):
        command = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--images",
            str(args.images),
            "--captions-per-image",
            str(args.captions_per_image),
            "--dim",
            str(args.dim),
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["torch"]
    print(f"{args.images} images x {args.captions_per_image} captions, D={args.dim}")
    print(f"{'variant':8} {'seconds':>8} {'x torch':>8} {'extra MB':>9} {'x torch':>8}  i2t R@1  t2i R@1")
    for name, row in rows.items():
        time_ratio = row["seconds"] / base["seconds"]
        memory_ratio = row["extra_peak_mb"] / max(base["extra_peak_mb"], 1)
        cost = f"{row['seconds']:8.2f} {time_ratio:8.2f} {row['extra_peak_mb']:9.0f} {memory_ratio:8.2f}"
        print(f"{name:8} {cost}  {row['i2t/R@1']:7.2f}  {row['t2i/R@1']:7.2f}")


if __name__ == "__main__":
    main()
