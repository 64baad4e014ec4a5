"""The federation layout: which client gets which samples, in which modality.

The client-private training split is first divided among the three client kinds in proportion
to their client counts, then each kind's pool is partitioned over its clients by the kind's label
(image-only and paired clients: the image label; text-only clients: the text label). Each client's
share is finally split into its local train and local test ids (the local test split is held out
from the client's own distribution, for personalization). Everything is keyed by stable sample
ids and saved with the run, so a partition can be checked and never silently reused when stale.

Missing modalities (as FedMultimodal, Feng et al. KDD 2023, simulates them): with
``layout.missing_image=p`` / ``missing_text=q`` a paired client's training samples lack their image
with rate p and their text with rate q (disjoint draws: no sample lacks both, so p + q <= 1),
drawn per client after the partition from the layout's stream (the partition itself does not
change) and saved with it (`ClientSpec.missing_image` / `missing_text`). The client trains on
whatever each sample has (`federation.client.ClientData`); local test samples stay complete.

The two bounds a comparison shows are layouts of the same rows: ``layout.pooled=true`` (centralized:
one client per kind holds all of that kind's rows, so skew no longer splits them; the three kinds
still train their own losses, as in the federation) and ``layout.only=<cid>`` (local-only: the
federation's client `cid` trains alone; the run's model is that client's model).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfed.config import check_positive, register
from mmfed.data.partition import Partitioner
from mmfed.utils.io import load_json, save_json

if TYPE_CHECKING:  # torch: the layout is built (checked) by `mmfed config`, which imports no torch
    from mmfed.data.samples import MultimodalSplit

CLIENT_KINDS = ("image", "text", "paired")
# What the partitioner skews over: the class labels (label skew) or the rows' visual domains (feature
# skew: clients see different styles of the same classes; `data.styles` in the synthetic world).
SKEWS = ("label", "domain")


@dataclass(frozen=True)
class ClientSpec:
    """One client: its id, its modality kind and the sample ids it owns."""

    cid: str
    kind: str
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...] = ()
    missing_image: tuple[str, ...] = ()  # paired clients: training ids whose image is missing
    missing_text: tuple[str, ...] = ()  # ... and whose captions are missing

    @property
    def num_examples(self) -> int:
        return len(self.train_ids)


@register("layout", "default")
class FederationLayout:
    """How many clients of each kind, and how much of each client's share is its local test split."""

    def __init__(
        self,
        image: int = 3,
        text: int = 3,
        paired: int = 3,
        local_test_fraction: float = 0.1,
        missing_image: float = 0.0,
        missing_text: float = 0.0,
        skew: str = "label",
        pooled: bool = False,
        only: str | None = None,
    ) -> None:
        for name, count in (("image", image), ("text", text), ("paired", paired)):
            check_positive(f"layout.{name}", count, strict=False)
        if image + text + paired == 0:
            raise ValueError("layout: at least one client is needed (image + text + paired = 0)")
        if not 0.0 <= local_test_fraction < 1.0:
            raise ValueError(f"layout.local_test_fraction must be in [0, 1), got {local_test_fraction}")
        for name, rate in (("missing_image", missing_image), ("missing_text", missing_text)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"layout.{name} must be in [0, 1], got {rate}")
        if missing_image + missing_text > 1.0:
            raise ValueError(
                f"layout.missing_image + layout.missing_text must be <= 1 (a sample keeps at least one "
                f"modality), got {missing_image} + {missing_text}"
            )
        if skew not in SKEWS:
            raise ValueError(f"layout.skew must be one of {', '.join(SKEWS)}, got {skew!r}")
        if pooled and only is not None:
            raise ValueError("layout.pooled and layout.only exclude each other (one bound at a time)")
        self.skew, self.pooled, self.only = skew, bool(pooled), only
        self.counts = {"image": image, "text": text, "paired": paired}
        self.local_test_fraction = local_test_fraction
        self.missing_image, self.missing_text = missing_image, missing_text

    def build(
        self, train: MultimodalSplit, partitioner: Partitioner, rng: np.random.Generator
    ) -> list[ClientSpec]:
        kinds = [kind for kind in CLIENT_KINDS if self.counts[kind] > 0]
        self._check_columns(train, kinds)
        total = sum(self.counts.values())
        order = rng.permutation(len(train))
        bounds = np.cumsum([0] + [self.counts[kind] for kind in kinds]) * len(train) // total
        clients: list[ClientSpec] = []
        for kind, start, stop in zip(kinds, bounds[:-1], bounds[1:], strict=True):
            pool = order[start:stop]
            labels = self._labels(train, kind, self.skew)[pool]
            for index, part in enumerate(partitioner(labels, self.counts[kind], rng)):
                rows = rng.permutation(pool[part])
                n_test = int(round(len(rows) * self.local_test_fraction))
                test_rows, train_rows = np.sort(rows[:n_test]), np.sort(rows[n_test:])
                clients.append(
                    ClientSpec(
                        cid=f"{kind}-{index}",
                        kind=kind,
                        train_ids=tuple(train.ids[i] for i in train_rows),
                        test_ids=tuple(train.ids[i] for i in test_rows),
                    )
                )
        clients = self._drop_modalities(clients, rng)
        if self.pooled:
            return self._pool(clients)
        if self.only is not None:
            kept = [c for c in clients if c.cid == self.only]
            if not kept:
                names = ", ".join(c.cid for c in clients)
                raise ValueError(
                    f"layout.only={self.only!r} is not a client of this layout; its clients: {names}"
                )
            return kept
        return clients

    @staticmethod
    def _pool(clients: list[ClientSpec]) -> list[ClientSpec]:
        """The centralized bound: one client per kind holding every row (and local test row) of that kind.

        The rows are those of the federated layout with the same seed, so the bound trains on exactly
        the federation's data; only who holds it changes.
        """
        pooled = []
        for kind in CLIENT_KINDS:
            mine = [c for c in clients if c.kind == kind]
            if mine:
                pooled.append(
                    ClientSpec(
                        cid=f"{kind}-0",  # the index picks the encoder variant (run.py)
                        kind=kind,
                        train_ids=tuple(sorted(i for c in mine for i in c.train_ids)),
                        test_ids=tuple(sorted(i for c in mine for i in c.test_ids)),
                        missing_image=tuple(sorted(i for c in mine for i in c.missing_image)),
                        missing_text=tuple(sorted(i for c in mine for i in c.missing_text)),
                    )
                )
        return pooled

    def _drop_modalities(self, clients: list[ClientSpec], rng: np.random.Generator) -> list[ClientSpec]:
        """Paired clients' missing images / texts, drawn after the partition (which stays as it is)."""
        if not (self.missing_image or self.missing_text):
            return clients
        out = []
        for client in clients:
            if client.kind == "paired":
                ids = np.array(client.train_ids, dtype=object)[rng.permutation(client.num_examples)]
                n_image = int(round(self.missing_image * len(ids)))
                n_text = min(int(round(self.missing_text * len(ids))), len(ids) - n_image)
                client = dataclasses.replace(
                    client,
                    missing_image=tuple(sorted(ids[:n_image])),
                    missing_text=tuple(sorted(ids[n_image : n_image + n_text])),
                )
            out.append(client)
        return out

    @staticmethod
    def _labels(train: MultimodalSplit, kind: str, skew: str = "label") -> np.ndarray:
        if skew == "domain":
            if train.domains is None:
                raise ValueError(
                    f"layout.skew=domain needs rows with a visual domain; split '{train.name}' has none "
                    "(the synthetic world has them with data.styles=[photo,inverted,...])"
                )
            return train.domains.numpy()
        labels = train.text_labels if kind == "text" else train.image_labels
        if labels is None:  # unlabelled pairs (e.g. Flickr30k): partition without label skew
            return np.zeros(len(train), dtype=np.int64)
        return labels.numpy()

    @staticmethod
    def _check_columns(train: MultimodalSplit, kinds: list[str]) -> None:
        need = {"image": ("images",), "text": ("captions",), "paired": ("images", "captions")}
        for kind in kinds:
            for column in need[kind]:
                if getattr(train, column) is None:
                    raise ValueError(
                        f"layout.{kind} > 0 needs split '{train.name}' to have {column}, it has none"
                    )


def save_layout(clients: list[ClientSpec], path: str | Path, meta: dict[str, Any]) -> None:
    save_json({"meta": meta, "clients": [dataclasses.asdict(c) for c in clients]}, path)


def load_layout(path: str | Path) -> tuple[list[ClientSpec], dict[str, Any]]:
    data = load_json(path, what="partition file")
    clients = [
        ClientSpec(
            cid=c["cid"],
            kind=c["kind"],
            train_ids=tuple(c["train_ids"]),
            test_ids=tuple(c["test_ids"]),
            missing_image=tuple(c.get("missing_image", ())),
            missing_text=tuple(c.get("missing_text", ())),
        )
        for c in data["clients"]
    ]
    return clients, data["meta"]
