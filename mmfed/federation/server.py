"""The server side: the round loop, written once.

A round is a sequence of stages. For each stage the server (1) samples clients, (2) builds each
client's payload by merging the fragments of every server step of that stage, (3) hands the
payloads to the engine, which runs the clients and returns their replies, and (4) lets each step
consume the replies, in config order (aggregate, then distill, then correct ...).

Two optional step hooks: a step with ``prepares = True`` takes part in a one-time "prepare" stage
before round 1 (every client; e.g. clients train and upload a generative model once), and a step
with ``observe(round, metrics)`` sees each round's validation metrics (e.g. to detect slow learning).
Metrics named ``cost/...`` are one namespace, summed over steps (and, by the run, over rounds).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mmfed.algorithms.base import ServerRound, ServerStep
from mmfed.data.layout import ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.federation.embedded import ClientFailure
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Payload, Reply
from mmfed.utils.seeding import numpy_rng

log = logging.getLogger("mmfed")
COST_PREFIX = "cost/"  # metrics named cost/... are one namespace: summed over steps, rounds and the run


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """``'name' (NaN)`` for the first floating tensor holding a NaN or an infinity, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() or tensor.is_complex():
            finite = torch.isfinite(tensor)
            if not bool(finite.all()):
                what = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
                return f"{name!r} ({what} in {int((~finite).sum())} of {tensor.numel()} values)"
    return None


def add_metrics(into: dict[str, float], metrics: dict[str, float], prefix: str) -> None:
    """Add a step's metrics under `prefix`; ``cost/...`` metrics keep their name and are summed."""
    for key, value in metrics.items():
        if key.startswith(COST_PREFIX):
            into[key] = into.get(key, 0.0) + value
        else:
            into[prefix + key] = value


class Engine(Protocol):
    def run_stage(self, stage: str, round_: int, payloads: dict[str, Payload]) -> dict[str, Reply]:
        """Run every client named in `payloads` and return their replies by client id."""
        ...


class RoundFailed(RuntimeError):
    """Fewer clients replied in a stage than `min_replies` asks for; the message names who and why."""


@dataclass
class RoundTraffic:
    bytes_down: int = 0
    bytes_up: int = 0
    per_client: dict[str, dict[str, int]] = field(default_factory=dict)


class Server:
    def __init__(
        self,
        global_model: MultimodalModel,
        steps: dict[str, ServerStep],
        clients: list[ClientSpec],
        seed: int,
        clients_per_round: int | None = None,
        public: MultimodalSplit | None = None,
        min_replies: int | None = None,
    ) -> None:
        if not steps:
            raise ValueError(
                "algorithm.server_steps is empty: a server needs at least one step (e.g. fedavg)"
            )
        if clients_per_round is not None and not 1 <= clients_per_round <= len(clients):
            raise ValueError(
                f"clients_per_round={clients_per_round} must be between 1 and {len(clients)} clients"
            )
        sampled = clients_per_round or len(clients)
        if min_replies is not None and not 1 <= min_replies <= sampled:
            raise ValueError(
                f"min_replies={min_replies} must be between 1 and {sampled} (the clients per round)"
            )
        self.min_replies = min_replies  # None: every sampled client must reply
        self.global_model, self.steps, self.clients = global_model, steps, clients
        self.seed, self.clients_per_round, self.public = seed, clients_per_round, public
        self.stages = list(dict.fromkeys(step.stage for step in steps.values()))
        self.rejected: list[ClientFailure] = []  # replies the server refused (see `checked`)

    def sample(self, round_: int) -> list[ClientSpec]:
        """Uniform sampling without replacement, from a stream derived from (seed, round)."""
        if self.clients_per_round is None or self.clients_per_round == len(self.clients):
            return list(self.clients)
        chosen = numpy_rng(self.seed, "sample-clients", round_).choice(
            len(self.clients), self.clients_per_round, replace=False
        )
        return [self.clients[i] for i in sorted(chosen)]

    def run_round(self, round_: int, engine: Engine) -> tuple[dict[str, float], RoundTraffic, list[Reply]]:
        context = ServerRound(round_, self.seed, self.global_model, self.clients, self.public)
        sampled = self.sample(round_)
        metrics: dict[str, float] = {"clients": float(len(sampled))}
        traffic = RoundTraffic()
        all_replies: list[Reply] = []
        for stage in self.stages:
            steps = {name: step for name, step in self.steps.items() if step.stage == stage}
            all_replies.extend(self._stage(context, stage, sampled, steps, engine, metrics, traffic))
        traffic.bytes_down = sum(e["down"] for e in traffic.per_client.values())
        traffic.bytes_up = sum(e["up"] for e in traffic.per_client.values())
        return metrics, traffic, all_replies

    @property
    def evaluate_from_global(self) -> bool:
        """Whether every step's evaluate-stage payload depends only on the global model (see
        `ServerStep.evaluate_from_global`): then the clients' evaluation of a round can be rebuilt later
        from that round's global weights."""
        return all(step.evaluate_from_global for step in self.steps.values())

    @property
    def prepares(self) -> bool:
        """Whether some step declares `prepares = True` (a one-time "prepare" stage before round 1)."""
        return any(step.prepares for step in self.steps.values())

    def prepare(self, engine: Engine) -> tuple[dict[str, float], RoundTraffic]:
        """The one-time prepare stage (round 0), for every client and the steps that declare it.

        Such a step sees ``round_.stage == "prepare"`` in `broadcast` and `aggregate`; clients run
        their configured client tasks (e.g. train and upload a diffusion model). Its non-cost
        metrics are named ``prepare/<step>/<key>``.
        """
        steps = {name: step for name, step in self.steps.items() if step.prepares}
        context = ServerRound(0, self.seed, self.global_model, self.clients, self.public, stage="prepare")
        metrics: dict[str, float] = {}
        traffic = RoundTraffic()
        self._stage(context, "prepare", self.clients, steps, engine, metrics, traffic, prefix="prepare")
        traffic.bytes_down = sum(e["down"] for e in traffic.per_client.values())
        traffic.bytes_up = sum(e["up"] for e in traffic.per_client.values())
        return metrics, traffic

    def _stage(
        self,
        context: ServerRound,
        stage: str,
        clients: list[ClientSpec],
        steps: dict[str, ServerStep],
        engine: Engine,
        metrics: dict[str, float],
        traffic: RoundTraffic,
        prefix: str = "server",
    ) -> list[Reply]:
        """One stage: payloads from the steps, the engine runs the clients, the steps consume replies."""
        payloads: dict[str, Payload] = {}
        for client in clients:
            payload = Payload(stage=stage, round=context.round)
            for step in steps.values():
                payload.merge(step.broadcast(context, client))
            payloads[client.cid] = payload
        replies = self.checked(engine.run_stage(stage, context.round, payloads), stage, context.round, engine)
        if len(replies) < min(self.min_replies or len(payloads), len(payloads)):
            known = [*getattr(engine, "failures", []), *self.rejected]
            why = {f.cid: f.error for f in known if f.round == context.round and f.stage == stage}
            lost = "; ".join(f"{c}: {why.get(c, 'no reply')}" for c in payloads if c not in replies)
            raise RoundFailed(
                f"round {context.round} ({stage}): {len(replies)} of {len(payloads)} clients replied, fewer "
                f"than min_replies={self.min_replies or 'all'} ({lost})"
            )
        ordered = [replies[c.cid] for c in clients if c.cid in replies]
        for cid, payload in payloads.items():
            entry = traffic.per_client.setdefault(cid, {"down": 0, "up": 0})
            entry["down"] += payload.nbytes
            entry["up"] += replies[cid].nbytes if cid in replies else 0
        for name, step in steps.items():
            add_metrics(metrics, step.aggregate(context, ordered), f"{prefix}/{name}/")
        return ordered

    def checked(self, replies: dict[str, Reply], stage: str, round_: int, engine: Engine) -> dict[str, Reply]:
        """The replies fit to aggregate: one with a NaN or infinite tensor is a client failure (recorded
        in the engine's `failures`, so metrics.jsonl lists it) and never reaches a server step; it
        counts against `min_replies` like a client that did not answer."""
        kept: dict[str, Reply] = {}
        for cid, reply in replies.items():
            bad = first_non_finite(reply.tensors)
            if bad is None:
                kept[cid] = reply
                continue
            error = f"sent a non-finite tensor {bad} (diverged local training? lower training.lr)"
            failure = ClientFailure(round_, stage, cid, "server check", error)
            failures = getattr(engine, "failures", None)
            if isinstance(failures, list):
                failures.append(failure)
            self.rejected.append(failure)
            log.warning("round %d %s: client %s left out: %s", round_, stage, cid, error)
        return kept

    def observe(self, round_: int, metrics: dict[str, float]) -> None:
        """After a round's evaluation, steps with an `observe(round, metrics)` hook see the validation
        metrics (named as in metrics.jsonl, ``val/...``), e.g. to detect slow learning."""
        for step in self.steps.values():
            step.observe(round_, metrics)

    def state_dict(self) -> dict[str, object]:
        return {name: step.state_dict() for name, step in self.steps.items()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name, step in self.steps.items():
            step.load_state_dict(state.get(name, {}))  # type: ignore[arg-type]

    def evaluate_clients(self, round_: int, engine: Engine) -> dict[str, dict[str, float]]:
        """Every client evaluates its model (what the server sends + its personal parts) on its local test."""
        context = ServerRound(
            round_, self.seed, self.global_model, self.clients, self.public, stage="evaluate"
        )
        payloads: dict[str, Payload] = {}
        for client in self.clients:
            payload = Payload(stage="evaluate", round=round_)
            for step in self.steps.values():
                payload.merge(step.broadcast(context, client))
            payload.reply = []
            payloads[client.cid] = payload
        replies = engine.run_stage("evaluate", round_, payloads)
        return {cid: reply.metrics for cid, reply in replies.items()}
