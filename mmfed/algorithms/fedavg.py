"""Modality-wise FedAvg (McMahan et al. 2017, Alg. 1), for mixed-modality federations.

Each model part is averaged over exactly the clients that trained it, weighted by their sample
counts n_k:  w_part <- sum_k n_k w_part^k / sum_k n_k  over k in S_part. So the image encoder is
averaged over image-only and paired clients, the text encoder over text-only and paired clients,
each head over the clients of its task, and the temperature over paired clients. A part no sampled
client trained keeps its previous global value.

Robust aggregation (our option, off by default: ``aggregation=mean``, ``max_update_norm=null``), for
federations where a client may send a scaled or sign-flipped model:
- ``aggregation=median``: the coordinate-wise median of the clients' part tensors (Yin et al. 2018,
  "Byzantine-robust distributed learning", Alg. "median"); unweighted, so n_k is not used.
- ``aggregation=trimmed_mean``: per coordinate, drop the floor(beta m) largest and smallest of the m
  values and average the rest (Yin et al. 2018, beta = ``trim_fraction``); unweighted.
- ``max_update_norm=C``: before aggregating, each client's update of a part, Delta_k = w_k - w_global,
  is scaled to norm <= C (the norm bound of Sun et al. 2019, "Can you really backdoor federated
  learning?"), per part because parts are the unit of aggregation here.
Code names: `states` = the w_part^k, `weights` = n_k, `reference` = the global w_part before the round.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from mmfed.algorithms.base import ServerRound, ServerStep
from mmfed.config import check_choice, check_positive, register
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


AGGREGATIONS = ("mean", "median", "trimmed_mean")


def _per_coordinate(
    states: list[dict[str, torch.Tensor]], reduce: Callable[[torch.Tensor], torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """`reduce(sorted values [m, ...])` for each floating tensor; non-float tensors from the first state."""
    if not states:
        raise ValueError(f"{what} needs at least one state")
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            out[key] = first.clone()
            continue
        out[key] = reduce(torch.stack([state[key].to(torch.float64) for state in states]).sort(dim=0).values)
    return out


def coordinate_median(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per coordinate, the median of the clients' values (for an even count, the mean of the middle two)."""

    def median(values: torch.Tensor) -> torch.Tensor:
        m = values.shape[0]
        return (values[(m - 1) // 2] + values[m // 2]) / 2

    return _per_coordinate(states, median, "coordinate_median")


def trimmed_mean(states: list[dict[str, torch.Tensor]], fraction: float) -> dict[str, torch.Tensor]:
    """Per coordinate, the mean after dropping the floor(fraction m) largest and smallest values."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {fraction}")

    def trimmed(values: torch.Tensor) -> torch.Tensor:
        cut = int(fraction * values.shape[0])
        return values[cut : values.shape[0] - cut].mean(dim=0)

    return _per_coordinate(states, trimmed, "trimmed_mean")


def bound_updates(
    states: list[dict[str, torch.Tensor]], reference: dict[str, torch.Tensor], max_norm: float
) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Each state moved back towards `reference` so its update (all floating tensors together) has
    norm <= `max_norm`; returns the bounded states and how many were scaled down."""
    bounded, clipped = [], 0
    for state in states:
        keys = [k for k, v in state.items() if v.is_floating_point()]
        deltas = {k: state[k].to(torch.float64) - reference[k].to(torch.float64) for k in keys}
        norm = float(torch.sqrt(sum((d * d).sum() for d in deltas.values()))) if keys else 0.0
        scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
        clipped += scale < 1.0
        moved = {k: reference[k].to(torch.float64) + delta * scale for k, delta in deltas.items()}
        bounded.append({k: moved.get(k, v) for k, v in state.items()})
    return bounded, clipped


@register("server_step", "fedavg")
class ModalityFedAvg(ServerStep):
    """Broadcast the global parts a client's kind trains; average the returned parts by sample count."""

    trains_parts = KIND_PARTS["global"]
    evaluate_from_global = True  # sends the global model's parts

    def __init__(
        self,
        transport_dtype: str = "float32",
        aggregation: str = "mean",
        trim_fraction: float = 0.1,
        max_update_norm: float | None = None,
    ) -> None:
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(
                f"transport_dtype={transport_dtype!r} is not one of {', '.join(TRANSPORT_DTYPES)}"
            )
        check_choice("aggregation", aggregation, AGGREGATIONS)
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        if max_update_norm is not None:
            check_positive("max_update_norm", max_update_norm)
        self.transport_dtype = transport_dtype
        self.aggregation, self.trim_fraction = aggregation, trim_fraction
        self.max_update_norm = max_update_norm

    def combine(
        self, states: list[dict[str, torch.Tensor]], weights: list[float], reference: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int]:
        """The new global value of one part from the clients' values (and how many updates were bounded)."""
        clipped = 0
        if self.max_update_norm is not None:
            states, clipped = bound_updates(states, reference, self.max_update_norm)
        if self.aggregation == "median":
            return coordinate_median(states), clipped
        if self.aggregation == "trimmed_mean":
            return trimmed_mean(states, self.trim_fraction), clipped
        return weighted_average(states, weights), clipped

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
            target = getattr(model, part)
            reference = target.state_dict()
            averaged, clipped = self.combine(
                [s for s, _ in entries], [n for _, n in entries], {k: v.cpu() for k, v in reference.items()}
            )
            target.load_state_dict({k: v.to(reference[k].dtype) for k, v in averaged.items()})
            metrics[f"{part}/clients"] = float(len(entries))
            if self.max_update_norm is not None:
                metrics[f"{part}/bounded"] = float(clipped)
        return metrics
