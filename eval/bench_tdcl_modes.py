"""What a TDCL training step costs in its two teacher modes: ``cached`` vs ``conditioned``.

- ``cached`` (reference code): the class-prompt representations F(x, p_c) do not depend on the local
  model; they are read from the teacher cache (filled before timing, as after a client's first
  round), so a step costs a cache read and a [B, C, D] contrast.
- ``conditioned`` (paper): the local feature z is injected into the prompt (added to its token embeddings) and
  the U-Net runs with gradients to z, once per candidate class, every step.

One step = the TDCL term's forward + backward into a small linear image encoder, batch `--batch`,
`--classes` classes (all C - 1 negatives unless `--negatives`). Medians of `--repeats` interleaved
repetitions; the ratio compares like with like within one invocation.

    python eval/bench_tdcl_modes.py                          # a tiny random SD (CPU, seconds)
    python eval/bench_tdcl_modes.py --arch sd15 --resolution 128 --batch 2 --negatives 3

``--arch sd15`` builds Stable Diffusion 1.5's architecture with random weights (eval/bench_teacher.py):
the real model's compute, no download. Writes a markdown line to stdout and JSON to
eval/results/bench_tdcl_modes/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import mmfed  # noqa: F401  (the torchvision guard, before diffusers/transformers)
from mmfed.algorithms.base import ClientRound
from mmfed.algorithms.feddifrc import TextDrivenContrastive
from mmfed.algorithms.teacher_space import (
    IMAGE_MATRIX,
    IMAGE_MEAN,
    IMAGE_OFFSET,
    TEXT_MATRIX,
    TEXT_MEAN,
    _padded,
    _rank,
    _unit_scale,
    layer_components,
)
from mmfed.protocol import Payload
from mmfed.teacher.features import teacher_features
from mmfed.teacher.model import TeacherSettings
from mmfed.teacher.reduce import LayerMoments, fit_layer_pca, fit_pca, rms_scaled
from mmfed.teacher.tiny import build_tiny_sd

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tdcl_modes"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "sd15"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default: model's)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=None)
    parser.add_argument("--dim", type=int, default=128, help="latent dimension D")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-tdcl-"))
    model = work / "sd" if args.arch == "tiny" else "sd15-random"
    if args.arch == "tiny":
        build_tiny_sd(model, seed=0, sample_size=16)
    settings = TeacherSettings(model=str(model), resolution=args.resolution, cache_dir=str(work / "cache"))
    features = teacher_features(settings, "bench")
    if args.arch == "sd15":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_teacher import sd15_teacher

        features._teacher = sd15_teacher(settings)
    teacher = features.teacher
    classes = (CLASSES * (args.classes // len(CLASSES) + 1))[: args.classes]
    classes = [f"{name} {i}" if i >= len(CLASSES) else name for i, name in enumerate(classes)]
    side = teacher.resolution
    images = torch.randint(0, 256, (args.batch, 3, side, side), dtype=torch.uint8)
    ids = [f"bench-{i}" for i in range(args.batch)]
    labels = torch.arange(args.batch) % args.classes

    # the maps, fitted once before timing: text PCA of the class prompts, per-layer PCA of the images
    prompts = features.prompts(classes)
    text_map = _padded(_unit_scale(fit_pca(prompts, _rank(prompts, args.dim)), prompts), args.dim)
    every = features.images_per_class(ids, images, classes)  # also fills the cache `cached` reads
    moments = LayerMoments.of(every.flatten(0, 1), features.block_widths())
    components = layer_components(args.dim, len(moments.widths), None)
    image_map = _padded(rms_scaled(fit_layer_pca(moments, components), moments), args.dim)
    tensors = {
        TEXT_MEAN: text_map.mean,
        TEXT_MATRIX: text_map.matrix,
        IMAGE_MEAN: image_map.mean,
        IMAGE_MATRIX: image_map.matrix,
        IMAGE_OFFSET: image_map.offset,
    }
    encoder = torch.nn.Linear(3 * side * side, args.dim)

    def term(mode: str) -> TextDrivenContrastive:
        made = TextDrivenContrastive(
            mode=mode, negatives=args.negatives, modalities=["image"], teacher=vars(settings), data="bench"
        )
        made.begin(
            ClientRound("image-0", "image", 1, Payload(tensors=tensors), None, image_classes=classes)  # type: ignore[arg-type]
        )
        made.view.features = features  # type: ignore[union-attr]  (the in-memory sd15 teacher)
        return made

    terms = {mode: term(mode) for mode in ("cached", "conditioned")}
    batch = {"ids": ids, "images": images, "image_labels": labels}

    def step(mode: str) -> float:
        encoder.zero_grad()
        began = time.perf_counter()
        z = encoder(images.float().flatten(1) / 255)
        loss = terms[mode](batch, {"image_emb": z}, None)["tdcl_image"]  # type: ignore[arg-type]
        loss.backward()
        return time.perf_counter() - began

    for mode in terms:  # warm-up (the conditioned mode's prompt tokens, allocator)
        step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in terms}
    for _ in range(args.repeats):
        for mode in terms:
            times[mode].append(step(mode))
    median = {mode: statistics.median(values) for mode, values in times.items()}
    candidates = args.classes if args.negatives is None else min(args.classes, 1 + args.negatives)
    result = {
        "arch": args.arch,
        "resolution": side,
        "batch": args.batch,
        "classes": args.classes,
        "candidates_per_sample": candidates,
        "dim": args.dim,
        "median_seconds_per_step": median,
        "ratio_conditioned_to_cached": median["conditioned"] / median["cached"],
        "times": times,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    print(
        f"| {args.arch} {side}px | B={args.batch}, C={args.classes}, {candidates} U-Net passes/step | "
        f"cached {median['cached'] * 1e3:.1f} ms | conditioned {median['conditioned'] * 1e3:.1f} ms | "
        f"{result['ratio_conditioned_to_cached']:.0f}x |"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"{args.arch}_{side}px_b{args.batch}_c{args.classes}_k{candidates}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
