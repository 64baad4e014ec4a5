"""The columnar split every data source returns.

One row per sample, keyed by a stable string id: partitions, caches and saved layouts refer to
samples by id, never by row number, so they survive re-ordering and sub-setting. A column is None
when the source does not have that modality or label (e.g. unlabelled image-caption pairs).

The image column is either a uint8 tensor [N, 3, H, W] (small, generated data) or a `LazyImages`
column that decodes rows only when they are indexed: a 118k-image COCO split must not be decoded
up front. Both support exactly what the consumers use: ``images[tensor_or_list_of_rows]``,
``images[start:stop]``, ``len(images)`` and ``images.shape``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps


class CorruptImageError(ValueError):
    """An image could not be read or decoded; the message names the sample id and where it lives."""


class ImageStore(Protocol):
    """Where a source's images live (files, an array, a `datasets` column), one row per sample.

    `open(row)` returns a PIL image (opened, possibly not decoded yet) or an RGB uint8 array
    [H, W, 3]; `where(row)` names the row's origin (a path, a hub row) for error messages.
    """

    def __len__(self) -> int: ...

    def open(self, row: int) -> Image.Image | np.ndarray: ...

    def where(self, row: int) -> str: ...


_DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None


def _decode_pool() -> ThreadPoolExecutor:
    """One shared pool: PIL releases the GIL while decoding, so JPEG batches decode in parallel."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="mmfed-decode")
    return _pool


def to_rgb_uint8(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 [size, size, 3]: shorter side resized to `size` (bicubic), then centre-cropped.

    The usual evaluation transform (CLIP, VSE++): no distortion of the aspect ratio, no
    randomness; augmentation belongs to the client's encoder, not to the data.
    """
    if isinstance(image, np.ndarray):
        if image.shape[:2] == (size, size):
            return image
        image = Image.fromarray(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


class LazyImages:
    """An image column decoded on access: ``column[rows] -> uint8 [B, 3, size, size]``.

    Holds a store, the store rows this column shows (so `subset` is a view, never a decode) and the
    sample ids of those rows (errors name the sample). A row that cannot be decoded raises
    `CorruptImageError` naming its sample id and file; sources find such rows up front and skip
    them only when their config allows it (`skip_corrupt`).
    """

    dtype = torch.uint8

    def __init__(
        self, store: ImageStore, ids: Sequence[str], size: int, rows: np.ndarray | None = None
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"LazyImages: size must be an int >= 1, got {size!r}")
        self.store, self.size = store, int(size)
        self.rows = (
            np.arange(len(store), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        )
        self.ids = list(ids)
        if len(self.ids) != len(self.rows):
            raise ValueError(f"LazyImages: {len(self.ids)} ids for {len(self.rows)} rows")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.size, self.size))

    def _positions(self, key: Any) -> np.ndarray:
        """Positions (0..len-1) selected by an int, slice, list, numpy array or tensor."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        index = np.asarray(key)
        if index.dtype == np.bool_:
            if index.shape != (n,):
                raise IndexError(f"bool mask has shape {index.shape}, expected ({n},)")
            return np.flatnonzero(index)
        if index.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(index.dtype, np.integer) or index.ndim > 1:
            raise IndexError(f"image rows must be ints, a 1-D int sequence or a slice, got {index.dtype}")
        index = index.astype(np.int64)
        if int(index.min()) < -n or int(index.max()) >= n:
            raise IndexError(f"image row out of range for {n} rows")
        return np.where(index < 0, index + n, index)

    def decode(self, position: int) -> np.ndarray:
        """Row `position` as RGB uint8 [size, size, 3]; CorruptImageError names the sample."""
        row = int(self.rows[position])
        try:
            return to_rgb_uint8(self.store.open(row), self.size)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises all three on bad files
            raise CorruptImageError(
                f"image of sample '{self.ids[position]}' ({self.store.where(row)}) cannot be decoded: "
                f"{' '.join(str(error).split()) or type(error).__name__}; fix or remove the file, or set "
                "verify_images=decode and skip_corrupt=true to find and skip such files when loading"
            ) from error

    def __getitem__(self, key: Any) -> torch.Tensor:
        scalar = isinstance(key, int | np.integer) or (isinstance(key, torch.Tensor) and key.ndim == 0)
        positions = self._positions(np.asarray([int(key)]) if scalar else key)
        out = np.empty((len(positions), self.size, self.size, 3), dtype=np.uint8)
        take = getattr(self.store, "take", None)
        if take is not None and len(positions):  # array-backed store: one fancy-index, no per-row PIL
            arrays = take(self.rows[positions])  # [B, H, W, 3]
            if arrays.shape[1:3] == (self.size, self.size):
                out[:] = arrays
            else:
                for i, array in enumerate(arrays):
                    out[i] = to_rgb_uint8(array, self.size)
        elif len(positions) > 4:
            for i, array in enumerate(_decode_pool().map(self.decode, positions.tolist())):
                out[i] = array
        else:
            for i, position in enumerate(positions.tolist()):
                out[i] = self.decode(position)
        images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # [B, 3, size, size]
        return images[0] if scalar else images

    def subset(self, positions: Any) -> LazyImages:
        """The rows `positions` of this column, still undecoded."""
        picked = self._positions(positions)
        return LazyImages(self.store, [self.ids[i] for i in picked.tolist()], self.size, self.rows[picked])

    def materialize(self) -> torch.Tensor:
        """Decode every row (small splits only): uint8 [N, 3, size, size]."""
        return self[slice(None)]


@dataclass
class MultimodalSplit:
    """Row i is the sample ids[i]; ids are stable strings (caches and partitions key on them)."""

    name: str
    ids: list[str]
    images: torch.Tensor | LazyImages | None = None  # uint8 [N, 3, H, W], or decoded on access
    captions: list[list[str]] | None = None  # N lists of captions
    image_labels: torch.Tensor | None = None  # int64 [N]
    text_labels: torch.Tensor | None = None  # int64 [N]; every caption of row i has label text_labels[i]
    image_classes: list[str] = field(default_factory=list)
    text_classes: list[str] = field(default_factory=list)
    domains: torch.Tensor | None = None  # int64 [N]: the row's visual domain (synthetic `styles`), if any
    domain_names: list[str] = field(default_factory=list)
    # samples the source left out (sample id -> why, e.g. a corrupt image under skip_corrupt=true);
    # reported so that nothing is dropped silently. Describes the source split: subsets start empty.
    skipped: dict[str, str] = field(default_factory=dict)

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
        if isinstance(img, LazyImages):
            if len(img) != n:
                self._fail(f"images has {len(img)} rows, ids has {n}")
            if img.ids != self.ids:  # a lazy column knows its sample ids: a misaligned one is caught here
                row = next(i for i, (a, b) in enumerate(zip(img.ids, self.ids, strict=True)) if a != b)
                self._fail(f"images row {row} is sample '{img.ids[row]}' but ids[{row}] is '{self.ids[row]}'")
        elif img is not None:
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
        self.domain_names = list(self.domain_names)
        self._check_labels("domains", self.domains, self.domain_names)

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
        index = torch.as_tensor(
            np.ascontiguousarray(indices) if not isinstance(indices, torch.Tensor) else indices
        )
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
            images=None if self.images is None else _take(self.images, index),
            captions=None if self.captions is None else [list(self.captions[i]) for i in rows],
            image_labels=None if self.image_labels is None else self.image_labels[index],
            text_labels=None if self.text_labels is None else self.text_labels[index],
            image_classes=list(self.image_classes),
            text_classes=list(self.text_classes),
            domains=None if self.domains is None else self.domains[index],
            domain_names=list(self.domain_names),
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


def _take(images: torch.Tensor | LazyImages, index: torch.Tensor) -> torch.Tensor | LazyImages:
    """Rows `index` of an image column; a lazy column stays lazy."""
    return images.subset(index) if isinstance(images, LazyImages) else images[index]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
