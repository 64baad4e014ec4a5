"""Chance levels: what a model that ranks or guesses uniformly at random scores, in percent.

Why: a result means little without its floor. On a small synthetic test split R@10 of a random
ranking is far from 0 (10 of 60 images: 16.7 %), so the end-of-run table prints these next to the
test metrics. Keys are those of `mmfed.evaluation.Evaluator` (``retrieval/i2t/R@K`` ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def i2t_recall_chance(captions_per_image: Sequence[int], k: int) -> float:
    """Expected image->text R@K (percent) of a uniformly random caption ranking.

    An image with c of the M captions is a hit unless all K top captions are negatives:
    P(hit) = 1 - C(M - c, K) / C(M, K) = 1 - prod_{j<K} (M - c - j) / (M - j); averaged over images.
    """
    total = sum(captions_per_image)
    if not captions_per_image or total == 0:
        raise ValueError("captions_per_image must hold at least one caption")
    hits = 0.0
    for c in captions_per_image:
        miss = 1.0
        for j in range(min(k, total)):
            miss *= max(total - c - j, 0) / (total - j)
        hits += 1.0 - miss
    return 100.0 * hits / len(captions_per_image)


def t2i_recall_chance(num_images: int, k: int) -> float:
    """Expected text->image R@K (percent): one positive among `num_images`, so min(K, N) / N."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be >= 1")
    return 100.0 * min(k, num_images) / num_images


def chance_levels(
    captions_per_image: Sequence[int] | None,
    image_classes: int,
    text_classes: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Chance value of every metric the split allows: retrieval (if it has captions per image),
    ``classification/<side>/acc`` = 100 / classes (uniform guessing) where it has classes."""
    out: dict[str, float] = {}
    if captions_per_image:
        for k in ks:
            out[f"retrieval/i2t/R@{k}"] = i2t_recall_chance(captions_per_image, k)
        for k in ks:
            out[f"retrieval/t2i/R@{k}"] = t2i_recall_chance(len(captions_per_image), k)
        out["retrieval/rsum"] = sum(out.values())
        out["retrieval/rsum@1"] = i2t_recall_chance(captions_per_image, 1) + t2i_recall_chance(
            len(captions_per_image), 1
        )
    for side, classes in (("image", image_classes), ("text", text_classes)):
        if classes > 0:
            out[f"classification/{side}/acc"] = 100.0 / classes
    return out


def split_chance(split: Any, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`chance_levels` of a `MultimodalSplit` (retrieval needs both images and captions)."""
    paired = split.images is not None and split.captions is not None
    return chance_levels(
        [len(captions) for captions in split.captions] if paired else None,
        len(split.image_classes) if split.image_labels is not None else 0,
        len(split.text_classes) if split.text_labels is not None else 0,
        ks,
    )
