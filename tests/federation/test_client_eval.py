"""Per-client evaluation evaluates pairs that belong together: the global model and each client's
personal parts (LoRA adapters, personal heads) of the same round.

`client_eval_round=best` (default): the best validation round's global model with the personal
parts as of that round; `last`: the last round's of both. The validation score is scripted so the
best round (1) is not the last (2), and the personal parts change between the rounds, so evaluating
the best global model with the last round's personal parts (the old behaviour) fails the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmfed.cli import compose
from mmfed.evaluation import Evaluator
from mmfed.federation.client import PERSONAL_MODEL, ClientApp
from mmfed.federation.run import train
from mmfed.models.lora import is_personal
from mmfed.utils.io import load_torch

pytestmark = pytest.mark.slow
SCORES = {1: 10.0, 2: 5.0}  # validation rsum per round: round 1 is the best


def _spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {"fit": {}, "evaluated": {}, "val_round": 0}
    evaluate = Evaluator.evaluate

    def scripted(self: Evaluator, model: Any, split: Any) -> dict[str, float]:
        metrics = evaluate(self, model, split)
        if split.name == "val":
            seen["val_round"] += 1
            metrics["retrieval/rsum"] = SCORES[seen["val_round"]]
        return metrics

    call = ClientApp.__call__

    def recording(self: ClientApp, payload: Any, state: dict[str, Any]) -> Any:
        reply, new_state = call(self, payload, state)
        if payload.stage == "fit":
            kept = {k: v.clone() for k, v in new_state[PERSONAL_MODEL].items()}
            seen["fit"][(self.spec.cid, payload.round)] = kept
        return reply, new_state

    client_evaluate = ClientApp._evaluate

    def evaluated(self: ClientApp, model: Any) -> dict[str, float]:
        state = {k: v.detach().clone() for k, v in model.part_state().items()}
        seen["evaluated"][self.spec.cid] = (state, {k for k in state if is_personal(model, k)})
        return client_evaluate(self, model)

    monkeypatch.setattr(Evaluator, "evaluate", scripted)
    monkeypatch.setattr(ClientApp, "__call__", recording)
    monkeypatch.setattr(ClientApp, "_evaluate", evaluated)
    return seen


def _global(path: Path) -> dict[str, torch.Tensor]:
    state = load_torch(path)
    return {k.replace(".", "/", 1): v for k, v in state.get("global", state).items()}


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> tuple[dict[str, Any], dict]:
    seen = _spy(monkeypatch)
    overrides = ["experiment=smoke", "model/lora=default", "quiet=true", "rounds=2", *extra]
    summary = train(compose([*overrides, f"run_dir={tmp_path / 'run'}"]))
    return seen, summary


def _check_pairs(seen: dict[str, Any], global_state: dict[str, torch.Tensor], round_: int) -> None:
    assert seen["evaluated"], "no client was evaluated"
    for cid, (state, personal) in seen["evaluated"].items():
        own = seen["fit"][(cid, round_)]
        other = seen["fit"][(cid, 3 - round_)]
        assert personal and personal <= set(own), cid
        # the personal parts changed between the rounds, so a mismatched pair is visible
        assert any(not torch.equal(own[k], other[k]) for k in personal), cid
        for key, value in state.items():
            expected = own[key] if key in personal else global_state[key]
            assert torch.equal(value, expected.to(value.dtype)), f"{cid} {key}"


def test_best_round_pairs_the_best_global_model_with_that_rounds_personal_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, summary = _run(tmp_path, monkeypatch)
    assert summary["best_round"] == 1 and summary["client_eval_round"] == "best"
    assert summary["clients_round"] == 1
    _check_pairs(seen, _global(tmp_path / "run" / "checkpoints" / "best.pt"), round_=1)
    assert set(summary["clients"]) == set(seen["evaluated"])


def test_last_round_pairs_the_last_global_model_with_the_last_personal_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen, summary = _run(tmp_path, monkeypatch, "client_eval_round=last")
    assert summary["best_round"] == 1 and summary["clients_round"] == 2
    _check_pairs(seen, _global(tmp_path / "run" / "checkpoints" / "last.pt"), round_=2)


def test_a_bad_choice_names_the_key(tmp_path: Path) -> None:
    from mmfed.config import ConfigError

    cfg = compose(["experiment=smoke", "client_eval_round=first", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="client_eval_round.*'first' is not one of best, last"):
        train(cfg)


# Deferral: with stateless clients (no LoRA, no personal parts) the best round's client evaluation waits
# for the end of training. Round 2 is the best of 3, after round 1 was best for a while, so the eager
# run evaluates twice (after rounds 1 and 2) and the deferred run once, from best.pt.
DEFER_SCORES = {1: 5.0, 2: 10.0, 3: 7.0}


def _stateless_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, deferrable: bool | None
) -> tuple[list[tuple[str, int, dict[str, torch.Tensor]]], dict[str, Any]]:
    from mmfed.federation.run import Run

    evaluations: list[tuple[str, int, dict[str, torch.Tensor]]] = []
    val_rounds = [0]
    evaluate = Evaluator.evaluate

    def scripted(self: Evaluator, model: Any, split: Any) -> dict[str, float]:
        metrics = evaluate(self, model, split)
        if split.name == "val":
            val_rounds[0] += 1
            metrics["retrieval/rsum"] = DEFER_SCORES[val_rounds[0]]
        return metrics

    call, client_evaluate, calling = ClientApp.__call__, ClientApp._evaluate, [0]

    def recording(self: ClientApp, payload: Any, state: dict[str, Any]) -> Any:
        calling[0] = payload.round
        return call(self, payload, state)

    def evaluated(self: ClientApp, model: Any) -> dict[str, float]:
        weights = {k: v.detach().clone() for k, v in model.part_state().items()}
        evaluations.append((self.spec.cid, calling[0], weights))
        return client_evaluate(self, model)

    monkeypatch.setattr(Evaluator, "evaluate", scripted)
    monkeypatch.setattr(ClientApp, "__call__", recording)
    monkeypatch.setattr(ClientApp, "_evaluate", evaluated)
    if deferrable is not None:
        monkeypatch.setattr(Run, "_client_eval_deferrable", lambda self: deferrable)
    overrides = ["experiment=smoke", "quiet=true", "rounds=3", f"run_dir={tmp_path / name}"]
    return evaluations, train(compose(overrides))


def test_stateless_clients_are_evaluated_once_from_the_best_round_with_the_eager_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deferred, summary = _stateless_run(tmp_path, monkeypatch, "deferred", None)  # decided by the run
    monkeypatch.undo()  # the second run's spies wrap the originals, not the first run's spies
    eager, eager_summary = _stateless_run(tmp_path, monkeypatch, "eager", False)
    clients = len(summary["clients"])
    assert summary["best_round"] == eager_summary["best_round"] == 2
    assert summary["clients_round"] == eager_summary["clients_round"] == 2
    assert len(deferred) == clients and {r for _, r, _ in deferred} == {3}  # once, as "after round 2"
    assert len(eager) == 2 * clients and {r for _, r, _ in eager} == {2, 3}
    assert summary["clients"] == eager_summary["clients"]  # the same numbers, bit for bit
    assert summary["client_eval_failures"] == []
    best = _global(tmp_path / "deferred" / "checkpoints" / "best.pt")
    for cid, _, weights in deferred:  # the best round's global model, not the last one's
        for key, value in weights.items():
            assert torch.equal(value, best[key].to(value.dtype)), f"{cid} {key}"


def test_a_step_whose_evaluate_payload_is_its_own_keeps_the_eager_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmfed.algorithms.fedavg import ModalityFedAvg

    monkeypatch.setattr(ModalityFedAvg, "evaluate_from_global", False)
    evaluations, summary = _stateless_run(tmp_path, monkeypatch, "run", None)
    assert {r for _, r, _ in evaluations} == {2, 3}  # each best round, when it became the best
    assert len(evaluations) == 2 * len(summary["clients"])
