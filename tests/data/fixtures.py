"""Tiny datasets written in each upstream format, so the real loading paths run without a download.

Every image encodes who it is, so a test can check alignment from the pixels alone:
- classification images: red channel = 20 * label + 10 (one solid colour per class);
- Karpathy images: solid colour `pair_colour(index)`, captions say "photo <index>";
- AG News texts name their class ("topic <class>") and have varied lengths.
"""

from __future__ import annotations

import csv
import json
import pickle
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
AG_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


def label_red(label: int) -> int:
    return 20 * label + 10


def pair_colour(index: int) -> tuple[int, int, int]:
    """Distinct, JPEG-stable solid colours (channels far apart, steps of >= 24)."""
    return (24 * (index % 10) + 8, 24 * ((index // 10) % 10) + 8, 24 * ((index // 100) % 10) + 8)


def _cifar_rows(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[N, 3072] channel-plane rows: red = label_red(label), green/blue noise."""
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    images[:, 0] = np.array([label_red(int(c)) % 256 for c in labels], dtype=np.uint8)[:, None, None]
    return images.reshape(len(labels), 3072)


def _labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> np.ndarray:
    """cifar-10-batches-py/ with 5 train batches; returns the train labels in file order."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_labels = []
    for b in range(1, 6):
        labels = _labels(per_batch, 10, rng)
        all_labels.append(labels)
        batch = {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels.tolist(),
            b"data": _cifar_rows(labels, rng),
            b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)],
        }
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch))
    test_labels = _labels(n_test, 10, rng)
    test = {b"labels": test_labels.tolist(), b"data": _cifar_rows(test_labels, rng)}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return np.concatenate(all_labels)


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 1) -> np.ndarray:
    """cifar-100-python/ (train, test, meta); coarse label = fine // 5; returns train fine labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = _labels(n, 100, rng)
        fine[part] = labels
        rows = _cifar_rows(labels % 12, rng)  # red encodes fine label mod 12 (fits in a byte)
        batch = {b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": rows}
        (folder / part).write_bytes(pickle.dumps(batch))
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return fine["train"]


def _jpeg(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_tiny_imagenet(
    root: Path, wnids: tuple[str, ...] = ("n02", "n01", "n03"), per_class: int = 4
) -> None:
    """tiny-imagenet-200/ with train/<wnid>/images, val/images + val_annotations.txt (2 per class)."""
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    order = sorted(wnids)
    lines = []
    for wnid in wnids:
        label = order.index(wnid)
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            (images / f"{wnid}_{i}.JPEG").write_bytes(_jpeg((label_red(label), 40, 40), (64, 64)))
        for i in range(2):
            name = f"val_{label * 2 + i}.JPEG"
            (folder / "val" / "images" / name).write_bytes(_jpeg((label_red(label), 90, 90), (64, 64)))
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def ag_text(index: int, label: int) -> tuple[str, str]:
    """(title, description): names the class; length varies with the index."""
    filler = " ".join(["word"] * (index % 7))
    return f"Story {index}, topic {AG_CLASSES[label]}", f"Details\\of story {index} {filler}".strip()


def write_agnews(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 2) -> None:
    """train.csv / test.csv: quoted 'class index (1-4)', title, description; no header."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", n_train), ("test", n_test)):
        labels = _labels(n, 4, rng)
        with (root / f"{part}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle, quoting=csv.QUOTE_ALL)
            for i, label in enumerate(labels.tolist()):
                writer.writerow([label + 1, *ag_text(i, label)])


KARPATHY_COUNTS = {"train": 12, "restval": 4, "val": 5, "test": 6}


def karpathy_entries(dataset: str, counts: dict[str, int]) -> list[dict]:
    """Entries of a Karpathy split file; image k has colour pair_colour(k) and 'photo k' captions."""
    entries = []
    k = 0
    for split, n in counts.items():
        for _ in range(n):
            n_caps = 7 if k == 1 else 5  # COCO has images with more than five captions
            sentences = [{"raw": f"A photo {k} caption {j}.", "tokens": ["a", "photo"], "sentid": 10 * k + j}
                         for j in range(n_caps)]  # fmt: skip
            entry = {
                "split": split,
                "sentences": sentences,
                "imgid": k,
                "sentids": [s["sentid"] for s in sentences],
            }
            if dataset == "coco":
                folder = "val2014" if split in ("val", "test", "restval") else "train2014"
                entry.update(filepath=folder, filename=f"COCO_{folder}_{k:012d}.jpg", cocoid=1000 + k)
            else:
                entry.update(filename=f"{5000 + k}.jpg")
            entries.append(entry)
            k += 1
    return entries


def image_path(root: Path, dataset: str, entry: dict) -> Path:
    if dataset == "coco":
        return root / entry["filepath"] / entry["filename"]
    return root / "flickr30k-images" / entry["filename"]


def write_karpathy(
    root: Path,
    dataset: str = "flickr30k",
    counts: dict[str, int] | None = None,
    corrupt: tuple[int, ...] = (),
    truncated: tuple[int, ...] = (),
    write_json: bool = True,
) -> list[dict]:
    """dataset_<name>.json + JPEGs of varied sizes; `corrupt` images are garbage bytes, `truncated` cut."""
    counts = counts or ({k: v for k, v in KARPATHY_COUNTS.items() if k != "restval"} if dataset == "flickr30k"
                        else dict(KARPATHY_COUNTS))  # fmt: skip
    entries = karpathy_entries(dataset, counts)
    for k, entry in enumerate(entries):
        path = image_path(root, dataset, entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _jpeg(pair_colour(k), (40 + 3 * (k % 4), 30 + 5 * (k % 3)))
        if k in corrupt:
            data = b"this is not a JPEG file"
        elif k in truncated:  # a noisy image has long pixel data: cut in half, its header still parses
            noise = np.random.default_rng(k).integers(0, 256, (30, 40, 3), dtype=np.uint8)
            buffer = BytesIO()
            Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
            data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        path.write_bytes(data)
    if write_json:
        (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": entries, "dataset": dataset}))
    return entries


# --------------------------------------------------------------------------------------------
# `datasets` copies with the hub schemas, saved with save_to_disk
# --------------------------------------------------------------------------------------------


def write_hub_cifar10(path: Path, n_train: int = 30, n_test: int = 10, seed: int = 3) -> None:
    """The uoft-cs/cifar10 schema: img (Image), label (ClassLabel)."""
    import datasets

    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=CIFAR10_CLASSES)}
    )
    parts = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = _labels(n, 10, rng).tolist()
        images = [Image.new("RGB", (32, 32), (label_red(c), 0, 0)) for c in labels]
        parts[part] = datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))


def write_hub_agnews(path: Path, n_train: int = 24, n_test: int = 8) -> None:
    """The fancyzhx/ag_news schema: text, label (ClassLabel, 0-3)."""
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=AG_CLASSES)}
    )
    parts = {}
    for part, n in (("train", n_train), ("test", n_test)):
        labels = [i % 4 for i in range(n)]
        texts = [" ".join(ag_text(i, c)) for i, c in enumerate(labels)]
        parts[part] = datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))


def write_hub_flickr30k(path: Path, entries: list[dict]) -> None:
    """The nlphuji/flickr30k schema: one hub split 'test' with a split column and the images inside."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Sequence(datasets.Value("string")),
            "sentids": datasets.Sequence(datasets.Value("string")),
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )
    rows = {
        "image": [Image.new("RGB", (36, 30), pair_colour(k)) for k in range(len(entries))],
        "caption": [[s["raw"] for s in e["sentences"]] for e in entries],
        "sentids": [[str(s) for s in e["sentids"]] for e in entries],
        "split": [e["split"] for e in entries],
        "img_id": [str(e["imgid"]) for e in entries],
        "filename": [e["filename"] for e in entries],
    }
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(path)
    )


def write_hub_coco_without_pixels(path: Path, entries: list[dict]) -> None:
    """The yerevann/coco-karpathy schema: hub splits by name, sentences as strings, no images."""
    import datasets

    names = {"train": "train", "restval": "restval", "val": "validation", "test": "test"}
    parts = {}
    for split, hub_name in names.items():
        chosen = [e for e in entries if e["split"] == split]
        parts[hub_name] = datasets.Dataset.from_dict(
            {
                "filepath": [e["filepath"] for e in chosen],
                "filename": [e["filename"] for e in chosen],
                "sentences": [[s["raw"] for s in e["sentences"]] for e in chosen],
                "cocoid": [e["cocoid"] for e in chosen],
                "url": [f"http://images.cocodataset.org/{e['filepath']}/{e['filename']}" for e in chosen],
            }
        )
    datasets.DatasetDict(parts).save_to_disk(str(path))
