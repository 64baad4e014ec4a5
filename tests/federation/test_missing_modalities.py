"""Missing modalities: paired clients whose samples lack the image or the text at a configured rate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.algorithms.task import clip_loss
from mmfed.data.layout import FederationLayout, load_layout, save_layout
from mmfed.data.partition import IidPartitioner
from mmfed.data.synthetic import SyntheticWorld
from mmfed.federation.client import ClientData


@pytest.fixture(scope="module")
def train():
    return SyntheticWorld(seed=0, n_train=300, n_public=1, n_val=1, n_test=1).split("train")


def _build(train, **rates: float):
    layout = FederationLayout(image=1, text=1, paired=2, local_test_fraction=0.1, **rates)
    return layout.build(train, IidPartitioner(), np.random.default_rng(3))


def test_rates_are_drawn_per_paired_client_without_changing_the_partition(train, tmp_path: Path) -> None:
    plain = _build(train)
    clients = _build(train, missing_image=0.3, missing_text=0.2)
    assert [(c.cid, c.train_ids, c.test_ids) for c in clients] == [
        (c.cid, c.train_ids, c.test_ids) for c in plain
    ]
    for client in clients:
        if client.kind != "paired":
            assert client.missing_image == client.missing_text == ()
            continue
        n = client.num_examples
        assert len(client.missing_image) == round(0.3 * n) and len(client.missing_text) == round(0.2 * n)
        assert set(client.missing_image).isdisjoint(client.missing_text)  # a sample keeps one modality
        assert set(client.missing_image) | set(client.missing_text) <= set(client.train_ids)
    assert clients == _build(train, missing_image=0.3, missing_text=0.2)  # seeded
    save_layout(clients, tmp_path / "partition.json", {})
    assert load_layout(tmp_path / "partition.json")[0] == clients  # saved with the partition
    with pytest.raises(ValueError, match=r"missing_image \+ layout.missing_text must be <= 1"):
        FederationLayout(missing_image=0.6, missing_text=0.5)


def test_batches_pair_complete_rows_and_carry_the_rest_as_extras(train) -> None:
    client = next(c for c in _build(train, missing_image=0.3, missing_text=0.3) if c.kind == "paired")
    rows = {sample_id: i for i, sample_id in enumerate(train.ids)}
    split = train.subset([rows[i] for i in client.train_ids], name=client.cid)
    data = ClientData(split, "paired", client.missing_image, client.missing_text)
    seen_pairs, seen_images, seen_texts = [], [], []
    for batch in data.batches(np.random.default_rng(0), 16):
        assert len(batch["ids"]) == len(batch["images"]) == len(batch["captions"])
        seen_pairs += batch["ids"]
        if "extra_images" in batch:
            assert len(batch["extra_images"]) == len(batch["extra_image_ids"])
            seen_images += batch["extra_image_ids"]
        if "extra_captions" in batch:
            assert len(batch["extra_captions"]) == len(batch["extra_text_ids"])
            seen_texts += batch["extra_text_ids"]
    missing = set(client.missing_image) | set(client.missing_text)
    assert sorted(seen_pairs) == sorted(set(client.train_ids) - missing)  # each complete row once
    assert sorted(seen_images) == sorted(client.missing_text)  # rows without text: image only
    assert sorted(seen_texts) == sorted(client.missing_image)  # rows without image: text only
    full = list(ClientData(split, "paired").batches(np.random.default_rng(0), 16))
    assert sum(len(b["ids"]) for b in full) == client.num_examples
    assert not any(k.startswith("extra_") for b in full for k in b)


def test_unpaired_texts_and_images_are_further_negatives_by_hand() -> None:
    image = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0]])
    extra_text = torch.tensor([[0.0, 1.0]])  # a caption without its image: a negative for the image
    extra_image = torch.tensor([[-1.0, 0.0]])  # an image without its text: a negative for the text
    scale = torch.tensor(2.0)
    # i2t: logits [2 cos 0, 2 cos 90deg] = [2, 0] -> CE = log(1 + e^-2);
    # t2i: logits [2, 2 cos 180deg] = [2, -2] -> CE = log(1 + e^-4)
    want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-4))) / 2
    assert float(clip_loss(image, text, scale, extra_image, extra_text)) == pytest.approx(want, rel=1e-6)
    assert float(clip_loss(image, text, scale)) == pytest.approx(0.0, abs=1e-7)  # one pair: no negative
    a, b = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).split(2)
    assert torch.equal(clip_loss(a, b, scale), clip_loss(a, b, scale, None, None))


@pytest.mark.slow
def test_a_run_with_missing_modalities(tmp_path: Path) -> None:
    from mmfed.cli import main

    run_dir = tmp_path / "run"
    code = main(
        ["train", "experiment=smoke", "rounds=1", "quiet=true", f"run_dir={run_dir}",
         "layout.missing_image=0.3", "layout.missing_text=0.3"]
    )  # fmt: skip
    assert code == 0
    saved = json.loads((run_dir / "partition.json").read_text())["clients"]
    paired = next(c for c in saved if c["kind"] == "paired")
    assert paired["missing_image"] and paired["missing_text"]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["train/paired/contrastive"])
