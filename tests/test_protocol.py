from __future__ import annotations

import pytest
import torch

from mmfed.protocol import Payload, encode_tensors


def test_encoded_tensors_are_snapshots_never_views_of_the_source() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    steps = torch.tensor(4)
    sent = encode_tensors({"w": weight, "steps": steps}, "float32")
    with torch.no_grad():
        weight.add_(1.0)  # the (pooled) model trains on after sending
    steps += 1
    assert torch.equal(sent["w"], torch.ones(3)) and int(sent["steps"]) == 4
    assert sent["w"].dtype == torch.float32 and sent["steps"].dtype == torch.int64


def test_transport_dtype_casts_floats_only_and_counts_bytes() -> None:
    sent = encode_tensors({"w": torch.ones(10), "i": torch.arange(3)}, "float16")
    assert sent["w"].dtype == torch.float16 and sent["i"].dtype == torch.int64
    assert Payload(tensors=sent).nbytes == 10 * 2 + 3 * 8
    with pytest.raises(ValueError, match="transport_dtype='int8' is not one of"):
        encode_tensors({}, "int8")


def test_two_steps_sending_the_same_tensor_is_an_error() -> None:
    payload = Payload(tensors={"a": torch.ones(1)}, reply=["weights"])
    payload.merge(Payload(tensors={"b": torch.ones(1)}, reply=["representations"]))
    assert payload.reply == ["representations", "weights"]
    with pytest.raises(ValueError, match="both send tensor 'a'"):
        payload.merge(Payload(tensors={"a": torch.zeros(1)}))
