from __future__ import annotations

import numpy as np
import pytest

from mmfed.data.partition import DirichletPartitioner, IidPartitioner, ShardPartitioner

LABELS = np.repeat(np.arange(10), 50)  # 500 samples, 10 balanced classes


def _check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    merged = np.concatenate(parts)
    assert len(merged) == n and len(np.unique(merged)) == n  # every index exactly once
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted


@pytest.mark.parametrize("partitioner", [IidPartitioner(), DirichletPartitioner(0.3), ShardPartitioner(2)])
def test_partitions_cover_every_sample_once_and_are_seeded(partitioner) -> None:
    parts = partitioner(LABELS, 7, np.random.default_rng(1))
    _check_disjoint_cover(parts, len(LABELS))
    again = partitioner(LABELS, 7, np.random.default_rng(1))
    other = partitioner(LABELS, 7, np.random.default_rng(2))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in IidPartitioner()(LABELS, 7, np.random.default_rng(0))]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def mean_dominant_share(alpha: float) -> float:
        shares = []
        for seed in range(5):
            for part in DirichletPartitioner(alpha, min_partition_size=1)(
                LABELS, 5, np.random.default_rng(seed)
            ):
                counts = np.bincount(LABELS[part], minlength=10)
                shares.append(counts.max() / counts.sum())
        return float(np.mean(shares))

    assert (
        mean_dominant_share(0.05) > 0.45 > mean_dominant_share(0.5) > 0.2 > mean_dominant_share(100.0)
    )  # 100: near IID, ~1/10


def test_dirichlet_respects_min_partition_size_or_says_why() -> None:
    parts = DirichletPartitioner(0.1, min_partition_size=20)(LABELS, 5, np.random.default_rng(0))
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ValueError, match="min_partition_size"):
        DirichletPartitioner(0.01, min_partition_size=99, max_tries=3)(LABELS, 5, np.random.default_rng(0))


def test_shards_give_each_client_exactly_k_classes_and_use_every_class() -> None:
    parts = ShardPartitioner(2)(LABELS, 5, np.random.default_rng(3))
    assert [len(np.unique(LABELS[p])) for p in parts] == [2] * 5
    assert set(np.concatenate([np.unique(LABELS[p]) for p in parts]).tolist()) == set(range(10))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DirichletPartitioner(alpha=0), "alpha must be > 0"),
        (lambda: ShardPartitioner(classes_per_client=0), "classes_per_client"),
        (lambda: ShardPartitioner(11)(LABELS, 2, np.random.default_rng(0)), "exceeds the 10 classes"),
        (lambda: IidPartitioner()(LABELS[:3], 5, np.random.default_rng(0)), "cannot split 3 samples"),
    ],
)
def test_bad_arguments_name_the_problem(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()
