"""The server checks every reply before aggregation: a non-finite tensor is a client failure naming the
client, the round and the tensor; it never reaches the global model and counts against min_replies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmfed.algorithms.fedavg import ModalityFedAvg
from mmfed.data.layout import ClientSpec
from mmfed.federation.server import RoundFailed, Server, first_non_finite
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Payload, Reply


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


class _Engine:
    """Replies with fixed image-encoder weights per client (and keeps `failures` as engines do)."""

    def __init__(self, weights: dict[str, list[float]]) -> None:
        self.weights, self.failures = weights, []

    def run_stage(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        return {
            cid: Reply(
                cid=cid,
                kind="image",
                num_examples=10,
                tensors={"weights/image_encoder/w": torch.tensor(self.weights[cid])},
            )
            for cid in payloads
        }


def _server(min_replies: int | None) -> Server:
    model = MultimodalModel({"image_encoder": _Lin()})
    clients = [ClientSpec(f"image-{i}", "image", ("x",)) for i in range(3)]
    return Server(model, {"fedavg": ModalityFedAvg()}, clients, seed=0, min_replies=min_replies)


WEIGHTS = {"image-0": [1.0, 2.0, 3.0], "image-1": [3.0, 4.0, 5.0], "image-2": [float("nan"), 0.0, 0.0]}


def test_a_non_finite_reply_is_left_out_of_the_aggregate_and_recorded() -> None:
    server, engine = _server(min_replies=2), _Engine(WEIGHTS)
    metrics, _, replies = server.run_round(4, engine)
    assert [r.cid for r in replies] == ["image-0", "image-1"]
    assert server.global_model.image_encoder.w.tolist() == [2.0, 3.0, 4.0]  # mean of the two finite ones
    assert metrics["server/fedavg/image_encoder/clients"] == 2.0
    (failure,) = engine.failures
    assert (failure.round, failure.stage, failure.cid) == (4, "fit", "image-2")
    assert "non-finite tensor 'weights/image_encoder/w' (NaN in 1 of 3 values)" in failure.error


def test_too_few_finite_replies_fail_the_round_naming_round_clients_and_tensor() -> None:
    weights = {**WEIGHTS, "image-1": [float("inf"), 0.0, 0.0]}
    server = _server(min_replies=2)
    with pytest.raises(RoundFailed) as caught:
        server.run_round(7, _Engine(weights))
    message = str(caught.value)
    assert message.startswith("round 7 (fit): 1 of 3 clients replied, fewer than min_replies=2")
    assert "image-1: sent a non-finite tensor 'weights/image_encoder/w' (inf in 1 of 3 values)" in message
    assert "image-2: sent a non-finite tensor" in message
    assert server.global_model.image_encoder.w.tolist() == [0.0, 0.0, 0.0]  # untouched


def test_first_non_finite_ignores_integer_tensors() -> None:
    assert first_non_finite({"steps": torch.tensor([1, 2]), "w": torch.ones(2)}) is None
    assert first_non_finite({"w": torch.tensor([1.0, -float("inf")])}) == "'w' (inf in 1 of 2 values)"
