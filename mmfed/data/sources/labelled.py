"""The shared shape of the classification datasets (CIFAR-10/100, Tiny-ImageNet, AG News).

Each has an official train and test split and a class list. Validation, which model selection
needs and none of them ships with a label, is a seeded hold-out of the official training rows
(`val_fraction`, `seed`); the official test split stays the test split (Tiny-ImageNet's test labels
are not public, so its official *validation* split is our test split, as is usual).

Sample ids are ``<dataset>-<official split>-<row>`` (row in the official file order) unless the
dataset has its own file names (Tiny-ImageNet's local layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from mmfed.config import check_choice
from mmfed.data.samples import MultimodalSplit
from mmfed.data.sources.base import (
    VERIFY_MODES,
    Attempts,
    DataSource,
    HFImageStore,
    default_root,
    hf_parts,
    holdout,
    image_column,
    is_saved_dataset,
    load_hf,
    pick_part,
)


@dataclass
class Part:
    """One official split as read: ids, labels, and either an image store or texts."""

    ids: list[str]
    labels: np.ndarray  # int64 [N]
    store: Any = None  # image datasets
    texts: list[str] | None = None  # text datasets


@dataclass
class Raw:
    parts: dict[str, Part]  # "train", "test"
    classes: list[str]
    origin: str  # where it was read from (for messages)


class LabelledSource(DataSource):
    """train / val (held out of the official train) / test, one modality, one label per row."""

    modality: ClassVar[str] = "image"  # "image" | "text"
    folder: ClassVar[str] = ""  # default root: $MMFED_DATA_DIR/<folder>
    native_size: ClassVar[int | None] = None  # image side in the files (None: varies)
    test_parts: ClassVar[tuple[str, ...]] = ("test",)  # hub split names used as our test split
    hint: ClassVar[str] = ""  # what to put where, for the not-found error

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = None,
        image_size: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        super().__init__()
        check_choice("verify_images", verify_images, VERIFY_MODES)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1 or null (the native size), got {image_size}")
        self.root = Path(root).expanduser() if root else default_root(self.folder)
        self.hub_id, self.image_size, self.val_fraction = hub_id, image_size, val_fraction
        self.seed, self.skip_corrupt, self.verify = seed, skip_corrupt, verify_images
        self._raw_data: Raw | None = None

    # ------------------------------------------------------------------ loading
    def _load_local(self, root: Path, attempts: Attempts) -> Raw | None:
        """The standard local layout under `root`, or None (recording what was looked for)."""
        raise NotImplementedError

    def _label_column(self, features: Any) -> str:
        """Which column of a `datasets` split holds the label (the first ClassLabel by default)."""
        from datasets import ClassLabel

        for name, feature in features.items():
            if isinstance(feature, ClassLabel):
                return name
        raise ValueError(f"dataset '{self.name}': no ClassLabel column in {list(features)}")

    def _from_hf(self, loaded: Any, origin: str) -> Raw:
        """A `datasets` dataset with the hub schema (an image or text column and a ClassLabel)."""
        from datasets import Image as ImageFeature

        hf = hf_parts(loaded)
        chosen = {
            "train": pick_part(hf, ("train",), self.name),
            "test": pick_part(hf, self.test_parts, self.name),
        }
        features = chosen["train"].features
        label = self._label_column(features)
        classes = list(features[label].names)
        if self.modality == "image":
            column = next((n for n, f in features.items() if isinstance(f, ImageFeature)), None)
        else:
            column = "text" if "text" in features else None
        if column is None:
            raise ValueError(
                f"dataset '{self.name}' from {origin}: no {self.modality} column in {list(features)}"
            )
        parts: dict[str, Part] = {}
        for part, ds in chosen.items():
            labels = np.asarray(ds[label], dtype=np.int64)
            ids = [f"{self.name}-{part}-{i:06d}" for i in range(len(ds))]
            if self.modality == "image":
                refs = [(part, i) for i in range(len(ds))]
                parts[part] = Part(ids, labels, store=HFImageStore({part: ds}, column, refs, origin))
            else:
                parts[part] = Part(ids, labels, texts=[clean_text(t) for t in ds[column]])
        return Raw(parts, classes, origin)

    def _raw(self) -> Raw:
        if self._raw_data is None:
            import datasets

            attempts = Attempts(self.name)
            raw = self._load_local(self.root, attempts)
            if raw is None:
                if is_saved_dataset(self.root):
                    raw = self._from_hf(datasets.load_from_disk(str(self.root)), str(self.root))
                else:
                    attempts.add(f"saved `datasets` folder {self.root}", "no dataset_dict.json there")
            if raw is None and self.hub_id:
                loaded = load_hf(self.hub_id, attempts)
                if loaded is not None:
                    raw = self._from_hf(loaded, self.hub_id)
            if raw is None:
                raise attempts.error(self.hint)
            self._check_labels(raw)
            self._raw_data = raw
        return self._raw_data

    def _check_labels(self, raw: Raw) -> None:
        for part, data in raw.parts.items():
            bad = np.flatnonzero((data.labels < 0) | (data.labels >= len(raw.classes)))
            if len(bad):
                i = int(bad[0])
                raise ValueError(
                    f"dataset '{self.name}' ({raw.origin}): sample '{data.ids[i]}' of split '{part}' has "
                    f"label {int(data.labels[i])}, outside the {len(raw.classes)} classes"
                )

    # ------------------------------------------------------------------ splits
    @property
    def image_classes(self) -> list[str]:
        return list(self._raw().classes) if self.modality == "image" else []

    @property
    def text_classes(self) -> list[str]:
        return list(self._raw().classes) if self.modality == "text" else []

    def _build(self, name: str) -> MultimodalSplit:
        raw = self._raw()
        part = raw.parts["test" if name == "test" else "train"]
        rows = np.arange(len(part.ids), dtype=np.int64)
        if name in ("train", "val"):
            train_rows, val_rows = holdout(len(part.ids), self.val_fraction, self.seed, self.name)
            rows = train_rows if name == "train" else val_rows
            if len(rows) == 0:
                raise ValueError(
                    f"dataset '{self.name}': val_fraction={self.val_fraction} leaves no '{name}' rows"
                )
        ids = [part.ids[r] for r in rows.tolist()]
        labels = torch.from_numpy(part.labels[rows])
        if self.modality == "text":
            texts = part.texts or []
            captions = [[texts[r]] for r in rows.tolist()]
            return MultimodalSplit(name, ids, captions=captions, text_labels=labels, text_classes=raw.classes)
        size = self.image_size or self.native_size
        if size is None:
            raise ValueError(f"dataset '{self.name}': images vary in size, set image_size")
        column, kept, skipped = image_column(
            part.store,
            ids,
            rows,
            size,
            dataset=self.name,
            split=name,
            verify=self.verify,
            skip_corrupt=self.skip_corrupt,
        )
        return MultimodalSplit(
            name,
            column.ids,
            images=column,
            image_labels=labels[kept],
            image_classes=raw.classes,
            skipped=skipped,
        )


def clean_text(text: str) -> str:
    """One line of text: AG News' literal backslashes (its line breaks) become spaces, runs of
    whitespace one space."""
    return " ".join(str(text).replace("\\", " ").split())
