"""Flickr30k and MS-COCO 2014 with the Karpathy splits, and the public COCO subset.

The Karpathy split files (Karpathy & Fei-Fei 2015, ``dataset_flickr30k.json`` / ``dataset_coco.json``)
list every image with ``split`` (train | restval | val | test), ``filename`` (COCO also ``filepath``,
the 2014 folder, and ``cocoid``) and ``sentences`` (each with ``raw``). Splits:

- Flickr30k: train 29,000 / val 1,014 / test 1,000 images, 5 captions each;
- COCO: train 82,783 + restval 30,504 for training (``use_restval``), val 5,000, test 5,000.

Captions per image: COCO images have 5 to 7 captions. The 1K/5K protocols count exactly five per
image (5,000 images / 25,000 captions): the first five in file order, as in VSE++'s precomputed
caption files that every published COCO retrieval number uses. ``captions_per_image`` (default 5)
applies that cut to every split; null keeps all captions (then 5K has ~25,010 captions and numbers
are not comparable with the literature).

Images are opened lazily (`LazyImages`), resized (shorter side) and centre-cropped to ``image_size``
when a batch is indexed. Sample ids: ``flickr30k-<file stem>`` and ``coco-<cocoid>``, the same from
the JSON file and from a hub copy with the same fields (``nlphuji/flickr30k``: one hub split with a
``split`` column, captions in ``caption``, images in ``image``; ``yerevann/coco-karpathy``: hub
splits train/validation/test/restval, captions in ``sentences``, no pixels: the images are read
from ``image_root/<filepath>/<filename>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mmfed.config import check_choice, register
from mmfed.data.samples import MultimodalSplit
from mmfed.data.sources.base import (
    VERIFY_MODES,
    Attempts,
    DataSource,
    FileStore,
    HFImageStore,
    default_root,
    hf_parts,
    image_column,
    is_saved_dataset,
    load_hf,
)
from mmfed.utils.seeding import numpy_rng

KARPATHY_SPLITS = ("train", "restval", "val", "test")
_HF_SPLIT_NAMES = {"train": "train", "restval": "restval", "val": "val", "validation": "val", "test": "test"}


@dataclass
class Record:
    """One image of the split file: its id, Karpathy split, captions and where its pixels are."""

    sample_id: str
    split: str
    captions: list[str]
    ref: Any  # a file path, or (hub split, row) when the pixels are in a `datasets` column


def _captions(entry: dict[str, Any]) -> list[str]:
    """Captions of one JSON entry or hub row, whichever of the known field layouts it uses."""
    for key in ("sentences", "caption", "captions", "raw"):
        if key not in entry or entry[key] is None:
            continue
        value = entry[key]
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, dict):
                text = item.get("raw") or " ".join(item.get("tokens") or [])
            else:
                text = str(item)
            out.append(" ".join(text.split()))
        return out
    return []


class KarpathySource(DataSource):
    """Image-caption pairs with the Karpathy train / val / test splits (no labels)."""

    json_name: ClassVar[str] = ""
    folder: ClassVar[str] = ""
    image_subdir: ClassVar[str] = ""  # default image_root below root
    hint: ClassVar[str] = ""  # what to put where, for the not-found error
    id_prefix: ClassVar[str] = ""  # sample ids are "<id_prefix>-<image id>" (default: the dataset name)
    train_splits: tuple[str, ...] = ("train",)  # Karpathy splits that make our train split

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = None,
        image_root: str | None = None,
        image_size: int = 224,
        captions_per_image: int | None = 5,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        super().__init__()
        check_choice("verify_images", verify_images, VERIFY_MODES)
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if captions_per_image is not None and captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1 or null (all), got {captions_per_image}")
        self.root = Path(root).expanduser() if root else default_root(self.folder)
        self.image_root = Path(image_root).expanduser() if image_root else self.root / self.image_subdir
        self.hub_id, self.image_size, self.captions_per_image = hub_id, image_size, captions_per_image
        self.skip_corrupt, self.verify = skip_corrupt, verify_images
        self._records: list[Record] | None = None
        self._hf: dict[str, Any] = {}  # hub splits holding pixels, when loaded from `datasets`
        self._origin = ""

    # ------------------------------------------------------------------ reading the split file
    def _sample_id(self, entry: dict[str, Any]) -> str:
        for key in ("cocoid", "filename", "img_id", "imgid"):
            value = entry.get(key)
            if value is not None and str(value) != "":
                image_id = Path(str(value)).stem if key == "filename" else value
                return f"{self.id_prefix or self.name}-{image_id}"
        raise ValueError(f"dataset '{self.name}': an entry has none of cocoid, filename, img_id, imgid")

    def _path(self, entry: dict[str, Any], where: str) -> str:
        filename = entry.get("filename")
        if not filename:
            raise ValueError(
                f"dataset '{self.name}' ({where}): entry {self._sample_id(entry)} has no filename"
            )
        return str(self.image_root / str(entry.get("filepath") or "") / str(filename))

    def _record(self, entry: dict[str, Any], split: str, ref: Any, where: str) -> Record:
        sample_id = self._sample_id(entry)
        if split not in KARPATHY_SPLITS:
            raise ValueError(
                f"dataset '{self.name}' ({where}): sample '{sample_id}' has split {split!r}, "
                f"expected one of {', '.join(KARPATHY_SPLITS)}"
            )
        captions = _captions(entry)
        if not captions or not all(captions):
            raise ValueError(
                f"dataset '{self.name}' ({where}): sample '{sample_id}' has an empty or no caption"
            )
        return Record(sample_id, split, captions, ref)

    def _from_json(self, path: Path) -> list[Record]:
        try:
            images = json.loads(path.read_text())["images"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"{path} is not a Karpathy split file (a JSON object with 'images'): {error}"
            ) from error
        return [self._record(e, str(e.get("split", "")), self._path(e, str(path)), str(path)) for e in images]

    def _from_hf(self, loaded: Any, origin: str) -> list[Record]:
        """Rows of a `datasets` copy; rows sharing an image id (one caption per row) are merged."""
        from datasets import Image as ImageFeature

        records: dict[str, Record] = {}
        for hf_split, part in hf_parts(loaded).items():
            has_pixels = isinstance(part.features.get("image"), ImageFeature)
            if has_pixels:
                self._hf[hf_split] = part
            rows = (part.remove_columns(["image"]) if has_pixels else part).to_list()
            for i, row in enumerate(rows):
                split = str(row.get("split") or _HF_SPLIT_NAMES.get(hf_split, hf_split))
                split = _HF_SPLIT_NAMES.get(split, split)
                ref = (hf_split, i) if has_pixels else self._path(row, origin)
                record = self._record(row, split, ref, origin)
                if record.sample_id in records:
                    records[record.sample_id].captions += record.captions
                else:
                    records[record.sample_id] = record
        return list(records.values())

    def records(self) -> list[Record]:
        """Every image of the split file, in file order (the 1K folds depend on this order)."""
        if self._records is None:
            import datasets

            attempts = Attempts(self.name)
            json_path = self.root / self.json_name
            if json_path.is_file():
                self._records, self._origin = self._from_json(json_path), str(json_path)
            else:
                attempts.add(f"split file {json_path}", "missing")
                if is_saved_dataset(self.root):
                    loaded = datasets.load_from_disk(str(self.root))
                    self._records, self._origin = self._from_hf(loaded, str(self.root)), str(self.root)
                else:
                    attempts.add(f"saved `datasets` folder {self.root}", "no dataset_dict.json there")
            if self._records is None and self.hub_id:
                loaded = load_hf(self.hub_id, attempts)
                if loaded is not None:
                    self._records, self._origin = self._from_hf(loaded, self.hub_id), self.hub_id
            if self._records is None:
                raise attempts.error(self.hint, ("root", "image_root", "hub_id"))
        return self._records

    # ------------------------------------------------------------------ splits
    def split_records(self, name: str) -> list[Record]:
        """The records of our split `name` (train: the Karpathy splits in `train_splits`)."""
        wanted = self.train_splits if name == "train" else (name,)
        return [r for r in self.records() if r.split in wanted]

    def _build(self, name: str) -> MultimodalSplit:
        records = self.split_records(name)
        if not records:
            raise ValueError(f"dataset '{self.name}' ({self._origin}) has no images in split '{name}'")
        return self._make(name, records)

    def _make(self, name: str, records: list[Record]) -> MultimodalSplit:
        """A split of `records`: verified lazy images, captions cut to `captions_per_image`."""
        ids = [r.sample_id for r in records]
        if all(isinstance(r.ref, tuple) for r in records):
            store: Any = HFImageStore(self._hf, "image", [r.ref for r in records], self._origin)
        else:
            store = FileStore([r.ref for r in records])
        rows = np.arange(len(records), dtype=np.int64)
        column, kept, skipped = image_column(
            store,
            ids,
            rows,
            self.image_size,
            dataset=self.name,
            split=name,
            verify=self.verify,
            skip_corrupt=self.skip_corrupt,
        )
        cut = self.captions_per_image
        captions = [records[i].captions[:cut] if cut else list(records[i].captions) for i in kept]
        return MultimodalSplit(name, column.ids, images=column, captions=captions, skipped=skipped)


@register("data", "flickr30k")
class Flickr30k(KarpathySource):
    """Flickr30k, Karpathy splits: 29,000 train / 1,014 val / 1,000 test images x 5 captions."""

    name = "flickr30k"
    folder = "flickr30k"
    json_name = "dataset_flickr30k.json"
    image_subdir = "flickr30k-images"
    hint = "Put dataset_flickr30k.json in <root> and the images in <root>/flickr30k-images/."

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = "nlphuji/flickr30k",
        image_root: str | None = None,
        image_size: int = 224,
        captions_per_image: int | None = 5,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        super().__init__(
            root, hub_id, image_root, image_size, captions_per_image, skip_corrupt, verify_images
        )


@register("data", "coco")
class Coco(KarpathySource):
    """MS-COCO 2014, Karpathy splits: train + restval (113,287) / val 5,000 / test 5,000 images."""

    name = "coco"
    folder = "coco"
    json_name = "dataset_coco.json"
    hint = "Put dataset_coco.json in <root> and the 2014 images in <root>/train2014/ and <root>/val2014/."

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = "yerevann/coco-karpathy",
        image_root: str | None = None,
        image_size: int = 224,
        captions_per_image: int | None = 5,
        use_restval: bool = True,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        super().__init__(
            root, hub_id, image_root, image_size, captions_per_image, skip_corrupt, verify_images
        )
        self.use_restval = use_restval
        self.train_splits = ("train", "restval") if use_restval else ("train",)


@register("data", "coco_public")
class CocoPublic(Coco):
    """The public paired data of CreamFL-style federations: `size` COCO training pairs, seeded.

    Drawn from the Karpathy train (+ restval) images only, so it is disjoint from COCO's val and
    test images (checked) and from Flickr30k (another image collection). One split, "public".
    With skip_corrupt, unreadable images among the drawn ones are left out (and reported), so the
    split can be smaller than `size`.
    """

    name = "coco_public"
    id_prefix = "coco"  # the same samples as data=coco, so the same ids
    SPLITS = ("public",)

    def __init__(
        self,
        size: int = 10000,
        seed: int = 0,
        root: str | None = None,
        hub_id: str | None = "yerevann/coco-karpathy",
        image_root: str | None = None,
        image_size: int = 224,
        captions_per_image: int | None = 5,
        use_restval: bool = True,
        skip_corrupt: bool = False,
        verify_images: str = "open",
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        super().__init__(
            root, hub_id, image_root, image_size, captions_per_image, use_restval, skip_corrupt, verify_images
        )
        self.size, self.seed = size, seed

    def _build(self, name: str) -> MultimodalSplit:
        pool = super().split_records("train")
        held_out = {r.sample_id for r in self.records() if r.split in ("val", "test")}
        overlap = [r.sample_id for r in pool if r.sample_id in held_out]
        if overlap:
            raise ValueError(
                f"dataset 'coco' ({self._origin}): sample '{overlap[0]}' is in both training and evaluation "
                "splits; the split file is inconsistent"
            )
        if self.size > len(pool):
            raise ValueError(
                f"coco_public: size={self.size} exceeds the {len(pool)} COCO training images "
                f"({' + '.join(self.train_splits)})"
            )
        chosen = np.sort(numpy_rng(self.seed, "coco_public").choice(len(pool), self.size, replace=False))
        return self._make(name, [pool[i] for i in chosen.tolist()])
