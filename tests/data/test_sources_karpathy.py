"""Flickr30k and COCO with the Karpathy splits, corrupt images, hub copies, the public COCO subset."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.cli import compose
from mmfed.config import instantiate
from mmfed.data.samples import CorruptImageError, LazyImages, MultimodalSplit
from mmfed.data.sources import Coco, CocoPublic, Flickr30k
from tests.data.fixtures import (
    pair_colour,
    write_hub_coco_without_pixels,
    write_hub_flickr30k,
    write_karpathy,
)


def check_pairs(split: MultimodalSplit, first_index: int = 0) -> None:
    """Every row's pixels, id and captions name the same fixture image."""
    images = split.images[torch.arange(len(split))].float().mean(dim=(2, 3))  # [N, 3]
    for row, sample_id in enumerate(split.ids):
        k = int(re.findall(r"photo (\d+) ", split.captions[row][0])[0])
        assert all(f"photo {k} " in caption for caption in split.captions[row])
        assert torch.allclose(images[row], torch.tensor(pair_colour(k), dtype=torch.float32), atol=3), (
            sample_id
        )


def test_flickr30k_karpathy_json(tmp_path: Path) -> None:
    write_karpathy(tmp_path, "flickr30k")  # train 12, val 5, test 6 (the 29k / 1k / 1k shape)
    source = Flickr30k(root=str(tmp_path), image_size=24)
    train, val, test = source.split("train"), source.split("val"), source.split("test")
    assert (len(train), len(val), len(test)) == (12, 5, 6)
    assert train.ids[0] == "flickr30k-5000" and test.ids[0] == "flickr30k-5017"
    assert isinstance(test.images, LazyImages) and test.images.shape == (6, 3, 24, 24)
    assert train.image_labels is None and source.image_classes == [] and source.text_classes == []
    assert all(len(caps) == 5 for caps in train.captions)  # image 1 has 7: the first five are kept
    assert train.captions[1] == [f"A photo 1 caption {j}." for j in range(5)]
    for split in (train, val, test):
        check_pairs(split)
    all_captions = Flickr30k(root=str(tmp_path), captions_per_image=None).split("train")
    assert len(all_captions.captions[1]) == 7


def test_coco_trains_on_train_plus_restval(tmp_path: Path) -> None:
    write_karpathy(tmp_path, "coco")  # train 12, restval 4, val 5, test 6
    source = Coco(root=str(tmp_path), image_size=16)
    train, val, test = source.split("train"), source.split("val"), source.split("test")
    assert (len(train), len(val), len(test)) == (16, 5, 6)
    assert train.ids[0] == "coco-1000" and set(train.ids).isdisjoint(val.ids + test.ids)
    assert len(Coco(root=str(tmp_path), use_restval=False).split("train")) == 12
    check_pairs(train)
    check_pairs(test)
    texts, rows, _ = test.flat_captions()
    assert len(texts) == 30 and rows.tolist() == np.repeat(np.arange(6), 5).tolist()


def test_corrupt_image_is_an_error_naming_the_sample_unless_skipped(tmp_path: Path) -> None:
    entries = write_karpathy(tmp_path, "flickr30k", corrupt=(3,))
    with pytest.raises(CorruptImageError) as info:
        Flickr30k(root=str(tmp_path)).split("train")
    message = str(info.value)
    assert "\n" not in message and "'flickr30k-5003'" in message and entries[3]["filename"] in message
    assert "skip_corrupt=true" in message
    source = Flickr30k(root=str(tmp_path), skip_corrupt=True, image_size=16)
    train = source.split("train")
    assert (
        len(train) == 11 and "flickr30k-5003" not in train.ids and list(train.skipped) == ["flickr30k-5003"]
    )
    check_pairs(train)  # the rows after the skipped one are still aligned
    source.split("val")
    assert source.data_metrics() == {"data/flickr30k/train/skipped": 1.0, "data/flickr30k/val/skipped": 0.0}


def test_missing_image_file_is_reported(tmp_path: Path) -> None:
    entries = write_karpathy(tmp_path, "flickr30k")
    (tmp_path / "flickr30k-images" / entries[20]["filename"]).unlink()
    with pytest.raises(CorruptImageError, match=r"'flickr30k-5020' \(.*5020.jpg: file is missing\)"):
        Flickr30k(root=str(tmp_path)).split("test")


def test_truncated_jpeg_found_by_decode_check_or_named_when_its_batch_decodes(tmp_path: Path) -> None:
    write_karpathy(tmp_path, "flickr30k", truncated=(2,))
    lazy = Flickr30k(root=str(tmp_path), image_size=16).split("train")  # the header parses: "open" passes
    assert len(lazy) == 12
    with pytest.raises(CorruptImageError, match="image of sample 'flickr30k-5002'"):
        lazy.images[torch.tensor([0, 2])]
    thorough = Flickr30k(root=str(tmp_path), image_size=16, verify_images="decode", skip_corrupt=True)
    assert list(thorough.split("train").skipped) == ["flickr30k-5002"]


def test_flickr30k_from_a_saved_hub_copy_matches_the_json(tmp_path: Path) -> None:
    entries = write_karpathy(tmp_path / "local", "flickr30k")
    write_hub_flickr30k(tmp_path / "hub", entries)
    local = Flickr30k(root=str(tmp_path / "local"), image_size=16)
    saved = str(tmp_path / "hub")
    for hub in (Flickr30k(root=saved, image_size=16), Flickr30k(root="x", hub_id=saved, image_size=16)):
        for name in ("train", "val", "test"):
            assert hub.split(name).ids == local.split(name).ids
            assert hub.split(name).captions == local.split(name).captions
            check_pairs(hub.split(name))


def test_coco_hub_copy_without_pixels_reads_image_root(tmp_path: Path) -> None:
    entries = write_karpathy(tmp_path / "images", "coco", write_json=False)
    write_hub_coco_without_pixels(tmp_path / "hub", entries)
    source = Coco(root=str(tmp_path / "hub"), image_root=str(tmp_path / "images"), image_size=16)
    assert len(source.split("train")) == 16 and len(source.split("val")) == 5  # "validation" -> val
    check_pairs(source.split("test"))


def test_coco_public_is_a_seeded_subset_disjoint_from_evaluation(tmp_path: Path) -> None:
    write_karpathy(tmp_path, "coco")
    public = CocoPublic(size=10, seed=1, root=str(tmp_path), image_size=16).split("public")
    coco = Coco(root=str(tmp_path))
    assert len(public) == 10 and set(public.ids) <= set(coco.split("train").ids)
    assert set(public.ids).isdisjoint(coco.split("val").ids + coco.split("test").ids)
    assert CocoPublic(size=10, seed=1, root=str(tmp_path)).split("public").ids == public.ids
    assert CocoPublic(size=10, seed=2, root=str(tmp_path)).split("public").ids != public.ids
    check_pairs(public)
    with pytest.raises(ValueError, match="size=17 exceeds the 16 COCO training images"):
        CocoPublic(size=17, root=str(tmp_path)).split("public")
    with pytest.raises(ValueError, match="has no split 'train'"):
        CocoPublic(root=str(tmp_path)).split("train")


@pytest.mark.parametrize(("preset", "size"), [("coco_public_10k", 10000), ("coco_public_50k", 50000)])
def test_public_presets(preset: str, size: int, tmp_path: Path) -> None:
    cfg = compose([f"data={preset}", f"data.root={tmp_path}"])
    source = instantiate(cfg.data, "data")
    assert isinstance(source, CocoPublic) and source.size == size and source.root == tmp_path
