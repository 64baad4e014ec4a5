"""Image<->text retrieval recall under the Flickr30k / COCO protocol.

No torchmetrics here (it imports torchvision and transformers: seconds): the mergeable
`RetrievalRecall` built on it lives in `mmfed.metrics.stateful`, so an evaluation imports only torch.

Why a module of our own rather than torchmetrics' retrieval metrics: those take a flat
(query, item, score) list, i.e. the full N_img x N_txt score matrix, and break ties in the
query's favour. For a 25k-caption COCO-5K evaluation the matrix is large, and for a model that
has collapsed (all embeddings equal) favourable tie-breaking reports a perfect score. Here the
scores are computed a chunk of queries at a time and ties count against the query.

Cost: the torch backend computes each image-caption score once, in tiles, and counts both
directions (and the 1K folds) from the same tile, so it costs about one full similarity matmul
(measured 1.13x, 1.18x with the folds, eval/bench_retrieval.py); see `_tiled_ranks`.

Ranking rule (both directions, both backends): the rank of a query is the number of NEGATIVE
gallery items whose score is >= the score of the query's best positive; the query is a hit at K
iff rank < K. Image->text: the positives of an image are all of its captions. Text->image: the
positive of a caption is its one image.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_KS",
    "retrieval_protocol",
    "retrieval_recall",
]

Backend = Literal["auto", "torch", "faiss"]
_BACKENDS: tuple[str, ...] = ("auto", "torch", "faiss")
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@functools.cache
def _faiss_available() -> bool:
    """Import rather than find_spec: an installed faiss can still fail to load its library."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str) -> str:
    """Map "auto" to a concrete backend: torch, measured the faster (eval/bench_retrieval.py).

    The torch backend scores every pair once for both directions and the 1K folds, 1.1-1.2x one
    full similarity matmul; faiss searches each direction separately (two matmuls' worth of
    scores plus a top-k), and needs a second search per fold.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; expected one of {_BACKENDS}")
    if backend == "auto":
        return "torch"
    if backend == "faiss" and not _faiss_available():
        raise ValueError(
            "backend='faiss' needs the faiss package, which is not importable; use 'torch' or 'auto'"
        )
    return backend


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Sorted, de-duplicated cut-offs; each must be a positive int."""
    values = tuple(ks)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"ks={ks!r} is invalid; expected a non-empty sequence of ints >= 1")
    return tuple(sorted(set(values)))


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected an int >= 1")
    return value


def _check_inputs(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
    """Reject inputs that would make recall undefined or silently wrong."""
    if not isinstance(image_emb, Tensor) or image_emb.ndim != 2:
        raise ValueError(f"image_emb must be a 2-D tensor [N_img, D]; got {_describe(image_emb)}")
    if not isinstance(text_emb, Tensor) or text_emb.ndim != 2:
        raise ValueError(f"text_emb must be a 2-D tensor [N_txt, D]; got {_describe(text_emb)}")
    if not isinstance(text_to_image, Tensor) or text_to_image.ndim != 1:
        raise ValueError(f"text_to_image must be a 1-D tensor [N_txt]; got {_describe(text_to_image)}")
    if text_to_image.is_floating_point() or text_to_image.is_complex() or text_to_image.dtype == torch.bool:
        raise ValueError(f"text_to_image.dtype={text_to_image.dtype} is invalid; expected an integer dtype")
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if n_img == 0:
        raise ValueError(f"image_emb.shape={tuple(image_emb.shape)} is empty; expected >= 1 image")
    if n_txt == 0:
        raise ValueError(f"text_emb.shape={tuple(text_emb.shape)} is empty; expected >= 1 caption")
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embedding dims differ: image_emb D={image_emb.shape[1]}, text_emb D={text_emb.shape[1]}; "
            "expected equal D"
        )
    if text_to_image.shape[0] != n_txt:
        raise ValueError(
            f"text_to_image has {text_to_image.shape[0]} entries; expected one per caption ({n_txt})"
        )
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(f"text_to_image values span [{lo}, {hi}]; expected image indices in [0, {n_img})")
    counts = torch.bincount(text_to_image.long(), minlength=n_img)  # [N_img]
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()
        raise ValueError(
            f"text_to_image leaves {missing.numel()} image(s) without a caption (first: image "
            f"{int(missing[0])}); expected >= 1 caption per image"
        )
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{name} contains NaN or inf; expected finite values")


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape={tuple(x.shape)}, dtype={x.dtype}"
    return f"type={type(x).__name__}"


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------


def _chunk_bounds(n_img: int, chunk_size: int, fold_size: int | None) -> list[int]:
    """Image chunk boundaries: every chunk_size images and every fold boundary (no chunk spans two folds)."""
    bounds = set(range(0, n_img, chunk_size)) | {n_img}
    if fold_size is not None:
        bounds |= set(range(0, (n_img // fold_size) * fold_size + 1, fold_size))
    return sorted(bounds)


def _tiled_ranks(
    images: Tensor, texts: Tensor, text_to_image: Tensor, max_k: int, chunk_size: int, fold_size: int | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Exact pessimistic ranks of both directions (and of the 1K folds) from ONE pass of score tiles.

    Captions are put in image order, so the captions of an image chunk are one contiguous column
    group and the score matrix is a grid of tiles (image chunk x caption group). The diagonal tiles
    hold every positive; they are computed first, giving each image its best positive score and each
    caption its positive score (the thresholds). Then every tile (the diagonal ones kept, the others
    computed once into a reused buffer) is compared with both thresholds and counted: rows count
    i2t (captions scoring >= the image's best positive), columns count t2i (images scoring >= the
    caption's positive). One similarity matmul in total, two comparisons and two sums per score, no
    top-k or sort. A tile whose chunk and group lie in the same 1K fold also counts for the fold, so
    the folds cost nothing extra. All tiles have the same shape (chunk x its captions) and K, so a
    positive and a negative with identical vectors get identical scores (ties stay exact).

    Returns (i2t ranks [N_img], t2i ranks [N_txt] in the input's caption order, and the same within
    each image's fold, or None without folds; images past the last whole fold get rank max_k there).
    """
    device = images.device
    n_img, n_txt = images.shape[0], texts.shape[0]
    order = torch.argsort(text_to_image, stable=True)  # caption positions in image order
    texts = texts[order]  # [N_txt, D]
    owner = text_to_image[order]  # [N_txt], non-decreasing
    counts = torch.bincount(owner, minlength=n_img)  # [N_img] captions per image (>= 1)
    first = torch.cumsum(counts, 0) - counts  # [N_img] each image's first caption column
    bounds = _chunk_bounds(n_img, chunk_size, fold_size)
    col_bounds = [int(first[b]) if b < n_img else n_txt for b in bounds]
    n_folds = n_img // fold_size if fold_size is not None else 0
    row_spans, col_spans = list(pairwise(bounds)), list(pairwise(col_bounds))
    in_folds = n_folds * (fold_size or 0)  # images [0, in_folds) lie in whole folds
    fold_of = [a // fold_size if fold_size is not None and a < in_folds else -1 for a, _ in row_spans]

    # diagonal tiles: thresholds, and how many of an image's own captions reach its best
    best = torch.empty(n_img, device=device)  # [N_img] best positive score per image
    own_at_best = torch.empty(n_img, device=device)  # [N_img] positives >= best (>= 1)
    positive = torch.empty(n_txt, device=device)  # [N_txt] each caption's positive score
    diagonal = []
    n_pos = int(counts.max())
    for (a, b), (p, q) in zip(row_spans, col_spans, strict=True):
        tile = images[a:b] @ texts[p:q].T  # [c, n]
        slot = torch.arange(n_pos, device=device)  # [P]
        valid = slot[None, :] < counts[a:b, None]  # [c, P]
        cols = (first[a:b, None] - p + slot[None, :]).clamp_(max=q - p - 1)  # [c, P]
        own = tile.gather(1, cols).masked_fill_(~valid, float("-inf"))  # [c, P]
        best[a:b] = own.amax(dim=1)
        own_at_best[a:b] = (own >= best[a:b, None]).sum(dim=1)
        positive[p:q] = tile[owner[p:q] - a, torch.arange(q - p, device=device)]
        diagonal.append(tile)

    rows = torch.zeros(n_img, device=device)  # [N_img] captions >= best, positives included
    cols = torch.zeros(n_txt, device=device)  # [N_txt] images >= positive, the positive included
    fold_rows = torch.zeros(n_img, device=device) if n_folds else None
    fold_cols = torch.zeros(n_txt, device=device) if n_folds else None
    widest = max(q - p for p, q in col_spans)
    tallest = max(b - a for a, b in row_spans)
    scores = torch.empty(tallest * widest, device=device)  # reused tile buffer
    hits = torch.empty(tallest * widest, device=device)  # reused 0/1 buffer (float: fast sums)
    for k, (a, b) in enumerate(row_spans):
        chunk = images[a:b]  # [c, D]
        best_k = best[a:b, None]  # [c, 1]
        for g, (p, q) in enumerate(col_spans):
            if g == k:
                tile = diagonal[k]
            else:
                tile = torch.mm(chunk, texts[p:q].T, out=scores[: (b - a) * (q - p)].view(b - a, q - p))
            hit = hits[: (b - a) * (q - p)].view(b - a, q - p)
            row_count = torch.ge(tile, best_k, out=hit).sum(dim=1)  # [c]
            col_count = torch.ge(tile, positive[None, p:q], out=hit).sum(dim=0)  # [n]
            rows[a:b] += row_count
            cols[p:q] += col_count
            if fold_rows is not None and fold_of[k] >= 0 and fold_of[k] == fold_of[g]:
                fold_rows[a:b] += row_count
                fold_cols[p:q] += col_count
    del diagonal

    def ranks(row_total: Tensor, col_total: Tensor) -> tuple[Tensor, Tensor]:
        i2t = (row_total - own_at_best).long().clamp_(max=max_k)  # [N_img]
        t2i = torch.empty(n_txt, dtype=torch.long, device=device)
        t2i[order] = (col_total - 1).long().clamp_(max=max_k)  # the positive itself reaches its score
        return i2t, t2i

    i2t, t2i = ranks(rows, cols)
    if fold_rows is None or fold_cols is None:
        return i2t, t2i, None, None
    fold_i2t, fold_t2i = ranks(fold_rows, fold_cols)
    return i2t, t2i, fold_i2t, fold_t2i


def _faiss_ranks(
    queries: Tensor, gallery: Tensor, query_group: Tensor, gallery_group: Tensor, max_k: int, chunk_size: int
) -> Tensor:
    """Pessimistic ranks from a faiss top-k search; exact below max_k, clamped to max_k.

    We search k = max_k + P items, P being the most positives any query has. Every score that is
    compared comes from the same faiss search (one arithmetic path), so a positive and a negative
    with identical vectors tie exactly, as in the torch backend; a separately computed positive
    score could differ from faiss' own by a rounding step and break ties the other way. Cases:
    - no positive returned: more than max_k items score >= all positives -> miss for every K;
    - best returned positive scores the same as the last returned item: the >= max_k returned
      negatives all score >= it -> miss for every K (not-returned items may tie, so the count
      is not exact, but it is >= max_k either way);
    - otherwise every item scoring >= the best positive was returned: count the returned negatives.
    """
    import faiss

    gallery_np = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)  # [N_g, D]
    queries_np = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)  # [N_q, D]
    q_group = query_group.detach().cpu().numpy()  # [N_q]
    g_group = gallery_group.detach().cpu().numpy()  # [N_g]
    n_gallery = gallery_np.shape[0]
    n_positive_max = int(np.bincount(g_group).max())
    k = min(max_k + n_positive_max, n_gallery)
    whole_gallery = k == n_gallery  # then the returned list is exact, no boundary case

    index = faiss.IndexFlatIP(gallery_np.shape[1])
    index.add(gallery_np)
    ranks = np.empty(queries_np.shape[0], dtype=np.int64)  # [N_q]
    for start in range(0, queries_np.shape[0], chunk_size):
        stop = min(start + chunk_size, queries_np.shape[0])
        scores, labels = index.search(queries_np[start:stop], k)  # [c, k], [c, k]
        positive = g_group[labels] == q_group[start:stop, None]  # [c, k]
        best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)  # [c, 1]
        rank = ((scores >= best) & ~positive).sum(axis=1)  # [c]
        miss = ~positive.any(axis=1)
        if not whole_gallery:
            miss |= best[:, 0] <= scores.min(axis=1)
        ranks[start:stop] = np.where(miss, max_k, rank)
    return torch.from_numpy(ranks).clamp_(max=max_k)


def _normalised(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """L2-normalised float32 embeddings and long caption owners, on the images' device."""
    device = image_emb.device
    images = F.normalize(image_emb.detach().float(), dim=1)  # [N_img, D]
    texts = F.normalize(text_emb.detach().to(device).float(), dim=1)  # [N_txt, D]
    return images, texts, text_to_image.detach().to(device).long()


def _faiss_both(
    images: Tensor, texts: Tensor, t2i: Tensor, max_k: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """(i2t, t2i) ranks by two faiss searches, one per direction."""
    image_ids = torch.arange(images.shape[0], device=images.device)  # [N_img]
    return (
        _faiss_ranks(images, texts, image_ids, t2i, max_k, chunk_size),
        _faiss_ranks(texts, images, t2i, image_ids, max_k, chunk_size),
    )


def _scores(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: tuple[int, ...],
    chunk_size: int,
    backend: str,
    fold_size: int | None,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(full-set recalls, recalls of each 1K fold: empty without fold_size or below two folds)."""
    max_k = max(ks)
    images, texts, t2i = _normalised(image_emb, text_emb, text_to_image)
    n_img = images.shape[0]
    folded = fold_size is not None and n_img >= 2 * fold_size
    folds = _fold_splits(t2i, n_img, fold_size) if folded and fold_size is not None else []
    if backend == "faiss":
        full = _recalls(*_faiss_both(images, texts, t2i, max_k, chunk_size), ks)
        per_fold = [
            _recalls(*_faiss_both(images[imgs], texts[caps], local, max_k, chunk_size), ks)
            for imgs, caps, local in folds
        ]
        return full, per_fold
    i2t, t2i_ranks, fold_i2t, fold_t2i = _tiled_ranks(
        images, texts, t2i, max_k, chunk_size, fold_size if folded else None
    )
    per_fold = []
    if fold_i2t is not None and fold_t2i is not None:
        per_fold = [_recalls(fold_i2t[imgs], fold_t2i[caps], ks) for imgs, caps, _ in folds]
    return _recalls(i2t, t2i_ranks, ks), per_fold


def _recalls(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Percent of queries with rank < K, plus rsum and rsum@1."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}/R@{k}"] = 100.0 * int((ranks < k).sum()) / ranks.numel()
    out["rsum"] = sum(out.values())
    out["rsum@1"] = sum(100.0 * int((r < 1).sum()) / r.numel() for r in (i2t_ranks, t2i_ranks))
    return out


def _fold_splits(text_to_image: Tensor, n_images: int, fold_size: int) -> list[tuple[slice, Tensor, Tensor]]:
    """COCO "1K" folds: floor(n_images / fold_size) contiguous image blocks, remainder dropped.

    Returns per fold (image slice, caption indices into the full set [n_f], text_to_image
    re-indexed inside the fold [n_f]); a caption only ever sees the images of its own fold.
    """
    t2i = text_to_image.long()  # [N_txt]
    folds = []
    for f in range(n_images // fold_size):
        lo, hi = f * fold_size, (f + 1) * fold_size
        captions = torch.nonzero((t2i >= lo) & (t2i < hi)).flatten()  # [n_f]
        folds.append((slice(lo, hi), captions, t2i[captions] - lo))
    return folds


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def retrieval_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 256,
    backend: Backend = "auto",
) -> dict[str, float]:
    """Image->text and text->image Recall@K in percent, plus rsum (the sum of all of them).

    Args:
        image_emb: [N_img, D] image embeddings (any scale; L2-normalised here, float32).
        text_emb: [N_txt, D] caption embeddings.
        text_to_image: [N_txt] index of each caption's image; every image needs >= 1 caption.
        ks: cut-offs K; keys are "i2t/R@K", "t2i/R@K" for each, and "rsum".
        chunk_size: images per score tile (torch: a tile is chunk_size images x their captions, two
            such tiles exist at once) or queries per search (faiss).
        backend: "torch" (one tiled matmul for both directions, exact counting), "faiss"
            (IndexFlatIP top-k search per direction) or "auto" (torch, the faster). Both give
            identical results.

    Ties are broken against the query: a query's rank is the number of negatives scoring >= its
    best positive, and it is a hit at K iff rank < K. Why: with optimistic (or index-order)
    tie-breaking a collapsed model, whose embeddings are all equal, would score a perfect or
    inflated recall; pessimistically it scores 0, which is what it deserves.
    """
    ks_t = _check_ks(ks)
    _check_positive_int("chunk_size", chunk_size)
    resolved = _resolve_backend(backend)
    _check_inputs(image_emb, text_emb, text_to_image)
    out, _ = _scores(image_emb, text_emb, text_to_image, ks_t, chunk_size, resolved, fold_size=None)
    del out["rsum@1"]
    return out


def retrieval_protocol(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    fold_size: int = 1000,
    chunk_size: int = 256,
    backend: Backend = "auto",
) -> dict[str, float]:
    """Full-set recall (COCO-5K / Flickr30k style) and, for N_img >= 2 * fold_size, COCO "1K".

    Full-set keys are those of `retrieval_recall` plus "rsum@1" (i2t R@1 + t2i R@1). The 1K
    protocol splits the images into floor(N_img / fold_size) contiguous folds (trailing images
    that fill no whole fold are left out), moves each caption into its image's fold, computes
    recall within each fold and averages over folds, under the same keys prefixed "1k/".
    Ties are broken against the query, as in `retrieval_recall`.
    """
    ks_t = _check_ks(ks)
    _check_positive_int("fold_size", fold_size)
    _check_positive_int("chunk_size", chunk_size)
    resolved = _resolve_backend(backend)
    _check_inputs(image_emb, text_emb, text_to_image)
    out, per_fold = _scores(image_emb, text_emb, text_to_image, ks_t, chunk_size, resolved, fold_size)
    for key in per_fold[0] if per_fold else ():
        out[f"1k/{key}"] = sum(fold[key] for fold in per_fold) / len(per_fold)
    return out
