"""LoRA adapters during federation (``model/lora=default``): personal client state, never averaged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mmfed.algorithms.base import ServerRound
from mmfed.algorithms.fedavg import WEIGHT_PREFIX, ModalityFedAvg
from mmfed.cli import compose
from mmfed.federation.client import PERSONAL_MODEL
from mmfed.federation.run import Federation
from mmfed.models.lora import AdaptedModel
from mmfed.models.multimodal import KIND_PARTS
from mmfed.protocol import Payload

HEADS = ("image_head", "text_head")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = compose(
        ["experiment=smoke", "quiet=true", "model/lora=default", "model.lora.rank=2", "training.max_steps=2",
         "name=lora", f"run_dir={run_dir}"]
    )  # fmt: skip
    return Federation(cfg)


def fit_payload(federation: Federation, global_model: Any, spec: Any, round_: int = 1) -> Payload:
    payload = Payload(stage="fit", round=round_)
    payload.merge(ModalityFedAvg().broadcast(ServerRound(round_, 0, global_model, federation.clients), spec))
    return payload


def test_client_models_carry_adapters_and_the_global_model_does_not(federation: Federation) -> None:
    assert isinstance(federation.build_model("image"), AdaptedModel)
    assert not any("lora_" in k for k in federation.global_model().state_dict())
    plain = Federation(compose(["experiment=smoke", "name=plain", "run_dir=unused"]))
    assert not isinstance(plain.build_model("image"), AdaptedModel)


def test_adapters_and_heads_stay_with_the_client_and_fedavg_never_averages_them(
    federation: Federation,
) -> None:
    global_model = federation.global_model()
    start = {k: v.clone() for k, v in global_model.part_state().items()}
    replies, states = [], {}
    for spec in federation.clients:
        reply, state = federation.client_app(spec.cid)(fit_payload(federation, global_model, spec), {})
        sent = {name.removeprefix(WEIGHT_PREFIX) for name in reply.tensors}
        # exactly the global model's tensors of the kind's shared parts: no adapter, no head
        shared = [p for p in KIND_PARTS[spec.kind] if p not in HEADS]
        assert sent == set(global_model.part_state(shared)), spec.cid
        own = state[PERSONAL_MODEL]
        adapters = {k: v for k, v in own.items() if "lora_" in k}
        assert adapters and all(k.partition("/")[0] in shared for k in adapters)
        assert {k.partition("/")[0] for k in own} - set(shared) == set(KIND_PARTS[spec.kind]) & set(HEADS)
        assert not any(
            k.partition("/")[0] in shared and "lora_" not in k for k in own
        )  # base is not personal
        assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in adapters.items())
        replies.append(reply)
        states[spec.cid] = state
    metrics = ModalityFedAvg().aggregate(ServerRound(1, 0, global_model, federation.clients), replies)
    assert metrics["image_encoder/clients"] == 2.0 and "image_head/clients" not in metrics
    after = global_model.part_state()
    assert set(after) == set(start)
    # the global image encoder is the sample-weighted mean of the two clients' base weights
    image_replies = [r for r in replies if r.kind in ("image", "paired")]
    total = sum(r.num_examples for r in image_replies)
    for key in ("image_encoder/projection.weight", "image_encoder/encoder.features.0.weight"):
        expected = sum(
            r.tensors[WEIGHT_PREFIX + key].double() * r.num_examples / total for r in image_replies
        )
        assert torch.allclose(after[key].double(), expected, atol=1e-6), key
        assert not torch.equal(after[key], start[key])
    for head in HEADS:  # nobody sent a head: the global heads are untouched
        assert all(torch.equal(after[k], start[k]) for k in after if k.startswith(head))


def test_a_client_resumes_its_own_adapters_and_head_next_round(
    federation: Federation, monkeypatch: pytest.MonkeyPatch
) -> None:
    global_model = federation.global_model()
    spec = federation.spec("image-0")
    app = federation.client_app(spec.cid)
    _, state = app(fit_payload(federation, global_model, spec), {})
    seen: dict[str, torch.Tensor] = {}
    fit = app._fit

    def spy(model: Any, terms: Any, payload: Payload) -> dict[str, float]:
        seen.update({k: v.clone() for k, v in model.part_state().items()})
        return fit(model, terms, payload)

    monkeypatch.setattr(app, "_fit", spy)
    new_global = {k: v + 0.5 if v.is_floating_point() else v for k, v in global_model.part_state().items()}
    global_model.load_part_state(new_global)
    app(fit_payload(federation, global_model, spec, round_=2), state)
    for key, value in state[PERSONAL_MODEL].items():  # adapters and head: the client's own
        assert torch.equal(seen[key], value), key
    for key in global_model.part_state(["image_encoder"]):  # base weights: the server's
        assert torch.equal(seen[key], new_global[key]), key


def test_tiny_federation_with_personal_adapters_runs_end_to_end(tmp_path: Path) -> None:
    from mmfed.federation.run import train

    cfg = compose(
        ["experiment=smoke", "quiet=true", "model/lora=default", "model.lora.rank=2", "rounds=1",
         "training.max_steps=2", "layout.text=0", "layout.paired=0", "name=e2e",
         f"run_dir={tmp_path / 'run'}"]
    )  # fmt: skip
    summary = train(cfg)
    assert "local/image/classification/image/acc/mean" in summary  # clients evaluate with their own head
    state = torch.load(tmp_path / "run" / "client_state" / "image-0" / "round_00001.pt", weights_only=False)
    assert any("lora_" in k for k in state[PERSONAL_MODEL])
