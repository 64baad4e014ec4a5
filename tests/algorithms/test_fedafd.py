"""FedAFD's client side: discriminators, the adversarial term's forward by hand, fusion wiring, presets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmfed.algorithms.base import GLOBAL_IMAGE, GLOBAL_TEXT, ClientRound, ServerRound
from mmfed.algorithms.fedafd import BiLevelAdversarialAlignment, discriminator, discriminator_loss
from mmfed.cli import compose
from mmfed.config import instantiate
from mmfed.federation.run import Federation
from mmfed.models.fusion import IterativeAttentionalFusion, TwoGateFusion
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Payload


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def image_round(
    global_image: torch.Tensor, global_text: torch.Tensor, state: dict | None = None
) -> ClientRound:
    model = MultimodalModel({"image_encoder": nn.Linear(2, 2)})
    payload = Payload(tensors={GLOBAL_IMAGE: global_image, GLOBAL_TEXT: global_text})
    return ClientRound("image-0", "image", 1, payload, model, state or {})


def set_discriminator(disc: nn.Sequential, out_bias: float) -> None:
    """hidden (2, 2): D(x) = lrelu(lrelu(x_0)) - lrelu(lrelu(x_1)) + out_bias."""
    first, _, second, _, last = disc
    with torch.no_grad():
        for layer in (first, second):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, -1.0]]))
        last.bias.fill_(out_bias)


def test_discriminators_have_the_reference_depth_and_learning_rate_and_end_in_a_logit() -> None:
    term = BiLevelAdversarialAlignment()
    term.begin(image_round(torch.randn(4, 16), torch.randn(4, 16)))
    assert set(term.discriminators) == {"intra", "cross"}  # one modality: one discriminator per level
    disc = term.discriminators["intra"]
    shapes = [tuple(m.weight.shape) for m in disc if isinstance(m, nn.Linear)]
    assert shapes == [(128, 16), (64, 128), (1, 64)]
    assert [type(m) for m in disc] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
    assert all(m.negative_slope == 0.2 for m in disc if isinstance(m, nn.LeakyReLU))
    group = term.disc_optimizer.param_groups[0]
    assert group["lr"] == 1e-4 and group["betas"] == (0.9, 0.999)
    # a logit, not a probability: a sigmoid at the end (the reference code's) cannot give this
    with torch.no_grad():
        disc[-1].bias.fill_(-5.0)
        disc[-1].weight.zero_()
        assert float(disc(torch.randn(3, 16)).max()) == -5.0


def test_paired_clients_share_discriminators_across_modalities_unless_per_modality() -> None:
    model = MultimodalModel({"image_encoder": nn.Linear(2, 2), "text_encoder": nn.Linear(2, 2)})
    payload = Payload(tensors={GLOBAL_IMAGE: torch.randn(3, 8), GLOBAL_TEXT: torch.randn(3, 8)})
    shared, own = BiLevelAdversarialAlignment(), BiLevelAdversarialAlignment(per_modality=True)
    for term in (shared, own):
        term.begin(ClientRound("paired-0", "paired", 1, payload, model))
    assert set(shared.discriminators) == {"intra", "cross"}
    assert set(own.discriminators) == {"intra_image", "cross_image", "intra_text", "cross_text"}


def test_adversarial_term_forward_by_hand() -> None:
    """Discriminator loss (real = global, fake = local) and the encoder's non-saturating loss."""
    local = torch.tensor([[1.0, 0.0], [0.6, -0.8]])  # unit rows: the L2 normalisation keeps them
    same = torch.tensor([[0.0, 1.0], [-0.8, 0.6]])  # global image features of the two public rows
    other = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # global text features of the same rows
    # disc_lr ~ 0: the discriminators after their step equal the hand-set ones
    term = BiLevelAdversarialAlignment(
        intra_weight=1.0, cross_weight=2.0, disc_lr=1e-12, disc_hidden=(2, 2), weight=0.5
    )
    term.begin(image_round(same, other))
    set_discriminator(term.discriminators["intra"], 0.5)
    set_discriminator(term.discriminators["cross"], 0.0)
    # lrelu twice scales a negative by 0.04. Intra D (bias 0.5):
    #   D(l) = [1.5, 0.6 + 0.032 + 0.5 = 1.132]; D(g_same) = [-0.5, -0.032 - 0.6 + 0.5 = -0.132]
    # Cross D (bias 0): D(l) = [1.0, 0.632]; D(g_other) = [0.6 - 0.8 = -0.2, 1.0]
    d_l_intra, d_real_intra = [1.5, 1.132], [-0.5, -0.132]
    d_l_cross, d_real_cross = [1.0, 0.632], [-0.2, 1.0]

    def d_loss(real: list[float], fake: list[float]) -> float:  # BCE(real, 1) + BCE(fake, 0), means
        return sum(softplus(-r) for r in real) / 2 + sum(softplus(f) for f in fake) / 2

    out = term({"public_positions": torch.tensor([0, 1])}, {"public_image_emb": local.clone()}, None)
    expected_d = 0.5 * (d_loss(d_real_intra, d_l_intra) + d_loss(d_real_cross, d_l_cross))
    assert math.isclose(term.last_discriminator_loss, expected_d, rel_tol=1e-5)
    # the encoder's loss: BCE(D(l), 1) = softplus(-D(l)), weighted 0.5 x level weight
    intra = 0.5 * 1.0 * sum(softplus(-x) for x in d_l_intra) / 2
    cross = 0.5 * 2.0 * sum(softplus(-x) for x in d_l_cross) / 2
    assert set(out) == {"adv_intra_image", "adv_cross_image"}
    assert math.isclose(float(out["adv_intra_image"]), intra, rel_tol=1e-5)
    assert math.isclose(float(out["adv_cross_image"]), cross, rel_tol=1e-5)


def test_discriminator_learns_global_is_real_and_the_encoder_loss_pushes_local_towards_global() -> None:
    torch.manual_seed(0)
    real = torch.tensor([[0.0, 1.0]]).repeat(8, 1)
    term = BiLevelAdversarialAlignment(disc_lr=1e-2, disc_hidden=(8, 8))
    term.begin(image_round(real, real))
    local = torch.tensor([[1.0, 0.0]]).repeat(8, 1).requires_grad_(True)
    batch, before = {"public_positions": torch.arange(8)}, None
    for _ in range(30):
        out = term(batch, {"public_image_emb": local}, None)
        before = before if before is not None else term.last_discriminator_loss
    disc = term.discriminators["intra"]
    assert term.last_discriminator_loss < before  # the discriminators take their own steps
    assert float(disc(real).mean()) > 0 > float(disc(local.detach()).mean())  # global = real (label 1)
    grads = [p.grad.clone() for p in term.discriminators.parameters()]  # from their own step
    out["adv_intra_image"].backward()
    # frozen for the encoder's loss: its backward adds nothing to the discriminators' gradients
    assert all(torch.equal(p.grad, g) for p, g in zip(term.discriminators.parameters(), grads, strict=True))
    # a small step against the encoder's gradient makes D call the local feature more "global"
    moved = local.detach() - 0.1 * local.grad / local.grad.norm()
    assert float(disc(moved).mean()) > float(disc(local.detach()).mean())


def test_discriminator_loss_matches_the_reference_targets() -> None:
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(0.5) + softplus(-3.0)) / 2
    assert math.isclose(float(discriminator_loss(real, fake)), expected, rel_tol=1e-6)
    assert [type(m) for m in discriminator(4, ())] == [nn.Linear]


def test_discriminators_are_personal_state() -> None:
    term = BiLevelAdversarialAlignment()
    term.begin(image_round(torch.randn(4, 8), torch.randn(4, 8)))
    kept = term.end()
    again = BiLevelAdversarialAlignment()
    again.begin(image_round(torch.randn(4, 8), torch.randn(4, 8), {**kept}))
    for key, value in again.discriminators.state_dict().items():
        assert torch.equal(value, kept["discriminators"][key])


# ---------------------------------------------------------------- the algorithm brings fusion; presets
TINY = ["experiment=smoke", "data.n_public=32", "name=t"]


def fusion_of(cfg) -> tuple[bool, bool]:
    return bool(cfg.model.fusion), bool(cfg.algorithm.server_steps.distill.send_global_encoders)


def test_algorithm_fedafd_alone_brings_fusion_and_sends_its_references() -> None:
    cfg = compose([*TINY, "algorithm=fedafd"])
    assert fusion_of(cfg) == (True, True)
    model = Federation(cfg).build_model("image")
    assert isinstance(model.image_fusion, IterativeAttentionalFusion)
    assert model.has("reference_image_encoder")
    # turning fusion off on the command line also stops sending the global encoders
    assert fusion_of(compose([*TINY, "algorithm=fedafd", "model.fusion=false"])) == (False, False)
    gates = Federation(compose([*TINY, "algorithm=fedafd", "model/fusion_module=gates"])).build_model("text")
    assert isinstance(gates.text_fusion, TwoGateFusion)


@pytest.mark.parametrize(
    ("preset", "fusion", "adversarial", "weighting"),
    [
        ("fedafd", True, True, "similarity"),
        ("fedafd_no_fusion", False, True, "similarity"),
        ("fedafd_no_adversarial", True, False, "similarity"),
        ("fedafd_uniform", True, True, "uniform"),
        ("fedafd_paper", True, True, "similarity"),
    ],
)
def test_fedafd_presets_run_what_their_names_say(
    preset: str, fusion: bool, adversarial: bool, weighting: str
) -> None:
    cfg = compose([f"experiment=[smoke,{preset}]", "name=t"])
    assert fusion_of(cfg) == (fusion, fusion)
    federation = Federation(cfg) if preset != "fedafd_paper" else None
    if federation is not None:
        model = federation.build_model("paired")
        assert model.has("image_fusion") == model.has("text_fusion") == fusion
        if fusion:  # one iAFF for both of a paired client's modalities, as in the reference
            assert model.image_fusion is model.text_fusion
    term = instantiate(cfg.algorithm.loss_terms.adversarial, "adversarial")
    assert term.applies_to("image", None) == adversarial
    assert cfg.algorithm.server_steps.distill.weighting == weighting
    if preset == "fedafd_paper":
        assert (cfg.layout.image, cfg.layout.text, cfg.layout.paired) == (3, 3, 4)
        assert (cfg.model.embed_dim, cfg.training.batch_size) == (256, 256)
        assert (cfg.data.n_public, cfg.rounds, cfg.training.local_epochs, cfg.partition.alpha) == (
            10000,
            40,
            5,
            0.1,
        )


@pytest.mark.parametrize("kind", ["image", "paired"])
def test_the_task_head_reads_the_fused_feature(tmp_path, kind: str) -> None:
    """One real client round: the task loss (image head / paired contrastive) trains the fusion module,
    whose output is the fusion of the client's feature with the received global encoder's feature.
    (A module per modality here, so each modality's task input is checked on its own.)"""
    own = "model.fusion_module.share_across_modalities=false"
    cfg = compose([*TINY, "algorithm=fedafd", own, "training.max_steps=2", f"run_dir={tmp_path}"])
    federation = Federation(cfg)
    spec = next(c for c in federation.clients if c.kind == kind)
    global_model = federation.global_model()
    step = instantiate(cfg.algorithm.server_steps.distill, "distill")
    context = ServerRound(1, federation.seed, global_model, federation.clients, federation.public)
    payload = Payload(stage="fit", round=1)
    payload.merge(step.broadcast(context, spec))
    modalities = ("image", "text") if kind == "paired" else ("image",)
    parts = [f"{m}_fusion" for m in modalities]
    initial = federation._template(kind, federation.variant(spec)).part_state(parts)
    _, state = federation.client_app(spec.cid)(payload, {})
    trained = state["model"]
    for part in parts:
        keys = [k for k in initial if k.startswith(part) and "weight" in k and "running" not in k]
        assert keys and all(not torch.equal(trained[k], initial[k]) for k in keys), (
            f"{part} got no gradient: the task loss did not read the fused feature"
        )
    # the fused feature is iAFF(local, global encoder's feature)
    model = federation.pool.get(kind, federation.variant(spec))
    model.load_part_state(trained, strict_parts=False)
    model.load_part_state({k: v for k, v in payload.tensors.items() if k.startswith("reference_")})
    model.eval()
    global_model.eval()
    inputs = {"image": federation.public.images[:4], "text": [c[0] for c in federation.public.captions[:4]]}
    with torch.no_grad():
        for modality in modalities:
            encode, encode_global = (
                getattr(model, f"encode_{modality}s"),
                getattr(global_model, f"encode_{modality}s"),
            )
            local, reference = encode(inputs[modality], fuse=False), encode_global(inputs[modality])
            fusion = getattr(model, f"{modality}_fusion")
            assert torch.allclose(encode(inputs[modality]), fusion(local, reference), atol=1e-5)
            assert not torch.allclose(encode(inputs[modality]), local, atol=1e-3)


def test_a_fusion_client_without_the_global_encoders_fails_loudly(tmp_path) -> None:
    """model.fusion with a server that sends no reference encoders (here CreamFL's distillation) would
    fuse with a random frozen encoder: the client refuses, naming the part and the fix."""
    cfg = compose([*TINY, "algorithm=creamfl", "model.fusion=true", f"run_dir={tmp_path}"])
    federation = Federation(cfg)
    spec = next(c for c in federation.clients if c.kind == "text")
    step = instantiate(cfg.algorithm.server_steps.distill, "distill")
    context = ServerRound(
        1, federation.seed, federation.global_model(), federation.clients, federation.public
    )
    payload = Payload(stage="fit", round=1)
    payload.merge(step.broadcast(context, spec))
    with pytest.raises(
        ValueError, match="client text-0: model.fusion is on but the server sent no reference_text"
    ):
        federation.client_app(spec.cid)(payload, {})
