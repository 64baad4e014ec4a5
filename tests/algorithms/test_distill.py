"""Ensemble distillation: weights by hand, chunked == full, each client's features counted once."""

from __future__ import annotations

import math

import pytest
import torch

from mmfed.algorithms.base import GLOBAL_IMAGE, GLOBAL_TEXT, REPR_IMAGE, REPR_TEXT, ServerRound
from mmfed.algorithms.distill import EnsembleDistillation, aggregate, ensemble
from mmfed.protocol import Reply


def test_similarity_weights_by_hand() -> None:
    # Two clients, one public row, D=2. anchor g = (1, 0).
    # client 0: (1, 0) -> cos 1;  client 1: (0, 2) -> cos 0.  T = 0.5
    reps = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # [K=2, c=1, D=2]
    w = ensemble(reps, torch.tensor([[1.0, 0.0]]), temperature=0.5)
    e = math.exp(1 / 0.5)
    assert torch.allclose(w[:, 0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    target, _ = aggregate([reps[0], reps[1]], torch.tensor([[1.0, 0.0]]), 0.5)
    assert torch.allclose(target[0], torch.tensor([e / (e + 1), 2 / (e + 1)]))


def test_creamfl_rule_scores_against_the_other_modality() -> None:
    # Same client features; the anchor is now the global *text* feature of the paired item, (0, 1):
    # client 0 cos 0, client 1 cos 1 -> the weights swap.
    reps = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    _, weights = aggregate(reps, torch.tensor([[0.0, 1.0]]), 0.5)
    e = math.exp(2.0)
    assert torch.allclose(weights[:, 0], torch.tensor([1 / (e + 1), e / (e + 1)]))


def test_uniform_weights_are_the_plain_mean() -> None:
    reps = [torch.randn(5, 3) for _ in range(4)]
    target, weights = aggregate(reps, None, 1.0)
    assert torch.allclose(weights, torch.full((4, 5), 0.25))
    assert torch.allclose(target, torch.stack(reps).mean(0), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_aggregation_equals_the_full_computation(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    reps = [torch.randn(50, 16, generator=gen).half() for _ in range(5)]
    anchor = torch.randn(50, 16, generator=gen)
    full = torch.stack([r.float() for r in reps])  # [K, N, D]
    scores = torch.nn.functional.cosine_similarity(full, anchor[None], dim=-1) / 0.3  # [K, N]
    expected = (torch.softmax(scores, 0)[..., None] * full).sum(0)
    target, _ = aggregate(reps, anchor, 0.3, chunk_size=chunk)
    assert torch.allclose(target, expected, atol=1e-5)


def test_paired_clients_count_once_per_modality_and_unimodal_ones_only_in_theirs(monkeypatch) -> None:
    step = EnsembleDistillation(weighting="uniform")
    n, d = 4, 3
    sample = {GLOBAL_IMAGE: torch.zeros(n, d), GLOBAL_TEXT: torch.zeros(n, d)}
    monkeypatch.setattr(step, "_sample", lambda round_: sample)
    seen: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(step, "_distill", lambda round_, s, targets: seen.update(targets) or {})
    replies = [
        Reply(cid="image-0", kind="image", tensors={REPR_IMAGE: torch.full((n, d), 1.0)}),
        Reply(cid="text-0", kind="text", tensors={REPR_TEXT: torch.full((n, d), 10.0)}),
        Reply(
            cid="paired-0",
            kind="paired",
            tensors={REPR_IMAGE: torch.full((n, d), 3.0), REPR_TEXT: torch.full((n, d), 20.0)},
        ),
    ]
    metrics = step.aggregate(ServerRound(1, 0, None, []), replies)  # type: ignore[arg-type]
    assert torch.allclose(seen["image"], torch.full((n, d), 2.0))  # (1 + 3) / 2
    assert torch.allclose(seen["text"], torch.full((n, d), 15.0))  # (10 + 20) / 2
    assert metrics["image/clients"] == 2.0 and metrics["text/clients"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weighting": "max"}, "weighting='max'"),
        ({"loss": "l1"}, "loss='l1'"),
        ({"temperature": 0}, "temperature must be > 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EnsembleDistillation(**kwargs)
