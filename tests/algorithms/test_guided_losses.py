"""FedDifRC's TDCL / NDCR and SemanticFL's anchor InfoNCE against hand-computed small cases."""

from __future__ import annotations

import math

import pytest
import torch

from mmfed.algorithms.base import ClientRound
from mmfed.algorithms.feddifrc import candidate_classes, consistency_loss, tdcl_loss
from mmfed.algorithms.semanticfl import (
    IMAGE_CLASS_ANCHORS,
    PUBLIC_IMAGE_ANCHORS,
    PUBLIC_TEXT_ANCHORS,
    SemanticConsistency,
    anchor_nce,
)
from mmfed.protocol import Payload


def test_tdcl_matches_hand_computation() -> None:
    z = torch.tensor([[1.0, 0.0]])
    # candidates: positive at 0 deg, negatives at 90 and 180 deg -> cosines 1, 0, -1
    reps = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]]])
    tau = 0.5
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(0) + math.exp(-1 / tau)))
    got = tdcl_loss(z, reps, torch.tensor([0]), tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_tdcl_negatives_are_each_samples_own() -> None:
    """The batch loss is the mean of per-sample losses: sample i's candidates are only row i of reps."""
    torch.manual_seed(0)
    z, reps = torch.randn(3, 4), torch.randn(3, 5, 4)
    target = torch.tensor([0, 2, 4])
    whole = tdcl_loss(z, reps, target, 0.2)
    alone = [tdcl_loss(z[i : i + 1], reps[i : i + 1], target[i : i + 1], 0.2) for i in range(3)]
    assert whole.item() == pytest.approx(torch.stack(alone).mean().item(), rel=1e-6)
    changed = reps.clone()
    changed[1] = torch.randn(5, 4)  # another sample's candidates do not move sample 0's loss
    assert tdcl_loss(z[:1], changed[:1], target[:1], 0.2).item() == pytest.approx(alone[0].item())


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
    round_ = ClientRound("paired-0", "paired", 1, Payload(tensors=anchors), model=None)  # type: ignore[arg-type]
    term.begin(round_)
    batch = {"image_labels": torch.tensor([0]), "public_positions": torch.tensor([0, 1])}
    out = {
        "image_emb": torch.tensor([[1.0, 0.0]]),
        "public_image_emb": torch.tensor([[0.0, 1.0], [1.0, 0.0]]),  # matches the *text* anchors of rows 0, 1
        "public_text_emb": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # matches the *image* anchors of rows 0, 1
    }
    losses = term(batch, out, None)  # type: ignore[arg-type]
    assert set(losses) == {"semantic_class_image", "semantic_public_image", "semantic_public_text"}
    best = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))  # the positive is the most similar anchor
    assert losses["semantic_class_image"].item() == pytest.approx(2.0 * best)
    assert losses["semantic_public_image"].item() == pytest.approx(2.0 * 0.5 * best)
    assert losses["semantic_public_text"].item() == pytest.approx(2.0 * 0.5 * best)


def test_teacher_view_maps_and_inverts_the_text_pca() -> None:
    from mmfed.algorithms.teacher_space import (
        IMAGE_MATRIX,
        IMAGE_MEAN,
        IMAGE_OFFSET,
        TEXT_MATRIX,
        TEXT_MEAN,
        TeacherView,
        _unit_scale,
    )
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
