"""AG News (Zhang et al. 2015): news text in 4 classes, 120,000 train / 7,600 test.

Local layout: ``root/train.csv`` and ``root/test.csv`` from ag_news_csv.tgz, no header, three
quoted columns: class index (1-4), title, description; optional ``root/classes.txt`` (one class
name per line; default World, Sports, Business, Sci/Tech). The text of a row is "title description"
with the literal backslashes of the files (their line breaks) turned into spaces. Hub:
``fancyzhx/ag_news`` (columns ``text``, ``label`` 0-3). Each row is one "caption" with its class as
the text label, so text-only clients train on it like any caption column.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mmfed.config import register
from mmfed.data.sources.base import Attempts
from mmfed.data.sources.labelled import LabelledSource, Part, Raw, clean_text

AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")


def _read_csv(path: Path, n_classes: int) -> tuple[list[str], np.ndarray]:
    """(texts, 0-based labels); a malformed row is an error naming the file and line."""
    texts: list[str] = []
    labels: list[int] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            if len(row) != 3 or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= n_classes:
                raise ValueError(
                    f"{path} row {line}: expected 'class index (1-{n_classes}), title, description', "
                    f"got {row[:3]!r}"
                )
            labels.append(int(row[0]) - 1)
            texts.append(clean_text(f"{row[1]} {row[2]}"))
    return texts, np.asarray(labels, dtype=np.int64)


@register("data", "agnews")
class AgNews(LabelledSource):
    """AG News: 4 classes; train / val (held out of train) / test; text only."""

    name = "agnews"
    folder = "agnews"
    modality = "text"
    hint = "Put train.csv and test.csv (from ag_news_csv.tgz) in <root>."

    def __init__(
        self,
        root: str | None = None,
        hub_id: str | None = "fancyzhx/ag_news",
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(root, hub_id, None, val_fraction, seed)

    def _load_local(self, root: Path, attempts: Attempts) -> Raw | None:
        files = {"train": root / "train.csv", "test": root / "test.csv"}
        missing = [p for p in files.values() if not p.is_file()]
        if missing:
            attempts.add(f"local layout {root}", f"missing {missing[0].name}")
            return None
        classes = list(AG_NEWS_CLASSES)
        if (root / "classes.txt").is_file():
            classes = [c.strip() for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
        parts: dict[str, Part] = {}
        for part, path in files.items():
            texts, labels = _read_csv(path, len(classes))
            parts[part] = Part([f"agnews-{part}-{i:06d}" for i in range(len(texts))], labels, texts=texts)
        return Raw(parts, classes, str(root))
