"""CIFAR-10/100, Tiny-ImageNet and AG News from their upstream formats and from `datasets` copies."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mmfed.data.samples import LazyImages
from mmfed.data.sources import AgNews, Cifar10, Cifar100, DataNotFoundError, TinyImageNet
from tests.data.fixtures import (
    AG_CLASSES,
    CIFAR10_CLASSES,
    label_red,
    write_agnews,
    write_cifar10,
    write_cifar100,
    write_hub_agnews,
    write_hub_cifar10,
    write_tiny_imagenet,
)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """What HF_HUB_OFFLINE=1 at start-up does: the hub is never contacted."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _reds(images: torch.Tensor) -> np.ndarray:
    return images[:, 0].float().mean(dim=(1, 2)).round().numpy()


def test_cifar10_from_pickle_batches(tmp_path: Path) -> None:
    labels = write_cifar10(tmp_path)  # 5 x 20 train, 30 test
    source = Cifar10(root=str(tmp_path), val_fraction=0.2, seed=3)
    train, val, test = source.split("train"), source.split("val"), source.split("test")
    assert (len(train), len(val), len(test)) == (80, 20, 30)
    assert source.image_classes == CIFAR10_CLASSES and train.image_classes == CIFAR10_CLASSES
    assert set(train.ids).isdisjoint(val.ids) and len(set(train.ids) | set(val.ids)) == 100
    assert train.ids[0].startswith("cifar10-train-") and test.ids[0] == "cifar10-test-000000"
    assert isinstance(train.images, LazyImages) and train.images.shape == (80, 3, 32, 32)
    rows = [int(i.rsplit("-", 1)[1]) for i in train.ids]
    assert train.image_labels.tolist() == labels[rows].tolist()  # file order -> ids -> labels
    expected = np.array([label_red(c) for c in train.image_labels.tolist()])
    assert (_reds(train.images[torch.arange(80)]) == expected).all()  # the pixels are that label's
    again = Cifar10(root=str(tmp_path), val_fraction=0.2, seed=3).split("val")
    other = Cifar10(root=str(tmp_path), val_fraction=0.2, seed=4).split("val")
    assert again.ids == val.ids and other.ids != val.ids  # the hold-out is seeded, not run-dependent


def test_cifar10_image_size_resizes_lazily(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=4, n_test=4)
    split = Cifar10(root=str(tmp_path / "cifar-10-batches-py"), image_size=48).split("test")
    assert split.images.shape == (4, 3, 48, 48) and split.images[0:2].shape == (2, 3, 48, 48)


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    fine = write_cifar100(tmp_path)
    source = Cifar100(root=str(tmp_path), val_fraction=0.0)
    train = source.split("train")
    assert (
        len(train) == 200
        and len(source.image_classes) == 100
        and train.image_labels.tolist() == fine.tolist()
    )
    coarse = Cifar100(root=str(tmp_path), val_fraction=0.0, label="coarse").split("train")
    assert len(coarse.image_classes) == 20 and coarse.image_labels.tolist() == (fine // 5).tolist()
    with pytest.raises(ValueError, match="val_fraction=0.0 leaves no 'val' rows"):
        source.split("val")
    with pytest.raises(ValueError, match="label='medium' is not one of"):
        Cifar100(label="medium")


def test_a_broken_cifar_batch_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=4, n_test=4)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"labels": [0, 1], b"data": np.zeros((2, 100), np.uint8)}))
    with pytest.raises(ValueError, match=r"data_batch_3: 'data' must be \[N, 3072\]"):
        Cifar10(root=str(tmp_path)).split("train")


def test_cifar10_from_a_saved_hub_copy(tmp_path: Path) -> None:
    write_hub_cifar10(tmp_path / "hub")
    for source in (
        Cifar10(root=str(tmp_path / "hub")),
        Cifar10(root=str(tmp_path / "none"), hub_id=str(tmp_path / "hub")),
    ):
        train, test = source.split("train"), source.split("test")
        assert len(train) + len(source.split("val")) == 30 and len(test) == 10
        assert source.image_classes == CIFAR10_CLASSES
        expected = np.array([label_red(c) for c in test.image_labels.tolist()])
        assert (_reds(test.images[0:10]) == expected).all()


def test_missing_data_is_one_error_naming_every_place_tried(tmp_path: Path, offline: None) -> None:
    with pytest.raises(DataNotFoundError) as info:
        Cifar10(root=str(tmp_path / "nowhere")).split("train")
    message = str(info.value)
    assert "\n" not in message and message.startswith("dataset 'cifar10' not found")
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py") in message  # the local layout
    assert "hub dataset 'uoft-cs/cifar10'" in message and "HF_HUB_OFFLINE" in message
    assert "cifar-10-batches-py/data_batch_1" in message and "data_recipes" in message  # what to put where
    with pytest.raises(DataNotFoundError, match="hub id / saved folder 'no_such_folder'"):
        AgNews(root=str(tmp_path), hub_id="no_such_folder").split("test")


def test_tiny_imagenet_folders(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)  # wnids n02, n01, n03 (sorted -> n01, n02, n03), 4 train + 2 val each
    source = TinyImageNet(root=str(tmp_path), val_fraction=0.25)
    train, val, test = source.split("train"), source.split("val"), source.split("test")
    assert source.image_classes == ["n01", "n02", "n03"] and (len(train), len(val), len(test)) == (9, 3, 6)
    assert "tiny_imagenet-n02_0" in train.ids + val.ids
    assert test.ids[:2] == ["tiny_imagenet-val_2", "tiny_imagenet-val_3"]  # val_annotations.txt order
    for split in (train, test):
        assert split.images.shape[1:] == (3, 64, 64)
        reds = _reds(split.images[torch.arange(len(split))])
        assert np.abs(reds - np.array([label_red(c) for c in split.image_labels.tolist()])).max() <= 2
        for sample_id, label in zip(split.ids, split.image_labels.tolist(), strict=True):
            if "_n0" in sample_id:
                assert sample_id.split("-")[1].startswith(source.image_classes[label])


def test_tiny_imagenet_bad_annotation_line_is_named(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_99.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations.txt line 7: .*'val_99.JPEG\\tn99"):
        TinyImageNet(root=str(tmp_path)).split("test")


def test_agnews_csv(tmp_path: Path) -> None:
    write_agnews(tmp_path)
    source = AgNews(root=str(tmp_path), val_fraction=0.25)
    train, val, test = source.split("train"), source.split("val"), source.split("test")
    assert (len(train), len(val), len(test)) == (45, 15, 20) and source.text_classes == AG_CLASSES
    assert train.images is None and train.image_labels is None
    for split in (train, test):
        for (caption,), label in zip(split.captions, split.text_labels.tolist(), strict=True):
            assert f"topic {AG_CLASSES[label]} " in caption and "\\" not in caption
    assert test.captions[0][0].startswith("Story 0, topic ") and "Details of story 0" in test.captions[0][0]


def test_agnews_bad_row_is_named(tmp_path: Path) -> None:
    write_agnews(tmp_path)
    with (tmp_path / "test.csv").open("a") as handle:
        handle.write('"9","title","text"\n')
    with pytest.raises(ValueError, match=r"test.csv row 21: expected 'class index \(1-4\)"):
        AgNews(root=str(tmp_path)).split("test")


def test_agnews_from_a_saved_hub_copy(tmp_path: Path) -> None:
    write_hub_agnews(tmp_path)
    source = AgNews(root=str(tmp_path), val_fraction=0.0)
    train = source.split("train")
    assert len(train) == 24 and source.text_classes == AG_CLASSES
    for (caption,), label in zip(train.captions, train.text_labels.tolist(), strict=True):
        assert f"topic {AG_CLASSES[label]} " in caption
