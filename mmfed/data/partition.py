"""Label partitioners: IID, Dirichlet(alpha) over labels, pathological k-class shards.

Why not flwr-datasets' partitioners: flwr-datasets 0.6 pins ``datasets<5`` (this project runs
datasets 5.2), and its partitioners work on a Hugging Face ``Dataset``; ours take a label array,
which is all any source (synthetic, HF or a local folder) can always give. They follow the same
definitions (Hsu et al. 2019 for Dirichlet; McMahan et al. 2017 for shards) and are tested.

A partitioner maps (labels, number of partitions, rng) to one sorted index array per partition;
every index appears in exactly one partition.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from mmfed.config import check_positive, register


class Partitioner(ABC):
    @abstractmethod
    def __call__(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Split row indices 0..len(labels)-1 into `num_partitions` disjoint sorted arrays."""

    def describe(self) -> dict[str, object]:
        return {"kind": type(self).__name__, **vars(self)}


def _check(labels: np.ndarray, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if len(labels) < num_partitions:
        raise ValueError(f"cannot split {len(labels)} samples into {num_partitions} non-empty partitions")


@register("partition", "iid")
class IidPartitioner(Partitioner):
    """Uniformly shuffled, equal-sized partitions (sizes differ by at most one)."""

    def __call__(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
        _check(labels, num_partitions)
        order = rng.permutation(len(labels))
        return [np.sort(part) for part in np.array_split(order, num_partitions)]


@register("partition", "dirichlet")
class DirichletPartitioner(Partitioner):
    """Label skew: each class's samples are spread over partitions by proportions ~ Dir(alpha).

    Small alpha (0.1) gives each client few dominant classes; large alpha tends to IID. Draws are
    repeated (up to `max_tries`) until every partition has at least `min_partition_size` samples.
    """

    def __init__(self, alpha: float = 0.5, min_partition_size: int = 10, max_tries: int = 100) -> None:
        check_positive("alpha", alpha)
        check_positive("min_partition_size", min_partition_size, strict=False)
        check_positive("max_tries", max_tries)
        self.alpha = alpha
        self.min_partition_size = min_partition_size
        self.max_tries = max_tries

    def __call__(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
        _check(labels, num_partitions)
        labels = np.asarray(labels)
        smallest = 0
        for _ in range(self.max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
            for label in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == label))
                proportions = rng.dirichlet(np.full(num_partitions, self.alpha))
                cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
                for part, chunk in zip(parts, np.split(members, cuts), strict=True):
                    part.append(chunk)
            result = [np.sort(np.concatenate(part)) for part in parts]
            smallest = min(len(part) for part in result)
            if smallest >= self.min_partition_size:
                return result
        raise ValueError(
            f"dirichlet partition: no draw in {self.max_tries} tries gave every one of {num_partitions} "
            f"partitions >= {self.min_partition_size} samples (alpha={self.alpha}, {len(labels)} samples, "
            f"smallest {smallest}); lower partition.min_partition_size or use fewer clients"
        )


@register("partition", "shards")
class ShardPartitioner(Partitioner):
    """Pathological non-IID: each partition holds exactly `classes_per_client` classes.

    Classes are dealt to partitions round-robin over a random permutation (so every class is used
    when partitions x classes_per_client >= number of classes), and each class's samples are split
    evenly among the partitions holding it.
    """

    def __init__(self, classes_per_client: int = 2) -> None:
        check_positive("classes_per_client", classes_per_client)
        self.classes_per_client = classes_per_client

    def __call__(self, labels: np.ndarray, num_partitions: int, rng: np.random.Generator) -> list[np.ndarray]:
        _check(labels, num_partitions)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        if self.classes_per_client > len(classes):
            raise ValueError(
                f"classes_per_client={self.classes_per_client} exceeds the {len(classes)} classes in the data"
            )
        deck = np.concatenate([rng.permutation(classes) for _ in range(num_partitions)])
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        position = 0
        for partition in range(num_partitions):
            chosen: list[int] = []
            while len(chosen) < self.classes_per_client:
                candidate = int(deck[position % len(deck)])
                position += 1
                if candidate not in chosen:
                    chosen.append(candidate)
            for label in chosen:
                holders[label].append(partition)
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        for label, owners in holders.items():
            if not owners:
                continue
            members = rng.permutation(np.flatnonzero(labels == label))
            for owner, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
                parts[owner].append(chunk)
        result = [np.sort(np.concatenate(part)) if part else np.empty(0, dtype=int) for part in parts]
        if min(len(part) for part in result) == 0:
            raise ValueError("shards partition left a client without samples; use fewer clients")
        return result
