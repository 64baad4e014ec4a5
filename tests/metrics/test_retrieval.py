"""Retrieval recall: hand-worked cases, pessimistic ties, backends, a NumPy reference, 1K folds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mmfed  # noqa: F401  (before torchmetrics: installs the torchvision import guard)
from mmfed.metrics import RetrievalRecall, retrieval_protocol, retrieval_recall
from mmfed.metrics.retrieval import _fold_splits

BACKENDS = ("torch", "faiss")
KEYS = ("i2t/R@1", "i2t/R@5", "i2t/R@10", "t2i/R@1", "t2i/R@5", "t2i/R@10", "rsum")


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def hand_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 images x 2 captions in 2-D. With x = 1/sqrt(2), the scores (image rows, caption cols) are

              c0(i0) c1(i0) c2(i1) c3(i1) c4(i2) c5(i2)
        i0 ->   1      0      x     -x      0     -x
        i1 ->   0      1      x      x     -1     -x
        i2 ->  -1      0     -x      x      0      x

    t2i ranks (negatives >= positive): c0 0, c1 2, c2 1 (tie i0), c3 1 (tie i2), c4 1 (tie i0), c5 0.
    i2t ranks (negatives >= best positive): i0 0, i1 1 (c1), i2 1 (tie c3).
    """
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 1.0], [0.0, -1.0], [-1.0, -1.0]])
    return images, texts, torch.tensor([0, 0, 1, 1, 2, 2])


def random_case(
    seed: int, n_img: int, dim: int, max_caps: int = 5, quantised: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random embeddings with 1..max_caps captions per image, captions in shuffled order.

    quantised: +-1 entries with dim a power of 4, so normalised entries and all dot products are
    exact in float32 -> many exact ties, independent of summation order.
    """
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_caps + 1, (n_img,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_img), counts)
    t2i = t2i[torch.randperm(t2i.numel(), generator=g)]
    if quantised:
        images = torch.randint(0, 2, (n_img, dim), generator=g).float() * 2 - 1
        texts = torch.randint(0, 2, (t2i.numel(), dim), generator=g).float() * 2 - 1
        # half the captions copy their image, so positives tie with copies among the negatives
        copy = torch.rand(t2i.numel(), generator=g) < 0.5
        texts[copy] = images[t2i[copy]]
    else:
        images = torch.randn(n_img, dim, generator=g)
        texts = images[t2i] + 1.5 * torch.randn(t2i.numel(), dim, generator=g)
    return images, texts, t2i


def numpy_reference(
    images: np.ndarray, texts: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Plain full-matrix recall with pessimistic ties, written independently of the module."""
    images = images.astype(np.float64)
    texts = texts.astype(np.float64)
    images = images / np.linalg.norm(images, axis=1, keepdims=True)
    texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    sims = images @ texts.T  # [N_img, N_txt]
    i2t_ranks = []
    for i in range(sims.shape[0]):
        best = sims[i, t2i == i].max()
        i2t_ranks.append(int((sims[i, t2i != i] >= best).sum()))
    t2i_ranks = []
    for j in range(sims.shape[1]):
        positive = sims[t2i[j], j]
        negatives = np.delete(sims[:, j], t2i[j])
        t2i_ranks.append(int((negatives >= positive).sum()))
    out = {}
    for name, ranks in (("i2t", np.array(i2t_ranks)), ("t2i", np.array(t2i_ranks))):
        for k in ks:
            out[f"{name}/R@{k}"] = 100.0 * float((ranks < k).mean())
    out["rsum"] = sum(out.values())
    return out


def assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


# --------------------------------------------------------------------------------------------
# Hand-worked cases and ties
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_case_default_ks(backend: str) -> None:
    out = retrieval_recall(*hand_case(), backend=backend)
    assert list(out) == list(KEYS)
    expected = {
        "i2t/R@1": 100 / 3,
        "i2t/R@5": 100.0,
        "i2t/R@10": 100.0,
        "t2i/R@1": 100 / 3,
        "t2i/R@5": 100.0,
        "t2i/R@10": 100.0,
        "rsum": 400 + 200 / 3,
    }
    assert out == pytest.approx(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_case_custom_ks(backend: str) -> None:
    out = retrieval_recall(*hand_case(), ks=(2, 1, 5), backend=backend)
    expected = {
        "i2t/R@1": 100 / 3,
        "i2t/R@2": 100.0,
        "i2t/R@5": 100.0,
        "t2i/R@1": 100 / 3,  # c0, c5
        "t2i/R@2": 500 / 6,  # all but c1
        "t2i/R@5": 100.0,
        "rsum": 450.0,
    }
    assert list(out) == list(expected)
    assert out == pytest.approx(expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_case_is_scale_invariant(backend: str) -> None:
    images, texts, t2i = hand_case()
    scaled = retrieval_recall(images * 3.0, texts * 0.25, t2i, ks=(1, 2, 5), backend=backend)
    assert scaled == pytest.approx(retrieval_recall(images, texts, t2i, ks=(1, 2, 5), backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_between_positive_and_negative_is_a_miss_at_1(backend: str) -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # caption 0 (image 0) scores x with both images
    out = retrieval_recall(images, texts, torch.tensor([0, 1]), ks=(1, 2), backend=backend)
    assert out["t2i/R@1"] == 50.0  # caption 0 ties -> miss; caption 1 -> hit
    assert out["t2i/R@2"] == 100.0
    # image 1: positive caption 1 (score 1) beats caption 0 (x) -> hit; image 0: caption 0 (x)
    # beats caption 1 (0) -> hit
    assert out["i2t/R@1"] == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_tie_in_image_to_text_is_a_miss(backend: str) -> None:
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # identical images
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = retrieval_recall(images, texts, torch.tensor([0, 1]), ks=(1, 2), backend=backend)
    # image 0: caption 0 scores 1, negative caption 1 scores 0 -> hit. image 1: best positive
    # caption 1 scores 0, negative caption 0 scores 1 -> rank 1.
    assert out["i2t/R@1"] == 50.0 and out["i2t/R@2"] == 100.0
    # caption 0 ties between image 0 and its duplicate -> miss; caption 1 ties (0 vs 0) -> miss
    assert out["t2i/R@1"] == 0.0 and out["t2i/R@2"] == 100.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vector", [[1.0, 1.0, 1.0, 1.0], [0.3, -1.7, 2.2, 0.9]])
def test_collapsed_model_scores_zero(backend: str, vector: list[float]) -> None:
    n_img = 40
    t2i = torch.arange(n_img).repeat_interleave(5)
    images = torch.tensor(vector).repeat(n_img, 1)
    texts = torch.tensor(vector).repeat(t2i.numel(), 1)
    out = retrieval_protocol(images, texts, t2i, fold_size=20, backend=backend)
    assert "1k/rsum" in out
    assert all(value == 0.0 for value in out.values()), out


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_collapsed_model_scores_zero_with_uneven_tiles(chunk_size: int) -> None:
    """Tiles of different shapes (1..5 captions per image, chunks cut at fold ends) still tie exactly."""
    _, _, t2i = random_case(12, 26, 4)
    vector = torch.tensor([0.3, -1.7, 2.2, 0.9, 0.1, 1e-3])
    images, texts = vector.repeat(26, 1), vector.repeat(t2i.numel(), 1)
    out = retrieval_protocol(images, texts, t2i, fold_size=12, chunk_size=chunk_size, backend="torch")
    assert "1k/rsum" in out  # 2 folds of 12 (11 tied negatives each), 2 images left out
    assert all(value == 0.0 for value in out.values()), out


def test_single_image_is_always_a_hit() -> None:
    out = retrieval_recall(torch.randn(1, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert all(out[key] == 100.0 for key in KEYS[:-1])


# --------------------------------------------------------------------------------------------
# Backends, chunking, references
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "n_img", "dim", "quantised"),
    [(0, 37, 8, False), (1, 40, 4, True), (2, 25, 16, True), (3, 12, 4, True)],
)
def test_backends_and_chunk_sizes_agree_with_numpy_reference(
    seed: int, n_img: int, dim: int, quantised: bool
) -> None:
    images, texts, t2i = random_case(seed, n_img, dim, quantised=quantised)
    expected = numpy_reference(images.numpy(), texts.numpy(), t2i.numpy())
    for backend in BACKENDS:
        for chunk_size in (1, 3, 10_000):
            out = retrieval_recall(images, texts, t2i, chunk_size=chunk_size, backend=backend)
            assert_same(out, expected)


@pytest.mark.parametrize(("seed", "n_img", "dim"), [(1, 40, 4), (2, 25, 16), (3, 12, 4)])
def test_quantised_cases_have_ties_and_imperfect_scores(seed: int, n_img: int, dim: int) -> None:
    """Guards the test above: its quantised cases really exercise positive/negative ties."""
    images, texts, t2i = random_case(seed, n_img, dim, quantised=True)
    sims = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).T
    positive = sims[torch.arange(t2i.numel()), t2i]  # [N_txt]
    negative = torch.ones_like(sims, dtype=torch.bool)
    negative[torch.arange(t2i.numel()), t2i] = False
    assert bool(((sims == positive[:, None]) & negative).any(dim=1).sum() >= 3)
    out = numpy_reference(images.numpy(), texts.numpy(), t2i.numpy())
    assert 0.0 < out["t2i/R@1"] < out["t2i/R@10"] < 100.0


def test_backends_agree_with_one_caption_per_image_and_large_k() -> None:
    images, texts, t2i = random_case(4, 30, 4, max_caps=1, quantised=True)
    ks = (1, 3, 29, 30, 100)  # K at and beyond the gallery size
    outs = [retrieval_recall(images, texts, t2i, ks=ks, backend=b) for b in BACKENDS]
    assert_same(outs[0], outs[1])
    assert_same(outs[0], numpy_reference(images.numpy(), texts.numpy(), t2i.numpy(), ks=ks))
    assert outs[0]["t2i/R@30"] == 100.0 and outs[0]["i2t/R@100"] == 100.0


def test_auto_backend_is_torch() -> None:
    """auto picks torch (one tiled matmul for both directions; eval/bench_retrieval.py measures why)."""
    from mmfed.metrics.retrieval import _resolve_backend

    assert _resolve_backend("auto") == "torch"
    case = random_case(5, 20, 8)
    assert_same(retrieval_recall(*case), retrieval_recall(*case, backend="torch"))


def test_text_to_image_matches_torchmetrics_hit_rate() -> None:
    from torchmetrics.retrieval import RetrievalHitRate  # after mmfed: torchvision import guard

    images, texts, t2i = random_case(6, 15, 6, max_caps=3)  # continuous: no ties
    sims = torch.nn.functional.normalize(texts, dim=1) @ torch.nn.functional.normalize(images, dim=1).T
    target = torch.zeros_like(sims, dtype=torch.bool)
    target[torch.arange(t2i.numel()), t2i] = True
    indexes = torch.arange(t2i.numel())[:, None].expand_as(sims)
    out = retrieval_recall(images, texts, t2i, ks=(1, 2, 5, 10), backend="torch")
    for k in (1, 2, 5, 10):
        hit_rate = RetrievalHitRate(top_k=k)(sims.flatten(), target.flatten(), indexes=indexes.flatten())
        assert out[f"t2i/R@{k}"] == pytest.approx(100.0 * float(hit_rate))
    assert 0.0 < out["t2i/R@1"] < 100.0


# --------------------------------------------------------------------------------------------
# COCO 1K protocol
# --------------------------------------------------------------------------------------------


def test_fold_splits_reindex_captions() -> None:
    g = torch.Generator().manual_seed(7)
    t2i = torch.arange(2500).repeat_interleave(5)[torch.randperm(12_500, generator=g)]
    folds = _fold_splits(t2i, n_images=2500, fold_size=1000)
    assert len(folds) == 2  # floor(2500 / 1000); images 2000..2499 are left out
    for f, (images, captions, local) in enumerate(folds):
        assert (images.start, images.stop) == (1000 * f, 1000 * (f + 1))
        assert captions.numel() == 5000
        assert torch.equal(t2i[captions] - 1000 * f, local)
        assert int(local.min()) == 0 and int(local.max()) == 999
        assert torch.equal(torch.bincount(local), torch.full((1000,), 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_coco_1k_protocol_on_duplicated_folds(backend: str) -> None:
    """2000 images / 10000 captions -> 2 folds; fold 1 repeats fold 0's images.

    Each caption equals its image, so in the full set it ties with the image's duplicate in the
    other fold (t2i rank 1) and an image ties with its duplicate's 5 captions (i2t rank 5). Within
    a fold nothing ties: if a caption could see the other fold, the 1K scores would drop.
    """
    g = torch.Generator().manual_seed(8)
    codes = torch.randperm(2**16, generator=g)[:1000]  # distinct 16-bit codes -> distinct images
    bits = (codes[:, None] >> torch.arange(16)) & 1  # [1000, 16]
    base = bits.float() * 2 - 1  # +-1, exact after normalising; distinct images score <= 14/16
    images = torch.cat([base, base])  # [2000, 16]
    t2i = torch.arange(2000).repeat_interleave(5)[torch.randperm(10_000, generator=g)]
    texts = images[t2i]  # [10000, 16]
    out = retrieval_protocol(images, texts, t2i, backend=backend)
    expected_full = {
        "i2t/R@1": 0.0,
        "i2t/R@5": 0.0,
        "i2t/R@10": 100.0,
        "t2i/R@1": 0.0,
        "t2i/R@5": 100.0,
        "t2i/R@10": 100.0,
        "rsum": 300.0,
        "rsum@1": 0.0,
    }
    expected = {**expected_full, **{f"1k/{key}": 100.0 for key in KEYS[:-1]}}
    expected.update({"1k/rsum": 600.0, "1k/rsum@1": 200.0})
    assert out == expected


@pytest.mark.parametrize(
    ("backend", "chunk_size"), [("torch", 1), ("torch", 4), ("torch", 256), ("faiss", 256)]
)
def test_1k_is_the_mean_over_folds(backend: str, chunk_size: int) -> None:
    """The torch backend counts the folds from the full set's tiles (a chunk never spans two folds)."""
    images, texts, t2i = random_case(9, 32, 4, quantised=True)  # fold_size 10 -> 3 folds, 2 left out
    out = retrieval_protocol(images, texts, t2i, fold_size=10, chunk_size=chunk_size, backend=backend)
    per_fold = []
    for f in range(3):
        caps = torch.nonzero((t2i >= 10 * f) & (t2i < 10 * (f + 1))).flatten()
        per_fold.append(retrieval_recall(images[10 * f : 10 * (f + 1)], texts[caps], t2i[caps] - 10 * f))
    for key in KEYS:
        assert out[f"1k/{key}"] == pytest.approx(sum(p[key] for p in per_fold) / 3)
    assert out["1k/rsum@1"] == pytest.approx(out["1k/i2t/R@1"] + out["1k/t2i/R@1"])
    assert_same({k: out[k] for k in KEYS}, retrieval_recall(images, texts, t2i, backend=backend))
    assert out["rsum@1"] == out["i2t/R@1"] + out["t2i/R@1"]


def test_no_1k_keys_below_two_folds() -> None:
    images, texts, t2i = random_case(10, 19, 4)
    out = retrieval_protocol(images, texts, t2i, fold_size=10)
    assert set(out) == {*KEYS, "rsum@1"}
    assert "1k/rsum" in retrieval_protocol(*random_case(10, 20, 4), fold_size=10)


# --------------------------------------------------------------------------------------------
# Stateful metric
# --------------------------------------------------------------------------------------------


def _split(case: tuple[torch.Tensor, ...], lo: int, hi: int) -> tuple[torch.Tensor, ...]:
    """Images lo..hi-1 with their captions, caption indices local to the slice."""
    images, texts, t2i = case
    caps = torch.nonzero((t2i >= lo) & (t2i < hi)).flatten()
    return images[lo:hi], texts[caps], t2i[caps] - lo


@pytest.mark.parametrize("backend", BACKENDS)
def test_merged_metrics_equal_one_metric(backend: str) -> None:
    case = random_case(11, 16, 4, quantised=True)
    whole = RetrievalRecall(fold_size=4, backend=backend)
    whole.update(*case)
    expected = whole.compute()
    assert "1k/rsum" in expected
    assert_same(expected, retrieval_protocol(*case, fold_size=4, backend=backend))

    first = RetrievalRecall(fold_size=4, backend=backend)
    second = RetrievalRecall(fold_size=4, backend=backend)
    first.update(*_split(case, 0, 3))  # several updates per client, indices local to each
    first.update(*_split(case, 3, 8))
    second.update(*_split(case, 8, 16))
    assert_same(second.compute(), retrieval_protocol(*_split(case, 8, 16), fold_size=4, backend=backend))
    second.merge_state(first)  # incoming state goes first -> images in the original order
    assert_same(second.compute(), expected)  # merge_state drops the value cached by compute

    # the other merge order swaps whole folds (8 = 2 folds of 4): same averages
    first.merge_state(RetrievalRecall(fold_size=4, backend=backend))  # merging an empty state is a no-op
    third = RetrievalRecall(fold_size=4, backend=backend)
    third.update(*_split(case, 8, 16))
    first.merge_state(third)
    assert_same(first.compute(), expected)


def test_unaligned_merge_keeps_full_set_scores() -> None:
    case = random_case(12, 15, 4, quantised=True)
    expected = retrieval_protocol(*case, fold_size=4)
    a, b = RetrievalRecall(fold_size=4), RetrievalRecall(fold_size=4)
    a.update(*_split(case, 0, 5))
    b.update(*_split(case, 5, 15))
    a.merge_state(b)
    out = a.compute()
    assert_same({k: out[k] for k in (*KEYS, "rsum@1")}, {k: expected[k] for k in (*KEYS, "rsum@1")})


def test_compute_after_states_are_concatenated_like_dist_sync() -> None:
    """After a process-group sync each "cat" list state is one tensor; offsets must survive that."""
    case = random_case(13, 12, 4, quantised=True)
    metric = RetrievalRecall(fold_size=6, backend="torch")
    for lo, hi in ((0, 4), (4, 5), (5, 12)):
        metric.update(*_split(case, lo, hi))
    expected = metric.compute()
    for name in ("image_emb", "text_emb", "text_to_image", "update_sizes"):
        setattr(metric, name, torch.cat(getattr(metric, name)))
    metric._computed = None
    assert_same(metric.compute(), expected)
    assert_same(expected, retrieval_protocol(*case, fold_size=6, backend="torch"))


def test_metric_reset_and_validation() -> None:
    metric = RetrievalRecall(ks=(1, 2))
    metric.update(*hand_case())
    assert metric.compute()["i2t/R@2"] == 100.0
    metric.reset()
    assert metric.image_emb == [] and metric.update_sizes == []
    with pytest.raises(ValueError, match="text_to_image values"):
        metric.update(torch.randn(2, 3), torch.randn(3, 3), torch.tensor([0, 1, 2]))  # 2 is not local
    with pytest.raises(ValueError, match="backend"):
        RetrievalRecall(backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fold_size"):
        RetrievalRecall(fold_size=0)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _good() -> dict[str, object]:
    images, texts, t2i = hand_case()
    return {"image_emb": images, "text_emb": texts, "text_to_image": t2i}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"backend": "gpu"}, r"backend='gpu' is not supported"),
        ({"text_to_image": torch.tensor([0, 0, 1, 1, 2, 3])}, r"text_to_image values span \[0, 3\]"),
        ({"text_to_image": torch.tensor([-1, 0, 1, 1, 2, 2])}, r"text_to_image values span \[-1, 2\]"),
        ({"text_to_image": torch.tensor([0, 0, 0, 0, 2, 2])}, r"without a caption \(first: image 1\)"),
        ({"text_to_image": torch.tensor([0, 1, 2])}, r"text_to_image has 3 entries"),
        ({"text_to_image": torch.tensor([0.0, 0, 1, 1, 2, 2])}, r"text_to_image.dtype"),
        ({"text_emb": torch.randn(6, 3)}, r"embedding dims differ"),
        ({"image_emb": torch.randn(0, 2)}, r"image_emb.shape=\(0, 2\) is empty"),
        ({"text_emb": torch.randn(0, 2), "text_to_image": torch.zeros(0, dtype=torch.long)}, r"text_emb"),
        ({"image_emb": torch.randn(3)}, r"image_emb must be a 2-D tensor"),
        ({"image_emb": torch.tensor([[math.nan, 0.0], [0, 1], [1, 0]])}, r"image_emb contains NaN"),
        ({"ks": ()}, r"ks=\(\) is invalid"),
        ({"ks": (1, 0)}, r"ks=\(1, 0\) is invalid"),
        ({"chunk_size": 0}, r"chunk_size=0 is invalid"),
    ],
)
@pytest.mark.parametrize("fn", [retrieval_recall, retrieval_protocol])
def test_validation_errors(fn, changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(**{**_good(), **changes})


def test_protocol_validates_fold_size() -> None:
    with pytest.raises(ValueError, match=r"fold_size=-1 is invalid"):
        retrieval_protocol(*hand_case(), fold_size=-1)
