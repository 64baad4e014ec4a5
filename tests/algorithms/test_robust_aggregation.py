"""Robust aggregation of the weight-averaging step: hand-worked arrays, and one bad client among honest
ones (scaled or sign-flipped update) leaves the global model near the honest average."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from mmfed.algorithms.base import ServerRound
from mmfed.algorithms.fedavg import (
    ModalityFedAvg,
    bound_updates,
    coordinate_median,
    trimmed_mean,
    weighted_average,
)
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Reply


def _states(*rows: list[float]) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.tensor(row, dtype=torch.float64), "n": torch.tensor(3)} for row in rows]


def test_median_and_trimmed_mean_by_hand() -> None:
    states = _states([1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0])
    assert coordinate_median(states)["w"].tolist() == [3.0, 1.0]
    # trim 1 of 5 each side: mean(2, 3, 4) = 3 and mean(0, 1, 2) = 1
    assert trimmed_mean(states, 0.2)["w"].tolist() == [3.0, 1.0]
    assert trimmed_mean(states, 0.1)["w"].tolist() == [22.0, 0.2]  # floor(0.5) = 0: the plain mean
    even = _states([1.0], [2.0], [10.0], [20.0])
    assert coordinate_median(even)["w"].tolist() == [6.0]  # mean of the middle two
    assert int(coordinate_median(states)["n"]) == 3  # integers are not aggregated


def test_norm_bound_by_hand() -> None:
    reference = {"w": torch.tensor([1.0, 1.0])}
    states = _states([4.0, 5.0], [1.5, 1.0])  # updates (3, 4): norm 5 -> scaled to 1; (0.5, 0): kept
    bounded, clipped = bound_updates(states, reference, 1.0)
    assert clipped == 1
    assert torch.allclose(bounded[0]["w"], torch.tensor([1.6, 1.8], dtype=torch.float64))
    assert torch.allclose(bounded[1]["w"], torch.tensor([1.5, 1.0], dtype=torch.float64))


class _Lin(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(size))


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
@pytest.mark.parametrize(
    ("settings", "tolerance"),
    [
        ({"aggregation": "median"}, 0.35),
        ({"aggregation": "trimmed_mean", "trim_fraction": 0.2}, 0.35),
        ({"max_update_norm": 1.5}, 0.75),  # the bad update counts, but at most 1.5 / 5 of the mean
    ],
)
def test_one_bad_client_does_not_move_the_global_model(attack: str, settings: dict, tolerance: float) -> None:
    size, generator = 64, torch.Generator().manual_seed(0)
    start = torch.randn(size, generator=generator)
    direction = torch.randn(size, generator=generator)
    direction /= direction.norm()  # the honest clients' common update has norm 1
    honest = [start + direction + 0.1 * torch.randn(size, generator=generator) for _ in range(4)]
    bad_update = 100 * direction if attack == "scaled" else -10 * direction
    sent = [*honest, start + bad_update]

    def aggregate(step: ModalityFedAvg) -> torch.Tensor:
        model = MultimodalModel({"image_encoder": _Lin(size)})
        model.image_encoder.w.data.copy_(start)
        replies = [
            Reply(cid=f"image-{i}", kind="image", num_examples=10, tensors={"weights/image_encoder/w": w})
            for i, w in enumerate(sent)
        ]
        step.aggregate(ServerRound(1, 0, model, []), replies)
        return model.image_encoder.w.detach().clone()

    honest_mean = weighted_average([{"w": w} for w in honest], [1.0] * 4)["w"].float()
    plain = aggregate(ModalityFedAvg())
    robust = aggregate(ModalityFedAvg(**settings))
    assert (plain - honest_mean).norm() > 2.0  # without the option the bad client drags the model away
    assert (robust - honest_mean).norm() < tolerance, (robust - honest_mean).norm()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"aggregation": "mode"}, "aggregation='mode' is not one of"),
        ({"trim_fraction": 0.5}, "trim_fraction must be in [0, 0.5)"),
        ({"max_update_norm": 0.0}, "max_update_norm must be > 0"),
    ],
)
def test_bad_settings_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModalityFedAvg(**settings)
