"""Ensemble distillation (FedAFD SED, CreamFL's representation ensemble): scores and weights by hand,
the chunked exact rule against an independent full-matrix NumPy computation, no N x N block, no
overflow, the right anchor per method, each client's features counted once."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfed.algorithms import distill
from mmfed.algorithms.base import GLOBAL_IMAGE, GLOBAL_TEXT, REPR_IMAGE, REPR_TEXT, ServerRound
from mmfed.algorithms.distill import EnsembleDistillation, aggregate, contrastive_scores
from mmfed.protocol import Reply

E = math.e


def numpy_ensemble(
    reps: list[torch.Tensor], anchor: torch.Tensor, temperature: float = 1.0, unit: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The published rule on full N x N matrices in float64: (target [N, D], weights [K, N])."""

    def prep(x: torch.Tensor) -> np.ndarray:
        x = x.double().numpy()
        return x / np.linalg.norm(x, axis=1, keepdims=True) if unit else x

    g = prep(anchor)
    rs = [prep(r) for r in reps]
    scores = []
    for r in rs:
        logits = r @ g.T / temperature  # [N, N]
        top = logits.max(axis=1, keepdims=True)
        log_softmax = logits - (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))
        scores.append(np.diagonal(log_softmax))
    s = np.stack(scores)  # [K, N]
    w = np.exp(s - s.max(axis=0)) / np.exp(s - s.max(axis=0)).sum(axis=0)
    return (w[..., None] * np.stack(rs)).sum(0), w


def test_contrastive_score_and_weights_by_hand() -> None:
    # g = rows (1,0), (0,1). Client A = g (discriminative); client B = (1,0) for both rows (collapsed).
    # A: row 0 logits [1, 0] -> s = 1 - log(e+1); row 1 logits [0, 1] -> s = 1 - log(e+1).
    # B: row 0 logits [1, 0] -> s = 1 - log(e+1); row 1 logits [1, 0], taken at j=1 -> s = -log(e+1).
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a, b = g.clone(), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(contrastive_scores(b, g), torch.tensor([1 - math.log(E + 1), -math.log(E + 1)]))
    target, weights = aggregate([a, b], g)
    # row 0: equal scores -> 1/2 each; row 1: softmax([1 - L, -L]) = [e/(e+1), 1/(e+1)]
    assert torch.allclose(weights[:, 0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(weights[:, 1], torch.tensor([E / (E + 1), 1 / (E + 1)]))
    assert torch.allclose(target[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(target[1], torch.tensor([1 / (E + 1), E / (E + 1)]))


def test_paired_cosine_option_is_the_earlier_rule_by_hand() -> None:
    # One row, anchor (1, 0); client 0 (1, 0): cos 1; client 1 (0, 2): cos 0; T = 0.5 -> softmax([2, 0]).
    reps = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    target, weights = aggregate(reps, torch.tensor([[1.0, 0.0]]), "paired_cosine", 0.5, unit_features=False)
    e = math.exp(2.0)
    assert torch.allclose(weights[:, 0], torch.tensor([e / (e + 1), 1 / (e + 1)]))
    assert torch.allclose(target[0], torch.tensor([e / (e + 1), 2 / (e + 1)]))


def test_uniform_weights_are_the_plain_mean() -> None:
    reps = [torch.randn(5, 3) for _ in range(4)]
    target, weights = aggregate(reps, None, unit_features=False)
    assert torch.allclose(weights, torch.full((4, 5), 0.25))
    assert torch.allclose(target, torch.stack(reps).mean(0), atol=1e-6)


@pytest.mark.parametrize("chunk", [333, 1024, 2000])
def test_chunked_exact_ensemble_equals_the_full_matrix_computation_at_2000_rows(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d = 2000, 24
    anchor = torch.randn(n, d, generator=gen)
    reps = [(anchor + s * torch.randn(n, d, generator=gen)).half() for s in (0.3, 1.0, 3.0)]  # fp16 as sent
    expected_target, expected_weights = numpy_ensemble(reps, anchor)
    target, weights = aggregate(reps, anchor, chunk_size=chunk)
    assert np.abs(weights.double().numpy() - expected_weights).max() < 1e-5
    assert np.abs(target.double().numpy() - expected_target).max() < 1e-5


@pytest.mark.parametrize(("unit", "temperature", "scale"), [(True, 0.01, 1.0), (False, 1.0, 12.0)])
def test_large_logits_do_not_overflow(unit: bool, temperature: float, scale: float) -> None:
    # Logits up to 1/0.01 = 100 (unit features) or 12^2 * 8 ~ 1000 (raw): exp of raw logits is inf in
    # float32 (the reference code's exp(logits) - log(sum) gives inf - inf = nan); log-sum-exp is finite.
    gen = torch.Generator().manual_seed(1)
    anchor = scale * F.normalize(torch.randn(300, 8, generator=gen), dim=-1) * math.sqrt(8)
    reps = [anchor + scale * torch.randn(300, 8, generator=gen) for _ in range(3)]
    target, weights = aggregate(reps, anchor, temperature=temperature, chunk_size=128, unit_features=unit)
    assert torch.isfinite(weights).all() and torch.isfinite(target).all()
    _, expected = numpy_ensemble(reps, anchor, temperature, unit)
    assert np.abs(weights.double().numpy() - expected).max() < 1e-3


def test_rows_whose_bound_is_loose_fall_back_to_a_max_shifted_log_sum_exp() -> None:
    # One global feature of norm 1000 along e1, the others small; client rows lie along e2, so their
    # Cauchy-Schwarz bound (1000) is far above their largest logit: the shifted sum underflows to 0.
    gen = torch.Generator().manual_seed(2)
    anchor = torch.randn(40, 4, generator=gen)
    anchor[0] = torch.tensor([1000.0, 0.0, 0.0, 0.0])
    reps = [torch.randn(40, 4, generator=gen) * torch.tensor([0.0, 1.0, 1.0, 1.0]) for _ in range(2)]
    scores = contrastive_scores(reps[0], anchor, unit=False)
    assert torch.isfinite(scores).all()
    _, expected = numpy_ensemble(reps, anchor, unit=False)
    _, weights = aggregate(reps, anchor, unit_features=False)
    assert np.abs(weights.double().numpy() - expected).max() < 1e-5


def test_the_chunked_path_never_builds_an_n_by_n_block(monkeypatch) -> None:
    shapes: list[tuple[int, ...]] = []
    original = distill.row_logits

    def spy(queries, keys, temperature, out=None):
        result = original(queries, keys, temperature, out)
        shapes.append(tuple(result.shape))
        return result

    monkeypatch.setattr(distill, "row_logits", spy)
    n, chunk, clients = 500, 64, 3
    reps = [torch.randn(n, 8) for _ in range(clients)]
    aggregate(reps, torch.randn(n, 8), chunk_size=chunk)
    assert len(shapes) == clients * math.ceil(n / chunk)  # every client's every row block went through it
    assert all(rows <= chunk and cols == n for rows, cols in shapes)


def test_a_near_collapsed_client_gains_weight_under_paired_cosine_but_not_under_the_exact_rule() -> None:
    # Global features share a strong common direction u; client "good" is g_i plus noise, client
    # "collapsed" maps every row near u. Paired cosine favours the collapsed client (u is close to
    # every g_i, so also to its own); the log-softmax over all rows sees that it is close to all rows.
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 16
    u = F.normalize(torch.randn(d, generator=gen), dim=0)
    g = F.normalize(torch.randn(n, d, generator=gen) + 4 * u, dim=-1)
    good = F.normalize(g + 0.35 * torch.randn(n, d, generator=gen), dim=-1)
    collapsed = F.normalize(u + 0.05 * torch.randn(n, d, generator=gen), dim=-1)
    assert (collapsed * g).sum(-1).mean() > (good * g).sum(-1).mean()  # closer to its paired row on average
    _, paired = aggregate([good, collapsed], g, "paired_cosine", 0.1)
    _, exact = aggregate([good, collapsed], g)
    assert float(paired[1].mean()) > 0.6 and float(exact[1].mean()) < 0.45


def _step_targets(monkeypatch, weighting: str, sample: dict, replies: list[Reply]) -> dict[str, torch.Tensor]:
    step = EnsembleDistillation(weighting=weighting)
    monkeypatch.setattr(step, "_sample", lambda round_: sample)
    seen: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(step, "_distill", lambda round_, s, targets: seen.update(targets) or {})
    step.aggregate(ServerRound(1, 0, None, []), replies)  # type: ignore[arg-type]
    return seen


@pytest.mark.parametrize(
    ("weighting", "anchor_key"), [("creamfl", GLOBAL_TEXT), ("similarity", GLOBAL_IMAGE)]
)
def test_the_server_step_scores_images_against_the_right_global_modality(
    monkeypatch, weighting: str, anchor_key: str
) -> None:
    # Global image features = e1, e2; global text features = e2, e1 (swapped). Image client A = (e1, e2),
    # B = (e2, e1). Against the image anchor A is the discriminative one, against the text anchor B is:
    # the favoured client at row 0 has score 1 - log(e+1), the other -log(e+1) -> weights e/(e+1), 1/(e+1).
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    sample = {GLOBAL_IMAGE: torch.stack([e1, e2]), GLOBAL_TEXT: torch.stack([e2, e1])}
    a, b = torch.stack([e1, e2]), torch.stack([e2, e1])
    replies = [
        Reply(cid="image-0", kind="image", tensors={REPR_IMAGE: a}),
        Reply(cid="image-1", kind="image", tensors={REPR_IMAGE: b}),
    ]
    target = _step_targets(monkeypatch, weighting, sample, replies)["image"]
    favoured, other = (b, a) if anchor_key == GLOBAL_TEXT else (a, b)
    expected = (E * favoured + other) / (E + 1)
    assert torch.allclose(target, expected, atol=1e-6)


def test_the_step_scores_with_the_published_rule_by_default(monkeypatch) -> None:
    # Image anchor e1, e2. Client A = (e1, e2); client B maps both rows to b = (1, 1)/sqrt(2).
    # Row 0: s_A = 1 - log(e + 1); s_B = c - log(2 e^c) = -log 2 (c = 1/sqrt(2)): w_A = sigmoid(s_A - s_B)
    # = 0.5938, where the paired cosine would give sigmoid(1 - c) = 0.5727.
    e1, e2, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0]) / math.sqrt(2)
    sample = {GLOBAL_IMAGE: torch.stack([e1, e2]), GLOBAL_TEXT: torch.stack([e1, e2])}
    replies = [
        Reply(cid="image-0", kind="image", tensors={REPR_IMAGE: torch.stack([e1, e2])}),
        Reply(cid="image-1", kind="image", tensors={REPR_IMAGE: torch.stack([b, b])}),
    ]
    target = _step_targets(monkeypatch, "similarity", sample, replies)["image"]
    w_a = 1 / (1 + math.exp(-(1 - math.log(E + 1) + math.log(2))))
    assert math.isclose(w_a, 0.5938, abs_tol=1e-4)
    assert torch.allclose(target[0], w_a * e1 + (1 - w_a) * b, atol=1e-6)


def test_paired_clients_count_once_per_modality_and_unimodal_ones_only_in_theirs(monkeypatch) -> None:
    n, d = 4, 3
    sample = {GLOBAL_IMAGE: torch.zeros(n, d), GLOBAL_TEXT: torch.zeros(n, d)}
    one = F.normalize(torch.ones(n, d), dim=-1)
    replies = [
        Reply(cid="image-0", kind="image", tensors={REPR_IMAGE: torch.full((n, d), 1.0)}),
        Reply(cid="text-0", kind="text", tensors={REPR_TEXT: torch.full((n, d), 10.0)}),
        Reply(
            cid="paired-0",
            kind="paired",
            tensors={REPR_IMAGE: torch.full((n, d), -3.0), REPR_TEXT: torch.full((n, d), -20.0)},
        ),
    ]
    seen = _step_targets(monkeypatch, "uniform", sample, replies)
    assert torch.allclose(seen["image"], torch.zeros(n, d), atol=1e-6)  # (u + (-u)) / 2 on unit features
    assert torch.allclose(seen["text"], torch.zeros(n, d), atol=1e-6)
    replies[2].tensors = {REPR_IMAGE: torch.full((n, d), 3.0), REPR_TEXT: torch.full((n, d), 20.0)}
    seen = _step_targets(monkeypatch, "uniform", sample, replies)
    assert torch.allclose(seen["image"], one) and torch.allclose(seen["text"], one)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weighting": "max"}, "weighting='max'"),
        ({"score": "cosine"}, "score='cosine'"),
        ({"loss": "l1"}, "loss='l1'"),
        ({"temperature": 0}, "temperature must be > 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        EnsembleDistillation(**kwargs)
