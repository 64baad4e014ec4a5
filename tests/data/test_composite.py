"""The composite world of the CreamFL/FedAFD preset, on fixtures: roles, public data, protocols, clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmfed.cli import compose
from mmfed.config import instantiate
from mmfed.data.partition import IidPartitioner
from mmfed.data.sources import AgNews, Cifar100, Coco, CocoPublic, CompositeSource, Flickr30k
from tests.data.fixtures import write_agnews, write_cifar100, write_karpathy


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("composite")
    write_cifar100(base / "cifar100")
    write_agnews(base / "agnews")
    write_karpathy(base / "flickr30k", "flickr30k")
    write_karpathy(base / "coco", "coco", counts={"train": 14, "restval": 4, "val": 5, "test": 12})
    return {name: base / name for name in ("cifar100", "agnews", "flickr30k", "coco")}


def _preset(roots: dict[str, Path], *extra: str):
    return compose(
        [
            "experiment=creamfl_real",
            f"data.image.root={roots['cifar100']}",
            f"data.text.root={roots['agnews']}",
            f"data.paired.root={roots['flickr30k']}",
            f"data.public.root={roots['coco']}",
            "data.public.size=8",
            f"data.eval_data.coco.root={roots['coco']}",
            *extra,
        ]
    )


def test_the_creamfl_preset_composes_and_every_role_loads(roots: dict[str, Path]) -> None:
    cfg = _preset(roots)
    assert (cfg.layout.image, cfg.layout.text, cfg.layout.paired) == (10, 10, 15)
    assert cfg.partition.alpha == 0.1 and cfg.partition_by_kind.paired._target_.endswith("IidPartitioner")
    world = instantiate(cfg.data, "data")
    assert isinstance(world, CompositeSource) and world.kinds == ("image", "text", "paired")
    assert isinstance(world.role("image"), Cifar100) and isinstance(world.role("text"), AgNews)
    assert isinstance(world.role("paired"), Flickr30k) and isinstance(world.role("public"), CocoPublic)
    image, text, paired = (world.train_split(k) for k in ("image", "text", "paired"))
    assert (len(image), len(text), len(paired)) == (180, 54, 12)
    assert image.images.shape[1:] == (3, 32, 32) and paired.images.shape[1:] == (3, 32, 32)  # one image size
    assert text.images is None and text.captions is not None and paired.image_labels is None
    assert len(world.image_classes) == 100 and len(world.text_classes) == 4
    public = world.split("public")
    assert len(public) == 8 and set(public.ids).isdisjoint(Coco(root=str(roots["coco"])).split("test").ids)
    assert world.split("val").ids == Flickr30k(root=str(roots["flickr30k"])).split("val").ids
    assert world.split("image/test").name == "test" and len(world.split("image/test")) == 100
    sizes = {name: len(world.protocol_split(name)) for name in world.protocols}
    assert sizes == {"coco-1k": 12, "coco-5k": 12, "flickr30k-1k": 6, "cifar100": 100, "agnews": 20}
    assert world.data_metrics()["data/flickr30k/train/skipped"] == 0.0


def test_clients_partition_each_kind_own_split(roots: dict[str, Path]) -> None:
    cfg = _preset(
        roots, "layout.image=3", "layout.text=2", "layout.paired=2", "partition.min_partition_size=2"
    )
    world = instantiate(cfg.data, "data")
    layout = instantiate(cfg.layout, "layout")
    partitioners = {
        "image": instantiate(cfg.partition, "partition"),
        "text": instantiate(cfg.partition, "partition"),
        "paired": instantiate(cfg.partition_by_kind.paired, "partition_by_kind.paired"),
    }
    clients = world.build_clients(layout, partitioners, seed=0)
    assert [c.cid for c in clients] == [
        "image-0",
        "image-1",
        "image-2",
        "text-0",
        "text-1",
        "paired-0",
        "paired-1",
    ]
    for kind in world.kinds:  # each kind splits all of its own rows, nothing else
        mine = [i for c in clients if c.kind == kind for i in (*c.train_ids, *c.test_ids)]
        assert sorted(mine) == sorted(world.train_split(kind).ids)
    paired_sizes = [c.num_examples + len(c.test_ids) for c in clients if c.kind == "paired"]
    assert paired_sizes == [6, 6]  # IID shards of the unlabelled pairs
    again = world.build_clients(layout, partitioners, seed=0)
    assert again == clients and world.build_clients(layout, partitioners, seed=1) != clients
    fewer = instantiate(cfg.layout, "layout")
    fewer.counts["text"] = 0
    assert [c for c in world.build_clients(fewer, partitioners, seed=0) if c.kind == "image"] == clients[:3]


def test_composite_errors_name_the_problem(roots: dict[str, Path]) -> None:
    world = instantiate(_preset(roots).data, "data")
    with pytest.raises(ValueError, match="one training split per client kind: use train_split"):
        world.split("train")
    with pytest.raises(ValueError, match="protocol 'cifar10' is not in data.protocols"):
        world.protocol_split("cifar10")
    paired = Flickr30k(root=str(roots["flickr30k"]))
    with pytest.raises(ValueError, match="no 'coco' source .* add data.eval_data.coco"):
        CompositeSource(paired=paired, protocols=("coco-5k",))
    with pytest.raises(ValueError, match="protocol='coco-2k' is not one of"):
        CompositeSource(paired=paired, protocols=("coco-2k",))
    with pytest.raises(ValueError, match="data.val='image' names no configured client role"):
        CompositeSource(paired=paired, val="image")
    with pytest.raises(ValueError, match="data.text must be a data source config"):
        CompositeSource(text={"root": "x"})
    with pytest.raises(ValueError, match="layout.text=1 but data has no 'text' source"):
        from mmfed.data.layout import FederationLayout

        CompositeSource(paired=paired).build_clients(FederationLayout(0, 1, 1), IidPartitioner(), 0)
    assert CompositeSource(paired=paired, protocols=("flickr30k-1k",)).protocol_split("flickr30k-1k").ids[
        0
    ] == ("flickr30k-5017")
    assert CompositeSource().data_metrics() == {}


@pytest.mark.parametrize("alpha", ["005", "02", "05"])
def test_feddifrc_presets(alpha: str, tmp_path: Path) -> None:
    cfg = compose([f"experiment=feddifrc_cifar10_nid1_a{alpha}", f"data.root={tmp_path}"])
    assert cfg.partition.alpha == float(f"0.{alpha[1:]}") and cfg.data._target_.endswith("Cifar10")
    assert (cfg.layout.image, cfg.layout.text, cfg.layout.paired, cfg.clients_per_round) == (10, 0, 0, 5)
    nid2 = compose(["experiment=feddifrc_cifar10_nid2"])
    assert nid2.partition._target_.endswith("ShardPartitioner") and nid2.partition.classes_per_client == 2
