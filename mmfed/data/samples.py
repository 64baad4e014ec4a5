"""The columnar split every data source returns.

One row per sample, keyed by a stable string id: partitions, caches and saved layouts refer to
samples by id, never by row number, so they survive re-ordering and sub-setting. A column is None
when the source does not have that modality or label (e.g. unlabelled image-caption pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import torch


@dataclass
class MultimodalSplit:
    """Row i is the sample ids[i]; ids are stable strings (caches and partitions key on them)."""

    name: str
    ids: list[str]
    images: torch.Tensor | None = None  # uint8 [N, 3, H, W]
    captions: list[list[str]] | None = None  # N lists of captions
    image_labels: torch.Tensor | None = None  # int64 [N]
    text_labels: torch.Tensor | None = None  # int64 [N]; every caption of row i has label text_labels[i]
    image_classes: list[str] = field(default_factory=list)
    text_classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = list(self.ids)
        self.image_classes = list(self.image_classes)
        self.text_classes = list(self.text_classes)
        n = len(self.ids)
        for i, sample_id in enumerate(self.ids):
            if not isinstance(sample_id, str):
                self._fail(f"ids[{i}] must be a str, got {type(sample_id).__name__}")
        if len(set(self.ids)) != n:
            seen: set[str] = set()
            for sample_id in self.ids:
                if sample_id in seen:
                    self._fail(f"duplicate sample id '{sample_id}'")
                seen.add(sample_id)
        img = self.images
        if img is not None:
            is_rgb_uint8 = isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and img.ndim == 4
            if not is_rgb_uint8 or img.shape[1] != 3:
                self._fail(f"images must be a uint8 tensor [N, 3, H, W], got {_describe(img)}")
            if img.shape[0] != n:
                self._fail(f"images has {img.shape[0]} rows, ids has {n}")
        if self.captions is not None:
            if len(self.captions) != n:
                self._fail(f"captions has {len(self.captions)} rows, ids has {n}")
            for sample_id, caps in zip(self.ids, self.captions, strict=True):
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    self._fail(f"captions of sample '{sample_id}' must be a list of str")
        self._check_labels("image_labels", self.image_labels, self.image_classes)
        self._check_labels("text_labels", self.text_labels, self.text_classes)

    def _fail(self, message: str) -> NoReturn:
        raise ValueError(f"split '{self.name}': {message}")

    def _check_labels(self, column: str, labels: torch.Tensor | None, classes: list[str]) -> None:
        if labels is None:
            return
        n = len(self.ids)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
            self._fail(f"{column} must be an int64 tensor [N], got {_describe(labels)}")
        if labels.shape[0] != n:
            self._fail(f"{column} has {labels.shape[0]} rows, ids has {n}")
        if n and classes:
            bad = ((labels < 0) | (labels >= len(classes))).nonzero()
            if len(bad):
                row = int(bad[0, 0])
                self._fail(
                    f"{column} of sample '{self.ids[row]}' is {int(labels[row])}, outside [0, {len(classes)})"
                )

    def __len__(self) -> int:
        return len(self.ids)

    def subset(
        self, indices: Sequence[int] | torch.Tensor | np.ndarray, name: str | None = None
    ) -> MultimodalSplit:
        """Rows `indices` (in that order; a bool mask also works), every column kept aligned."""
        index = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                self._fail(f"bool mask has shape {tuple(index.shape)}, expected ({len(self)},)")
            index = index.nonzero().flatten()
        if index.numel() == 0:
            index = index.reshape(0).long()
        if index.ndim != 1 or index.dtype.is_floating_point or index.dtype.is_complex:
            self._fail(f"indices must be a 1-D sequence of ints, got {_describe(index)}")
        index = index.long()
        n = len(self)
        if index.numel() and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"split '{self.name}': index out of range for {n} rows")
        index = torch.where(index < 0, index + n, index)
        rows = index.tolist()
        return MultimodalSplit(
            name=self.name if name is None else name,
            ids=[self.ids[i] for i in rows],
            images=None if self.images is None else self.images[index],
            captions=None if self.captions is None else [list(self.captions[i]) for i in rows],
            image_labels=None if self.image_labels is None else self.image_labels[index],
            text_labels=None if self.text_labels is None else self.text_labels[index],
            image_classes=list(self.image_classes),
            text_classes=list(self.text_classes),
        )

    def flat_captions(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(all captions, caption -> row index, caption text label) in row order.

        Text-side training and caption->image retrieval work on single captions; the row index maps
        each back to its image. Labels are -1 when the split has no text labels.
        """
        if self.captions is None:
            raise ValueError(f"split '{self.name}' has no captions")
        texts = [c for caps in self.captions for c in caps]
        counts = torch.tensor([len(caps) for caps in self.captions], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(len(self), dtype=torch.int64), counts)
        if self.text_labels is None:
            labels = torch.full((len(texts),), -1, dtype=torch.int64)
        else:
            labels = self.text_labels[rows]
        return texts, rows, labels


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
