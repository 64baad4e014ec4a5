"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009): 32x32 RGB, 50,000 train / 10,000 test images.

Local layout: the "python version" archives from https://www.cs.toronto.edu/~kriz/cifar.html,
extracted under ``root``: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}`` (``root`` may also be that folder itself). Each batch is a
pickled dict with ``b"data"`` (uint8 [N, 3072], channel planes R, G, B of 32x32, row-major) and the
labels. Hub: ``uoft-cs/cifar10`` (columns ``img``, ``label``) and ``uoft-cs/cifar100`` (``img``,
``fine_label``, ``coarse_label``). The pixels are small enough to keep in memory as one array; the
image column still resizes lazily when ``image_size`` differs from 32.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmfed.config import check_choice, register
from mmfed.data.sources.base import ArrayStore, Attempts
from mmfed.data.sources.labelled import LabelledSource, Part, Raw


def _unpickle(path: Path) -> dict[bytes, Any]:
    """One CIFAR batch file; an unreadable one is an error naming the file."""
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"CIFAR batch {path} cannot be read: {error}") from error
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR batch {path}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _field(batch: dict[bytes, Any], key: str, path: Path) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    if key in batch:  # a batch re-pickled with str keys
        return batch[key]  # type: ignore[index]
    raise ValueError(f"CIFAR batch {path} has no '{key}' entry (it has {', '.join(map(str, batch))})")


def _images(batch: dict[bytes, Any], path: Path) -> np.ndarray:
    """uint8 [N, 32, 32, 3] from the [N, 3072] channel-plane rows."""
    data = np.asarray(_field(batch, "data", path), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR batch {path}: 'data' must be [N, 3072], got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _names(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _Cifar(LabelledSource):
    native_size: ClassVar[int | None] = 32
    subdir: ClassVar[str] = ""
    files: ClassVar[dict[str, tuple[str, ...]]] = {}
    meta_file: ClassVar[str] = ""

    def _folder(self, root: Path) -> Path:
        return root if (root / self.meta_file).is_file() else root / self.subdir

    def _label_key(self) -> tuple[str, str]:
        """(label key in the batches, class-name key in the meta file)."""
        raise NotImplementedError

    def _load_local(self, root: Path, attempts: Attempts) -> Raw | None:
        folder = self._folder(root)
        wanted = [folder / self.meta_file, *(folder / f for files in self.files.values() for f in files)]
        missing = [p for p in wanted if not p.is_file()]
        if missing:
            attempts.add(f"local layout {folder}", f"missing {missing[0].name}")
            return None
        label_key, names_key = self._label_key()
        classes = _names(_field(_unpickle(folder / self.meta_file), names_key, folder / self.meta_file))
        parts: dict[str, Part] = {}
        for part, files in self.files.items():
            arrays, labels = [], []
            for file in files:
                batch = _unpickle(folder / file)
                arrays.append(_images(batch, folder / file))
                batch_labels = np.asarray(_field(batch, label_key, folder / file), dtype=np.int64)
                if len(batch_labels) != len(arrays[-1]):
                    raise ValueError(
                        f"CIFAR batch {folder / file}: {len(batch_labels)} labels, {len(arrays[-1])} images"
                    )
                labels.append(batch_labels)
            images = np.concatenate(arrays)
            ids = [f"{self.name}-{part}-{i:06d}" for i in range(len(images))]
            parts[part] = Part(ids, np.concatenate(labels), store=ArrayStore(images, str(folder / part)))
        return Raw(parts, classes, str(folder))


@register("data", "cifar10")
class Cifar10(_Cifar):
    """CIFAR-10: 10 classes; train / val (held out of train) / test."""

    name = "cifar10"
    folder = "cifar10"
    subdir = "cifar-10-batches-py"
    files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    meta_file = "batches.meta"
    hint = "Extract cifar-10-python.tar.gz so that <root>/cifar-10-batches-py/data_batch_1 exists."

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = "uoft-cs/cifar10",
        image_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        super().__init__(root, hub_id, image_size, val_fraction, seed, skip_corrupt, verify_images)

    def _label_key(self) -> tuple[str, str]:
        return "labels", "label_names"


CIFAR100_LABELS = ("fine", "coarse")


@register("data", "cifar100")
class Cifar100(_Cifar):
    """CIFAR-100: 100 fine classes (or the 20 coarse superclasses with label=coarse)."""

    name = "cifar100"
    folder = "cifar100"
    subdir = "cifar-100-python"
    files = {"train": ("train",), "test": ("test",)}
    meta_file = "meta"
    hint = "Extract cifar-100-python.tar.gz so that <root>/cifar-100-python/train exists."

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = "uoft-cs/cifar100",
        image_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        verify_images: str = "open",
        label: str = "fine",
    ) -> None:
        check_choice("label", label, CIFAR100_LABELS)
        super().__init__(root, hub_id, image_size, val_fraction, seed, skip_corrupt, verify_images)
        self.label = label

    def _label_key(self) -> tuple[str, str]:
        return f"{self.label}_labels", f"{self.label}_label_names"

    def _label_column(self, features: Any) -> str:
        column = f"{self.label}_label"
        if column not in features:
            raise ValueError(f"dataset 'cifar100': no '{column}' column in {list(features)}")
        return column
