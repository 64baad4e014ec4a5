"""Payloads, replies and client state survive Flower's records (through its protobuf serde) bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from mmfed.cli import compose
from mmfed.federation.flower.apps import NodeConfigError, hosted_clients
from mmfed.federation.flower.records import (
    RecordError,
    load_state,
    payload_to_records,
    records_to_payload,
    records_to_reply,
    reply_to_records,
    save_state,
)
from mmfed.federation.run import Federation
from mmfed.protocol import Payload, Reply


def _wire(records: RecordDict) -> RecordDict:
    """What the other side gets: the records through Flower's own protobuf serialisation."""
    return recorddict_from_proto(recorddict_to_proto(records))


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_payload_and_reply_round_trip_bit_exact() -> None:
    generator = torch.Generator().manual_seed(0)
    payload = Payload(
        tensors={
            "image_encoder/w": torch.randn(4, 3, generator=generator),
            "text_head/b": torch.randn(5, generator=generator).to(torch.bfloat16),
            "public/indices": torch.arange(7),
            "empty": torch.zeros(0, 2, dtype=torch.float16),
        },
        config={"weights_dtype": "bfloat16", "nested": {"k": [1, 2], "none": None}},
        metrics={"lr": 0.5},
        stage="fit",
        round=3,
        reply=["weights", "representations"],
    )
    back, cid, federation = records_to_payload(_wire(payload_to_records(payload, "text-1", "seed: 4\n")))
    assert (cid, federation) == ("text-1", "seed: 4\n")
    _same_tensors(back.tensors, payload.tensors)
    assert (back.config, back.metrics) == (payload.config, payload.metrics)
    assert (back.stage, back.round, back.reply) == ("fit", 3, ["weights", "representations"])
    assert back.nbytes == payload.nbytes  # bytes up/down are counted the same on both engines

    reply = Reply(
        tensors={"weights/x": torch.randn(2, 2, generator=generator).to(torch.bfloat16)},
        metrics={"train/loss": 1.25, "train/steps": 4.0},
        cid="text-1",
        kind="text",
        num_examples=17,
    )
    back_reply, seconds = records_to_reply(_wire(reply_to_records(reply, 2.5)))
    _same_tensors(back_reply.tensors, reply.tensors)
    assert (back_reply.cid, back_reply.kind, back_reply.num_examples, seconds) == ("text-1", "text", 17, 2.5)
    assert back_reply.metrics == reply.metrics


def test_client_state_round_trips_through_context_state() -> None:
    state = {
        "moon": {"previous": {"w": torch.randn(3, 2), "h": torch.ones(2, dtype=torch.bfloat16)}},
        "protos": {3: np.arange(4.0), 7: [1, 2.5], "empty": {}, "none": None},
        "count": 5,
        "flag": True,
        "names": ("a", "b"),
        "blob": b"\x00\x01",
    }
    context_state = RecordDict()
    save_state(context_state, "paired-0", state)
    save_state(context_state, "paired-0", {})  # an empty state keeps the previous one (as on disk)
    back = load_state(_wire(context_state), "paired-0")
    _same_tensors(back["moon"]["previous"], state["moon"]["previous"])
    assert np.array_equal(back["protos"][3], state["protos"][3])
    assert back["protos"][7] == [1, 2.5] and back["protos"]["empty"] == {} and back["protos"]["none"] is None
    assert (back["count"], back["flag"], back["names"], back["blob"]) == (5, True, ["a", "b"], b"\x00\x01")
    assert load_state(context_state, "text-0") == {}


def test_state_that_cannot_travel_names_where_it_sits() -> None:
    with pytest.raises(RecordError, match=r"client c state at \['term', 'x'\]: a object cannot travel"):
        save_state(RecordDict(), "c", {"term": {"x": object()}})
    with pytest.raises(RecordError, match="only str and int keys"):
        save_state(RecordDict(), "c", {"term": {(1, 2): 1}})


def test_nodes_host_clients_by_partition_id_modulo_partitions() -> None:
    federation = Federation(compose(["experiment=smoke", "layout.image=2"]))
    cids = [c.cid for c in federation.clients]
    assert hosted_clients(federation, {"partition-id": 0, "num-partitions": 2}) == cids[0::2]
    assert hosted_clients(federation, {"partition-id": 1, "num-partitions": 2}) == cids[1::2]
    assert hosted_clients(federation, {"partition-id": 3, "num-partitions": 4}) == [cids[3]]
    with pytest.raises(NodeConfigError, match="--node-config 'partition-id=<i> num-partitions=<n>'"):
        hosted_clients(federation, {"num-partitions": 2})
    with pytest.raises(NodeConfigError, match=r"partition-id=2 must be in \[0, num-partitions=2\)"):
        hosted_clients(federation, {"partition-id": 2, "num-partitions": 2})
