"""FedProx, MOON, CreamFL and FedAFD client terms against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import torch

from mmfed.algorithms.base import GLOBAL_IMAGE, GLOBAL_TEXT, ClientRound
from mmfed.algorithms.creamfl import CreamFLRegularizers, inter_modal_loss
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


def test_creamfl_inter_modal_negatives_are_all_public_rows_by_hand() -> None:
    # Local feature (1, 0) of public row 1; the other modality's global features of the round's 3 rows:
    # (0, 1), (1, 0), (0, 1). logits / 0.5 = [0, 2, 0], label 1 -> CE = log(1 + 2 e^-2).
    # (Against in-batch negatives only, the batch {row 1} has no negative: CE would be 0.)
    local = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    value = inter_modal_loss(local, keys, torch.tensor([1]), 0.5)
    assert math.isclose(float(value), math.log1p(2 * math.exp(-2.0)), rel_tol=1e-6)
    # Features are L2-normalised first (the reference's encoders end in a normalisation).
    assert math.isclose(float(inter_modal_loss(5 * local, 3 * keys, torch.tensor([1]), 0.5)), float(value))


class _Pixels(torch.nn.Module):
    """A linear image tower on 2 x 1 x 1 'images', so its features are easy to work out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 2, 2, bias=False)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _np_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    top = logits.max(1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    return float(-log_softmax[np.arange(len(labels)), labels].mean())


def test_creamfl_term_inter_over_all_rows_and_moon_style_intra_against_the_round_start_model() -> None:
    torch.manual_seed(0)
    model = MultimodalModel({"image_encoder": _Pixels()})
    n = 6  # the round's public sample
    global_image, global_text = torch.randn(n, 2), torch.randn(n, 2)
    payload = Payload(tensors={GLOBAL_IMAGE: global_image, GLOBAL_TEXT: global_text})
    term = CreamFLRegularizers()  # tau 0.5, weight 0.5, inter/intra weights 1
    term.begin(ClientRound("image-0", "image", 1, payload, model))
    start = model.image_encoder.linear.weight.detach().clone()
    with torch.no_grad():  # local training has moved the model since the round started
        model.image_encoder.linear.weight.add_(torch.randn_like(start))
    positions = torch.tensor([4, 1])
    images = torch.randint(0, 256, (2, 3, 2, 1), dtype=torch.uint8)
    batch = {"public_positions": positions, "public_images": images}
    out = {"public_image_emb": model.encode_images(images, fuse=False)}
    losses = term(batch, out, model)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    pixels = images.float().flatten(1).numpy()
    local = unit(out["public_image_emb"].detach().numpy())
    previous = unit(pixels @ start.numpy().T)  # the round-start model's features of the same inputs
    # inter: against the global *text* features of all 6 rows, label = own row
    inter = _np_ce(local @ unit(global_text.numpy()).T / 0.5, positions.numpy())
    # intra: 2-way, positive the global *image* feature of the row, negative the round-start feature
    pos = (local * unit(global_image.numpy()[positions.numpy()])).sum(-1)
    neg = (local * previous).sum(-1)
    intra = _np_ce(np.stack([pos, neg], 1) / 0.5, np.zeros(2, dtype=int))
    assert math.isclose(float(losses["creamfl_inter_image"].detach()), 0.5 * inter, rel_tol=1e-5)
    assert math.isclose(float(losses["creamfl_intra_image"].detach()), 0.5 * intra, rel_tol=1e-5)
    assert set(losses) == {"creamfl_inter_image", "creamfl_intra_image"}


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
