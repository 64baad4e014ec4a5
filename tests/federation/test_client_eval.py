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
