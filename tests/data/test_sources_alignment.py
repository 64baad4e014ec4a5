"""Labels, captions and images stay aligned through every subset, sort, batch and evaluation.

CreamFL's reference code sorted AG News texts by length inside its collate function without
permuting the labels. Here every fixture row carries its identity in its content (the text names
its class, the pixels encode the label or the caption's photo number), so any misalignment along
the path source -> subset/sort -> partition -> client batches -> evaluator shows up.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.data.layout import FederationLayout
from mmfed.data.partition import DirichletPartitioner, IidPartitioner, ShardPartitioner
from mmfed.data.samples import MultimodalSplit
from mmfed.data.sources import AgNews, Cifar10, Flickr30k
from mmfed.evaluation import Evaluator
from mmfed.federation.client import ClientData
from tests.data.fixtures import (
    AG_CLASSES,
    label_red,
    pair_colour,
    write_agnews,
    write_cifar10,
    write_karpathy,
)


def _text_class(caption: str) -> int:
    return AG_CLASSES.index(re.search(r"topic (\S+)", caption).group(1))


def _photo(caption: str) -> int:
    return int(re.search(r"photo (\d+) ", caption).group(1))


def test_agnews_sorted_by_length_then_batched_keeps_labels(tmp_path: Path) -> None:
    write_agnews(tmp_path)
    split = AgNews(root=str(tmp_path), val_fraction=0.0).split("train")
    by_length = split.subset(np.argsort([len(caps[0]) for caps in split.captions], kind="stable"))
    lengths = [len(caps[0]) for caps in by_length.captions]
    assert lengths == sorted(lengths) and lengths != [len(caps[0]) for caps in split.captions]
    for (caption,), label in zip(by_length.captions, by_length.text_labels.tolist(), strict=True):
        assert _text_class(caption) == label
    seen = []
    for batch in ClientData(by_length, "text").batches(np.random.default_rng(0), batch_size=7):
        assert len(batch["captions"]) == len(batch["text_labels"])
        assert [_text_class(c) for c in batch["captions"]] == batch["text_labels"].tolist()
        seen += batch["captions"]
    assert sorted(seen) == sorted(c[0] for c in split.captions)  # one epoch: every row once


def test_paired_batches_from_lazy_images_match_their_captions(tmp_path: Path) -> None:
    write_karpathy(tmp_path, "flickr30k")
    split = Flickr30k(root=str(tmp_path), image_size=16).split("train")
    client = split.subset(torch.tensor([7, 2, 11, 0, 5, 9, 3]))
    for batch in ClientData(client, "paired").batches(np.random.default_rng(1), batch_size=3):
        colours = batch["images"].float().mean(dim=(2, 3))  # [B, 3]
        expected = torch.tensor([pair_colour(_photo(c)) for c in batch["captions"]], dtype=torch.float32)
        assert torch.allclose(colours, expected, atol=3)


def test_image_batches_match_labels(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    split = Cifar10(root=str(tmp_path)).split("train")
    for batch in ClientData(split.subset(np.arange(len(split))[::-1]), "image").batches(
        np.random.default_rng(2), 16
    ):
        reds = batch["images"][:, 0].float().mean(dim=(1, 2)).round().long()
        assert reds.tolist() == [label_red(c) for c in batch["image_labels"].tolist()]


class OracleModel(torch.nn.Module):
    """Embeds an image by its fixture colour and a caption by its photo number: perfect iff aligned."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.palette = torch.tensor([pair_colour(k) for k in range(n)], dtype=torch.float32)  # [n, 3]

    def has(self, part: str) -> bool:
        return part in ("image_encoder", "text_encoder")

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        colours = images.float().mean(dim=(2, 3))  # [B, 3]
        nearest = torch.cdist(colours, self.palette).argmin(dim=1)
        return torch.nn.functional.one_hot(nearest, self.n).float()

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.tensor([_photo(t) for t in texts]), self.n).float()


def test_evaluator_on_a_lazy_split_sees_aligned_pairs(tmp_path: Path) -> None:
    entries = write_karpathy(tmp_path, "flickr30k")
    split = Flickr30k(root=str(tmp_path), image_size=16).split("train")
    shuffled = split.subset(torch.randperm(len(split), generator=torch.Generator().manual_seed(0)))
    results = Evaluator(batch_size=5).evaluate(OracleModel(len(entries)), shuffled)
    assert results["retrieval/i2t/R@1"] == 100.0 and results["retrieval/t2i/R@1"] == 100.0
    broken = MultimodalSplit("x", shuffled.ids, images=shuffled.images, captions=shuffled.captions[::-1])
    assert Evaluator(batch_size=5).evaluate(OracleModel(len(entries)), broken)["retrieval/i2t/R@1"] < 100.0


@pytest.mark.parametrize(
    "partitioner",
    [
        DirichletPartitioner(alpha=0.1, min_partition_size=2),
        ShardPartitioner(classes_per_client=2),
        IidPartitioner(),
    ],
    ids=["dirichlet", "shards", "iid"],
)
def test_partitions_of_a_real_source_through_the_layout(tmp_path: Path, partitioner: object) -> None:
    labels_in_files = write_cifar10(tmp_path)
    train = Cifar10(root=str(tmp_path)).split("train")
    clients = FederationLayout(
        image=5, text=0, paired=0, local_test_fraction=0.1
    ).build(  # 5 x 2 classes: all
        train, partitioner, np.random.default_rng(0)
    )
    ids = [i for c in clients for i in (*c.train_ids, *c.test_ids)]
    assert len(ids) == len(set(ids)) == len(train)
    for client in clients:  # ids map back to the labels in the files
        rows = [int(i.rsplit("-", 1)[1]) for i in client.train_ids]
        subset = train.subset([train.ids.index(i) for i in client.train_ids])
        assert subset.image_labels.tolist() == labels_in_files[rows].tolist()
    if isinstance(partitioner, ShardPartitioner):
        for client in clients:
            assert (
                len({labels_in_files[int(i.rsplit("-", 1)[1])] for i in client.train_ids + client.test_ids})
                == 2
            )
    again = FederationLayout(image=5, text=0, paired=0).build(train, partitioner, np.random.default_rng(0))
    assert again == FederationLayout(image=5, text=0, paired=0).build(
        train, partitioner, np.random.default_rng(0)
    )
