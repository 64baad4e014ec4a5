"""FedDifRC's TDCL / NDCR and SemanticFL's anchor InfoNCE against hand-computed small cases."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmfed.algorithms.base import ClientRound
from mmfed.algorithms.feddifrc import candidate_classes, consistency_loss, tdcl_loss
from mmfed.algorithms.semanticfl import (
    CLASS_NAMES,
    IMAGE_CLASS_ANCHORS,
    PUBLIC_IMAGE_ANCHORS,
    PUBLIC_TEXT_ANCHORS,
    SemanticConsistency,
    anchor_nce,
)
from mmfed.algorithms.teacher_space import (
    IMAGE_MATRIX,
    IMAGE_MEAN,
    IMAGE_OFFSET,
    TEXT_MATRIX,
    TEXT_MEAN,
    TeacherView,
    _unit_scale,
)
from mmfed.protocol import Payload


def test_tdcl_matches_hand_computation() -> None:
    z = torch.tensor([[1.0, 0.0]])
    # candidates: positive at 0 deg, negatives at 90 and 180 deg -> cosines 1, 0, -1
    reps = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(-1 / tau)))
    got = tdcl_loss(z, reps, torch.tensor([0]), tau, normalizer="none")  # the reference code's s = cos
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tdcl_negatives_are_each_samples_own() -> None:
    """Without U the batch loss is the mean of per-sample losses: sample i's candidates are only row i
    of reps (U, the paper's normaliser, is a batch statistic; see the next test)."""
    torch.manual_seed(0)
    z, reps = torch.randn(3, 4), torch.randn(3, 5, 4)
    target = torch.tensor([0, 2, 4])
    whole = tdcl_loss(z, reps, target, 0.2, "none")
    alone = [tdcl_loss(z[i : i + 1], reps[i : i + 1], target[i : i + 1], 0.2, "none") for i in range(3)]
    assert whole.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-6)
    changed = reps.clone()
    changed[1] = torch.randn(5, 4)  # another sample's candidates do not move sample 0's loss
    assert tdcl_loss(z[:1], changed[:1], target[:1], 0.2, "none").item() == pytest.approx(alone[0].item())


def test_tdcl_with_the_mean_distance_normaliser_by_hand() -> None:
    """s(z_i, F_ik) = cos(z_i, F_ik) / U_ik, U_ik = mean over the batch's z_b of ||z_b^ - F_ik^||."""
    r = 1 / math.sqrt(2)
    z = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # unit directions e1, e2 (norms do not matter)
    reps = torch.tensor(
        [
            [[2.0, 0.0], [0.0, 4.0]],  # sample 0: own class (e1), the other class (e2)
            [[0.0, 1.0], [-1.0, 1.0]],  # sample 1: own class (e2), the other class ((-1, 1) / sqrt 2)
        ]
    )
    tau = 0.5
    # U: distances of both unit embeddings e1, e2 to each unit representation, averaged
    u00 = (0 + math.sqrt(2)) / 2  # F00 = e1
    u01 = (math.sqrt(2) + 0) / 2  # F01 = e2
    u10 = (math.sqrt(2) + 0) / 2  # F10 = e2
    u11 = (math.hypot(1 + r, -r) + math.hypot(r, 1 - r)) / 2  # F11 = (-r, r)
    s0 = [1 / u00, 0 / u01]
    s1 = [1 / u10, r / u11]
    loss = [math.log(sum(math.exp(v / tau) for v in s)) - s[0] / tau for s in (s0, s1)]
    got = tdcl_loss(z, reps, torch.tensor([0, 0]), tau)  # the default normaliser is the paper's U
    assert got.item() == pytest.approx(sum(loss) / 2, rel=1e-6)


def test_tdcl_u_is_finite_where_exp_overflows() -> None:
    """Embeddings next to their representation make U small and s / 0.04 in the thousands: exp of it
    overflows float32 (the reference code's exp(cos / 0.04) / sum), the log-sum-exp form does not."""
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    reps = torch.tensor([[[1.0, 0.01], [0.0, 1.0]], [[1.0, 0.01], [0.0, 1.0]]])
    for dtype in (torch.float32, torch.float16):
        loss = tdcl_loss(z.to(dtype), reps.to(dtype), torch.tensor([0, 0]), 0.04)
        assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-4)


def test_tdcl_is_stable_in_fp16_with_a_small_temperature() -> None:
    torch.manual_seed(1)
    z, reps = torch.randn(8, 16), torch.randn(8, 10, 16)
    target = torch.zeros(8, dtype=torch.long)
    exact = tdcl_loss(z, reps, target, 0.01)
    half = tdcl_loss(z.half(), reps.half(), target, 0.01)
    assert torch.isfinite(half)
    assert half.float().item() == pytest.approx(exact.item(), rel=2e-2)


def test_candidate_classes_puts_the_label_first_and_never_repeats_it() -> None:
    labels = torch.tensor([0, 3, 9, 5])
    every = candidate_classes(labels, 10, None)
    assert every.shape == (4, 10)
    assert torch.equal(every[:, 0], labels)
    assert torch.equal(every[1, 1:], torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9]))  # all others, in class order
    some = candidate_classes(labels, 10, 3, torch.Generator().manual_seed(0))
    assert some.shape == (4, 4)
    for row, label in zip(some, labels, strict=True):
        assert row[0] == label and label not in row[1:] and len(set(row.tolist())) == 4
    assert candidate_classes(labels, 10, 20).shape == (4, 10)  # more than C - 1 asked: all of them


def test_consistency_distances() -> None:
    z = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert consistency_loss(z, target, "cosine").item() == pytest.approx((0.0 + 1.0) / 2)
    assert consistency_loss(z, target, "l2").item() == pytest.approx((4.0 + 2.0) / 2)


def test_anchor_nce_hand_value() -> None:
    z = torch.tensor([[1.0, 0.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = anchor_nce(z, anchors, torch.tensor([1]), 1.0)
    assert got.item() == pytest.approx(-math.log(math.exp(0) / (math.exp(1) + math.exp(0))))


def test_semantic_consistency_uses_class_and_public_anchors() -> None:
    term = SemanticConsistency(weight=2.0, temperature=1.0, class_weight=1.0, public_weight=0.5)
    anchors = {
        IMAGE_CLASS_ANCHORS: torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        PUBLIC_IMAGE_ANCHORS: torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
        PUBLIC_TEXT_ANCHORS: torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]),
    }
    payload = Payload(tensors=anchors, config={CLASS_NAMES[IMAGE_CLASS_ANCHORS]: json.dumps(["cat", "dog"])})
    # the client's own class list is in another order: its label 0 is "dog", anchor row 1
    round_ = ClientRound("paired-0", "paired", 1, payload, model=None, image_classes=["dog", "cat"])  # type: ignore[arg-type]
    term.begin(round_)
    batch = {"image_labels": torch.tensor([0]), "public_positions": torch.tensor([0, 1])}
    out = {
        "image_emb": torch.tensor([[0.0, 1.0]]),  # points at the dog anchor
        "public_image_emb": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),  # matches the *text* anchors of rows 0, 1
        "public_text_emb": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # matches the *image* anchors of rows 0, 1
    }
    losses = term(batch, out, None)  # type: ignore[arg-type]
    assert set(losses) == {"semantic_class_image", "semantic_public_image", "semantic_public_text"}
    best = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))  # the positive is the most similar anchor
    assert losses["semantic_class_image"].item() == pytest.approx(2.0 * best)
    assert losses["semantic_public_image"].item() == pytest.approx(2.0 * 0.5 * best)
    assert losses["semantic_public_text"].item() == pytest.approx(2.0 * 0.5 * best)


def test_semantic_class_anchors_missing_for_a_client_class_is_one_clear_error() -> None:
    term = SemanticConsistency()
    anchors = {
        IMAGE_CLASS_ANCHORS: torch.eye(2),
        PUBLIC_IMAGE_ANCHORS: torch.eye(2),
        PUBLIC_TEXT_ANCHORS: torch.eye(2),
    }
    payload = Payload(tensors=anchors, config={CLASS_NAMES[IMAGE_CLASS_ANCHORS]: json.dumps(["cat", "dog"])})
    round_ = ClientRound("image-3", "image", 1, payload, model=None, image_classes=["cat", "ship", "frog"])  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"client image-3: image classes \['ship', 'frog'\] have no class anchor"
    ):
        term.begin(round_)
    # a text-only client does not embed images: image classes without anchors are no error for it
    text_round = ClientRound("text-0", "text", 1, payload, model=None, image_classes=["ship"])  # type: ignore[arg-type]
    term.begin(text_round)


def test_teacher_view_maps_and_inverts_the_text_pca() -> None:
    from mmfed.teacher.reduce import fit_pca

    torch.manual_seed(0)
    raw = torch.randn(50, 3) @ torch.randn(3, 12) + 5.0  # rank-3 teacher text features, Dt = 12
    text_map = _unit_scale(fit_pca(raw, 3), raw)
    assert text_map.apply(raw).norm(dim=-1).mean().item() == pytest.approx(1.0, rel=1e-5)
    tensors = {
        TEXT_MEAN: text_map.mean,
        TEXT_MATRIX: text_map.matrix,
        IMAGE_MEAN: torch.zeros(4),
        IMAGE_MATRIX: torch.eye(4, 3),
        IMAGE_OFFSET: torch.ones(3),
    }
    view = TeacherView(ClientRound("image-0", "image", 1, Payload(tensors=tensors), model=None), None, "")  # type: ignore[arg-type]
    z = view.text(raw[:5])
    assert torch.allclose(z, text_map.apply(raw[:5]), atol=1e-5)
    assert torch.allclose(view.text_to_teacher(z), raw[:5], atol=1e-3)  # exact inverse on the PCA span
    assert torch.allclose(view.image(torch.ones(2, 4)), torch.full((2, 3), 2.0))  # (x - mean) @ M + offset


def test_a_teacher_narrower_than_the_latent_space_is_padded() -> None:
    from mmfed.algorithms.teacher_space import _padded, _rank, _unit_scale
    from mmfed.teacher.reduce import fit_pca

    raw = torch.randn(40, 6)  # a 6-wide teacher, D = 16
    reduction = _padded(_unit_scale(fit_pca(raw, _rank(raw, 16)), raw), 16)
    mapped = reduction.apply(raw)
    assert mapped.shape == (40, 16)
    assert torch.equal(mapped[:, 6:], torch.zeros(40, 10))  # the teacher spans the first 6 only
    assert mapped.norm(dim=-1).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_centered_tdcl_contrasts_only_what_the_prompt_changes() -> None:
    from mmfed.algorithms.feddifrc import TextDrivenContrastive

    common = torch.tensor([100.0, 0.0, 0.0])  # what every prompt shares dominates each representation
    specific = torch.tensor([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    reps = (common + specific)[None]  # [1, 3 classes, 3]
    z = torch.tensor([[0.0, 1.0, 0.0]])  # points at class 0's own direction
    target = torch.tensor([0])
    plain = tdcl_loss(z, TextDrivenContrastive(center_classes=False)._centered(reps), target, 0.1)
    centered_reps = TextDrivenContrastive(center_classes=True)._centered(reps)
    assert torch.allclose(centered_reps.mean(dim=1), torch.zeros(1, 3), atol=1e-6)
    centered = tdcl_loss(z, centered_reps, target, 0.1)
    assert plain.item() > 0.9 and centered.item() < 0.01  # near chance (ln 3 = 1.10) vs nearly solved


class _Features:
    """Stands in for TeacherFeatures: fixed class-prompt features per sample id, fixed NDCR targets."""

    def __init__(self, per_class: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
        self.per_class, self.target = per_class, target

    def images_per_class(self, ids, images, classes):  # noqa: ANN001, ANN201
        return torch.stack([self.per_class[i] for i in ids])  # [B, C, F]

    def images(self, ids, images, captions, caption_index, labels=None, classes=None):  # noqa: ANN001, ANN201
        return torch.stack([self.target[i] for i in ids])  # [B, F]


class _View:
    """Stands in for TeacherView: the identity map."""

    def __init__(self, features: _Features, classes: list[str]) -> None:
        self.features, self.image_classes, self.text_classes = features, classes, []

    def image(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.float()


def _term_batch(term, per_class, target, z, labels):  # noqa: ANN001, ANN202
    term.view = _View(_Features(per_class, target), ["cat", "dog", "ship"])
    term._generator = torch.Generator().manual_seed(0)
    ids = list(per_class or target)
    batch = {"ids": ids, "images": torch.zeros(len(ids), 3, 2, 2, dtype=torch.uint8), "image_labels": labels}
    return term(batch, {"image_emb": z}, None)


def test_tdcl_forward_contrasts_each_sample_with_its_own_class_prompt_representations() -> None:
    """At the loss term's forward: sample i's positive is F(x_i, own class prompt), its negatives are
    F(x_i, other prompts). Pairing a sample with its neighbour's representations, or one softmax over
    every sample's representations, gives other values."""
    from mmfed.algorithms.feddifrc import TextDrivenContrastive

    e1, e2, e3 = torch.eye(3)
    per_class = {  # [C = 3 classes, F = 3] per sample id
        "a": torch.stack([e1, e2, e3]),  # sample a: class 0 prompt -> e1, class 1 -> e2, class 2 -> e3
        "b": torch.stack([e3, e2 + e3, e1]),  # sample b: a different set, not a permutation of a's
    }
    z = torch.stack([e1 + 0.5 * e2, e1])  # a (label 0) leans to e1, its own class-0 feature
    labels = torch.tensor([0, 1])  # b's own class-1 feature is e2 + e3, orthogonal to z_b
    tau = 0.5
    term = TextDrivenContrastive(temperature=tau, normalizer="none", mode="cached", modalities=["image"])
    losses = _term_batch(term, per_class, {}, z, labels)
    ca = [1 / math.sqrt(1.25), 0.5 / math.sqrt(1.25), 0.0]  # cos(z_a, e1), (z_a, e2), (z_a, e3)
    cb = [0.0, 0.0, 1.0]  # cos(z_b, e3), (z_b, e2 + e3), (z_b, e1): its positive (class 1) is 0
    loss_a = math.log(sum(math.exp(c / tau) for c in ca)) - ca[0] / tau
    loss_b = math.log(sum(math.exp(c / tau) for c in cb)) - cb[1] / tau
    assert set(losses) == {"tdcl_image"}
    assert losses["tdcl_image"].item() == pytest.approx((loss_a + loss_b) / 2, rel=1e-6)


def test_tdcl_forward_with_the_default_normaliser_and_temperature() -> None:
    from mmfed.algorithms.feddifrc import TextDrivenContrastive

    assert TextDrivenContrastive().mode == "conditioned"  # the paper's; presets choose cached
    term = TextDrivenContrastive(mode="cached", modalities=["image"])
    assert (term.temperature, term.normalizer) == (0.04, "mean_distance")
    e1, e2, e3 = torch.eye(3)
    per_class = {"a": torch.stack([e1, e2, e3]), "b": torch.stack([e3, e1, e2])}
    z = torch.stack([e1, e2])
    losses = _term_batch(term, per_class, {}, z, torch.tensor([0, 2]))

    def distance(u: torch.Tensor, v: torch.Tensor) -> float:
        return float((u / u.norm() - v / v.norm()).norm())

    expected = []
    for i, (sid, label) in enumerate((("a", 0), ("b", 2))):
        s = [float(z[i] @ f / f.norm()) / (sum(distance(zb, f) for zb in z) / 2) for f in per_class[sid]]
        expected.append(math.log(sum(math.exp(v / 0.04) for v in s)) - s[label] / 0.04)
    assert losses["tdcl_image"].item() == pytest.approx(sum(expected) / 2, rel=1e-5)


def test_ndcr_forward_is_the_squared_error_to_the_teacher_representation() -> None:
    """NDCR (paper): sum_q (z_iq - H_iq)^2, averaged over the batch. The reference code's KL between
    softmaxes of unit vectors is near zero here."""
    from mmfed.algorithms.feddifrc import NoiseDrivenConsistency

    term = NoiseDrivenConsistency(modalities=["image"])
    assert term.distance == "l2"
    target = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 2.0])}
    z = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    losses = _term_batch(term, {}, target, z, torch.tensor([0, 1]))
    assert losses["ndcr_image"].item() == pytest.approx(((2**2 + 0) + (1 + 1)) / 2)


def test_ndcr_targets_do_not_depend_on_the_batch() -> None:
    """The maps come fitted once in the payload: a sample's NDCR loss is the same alone or in any batch
    (a PCA refitted per batch, the reference code's defect, moves every target with its batch)."""
    from mmfed.algorithms.feddifrc import NoiseDrivenConsistency
    from mmfed.teacher.reduce import LayerMoments, fit_layer_pca

    torch.manual_seed(0)
    raw = torch.randn(40, 6) @ torch.randn(6, 6)
    image_map = fit_layer_pca(LayerMoments.of(raw, [3, 2, 1]), [2, 1, 1])
    tensors = {
        TEXT_MEAN: torch.zeros(5),
        TEXT_MATRIX: torch.eye(5, 4),
        IMAGE_MEAN: image_map.mean,
        IMAGE_MATRIX: image_map.matrix,
        IMAGE_OFFSET: torch.zeros(4),
    }
    ids = [f"s{i}" for i in range(6)]
    features = _Features({}, dict(zip(ids, raw[:6], strict=True)))
    z = torch.randn(6, 4)

    def loss(rows: list[int]) -> float:
        term = NoiseDrivenConsistency(modalities=["image"])
        term.begin(ClientRound("image-0", "image", 1, Payload(tensors=tensors), model=None))  # type: ignore[arg-type]
        assert isinstance(term.view, TeacherView)
        term.view.features = features  # type: ignore[assignment]
        batch = {
            "ids": [ids[r] for r in rows],
            "images": torch.zeros(len(rows), 3, 2, 2, dtype=torch.uint8),
            "image_labels": torch.zeros(len(rows), dtype=torch.long),
        }
        return term(batch, {"image_emb": z[rows]}, None)["ndcr_image"].item()  # type: ignore[arg-type]

    whole = loss([0, 1, 2, 3, 4, 5])
    assert whole == pytest.approx(sum(loss([r]) for r in range(6)) / 6, rel=1e-5)
    assert loss([0, 1]) == pytest.approx((loss([0]) + loss([1])) / 2, rel=1e-5)


def test_both_sources_are_balanced_then_folded_into_one_map() -> None:
    """SemanticFL's image features: U-Net columns then VAE latents. Each source is scaled to unit mean
    centred squared norm before the joint map is fitted, and the scales are folded into the map."""
    from mmfed.algorithms.teacher_space import _folded, _source_scales
    from mmfed.teacher.reduce import fit_pca

    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 10.0], [0.0, 2.0, 0.0], [2.0, 2.0, 10.0]])
    scales = _source_scales(x, [2, 1])
    # U-Net block: centred rows (+-1, +-1), squared norm 2 -> scale 1/sqrt 2; latents: +-5 -> 1/5
    assert torch.allclose(scales, torch.tensor([2**-0.5, 2**-0.5, 0.2]))
    fitted = fit_pca(x * scales, 2)
    folded = _folded(fitted, scales)
    assert torch.allclose(folded.apply(x), fitted.apply(x * scales), atol=1e-6)
    assert torch.equal(_source_scales(x, [3]), torch.ones(3))  # one source: untouched


def test_layer_components_default_to_the_reference_split() -> None:
    from mmfed.algorithms.teacher_space import layer_components
    from mmfed.config import ConfigError

    assert layer_components(512, 3, None) == [256, 128, 128]  # the reference code's at D = 512
    assert layer_components(16, 3, None) == [8, 4, 4]
    assert layer_components(10, 4, None) == [3, 3, 2, 2]
    assert layer_components(16, 3, [4, 4, 4]) == [4, 4, 4]
    with pytest.raises(
        ConfigError, match=r"layer_components=\[8, 8\] needs one count per decoder layer \(3\)"
    ):
        layer_components(16, 3, [8, 8])


def test_client_teacher_space_refuses_other_reductions_and_a_missing_prepare_stage() -> None:
    from mmfed.algorithms.base import ServerRound
    from mmfed.algorithms.teacher_space import ClientTeacherSpace
    from mmfed.config import ConfigError

    with pytest.raises(ConfigError, match="image_reduction='ridge' needs paired public data"):
        ClientTeacherSpace(image_reduction="ridge")
    step = ClientTeacherSpace()
    assert step.prepares and not step.uses_public
    with pytest.raises(ValueError, match="fitted in the prepare stage before round 1"):
        step.fit(ServerRound(1, 0, None, []))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no client sent teacher moments"):
        step.aggregate(ServerRound(0, 0, None, [], stage="prepare"), [])  # type: ignore[arg-type]
