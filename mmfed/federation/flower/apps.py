"""The Flower apps: `client_app` (what a SuperNode runs) and `server_app` (a deployment's ServerApp).

Node side: every message carries the resolved run config; the node rebuilds `Federation(cfg)` once
per process (a Ray actor keeps it between messages; a deployment starts a `flwr-clientapp` process
per message), maps its ``partition-id`` to its clients, runs the client function on the decoded
payload with the client's personal state from `Context.state`, and encodes the reply. A client
that raises answers with an error reply naming the exception; the server records it as a failure.

Server side (deployment): the run config of ``flwr run`` gives Hydra overrides, the run folder and
optionally the config folder; `Run` then trains exactly as ``mmfed train`` does, over the `Grid`.
The simulation builds its own ServerApp around an existing `Run` (see `simulation.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from mmfed.federation.embedded import describe
from mmfed.federation.flower.records import (
    META,
    load_state,
    records_to_payload,
    reply_to_records,
    save_state,
)

if TYPE_CHECKING:
    from mmfed.federation.run import Federation

log = logging.getLogger("mmfed")

PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
_FEDERATIONS: dict[str, Federation] = {}  # this process's federation, keyed by its config's hash


class NodeConfigError(ValueError):
    """The SuperNode's --node-config does not say which clients it hosts."""


def federation_for(config_yaml: str) -> Federation:
    """The federation this config makes, built once per process (and only the latest one kept)."""
    from mmfed.federation.run import Federation

    key = hashlib.sha256(config_yaml.encode()).hexdigest()
    if key not in _FEDERATIONS:
        _FEDERATIONS.clear()
        _FEDERATIONS[key] = Federation(OmegaConf.create(config_yaml))
    return _FEDERATIONS[key]


def hosted_clients(federation: Federation, node_config: Mapping[str, Any]) -> list[str]:
    """Client i of the federation is hosted by the node whose partition-id is i mod num-partitions."""
    try:
        partition, partitions = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    except (KeyError, TypeError, ValueError) as error:
        raise NodeConfigError(
            f"SuperNode node config {dict(node_config)} needs integer {PARTITION_ID} and {NUM_PARTITIONS}: "
            f"start it with --node-config '{PARTITION_ID}=<i> {NUM_PARTITIONS}=<n>'"
        ) from error
    if not 0 <= partition < partitions:
        raise NodeConfigError(f"{PARTITION_ID}={partition} must be in [0, {NUM_PARTITIONS}={partitions})")
    return [client.cid for i, client in enumerate(federation.clients) if i % partitions == partition]


def _error_reply(message: Message, error: BaseException) -> Message:
    log.error("client app failed on %s", message.metadata.message_type, exc_info=error)
    return Message(
        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=describe(error)), reply_to=message
    )


client_app = ClientApp()


@client_app.query("hosts")
def answer_hosts(message: Message, context: Context) -> Message:
    """Which clients this node hosts in the run the message's config describes."""
    try:
        federation = federation_for(str(message.content[META]["federation"]))
        cids = hosted_clients(federation, context.node_config)
    except Exception as error:  # the server logs it and leaves the node out
        return _error_reply(message, error)
    return Message(RecordDict({META: ConfigRecord({"cids": json.dumps(cids)})}), reply_to=message)


@client_app.train()
@client_app.evaluate()
def run_client(message: Message, context: Context) -> Message:
    """One client, one stage: the embedded engine's client function on this node's data."""
    try:
        payload, cid, config_yaml = records_to_payload(message.content)
        federation = federation_for(config_yaml)
        if cid not in hosted_clients(federation, context.node_config):
            raise NodeConfigError(
                f"client {cid} is not hosted by this SuperNode ({dict(context.node_config)})"
            )
        began = time.perf_counter()
        reply, state = federation.client_app(cid)(payload, load_state(context.state, cid))
        seconds = time.perf_counter() - began
        save_state(context.state, cid, state)
    except Exception as error:  # reported to the server as this client's failure, state left as it was
        return _error_reply(message, error)
    return Message(reply_to_records(reply, seconds), reply_to=message)


# ------------------------------------------------------------------------- deployment ServerApp
def compose_run_config(run_config: Mapping[str, Any]) -> Any:
    """The run's config from ``flwr run``'s run config: `overrides` (Hydra, space separated),
    `run-dir` (the run folder, on the SuperLink's machine) and `config-dir` (default: mmfed's)."""
    from mmfed.composition import compose

    overrides = shlex.split(str(run_config.get("overrides", "")))
    if run_config.get("run-dir"):
        overrides.append(f"run_dir={run_config['run-dir']}")
    return compose([*overrides, "engine=flower"], str(run_config.get("config-dir") or "") or None)


server_app = ServerApp()


@server_app.main()
def deployment_main(grid: Grid, context: Context) -> None:
    """`mmfed train engine=flower` with the SuperNodes of a real deployment instead of Ray."""
    from mmfed.federation.flower.engine import FlowerEngine
    from mmfed.federation.run import Run

    if not log.handlers:  # the ServerApp process has no logging set up; its output is the run's log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    run = Run(compose_run_config(context.run_config))
    assert isinstance(run.engine, FlowerEngine)
    run.engine.bind(grid)
    summary = run.train()
    log.info("run folder %s: %s", run.dir, json.dumps(summary))
