"""Payload, Reply and personal client state as Flower records, and back, without loss.

Why a codec of our own: Flower's records hold flat names -> numpy arrays (`ArrayRecord`), scalars
and lists (`ConfigRecord`) and numbers (`MetricRecord`), while mmfed messages carry torch tensors
(bfloat16 too, which numpy lacks) and client state is a nested dict. Tensors travel bit-exact (a
bfloat16 tensor as its int16 bits), so both engines see the same numbers.

A nested dict (payload config, client state) is flattened: each leaf's key is its path as JSON
(`["term", "proto", 3]`, so string and integer keys survive) behind a one-letter kind:
``t`` torch tensor, ``b`` bfloat16 tensor (as int16 bits), ``n`` numpy array (in the ArrayRecord),
``v`` a value ConfigRecord holds as it is, ``j`` anything else JSON can write (None, {}, mixed lists)
as a JSON string. Tuples come back as lists.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from mmfed.protocol import Payload, Reply

# numpy has no bfloat16: such tensors travel as the integer of the same width (their raw bits).
_BIT_VIEWS = {torch.bfloat16: torch.int16}
_DTYPES = {str(dtype): dtype for dtype in _BIT_VIEWS}
_SCALARS = (bool, int, float, str, bytes)

META, TENSORS, CONFIG, METRICS = "meta", "tensors", "config", "metrics"


class RecordError(TypeError):
    """A value cannot travel in Flower records; the message names where it sits."""


# ----------------------------------------------------------------------------- tensors
def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, dict[str, str]]:
    """Named tensors as an ArrayRecord, plus {name: dtype} for tensors sent as their bits."""
    record, viewed = ArrayRecord(), {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.dtype in _BIT_VIEWS:
            viewed[name] = str(tensor.dtype)
            tensor = tensor.view(_BIT_VIEWS[tensor.dtype])
        record[name] = Array(tensor.numpy())
    return record, viewed


def record_to_tensors(record: ArrayRecord, viewed: Mapping[str, str]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, array in record.items():
        tensor = torch.from_numpy(np.array(array.numpy()))  # a writable copy
        tensors[name] = tensor.view(_DTYPES[viewed[name]]) if name in viewed else tensor
    return tensors


# ----------------------------------------------------------------------------- nested dicts
def _is_config_value(value: Any) -> bool:
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, list | tuple) and value:
        first = type(value[0])
        return first in _SCALARS and all(type(v) is first for v in value)
    return False


def tree_to_records(tree: Mapping[Any, Any], what: str) -> tuple[ArrayRecord, ConfigRecord]:
    """Flatten a nested dict into (tensors and arrays, everything else); `what` names it in errors."""
    arrays, config = ArrayRecord(), ConfigRecord()

    def walk(node: Any, path: list[Any]) -> None:
        if isinstance(node, Mapping) and (node or not path):
            for key, value in node.items():
                if not isinstance(key, str | int) or isinstance(key, bool):
                    raise RecordError(f"{what} key {key!r} at {path}: only str and int keys can travel")
                walk(value, [*path, key])
            return
        key = json.dumps(path)
        if isinstance(node, torch.Tensor):
            record, viewed = tensors_to_record({key: node})
            arrays[("b" if viewed else "t") + key] = record[key]
        elif isinstance(node, np.ndarray):
            arrays["n" + key] = Array(np.ascontiguousarray(node))
        elif _is_config_value(node):
            config["v" + key] = list(node) if isinstance(node, tuple) else node
        else:
            try:
                config["j" + key] = json.dumps(node)
            except (TypeError, ValueError) as error:
                raise RecordError(
                    f"{what} at {path}: a {type(node).__name__} cannot travel in Flower records "
                    "(tensors, arrays, numbers, strings, bytes, and lists and dicts of them can)"
                ) from error

    walk(tree, [])
    return arrays, config


def records_to_tree(arrays: ArrayRecord | None, config: ConfigRecord | None) -> dict[Any, Any]:
    tree: dict[Any, Any] = {}

    def put(path: list[Any], value: Any) -> None:
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    for key, array in (arrays or {}).items():
        value = np.array(array.numpy())  # a writable copy
        if key[0] == "n":
            put(json.loads(key[1:]), value)
        else:
            tensor = torch.from_numpy(value)
            put(json.loads(key[1:]), tensor.view(torch.bfloat16) if key[0] == "b" else tensor)
    for key, value in (config or {}).items():
        put(json.loads(key[1:]), json.loads(value) if key[0] == "j" else value)
    return tree


# ----------------------------------------------------------------------------- messages
def _message_records(message: Payload | Reply, meta: dict[str, Any], what: str) -> RecordDict:
    tensors, viewed = tensors_to_record(message.tensors)
    config_arrays, config = tree_to_records(message.config, f"{what} config")
    if len(config_arrays):
        raise RecordError(f"{what} config holds tensors ({', '.join(config_arrays)}): send them as tensors")
    meta = {**meta, "viewed": json.dumps(viewed)}
    return RecordDict(
        {
            META: ConfigRecord(meta),
            TENSORS: tensors,
            CONFIG: config,
            METRICS: MetricRecord({k: float(v) for k, v in message.metrics.items()}),
        }
    )


def payload_to_records(payload: Payload, cid: str, federation: str) -> RecordDict:
    """The payload for client `cid`; `federation` is the resolved config (YAML) the node rebuilds."""
    meta = {
        "cid": cid,
        "stage": payload.stage,
        "round": payload.round,
        "reply": json.dumps(payload.reply),
        "federation": federation,
    }
    return _message_records(payload, meta, "payload")


def records_to_payload(records: RecordDict) -> tuple[Payload, str, str]:
    """(payload, client id, federation config YAML)."""
    meta = records[META]
    payload = Payload(
        tensors=record_to_tensors(records[TENSORS], json.loads(str(meta["viewed"]))),
        config=records_to_tree(None, records[CONFIG]),
        metrics=dict(records[METRICS]),
        stage=str(meta["stage"]),
        round=int(meta["round"]),
        reply=json.loads(str(meta["reply"])),
    )
    return payload, str(meta["cid"]), str(meta["federation"])


def reply_to_records(reply: Reply, seconds: float) -> RecordDict:
    """A client's reply and how long the client took (the server applies `client_timeout` to it)."""
    meta = {"cid": reply.cid, "kind": reply.kind, "num_examples": reply.num_examples, "seconds": seconds}
    return _message_records(reply, meta, "reply")


def records_to_reply(records: RecordDict) -> tuple[Reply, float]:
    meta = records[META]
    reply = Reply(
        tensors=record_to_tensors(records[TENSORS], json.loads(str(meta["viewed"]))),
        config=records_to_tree(None, records[CONFIG]),
        metrics=dict(records[METRICS]),
        cid=str(meta["cid"]),
        kind=str(meta["kind"]),
        num_examples=int(meta["num_examples"]),
    )
    return reply, float(meta["seconds"])


# ----------------------------------------------------------------------------- client state
def _state_keys(cid: str) -> tuple[str, str]:
    return f"mmfed.state.{cid}.arrays", f"mmfed.state.{cid}.config"


def save_state(context_state: RecordDict, cid: str, state: Mapping[str, Any]) -> None:
    """Keep `cid`'s personal state in the node's Context.state (it never leaves the node).

    Like the embedded `ClientStateStore`, an empty state keeps the previous one.
    """
    if not state:
        return
    arrays, config = tree_to_records(state, f"client {cid} state")
    array_key, config_key = _state_keys(cid)
    context_state[array_key], context_state[config_key] = arrays, config


def load_state(context_state: RecordDict, cid: str) -> dict[str, Any]:
    array_key, config_key = _state_keys(cid)
    arrays = context_state[array_key] if array_key in context_state else None
    config = context_state[config_key] if config_key in context_state else None
    return records_to_tree(arrays, config)  # type: ignore[arg-type]
