"""FedProx, MOON, CreamFL and FedAFD client terms against hand-computed values."""

from __future__ import annotations

import math

import torch

from mmfed.algorithms.base import ClientRound
from mmfed.algorithms.creamfl import info_nce
from mmfed.algorithms.fedafd import discriminator_loss, generator_loss
from mmfed.algorithms.moon import moon_loss
from mmfed.algorithms.prox import ProximalTerm
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Payload


def test_discriminator_losses_on_known_logits_use_logits_not_probabilities() -> None:
    zero = torch.zeros(4)
    assert math.isclose(float(discriminator_loss(zero, zero)), 2 * math.log(2), rel_tol=1e-6)
    assert math.isclose(float(generator_loss(zero)), math.log(2), rel_tol=1e-6)
    # A confident, correct discriminator: real logit +10, fake logit -10 -> loss ~ 2 * log(1 + e^-10).
    good = discriminator_loss(
        torch.full((3,), 10.0, dtype=torch.float64), torch.full((3,), -10.0, dtype=torch.float64)
    )
    assert math.isclose(float(good), 2 * math.log1p(math.exp(-10)), rel_tol=1e-4)
    # Had a sigmoid been applied first (the reference bug), logit 10 -> p~1 -> BCE-with-logits(1, 1)=0.313.
    assert float(good) < 1e-3
    assert math.isclose(float(generator_loss(torch.tensor([-3.0]))), math.log1p(math.exp(3.0)), rel_tol=1e-6)


def test_info_nce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = I / T, T = 0.5: CE of [2, 0] against 0 = log(1 + e^-2)
    assert math.isclose(float(info_nce(q, k, 0.5)), math.log1p(math.exp(-2.0)), rel_tol=1e-6)
    # Each row's positive is its own key: swapping the keys makes every positive a negative.
    assert float(info_nce(q, k.flip(0), 0.5)) > float(info_nce(q, k, 0.5))


def test_moon_loss_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0]])
    z_glob = torch.tensor([[1.0, 0.0]])  # cos 1
    z_prev = torch.tensor([[0.0, 1.0]])  # cos 0
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0.0)))
    assert math.isclose(float(moon_loss(z, z_glob, z_prev, 0.5)), expected, rel_tol=1e-6)


def test_prox_is_half_mu_times_the_squared_distance_to_the_received_weights() -> None:
    model = MultimodalModel({"image_head": torch.nn.Linear(2, 1, bias=False)})
    payload = Payload(tensors={"image_head/weight": torch.tensor([[1.0, 2.0]])})
    model.load_part_state(payload.tensors)
    term = ProximalTerm(mu=0.1)
    term.begin(ClientRound("image-0", "image", 1, payload, model))
    with torch.no_grad():
        model.image_head.weight.copy_(torch.tensor([[4.0, 6.0]]))  # moved by (3, 4): ||.||^2 = 25
    value = term({}, {}, model)["prox"]
    assert math.isclose(float(value), 0.5 * 0.1 * 25, rel_tol=1e-6)
    value.backward()
    assert torch.allclose(model.image_head.weight.grad, 0.1 * torch.tensor([[3.0, 4.0]]))
