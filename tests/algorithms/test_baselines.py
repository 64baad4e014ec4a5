"""FedProx and MOON at the level of their loss terms' forward, against hand-computed values.

FedProx (papers.md): mu/2 ||w - w^t||^2 over every trained tensor the server sent and the client
loaded, with and without LoRA adapters (whose peft-wrapped names must still match the payload's).
MOON: l = -log e^{sim(z,z_glob)/tau} / (e^{sim(z,z_glob)/tau} + e^{sim(z,z_prev)/tau}), tau 0.5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mmfed.algorithms.base import ClientRound
from mmfed.algorithms.moon import ModelContrastive
from mmfed.algorithms.prox import ProximalTerm
from mmfed.cli import compose
from mmfed.config import instantiate
from mmfed.models.lora import is_personal
from mmfed.models.multimodal import KIND_PARTS, MultimodalModel, Tower, build_model
from mmfed.protocol import Payload

MU = 0.1
SHIFT = 0.5  # every parameter moves by this after the round starts: ||w - w^t||^2 = SHIFT^2 * numel


def _client_model(lora: str | None, kind: str = "image") -> tuple[MultimodalModel, MultimodalModel]:
    """(the un-adapted model the server's payload comes from, the client's model: LoRA-wrapped or not)."""
    overrides = ["experiment=smoke", *([f"model/lora={lora}"] if lora else [])]
    cfg = compose(overrides)
    torch.manual_seed(0)
    plain = build_model(cfg.model, KIND_PARTS[kind], 10, 4)
    client = copy.deepcopy(plain)
    if lora:
        client = instantiate(cfg.model.lora, "model.lora").wrap(client)
    return plain, client


def _prox_after_shift(client: MultimodalModel, payload: Payload) -> torch.Tensor:
    """What the client does (load the non-personal payload tensors), then the term on shifted weights."""
    client.load_part_state(
        {k: v for k, v in payload.tensors.items() if not is_personal(client, k)}, strict_parts=False
    )
    term = ProximalTerm(mu=MU)
    term.begin(ClientRound("image-0", "image", 1, payload, client))
    with torch.no_grad():
        for param in client.parameters():
            param.add_(SHIFT)
    return term({}, {}, client)["prox"]


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_prox_without_lora_covers_every_sent_parameter() -> None:
    plain, client = _client_model(None)
    payload = Payload(tensors=plain.part_state(KIND_PARTS["image"]))  # as FedAvg broadcasts
    value = _prox_after_shift(client, payload)
    # anchored: the image encoder's and the image head's parameters (buffers are not parameters)
    sent = _numel(plain.image_encoder) + _numel(plain.image_head)
    assert math.isclose(float(value.detach()), 0.5 * MU * SHIFT**2 * sent, rel_tol=1e-6)


@pytest.mark.parametrize("personal_heads", [True, False])
def test_prox_with_lora_anchors_the_base_weights_and_no_personal_tensor(personal_heads: bool) -> None:
    plain, client = _client_model("default")
    client.personal_parts = ("image_head",) if personal_heads else ()
    payload = Payload(tensors=plain.part_state(KIND_PARTS["image"]))
    value = _prox_after_shift(client, payload)
    # every base parameter of the (un-adapted) encoder is anchored, under its peft-wrapped name too;
    # the head only when it is shared; adapters never (the server never sent them)
    sent = _numel(plain.image_encoder) + (0 if personal_heads else _numel(plain.image_head))
    assert sum(1 for k in client.part_parameters() if "lora_" in k) > 0
    assert math.isclose(float(value.detach()), 0.5 * MU * SHIFT**2 * sent, rel_tol=1e-6)
    value.backward()
    for name, param in client.part_parameters().items():
        anchored = param.grad is not None and bool(param.grad.abs().sum() > 0)
        expected = not is_personal(client, name)
        assert anchored == expected, name
        if anchored:  # d/dw mu/2 ||w - w^t||^2 = mu (w - w^t)
            assert torch.allclose(param.grad, torch.full_like(param, MU * SHIFT)), name


def test_prox_ignores_what_the_server_did_not_send() -> None:
    plain, client = _client_model(None)
    payload = Payload(tensors=plain.part_state(["image_head"]))  # only the head
    value = _prox_after_shift(client, payload)
    assert math.isclose(float(value.detach()), 0.5 * MU * SHIFT**2 * _numel(plain.image_head), rel_tol=1e-6)


# ----------------------------------------------------------------------------- MOON
class _Raw2d(nn.Module):
    """An encoder that passes 2-d inputs through, so the tower's projection decides the feature."""

    output_dim = 2

    def prepare(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _rotation(degrees: float) -> torch.Tensor:
    a = math.radians(degrees)
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def _model(projection: torch.Tensor) -> MultimodalModel:
    tower = Tower(_Raw2d(), 2)
    with torch.no_grad():
        tower.projection.weight.copy_(projection)
        tower.projection.bias.zero_()
    return MultimodalModel({"image_encoder": tower})


def test_moon_term_forward_by_hand_positive_global_negative_previous_tau_half() -> None:
    # global model: identity; previous local model: rotation by 90 degrees; current: rotation by 60.
    model = _model(torch.eye(2))
    previous = _model(_rotation(90.0)).part_state()
    term = ModelContrastive()  # tau = 0.5 by default (papers.md)
    assert term.temperature == 0.5
    term.begin(ClientRound("image-0", "image", 2, Payload(), model, {"previous": previous}))
    with torch.no_grad():
        model.image_encoder.projection.weight.copy_(_rotation(60.0))
    images = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    out = {"image_emb": model.encode_images(images)}
    loss = float(term({"images": images}, out, model)["moon"])
    # every sample: sim(z, z_glob) = cos 60 = 0.5, sim(z, z_prev) = cos 30
    pos, neg = 0.5, math.cos(math.radians(30.0))
    expected = -math.log(math.exp(pos / 0.5) / (math.exp(pos / 0.5) + math.exp(neg / 0.5)))
    assert math.isclose(loss, expected, rel_tol=1e-5)
    assert math.isclose(expected, math.log1p(math.exp((neg - pos) / 0.5)), rel_tol=1e-9)
    assert term.end()["previous"]["image_encoder/projection.weight"].allclose(_rotation(60.0))


def test_moon_first_round_uses_the_global_model_as_previous() -> None:
    model = _model(torch.eye(2))
    term = ModelContrastive(temperature=0.5)
    term.begin(ClientRound("image-0", "image", 1, Payload(), model, {}))
    with torch.no_grad():
        model.image_encoder.projection.weight.copy_(_rotation(60.0))
    images = torch.tensor([[1.0, 0.0]])
    loss = float(term({"images": images}, {"image_emb": model.encode_images(images)}, model)["moon"])
    assert math.isclose(loss, math.log(2.0), rel_tol=1e-6)  # both similarities equal: -log(1/2)
