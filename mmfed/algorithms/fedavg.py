"""Modality-wise FedAvg (McMahan et al. 2017, Alg. 1), for mixed-modality federations.

Each model part is averaged over exactly the clients that trained it, weighted by their sample
counts n_k:  w_part <- sum_k n_k w_part^k / sum_k n_k  over k in S_part. So the image encoder is
averaged over image-only and paired clients, the text encoder over text-only and paired clients,
each head over the clients of its task, and the temperature over paired clients. A part no sampled
client trained keeps its previous global value.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from mmfed.algorithms.base import ServerRound, ServerStep
from mmfed.config import register
from mmfed.data.layout import ClientSpec
from mmfed.models.multimodal import KIND_PARTS
from mmfed.protocol import TRANSPORT_DTYPES, Payload, Reply, encode_tensors

WEIGHT_PREFIX = "weights/"


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_k w_k state_k / sum_k w_k, accumulated in float64; non-float tensors come from the first state."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError(
            f"weighted_average needs at least one state with positive weight, got weights={weights}"
        )
    averaged: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            averaged[key] = first.clone()
            continue
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (weight / total)
        averaged[key] = acc
    return averaged


@register("server_step", "fedavg")
class ModalityFedAvg(ServerStep):
    """Broadcast the global parts a client's kind trains; average the returned parts by sample count."""

    trains_parts = KIND_PARTS["global"]

    def __init__(self, transport_dtype: str = "float32") -> None:
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(
                f"transport_dtype={transport_dtype!r} is not one of {', '.join(TRANSPORT_DTYPES)}"
            )
        self.transport_dtype = transport_dtype

    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        parts = [p for p in KIND_PARTS[client.kind] if round_.global_model.has(p)]
        state = round_.global_model.part_state(parts)
        return Payload(
            tensors=encode_tensors(state, self.transport_dtype),
            config={"weights_dtype": self.transport_dtype},
            reply=["weights"],
        )

    def aggregate(self, round_: ServerRound, replies: list[Reply]) -> dict[str, float]:
        by_part: dict[str, list[tuple[dict[str, torch.Tensor], int]]] = defaultdict(list)
        for reply in replies:
            per_part: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
            for name, tensor in reply.tensors.items():
                if name.startswith(WEIGHT_PREFIX):
                    part, _, param = name[len(WEIGHT_PREFIX) :].partition("/")
                    per_part[part][param] = tensor
            for part, state in per_part.items():
                by_part[part].append((state, reply.num_examples))
        model = round_.global_model
        metrics: dict[str, float] = {}
        for part, entries in by_part.items():
            averaged = weighted_average([s for s, _ in entries], [n for _, n in entries])
            target = getattr(model, part)
            reference = target.state_dict()
            target.load_state_dict({k: v.to(reference[k].dtype) for k, v in averaged.items()})
            metrics[f"{part}/clients"] = float(len(entries))
        return metrics
