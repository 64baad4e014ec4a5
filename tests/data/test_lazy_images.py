"""The lazy image column: the operations the consumers use, laziness, and errors that name the sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfed.data.samples import CorruptImageError, LazyImages, MultimodalSplit, to_rgb_uint8
from mmfed.data.sources.base import ArrayStore, FileStore


class CountingStore:
    """Solid images whose red channel is the row number; counts how many rows were opened."""

    def __init__(self, n: int, size: tuple[int, int] = (12, 8)) -> None:
        self.n, self.size, self.opened = n, size, []

    def __len__(self) -> int:
        return self.n

    def open(self, row: int) -> Image.Image:
        self.opened.append(row)
        return Image.new("RGB", self.size, (row, 100, 200))

    def where(self, row: int) -> str:
        return f"counting row {row}"


def _reds(images: torch.Tensor) -> list[int]:
    return images[:, 0, 0, 0].tolist()


def test_indexing_forms_used_by_the_consumers() -> None:
    store = CountingStore(10)
    column = LazyImages(store, [f"s{i}" for i in range(10)], size=6)
    assert len(column) == 10 and column.shape == (10, 3, 6, 6) and column.dtype == torch.uint8
    assert store.opened == []  # nothing decoded up front
    batch = column[torch.tensor([7, 2, 2])]  # ClientData: a tensor of rows
    assert batch.dtype == torch.uint8 and batch.shape == (3, 3, 6, 6) and _reds(batch) == [7, 2, 2]
    assert _reds(column[2:5]) == [2, 3, 4]  # Evaluator: a python slice
    assert _reds(column[8:100]) == [8, 9]
    assert _reds(column[[0, -1]]) == [0, 9]
    assert _reds(column[np.array([5])]) == [5]
    assert column[3].shape == (3, 6, 6) and int(column[3][0, 0, 0]) == 3
    assert column[torch.tensor([], dtype=torch.long)].shape == (0, 3, 6, 6)
    with pytest.raises(IndexError):
        column[torch.tensor([10])]
    with pytest.raises(IndexError):
        column[[0.5]]


def test_subset_stays_lazy_and_composes() -> None:
    store = CountingStore(10)
    column = LazyImages(store, [f"s{i}" for i in range(10)], size=4)
    sub = column.subset(torch.tensor([9, 4, 1, 0]))
    subsub = sub.subset([2, 0])
    assert store.opened == []
    assert subsub.ids == ["s1", "s9"] and _reds(subsub[0:2]) == [1, 9]
    assert sorted(store.opened) == [1, 9]  # only the indexed rows were decoded
    assert _reds(column.subset(torch.tensor([True] + [False] * 9)).materialize()) == [0]


def test_resize_is_shorter_side_then_centre_crop() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # left quarter red: cropped away by a centre crop
    image.paste((0, 255, 0), (10, 0, 30, 20))  # middle half green
    out = to_rgb_uint8(image, 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, 1:-1, 1].min() > 200 and out[:, 1:-1, 0].max() < 60
    grey = to_rgb_uint8(Image.new("L", (8, 8), 77), 8)
    assert grey.shape == (8, 8, 3) and (grey == 77).all()


def test_array_store_takes_rows_without_pil() -> None:
    array = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    array[:, :, :, 0] = np.arange(5)[:, None, None]
    column = LazyImages(ArrayStore(array, "arr"), list("abcde"), size=4)
    assert _reds(column[torch.tensor([4, 1])]) == [4, 1]
    resized = LazyImages(ArrayStore(array, "arr"), list("abcde"), size=8)
    assert resized[[3]].shape == (1, 3, 8, 8) and int(resized[[3]][0, 0, 4, 4]) == 3


def test_a_bad_file_names_its_sample_and_path(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.new("RGB", (5, 5), (1, 2, 3)).save(good)
    bad.write_bytes(b"garbage")
    column = LazyImages(FileStore([good, bad]), ["img-good", "img-bad"], size=5)
    assert column[[0]].shape == (1, 3, 5, 5)
    with pytest.raises(CorruptImageError, match=r"sample 'img-bad' \(.*bad\.jpg\)") as info:
        column[torch.tensor([0, 1])]
    assert "\n" not in str(info.value) and "skip_corrupt" in str(info.value)


def test_split_accepts_a_lazy_column_and_keeps_it_aligned() -> None:
    store = CountingStore(4)
    ids = ["a", "b", "c", "d"]
    split = MultimodalSplit(
        "t", ids, images=LazyImages(store, ids, 6), captions=[[f"cap {i}"] for i in ids],
        image_labels=torch.tensor([0, 1, 0, 1]), image_classes=["x", "y"],
    )  # fmt: skip
    sub = split.subset([3, 1])
    assert isinstance(sub.images, LazyImages) and store.opened == []
    assert sub.ids == ["d", "b"] and sub.images.ids == ["d", "b"] and sub.captions == [["cap d"], ["cap b"]]
    assert _reds(sub.images[torch.tensor([0, 1])]) == [3, 1] and sub.image_labels.tolist() == [1, 1]
    with pytest.raises(ValueError, match="images has 3 rows"):
        MultimodalSplit("t", ids, images=LazyImages(store, ids[:3], 6, rows=np.arange(3)))
    with pytest.raises(ValueError, match="images row 1 is sample 'c' but ids\\[1\\] is 'b'"):
        MultimodalSplit("t", ids, images=LazyImages(store, ["a", "c", "b", "d"], 6))
