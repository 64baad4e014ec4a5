"""One world made of several sources: a dataset per client kind, public data, evaluation sets.

CreamFL/FedAFD-style federations give each client kind its own dataset (image clients CIFAR-100,
text clients AG News, paired clients Flickr30k), the server a public set (a COCO subset) and
evaluate on yet other splits (COCO 1K/5K, Flickr30k 1K). `CompositeSource` holds one source per
role and answers for each:

- ``kinds`` / ``train_split(kind)``: the training split of the image, text and paired clients;
  ``build_clients(layout, partitioners, seed)``: the clients, each kind partitioning its own split;
- ``split("public")``: the public role's split; ``split("val")`` / ``split("test")``: the
  validation / test split of the ``val`` role (model selection; the paired role by default);
- ``split("<role>/<split>")``: any split of any role, e.g. ``"image/test"``;
- ``protocols`` / ``protocol_split(name)``: the split each named evaluation protocol runs on,
  found in ``eval_data`` (by dataset name) or among the roles (by their dataset name);
- ``image_classes`` / ``text_classes``: the image role's and the text role's classes.

``split("train")`` is an error: there is no single training split; the federation asks per kind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from mmfed.config import register
from mmfed.data.layout import CLIENT_KINDS, ClientSpec, FederationLayout
from mmfed.data.partition import Partitioner
from mmfed.data.samples import MultimodalSplit
from mmfed.data.sources.base import DataNotFoundError
from mmfed.data.sources.protocols import Protocol, get_protocol
from mmfed.utils.seeding import numpy_rng

CLIENT_ROLES = ("image", "text", "paired")
ROLES = (*CLIENT_ROLES, "public")


@contextlib.contextmanager
def _configured_at(key: str) -> Iterator[None]:
    """A member's missing data is advised with its own config key (``data.paired.root=...``)."""
    try:
        yield
    except DataNotFoundError as error:
        raise error.under(f"data.{key}.") from None


@register("data", "composite")
class CompositeSource:
    """Several data sources, one per role; each role is a full data config (``data.image: cifar100``)."""

    name = "composite"

    def __init__(
        self,
        image: Any = None,
        text: Any = None,
        paired: Any = None,
        public: Any = None,
        eval_data: dict[str, Any] | None = None,
        protocols: tuple[str, ...] = (),
        val: str | None = None,
    ) -> None:
        self.roles: dict[str, Any] = {}
        for role, source in (("image", image), ("text", text), ("paired", paired), ("public", public)):
            if source is None:
                continue
            if not callable(getattr(source, "split", None)):
                raise ValueError(
                    f"data.{role} must be a data source config (with _target_), got {type(source).__name__}"
                )
            self.roles[role] = source
        self.eval_data: dict[str, Any] = dict(eval_data or {})
        for key, source in self.eval_data.items():
            if not callable(getattr(source, "split", None)):
                raise ValueError(
                    f"data.eval_data.{key} must be a data source config, got {type(source).__name__}"
                )
        present = [r for r in CLIENT_ROLES if r in self.roles]
        if val is not None and val not in present:
            raise ValueError(
                f"data.val={val!r} names no configured client role ({', '.join(present) or 'none'})"
            )
        default_val = "paired" if "paired" in present else (present[0] if present else None)
        self.val_role = val if val is not None else default_val
        self.protocols: dict[str, Protocol] = {}
        for name in protocols:
            protocol = get_protocol(name)
            self.source_for(protocol.dataset)  # fails now, naming the protocol's dataset, if absent
            self.protocols[name] = protocol

    # ------------------------------------------------------------------ roles
    @property
    def kinds(self) -> tuple[str, ...]:
        """The client kinds with training data, in the layout's order."""
        return tuple(role for role in CLIENT_ROLES if role in self.roles)

    def role(self, role: str) -> Any:
        if role not in self.roles:
            raise ValueError(f"data has no '{role}' source (configured: {', '.join(self.roles) or 'none'})")
        return self.roles[role]

    def train_split(self, kind: str) -> MultimodalSplit:
        """The training split of client kind `kind` (image | text | paired)."""
        if kind not in CLIENT_ROLES:
            raise ValueError(f"kind={kind!r} is not one of {', '.join(CLIENT_ROLES)}")
        with _configured_at(kind):
            return self.role(kind).split("train")

    def split(self, name: str) -> MultimodalSplit:
        """ "public", "val", "test" (of the val role) or "<role>/<split>"."""
        if "/" in name:
            role, _, split = name.partition("/")
            with _configured_at(role):
                return self.role(role).split(split)
        if name == "public":
            with _configured_at("public"):
                return self.role("public").split("public")
        if name in ("val", "test"):
            if self.val_role is None:
                raise ValueError("data has no client role to take 'val' / 'test' from")
            with _configured_at(self.val_role):
                return self.role(self.val_role).split(name)
        if name == "train":
            raise ValueError(
                "composite data has one training split per client kind: use train_split(kind) "
                f"for kind in {', '.join(self.kinds) or '(none configured)'}"
            )
        raise ValueError(f"composite data has no split '{name}'; use public, val, test or <role>/<split>")

    def build_clients(
        self, layout: FederationLayout, partitioners: Partitioner | Mapping[str, Partitioner], seed: int
    ) -> list[ClientSpec]:
        """The federation's clients: each kind's clients partition that kind's own training split.

        Unlike `FederationLayout.build` on one shared split, no kind takes rows from another: the
        image clients split all of the image source's training rows, and so on. `partitioners` is one
        partitioner for every kind or one per kind (e.g. Dirichlet for labelled image/text data, IID
        shards for unlabelled pairs). Each kind draws from its own stream (seed, "layout", kind), so
        adding text clients does not move the image clients' rows. Client ids and kinds are those of
        `FederationLayout.build` ("image-0", ...), in the order image, text, paired.
        """
        clients: list[ClientSpec] = []
        for kind in CLIENT_KINDS:
            count = layout.counts[kind]
            if count == 0:
                continue
            if kind not in self.roles:
                raise ValueError(f"layout.{kind}={count} but data has no '{kind}' source (data.{kind})")
            if isinstance(partitioners, Mapping):
                if kind not in partitioners:
                    raise ValueError(f"no partitioner for client kind '{kind}'")
                partitioner = partitioners[kind]
            else:
                partitioner = partitioners
            only = FederationLayout(
                **{k: count if k == kind else 0 for k in CLIENT_KINDS},
                local_test_fraction=layout.local_test_fraction,
                missing_image=layout.missing_image,
                missing_text=layout.missing_text,
            )
            clients += only.build(self.train_split(kind), partitioner, numpy_rng(seed, "layout", kind))
        return clients

    # ------------------------------------------------------------------ evaluation
    def source_for(self, dataset: str) -> Any:
        """The source of dataset `dataset`: ``eval_data[dataset]``, else the role reading that dataset."""
        if dataset in self.eval_data:
            return self.eval_data[dataset]
        for source in self.roles.values():
            if getattr(source, "name", None) == dataset:
                return source
        have = sorted({*self.eval_data, *(getattr(s, "name", "?") for s in self.roles.values())})
        raise ValueError(
            f"no '{dataset}' source among data.eval_data or the roles (have {', '.join(have) or 'none'}); "
            f"add data.eval_data.{dataset}"
        )

    def protocol_split(self, name: str) -> MultimodalSplit:
        """The split evaluation protocol `name` runs on (one of `protocols`)."""
        if name not in self.protocols:
            raise ValueError(
                f"protocol {name!r} is not in data.protocols ({', '.join(self.protocols) or 'none'})"
            )
        protocol = self.protocols[name]
        source = self.source_for(protocol.dataset)
        keys = {id(s): role for role, s in self.roles.items()}
        with _configured_at(keys.get(id(source), f"eval_data.{protocol.dataset}")):
            return source.split(protocol.split)

    # ------------------------------------------------------------------ classes and counts
    @property
    def image_classes(self) -> list[str]:
        with _configured_at("image"):
            return list(self.roles["image"].image_classes) if "image" in self.roles else []

    @property
    def text_classes(self) -> list[str]:
        with _configured_at("text"):
            return list(self.roles["text"].text_classes) if "text" in self.roles else []

    def data_metrics(self) -> dict[str, float]:
        """Every member source's skipped-sample counts (``data/<dataset>/<split>/skipped``)."""
        out: dict[str, float] = {}
        for source in (*self.roles.values(), *self.eval_data.values()):
            out.update(getattr(source, "data_metrics", dict)())
        return out
