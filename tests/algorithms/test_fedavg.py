"""Modality-wise FedAvg against hand-worked numbers."""

from __future__ import annotations

import torch
from torch import nn

from mmfed.algorithms.base import ServerRound
from mmfed.algorithms.fedavg import ModalityFedAvg, weighted_average
from mmfed.data.layout import ClientSpec
from mmfed.models.multimodal import LogitScale, MultimodalModel
from mmfed.protocol import Reply


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))


def _global() -> MultimodalModel:
    return MultimodalModel(
        {
            "image_encoder": _Lin(),
            "text_encoder": _Lin(),
            "image_head": _Lin(),
            "text_head": _Lin(),
            "logit_scale": LogitScale(),
        }
    )


def _reply(kind: str, n: int, **parts: list[float]) -> Reply:
    tensors = {f"weights/{part}/w": torch.tensor(v) for part, v in parts.items()}
    return Reply(cid=f"{kind}-x", kind=kind, num_examples=n, tensors=tensors)


def test_weighted_average_by_hand() -> None:
    states = [
        {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(7)},
        {"w": torch.tensor([4.0, 8.0]), "steps": torch.tensor(9)},
    ]
    out = weighted_average(states, [1, 2])
    assert torch.allclose(out["w"].float(), torch.tensor([3.0, 6.0]))  # (1*1 + 2*4)/3, (1*2 + 2*8)/3
    assert int(out["steps"]) == 7  # integers are not averaged


def test_each_part_is_averaged_over_exactly_the_clients_that_trained_it() -> None:
    model = _global()
    model.logit_scale.log_scale.data.fill_(5.0)
    replies = [
        _reply("image", 100, image_encoder=[1.0, 1.0], image_head=[2.0, 2.0]),
        _reply("text", 300, text_encoder=[4.0, 0.0], text_head=[3.0, 3.0]),
        _reply("paired", 100, image_encoder=[3.0, 5.0], text_encoder=[0.0, 4.0]),
    ]
    ModalityFedAvg().aggregate(ServerRound(1, 0, model, []), replies)
    # image encoder: image (n=100) and paired (n=100) -> mean
    assert torch.allclose(model.image_encoder.w, torch.tensor([2.0, 3.0]))
    # text encoder: text (n=300) and paired (n=100) -> (300*[4,0] + 100*[0,4]) / 400
    assert torch.allclose(model.text_encoder.w, torch.tensor([3.0, 1.0]))
    assert torch.allclose(model.image_head.w, torch.tensor([2.0, 2.0]))  # image clients only
    assert torch.allclose(model.text_head.w, torch.tensor([3.0, 3.0]))  # text clients only
    assert model.logit_scale.log_scale.item() == 5.0  # no paired client sent it: unchanged


def test_broadcast_sends_only_the_parts_of_the_client_kind() -> None:
    model = _global()
    step = ModalityFedAvg(transport_dtype="float16")
    for kind, parts in {
        "image": {"image_encoder", "image_head"},
        "text": {"text_encoder", "text_head"},
        "paired": {"image_encoder", "text_encoder", "logit_scale"},
    }.items():
        payload = step.broadcast(ServerRound(1, 0, model, []), ClientSpec(f"{kind}-0", kind, ("a",)))
        assert {name.split("/")[0] for name in payload.tensors} == parts
        assert all(t.dtype == torch.float16 for t in payload.tensors.values())
        assert payload.reply == ["weights"]
        assert payload.nbytes == sum(t.numel() * 2 for t in payload.tensors.values())
