"""What travels between server and clients: named tensors, a small config and metrics.

Kept free of any engine so the same messages ride the embedded engine and Flower (as ArrayRecord /
ConfigRecord / MetricRecord). Bytes are counted from the tensors as sent (after the transport cast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TRANSPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Message:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def merge(self, other: Message) -> None:
        """Add another step's fragment; two steps sending the same name is a bug, not an override."""
        for mine, theirs, what in (
            (self.tensors, other.tensors, "tensor"),
            (self.config, other.config, "config"),
        ):
            clash = mine.keys() & theirs.keys()
            if clash:
                raise ValueError(f"two server steps both send {what} {sorted(clash)[0]!r}")
            mine.update(theirs)
        self.metrics.update(other.metrics)


@dataclass
class Payload(Message):
    """Server -> client for one stage of one round."""

    stage: str = "fit"
    round: int = 0
    reply: list[str] = field(default_factory=list)  # what the client sends back: "weights", ...

    def merge(self, other: Message) -> None:
        super().merge(other)
        if isinstance(other, Payload):
            self.reply = sorted(set(self.reply) | set(other.reply))


@dataclass
class Reply(Message):
    """Client -> server."""

    cid: str = ""
    kind: str = ""
    num_examples: int = 0


def encode_tensors(tensors: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Copies of the tensors as sent: floating ones cast to the transport dtype, all on CPU.

    Always a copy (``copy=True``): a message is a snapshot. Without it a float32 CPU parameter
    would travel as the parameter itself, and a later update of the (pooled) model would silently
    change a reply already handed to the server.
    """
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport_dtype={dtype!r} is not one of {', '.join(TRANSPORT_DTYPES)}")
    target = TRANSPORT_DTYPES[dtype]
    return {
        name: t.detach().to("cpu", target if t.is_floating_point() else t.dtype, copy=True).contiguous()
        for name, t in tensors.items()
    }
