"""A federation whose client kinds read different datasets (the CreamFL preset) trains end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmfed.cli import compose
from mmfed.federation.run import train
from tests.data.fixtures import write_agnews, write_cifar100, write_karpathy

pytestmark = pytest.mark.slow
TINY_MODEL = [
    "model.embed_dim=16",
    "model.image_encoder.width=8",
    "model.text_encoder.width=16",
    "model.text_encoder.layers=1",
    "model.text_encoder.heads=2",
]


def test_creamfl_on_cifar100_agnews_flickr30k_with_public_coco(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar100")
    write_agnews(tmp_path / "agnews")
    write_karpathy(tmp_path / "flickr30k", "flickr30k")
    write_karpathy(tmp_path / "coco", "coco", counts={"train": 14, "restval": 4, "val": 5, "test": 12})
    run = tmp_path / "run"
    cfg = compose(
        [
            "experiment=creamfl_real",
            "algorithm=creamfl",
            "quiet=true",
            f"run_dir={run}",
            "rounds=2",
            f"data.image.root={tmp_path / 'cifar100'}",
            f"data.text.root={tmp_path / 'agnews'}",
            f"data.paired.root={tmp_path / 'flickr30k'}",
            f"data.public.root={tmp_path / 'coco'}",
            "data.public.size=8",
            f"data.eval_data.coco.root={tmp_path / 'coco'}",
            "data.protocols=[coco-5k,flickr30k-1k,cifar100,agnews]",
            "layout.image=2",
            "layout.text=2",
            "layout.paired=2",
            "clients_per_round=null",
            "partition.min_partition_size=5",
            "training.batch_size=8",
            *TINY_MODEL,
        ]
    )
    summary = train(cfg)
    partition = json.loads((run / "partition.json").read_text())
    kinds = {c["cid"]: c["kind"] for c in partition["clients"]}
    assert kinds == {
        "image-0": "image",
        "image-1": "image",
        "text-0": "text",
        "text-1": "text",
        "paired-0": "paired",
        "paired-1": "paired",
    }
    # each kind's clients hold rows of their own dataset only
    ids = {c["cid"]: c["train_ids"] + c["test_ids"] for c in partition["clients"]}
    image_ids = set(ids["image-0"] + ids["image-1"])
    assert image_ids.isdisjoint(ids["text-0"] + ids["paired-0"])
    assert partition["meta"]["partition_by_kind"]["paired"]["_target_"].endswith("IidPartitioner")
    for name in ("coco-5k", "flickr30k-1k"):
        assert f"test/{name}/retrieval/rsum" in summary
    assert "data/flickr30k/train/skipped" in summary
    assert "local/image/classification/image/acc/mean" in summary  # CIFAR-100 clients, own test rows
    assert "local/text/classification/text/acc/mean" in summary  # AG News clients
