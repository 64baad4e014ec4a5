"""Tiny-ImageNet (CS231n): 200 classes of 64x64 images, 500 train and 50 validation images each.

Local layout (tiny-imagenet-200.zip extracted under ``root``; ``root`` may also be that folder):
``tiny-imagenet-200/wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` and
``val/val_annotations.txt`` (tab-separated: file name, wnid, bounding box). The official test labels
are not public, so the official validation split is our test split and validation is held out of
train. Classes are the wnids in sorted order (as torchvision's ImageFolder and the hub copy
``zh-plus/tiny-imagenet``, splits ``train`` / ``valid``, columns ``image``, ``label``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from mmfed.config import register
from mmfed.data.sources.base import Attempts, FileStore
from mmfed.data.sources.labelled import LabelledSource, Part, Raw

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@register("data", "tiny_imagenet")
class TinyImageNet(LabelledSource):
    """Tiny-ImageNet: 200 classes; train / val (held out of train) / test (the official val)."""

    name = "tiny_imagenet"
    folder = "tiny-imagenet"
    native_size: ClassVar[int | None] = 64
    test_parts = ("valid", "validation", "val", "test")
    hint = "Extract tiny-imagenet-200.zip so that <root>/tiny-imagenet-200/wnids.txt exists."

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = "zh-plus/tiny-imagenet",
        image_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        super().__init__(root, hub_id, image_size, val_fraction, seed, skip_corrupt, verify_images)

    def _load_local(self, root: Path, attempts: Attempts) -> Raw | None:
        folder = root if (root / "wnids.txt").is_file() else root / "tiny-imagenet-200"
        annotations = folder / "val" / "val_annotations.txt"
        for needed in (folder / "wnids.txt", folder / "train", annotations):
            if not needed.exists():
                attempts.add(f"local layout {folder}", f"missing {needed.relative_to(folder)}")
                return None
        wnids = sorted(
            {line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()}
        )
        index = {wnid: i for i, wnid in enumerate(wnids)}
        paths, labels = [], []
        for wnid in wnids:
            files = sorted(
                p
                for p in (folder / "train" / wnid / "images").glob("*")
                if p.suffix.lower() in _IMAGE_SUFFIXES
            )
            if not files:
                raise ValueError(
                    f"tiny_imagenet: class {wnid} has no images in {folder / 'train' / wnid / 'images'}"
                )
            paths += files
            labels += [index[wnid]] * len(files)
        train = Part(
            [f"tiny_imagenet-{p.stem}" for p in paths], np.asarray(labels, np.int64), store=FileStore(paths)
        )
        val_paths, val_labels = [], []
        for number, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise ValueError(
                    f"{annotations} line {number}: expected '<file>\\t<wnid>\\t...' with a wnid of "
                    f"wnids.txt, got {line[:80]!r}"
                )
            val_paths.append(folder / "val" / "images" / fields[0])
            val_labels.append(index[fields[1]])
        test = Part(
            [f"tiny_imagenet-{p.stem}" for p in val_paths],
            np.asarray(val_labels, np.int64),
            store=FileStore(val_paths),
        )
        return Raw({"train": train, "test": test}, wnids, str(folder))
