"""`FlowerEngine`: the server's `Engine` over a Flower `Grid` (simulation or a real SuperLink).

`run_stage` sends one Message per client to the SuperNode hosting it and decodes the replies; the
`Server` round loop, the server steps and the client function are the embedded engine's own.

Which node hosts which client is asked, not assumed: Flower gives nodes random ids, so the engine
sends each new node a "query.hosts" message and the node answers with the client ids its
``partition-id`` / ``num-partitions`` node config gives it (client i is hosted by partition
i mod num-partitions). A client no connected node hosts, an error reply, or a reply later than its
deadline becomes a `ClientFailure`; `Server.run_round` decides with `min_replies` whether the round
still counts.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from omegaconf import DictConfig, OmegaConf

from mmfed.config import instantiate
from mmfed.federation.embedded import ClientFailure, check_timeout
from mmfed.federation.flower.records import META, payload_to_records, records_to_reply
from mmfed.federation.flower.settings import FlowerSettings
from mmfed.protocol import Payload, Reply

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger("mmfed.flower")  # a deployment's log shows node discovery; a simulation hides it

QUERY_HOSTS = f"{MessageType.QUERY}.hosts"


class FlowerSetupError(RuntimeError):
    """The Flower federation cannot carry this run (no grid, nodes that claim the same clients ...)."""


def message_type(stage: str) -> str:
    """Flower's category for a stage: the client-side evaluation is "evaluate", any other "train"."""
    return MessageType.EVALUATE if stage == "evaluate" else MessageType.TRAIN


class FlowerEngine:
    """Runs each stage's clients on the SuperNodes that host them, through a Flower `Grid`.

    `federation` is the resolved run config as YAML: every message carries it, so a node (a Ray
    actor, or a fresh `flwr-clientapp` process per message in a deployment) rebuilds the same
    `Federation` and client from it. The grid is bound when the ServerApp starts (`bind`).
    """

    def __init__(
        self,
        federation: str,
        settings: FlowerSettings,
        client_timeout: float | None = None,
        expected_nodes: int | None = None,
    ) -> None:
        self.federation, self.settings = federation, settings
        self.client_timeout = check_timeout(client_timeout)
        self.expected_nodes = expected_nodes  # known in a simulation: stop waiting once all answered
        self.grid: Grid | None = None
        self.failures: list[ClientFailure] = []
        self._hosted: dict[int, list[str]] = {}  # node id -> client ids it hosts
        self._node_errors: dict[int, str] = {}  # why a node hosts nothing (its error reply)
        self._complete_once = False

    @classmethod
    def from_config(cls, cfg: DictConfig) -> FlowerEngine:
        """The engine `engine=flower` asks for: `flower` settings, `client_timeout`, the resolved config."""
        settings: FlowerSettings = instantiate(cfg.flower, "flower")
        return cls(OmegaConf.to_yaml(cfg, resolve=True), settings, cfg.client_timeout)

    def bind(self, grid: Grid, expected_nodes: int | None = None) -> None:
        self.grid, self.expected_nodes = grid, expected_nodes
        self._hosted, self._node_errors, self._complete_once = {}, {}, False

    # ----------------------------------------------------------------- nodes
    def _query_hosts(self, grid: Grid, node_ids: list[int]) -> None:
        messages = [
            Message(RecordDict({META: ConfigRecord({"federation": self.federation})}), node, QUERY_HOSTS)
            for node in node_ids
        ]
        answered = self._exchange(grid, messages, time.monotonic() + self.settings.connect_timeout)
        for node, (reply, error) in zip(node_ids, answered, strict=True):
            if reply is None:  # it hosts nothing for this run (and is not asked again)
                log.warning("SuperNode %d did not say which clients it hosts: %s", node, error)
                self._hosted[node], self._node_errors[node] = [], error
                continue
            self._hosted[node] = json.loads(str(reply.content[META]["cids"]))
            log.info("SuperNode %d hosts %s", node, ", ".join(self._hosted[node]) or "no client")

    def hosts(self, cids: list[str]) -> dict[str, int]:
        """cid -> node id for the clients of a stage; waits for nodes until the first full cover."""
        grid = self.grid
        if grid is None:
            raise FlowerSetupError("FlowerEngine has no Grid: run it from a Flower ServerApp (see bind)")
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            present = list(grid.get_node_ids())
            for gone in set(self._hosted) - set(present):
                log.warning("SuperNode %d left the federation", gone)
                del self._hosted[gone]
            new = [node for node in present if node not in self._hosted]
            if new:
                self._query_hosts(grid, new)
            where: dict[str, int] = {}
            for node, hosted in self._hosted.items():
                for cid in hosted:
                    if cid in where:
                        raise FlowerSetupError(
                            f"client {cid} is hosted by SuperNodes {where[cid]} and {node}: give every "
                            "SuperNode its own --node-config 'partition-id=<i> num-partitions=<n>'"
                        )
                    where[cid] = node
            if all(cid in where for cid in cids):
                self._complete_once = True
                return where
            everyone = self.expected_nodes is not None and len(self._hosted) >= self.expected_nodes
            if everyone or self._complete_once or time.monotonic() > deadline:
                return where
            time.sleep(max(self.settings.poll_interval, 0.5))

    # ----------------------------------------------------------------- messages
    def _exchange(
        self, grid: Grid, messages: list[Message], deadline: float | None
    ) -> list[tuple[Message | None, str]]:
        """Push `messages`, pull until all replied or `deadline`: (reply or None, error) per message."""
        ids = list(grid.push_messages(messages))
        late = "timed out: no reply before the stage's deadline"
        results: list[tuple[Message | None, str]] = [(None, late)] * len(ids)
        pending = {mid: i for i, mid in enumerate(ids) if mid is not None}
        for i, mid in enumerate(ids):
            if mid is None:
                results[i] = (None, "the SuperLink did not accept the message")
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in grid.pull_messages(list(pending)):
                index = pending.pop(reply.metadata.reply_to_message_id, None)
                if index is None:
                    continue
                if reply.has_error():
                    lines = reply.error.reason.strip().splitlines() or [f"error code {reply.error.code}"]
                    results[index] = (None, lines[-1])
                else:
                    results[index] = (reply, "")
            if pending:
                time.sleep(self.settings.poll_interval)
        return results

    def _fail(self, round_: int, stage: str, cid: str, node: int | None, error: str) -> None:
        failure = ClientFailure(round_, stage, cid, "none" if node is None else str(node), error)
        self.failures.append(failure)
        log.warning("round %d %s: client %s (node %s) failed: %s", round_, stage, cid, failure.node, error)

    def run_stage(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        where = self.hosts(list(payloads))
        grid = self.grid
        assert grid is not None  # hosts() checked
        sent: list[str] = []
        messages: list[Message] = []
        for cid, payload in payloads.items():
            if cid not in where:
                said = "".join(f"; SuperNode {n}: {e}" for n, e in list(self._node_errors.items())[:1])
                self._fail(round_, stage, cid, None, f"no connected SuperNode hosts this client{said}")
                continue
            content = payload_to_records(payload, cid, self.federation)
            messages.append(Message(content, where[cid], message_type(stage), group_id=str(round_)))
            sent.append(cid)
        deadline = None
        if self.client_timeout is not None:  # as if every client took its whole allowance in turn
            deadline = time.monotonic() + self.client_timeout * len(messages) + self.settings.wait_grace
        replies: dict[str, Reply] = {}
        for cid, (message, error) in zip(sent, self._exchange(grid, messages, deadline), strict=True):
            if message is None:
                self._fail(round_, stage, cid, where[cid], error)
                continue
            reply, seconds = records_to_reply(message.content)
            if self.client_timeout is not None and seconds > self.client_timeout:
                self._fail(
                    round_,
                    stage,
                    cid,
                    where[cid],
                    f"timed out: {seconds:.1f}s > client_timeout={self.client_timeout:g}s",
                )
                continue
            replies[cid] = reply
        return {cid: replies[cid] for cid in payloads if cid in replies}
