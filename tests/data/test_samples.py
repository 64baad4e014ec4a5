from __future__ import annotations

import numpy as np
import pytest
import torch

from mmfed.data.samples import MultimodalSplit


def make_split(n: int = 4, **overrides: object) -> MultimodalSplit:
    columns: dict[str, object] = {
        "name": "train",
        "ids": [f"s{i}" for i in range(n)],
        "images": torch.arange(n * 3 * 2 * 2, dtype=torch.uint8).reshape(n, 3, 2, 2),
        "captions": [[f"caption {i}.{j}" for j in range(i % 3 + 1)] for i in range(n)],
        "image_labels": torch.arange(n, dtype=torch.int64) % 3,
        "text_labels": torch.arange(n, dtype=torch.int64) % 2,
        "image_classes": ["a", "b", "c"],
        "text_classes": ["x", "y"],
    }
    columns.update(overrides)
    return MultimodalSplit(**columns)  # type: ignore[arg-type]


def test_basic_columns_and_len() -> None:
    split = make_split(5)
    assert len(split) == 5
    assert split.ids[2] == "s2"
    assert split.images is not None and split.images.shape == (5, 3, 2, 2)


def test_missing_columns_are_allowed() -> None:
    split = MultimodalSplit(name="pairs", ids=["a", "b"], images=None, captions=[["x"], ["y"]])
    assert split.image_labels is None and split.text_labels is None
    assert len(split) == 2


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("images", torch.zeros(3, 3, 2, 2, dtype=torch.uint8)),
        ("captions", [["a"], ["b"], ["c"]]),
        ("image_labels", torch.zeros(3, dtype=torch.int64)),
        ("text_labels", torch.zeros(5, dtype=torch.int64)),
    ],
)
def test_length_mismatch_names_the_column(column: str, value: object) -> None:
    with pytest.raises(ValueError, match=column) as info:
        make_split(4, **{column: value})
    assert "\n" not in str(info.value)


def test_duplicate_id_is_named() -> None:
    with pytest.raises(ValueError, match="duplicate sample id 's1'"):
        make_split(3, ids=["s0", "s1", "s1"])


def test_non_string_id_rejected() -> None:
    with pytest.raises(ValueError, match=r"ids\[1\]"):
        make_split(2, ids=["s0", 1])


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(4, 3, 2, 2, dtype=torch.float32),
        torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
        torch.zeros(4, 3, 2, dtype=torch.uint8),
    ],
)
def test_bad_images_rejected(images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="images"):
        make_split(4, images=images)


def test_bad_labels_rejected() -> None:
    with pytest.raises(ValueError, match="image_labels must be an int64"):
        make_split(4, image_labels=torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="text_labels of sample 's2' is 7"):
        make_split(4, text_labels=torch.tensor([0, 1, 7, 0]))


def test_bad_captions_rejected() -> None:
    with pytest.raises(ValueError, match="captions of sample 's1'"):
        make_split(2, captions=[["ok"], "not a list"])


@pytest.mark.parametrize(
    "indices",
    [[3, 0, 2], torch.tensor([3, 0, 2]), np.array([3, 0, 2]), [-1, 0, -2]],
)
def test_subset_keeps_columns_aligned(indices: object) -> None:
    split = make_split(4)
    sub = split.subset(indices)  # type: ignore[arg-type]
    assert sub.ids == ["s3", "s0", "s2"]
    assert sub.name == "train"
    assert split.images is not None and sub.images is not None
    assert torch.equal(sub.images, split.images[[3, 0, 2]])
    assert sub.captions == [split.captions[i] for i in (3, 0, 2)]  # type: ignore[index]
    assert torch.equal(sub.image_labels, split.image_labels[[3, 0, 2]])  # type: ignore[index,arg-type]
    assert torch.equal(sub.text_labels, split.text_labels[[3, 0, 2]])  # type: ignore[index,arg-type]
    assert sub.image_classes == split.image_classes and sub.text_classes == split.text_classes


def test_subset_bool_mask_name_and_empty() -> None:
    split = make_split(4)
    sub = split.subset(torch.tensor([True, False, True, False]), name="part")
    assert sub.ids == ["s0", "s2"] and sub.name == "part"
    empty = split.subset([])
    assert len(empty) == 0 and empty.images is not None and empty.images.shape == (0, 3, 2, 2)
    assert empty.flat_captions()[0] == []


def test_subset_does_not_share_caption_lists() -> None:
    split = make_split(2)
    sub = split.subset([0])
    sub.captions[0].append("extra")  # type: ignore[index]
    assert split.captions[0] == ["caption 0.0"]  # type: ignore[index]


def test_subset_errors() -> None:
    split = make_split(3)
    with pytest.raises(IndexError):
        split.subset([3])
    with pytest.raises(ValueError, match="duplicate sample id"):
        split.subset([0, 0])
    with pytest.raises(ValueError, match="bool mask"):
        split.subset(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="indices"):
        split.subset([0.5])


def test_subset_with_missing_columns() -> None:
    split = MultimodalSplit(
        name="t", ids=["a", "b"], images=None, captions=None, image_labels=None, text_labels=None
    )
    sub = split.subset([1])
    assert sub.ids == ["b"] and sub.images is None and sub.captions is None


def test_flat_captions_in_row_order() -> None:
    split = make_split(4)  # rows have 1, 2, 3, 1 captions
    texts, rows, labels = split.flat_captions()
    assert texts == ["caption 0.0", "caption 1.0", "caption 1.1", "caption 2.0", "caption 2.1", "caption 2.2",
                     "caption 3.0"]  # fmt: skip
    assert rows.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert rows.dtype == torch.int64 and labels.dtype == torch.int64
    assert labels.tolist() == [0, 1, 1, 0, 0, 0, 1]


def test_flat_captions_without_labels_or_captions() -> None:
    split = MultimodalSplit(name="t", ids=["a", "b"], images=None, captions=[["x", "y"], ["z"]])
    texts, rows, labels = split.flat_captions()
    assert texts == ["x", "y", "z"] and rows.tolist() == [0, 0, 1] and labels.tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="no captions"):
        MultimodalSplit(name="t", ids=["a"], images=None, captions=None).flat_captions()
