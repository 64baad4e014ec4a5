"""`FlowerEngine` over an in-process Grid: the Flower message path without Ray or sockets.

`LocalGrid` hands every message to mmfed's real Flower `client_app`, one `Context` per node, exactly
as a SuperNode would; so these tests cover the records, node discovery, Context.state and failure
handling of the Flower engine in seconds. Ray and real SuperNodes: test_flower_simulation.py,
test_flower_deployment.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from mmfed.cli import compose, main
from mmfed.federation.flower.apps import client_app
from mmfed.federation.flower.engine import FlowerEngine, FlowerSetupError
from mmfed.federation.run import Run, train
from mmfed.federation.server import RoundFailed
from mmfed.protocol import Payload

TINY = ["experiment=smoke", "quiet=true"]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Who sends messages: Flower's runtime sets it in a ServerApp process; here the test does."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LocalGrid:
    """The part of Flower's `Grid` the engine uses; messages run on `client_app` at push time."""

    def __init__(self, node_configs: list[dict[str, Any]]) -> None:
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, node_config=c, state=RecordDict(), run_config={})
            for i, c in enumerate(node_configs)
        }
        self._replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(message)
            self._replies[message.metadata.message_id] = client_app(
                message, self.contexts[message.metadata.dst_node_id]
            )
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]


def partitions(n: int) -> list[dict[str, Any]]:
    return [{"partition-id": i, "num-partitions": n} for i in range(n)]


def run_on_grid(overrides: list[str], grid: LocalGrid) -> dict[str, Any]:
    run = Run(compose([*overrides, "engine=flower"]))
    assert isinstance(run.engine, FlowerEngine)
    run.engine.bind(grid)  # type: ignore[arg-type]
    return run.train()


def _records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("wall_seconds")
    return records


def test_flower_engine_matches_the_embedded_engine_with_personal_state(tmp_path: Path) -> None:
    """MOON keeps each client's previous model as personal state: on Flower it lives in Context.state."""
    overrides = [*TINY, "algorithm=moon", "layout.image=2"]
    embedded = train(compose([*overrides, f"run_dir={tmp_path / 'embedded'}"]))
    grid = LocalGrid(partitions(2))  # 4 clients on 2 nodes
    flower = run_on_grid([*overrides, f"run_dir={tmp_path / 'flower'}"], grid)
    for summary in (embedded, flower):
        summary.pop("wall_seconds")
    assert flower == embedded
    assert _records(tmp_path / "flower") == _records(tmp_path / "embedded")
    kept = {key for context in grid.contexts.values() for key in context.state}
    assert {f"mmfed.state.{cid}.arrays" for cid in ("image-0", "image-1", "text-0", "paired-0")} <= kept
    assert {m.metadata.message_type for m in grid.sent} == {"query.hosts", "train", "evaluate"}


def test_nodes_that_claim_the_same_clients_are_refused(tmp_path: Path) -> None:
    grid = LocalGrid([{"partition-id": 0, "num-partitions": 2}] * 2)
    with pytest.raises(FlowerSetupError, match="give every SuperNode its own --node-config"):
        run_on_grid([*TINY, f"run_dir={tmp_path / 'run'}"], grid)


def test_a_client_no_node_hosts_is_a_failure_and_min_replies_decides(tmp_path: Path) -> None:
    """Node 1 of 2 has no partition-id: it hosts nothing, so text-0 (index 1) has no node."""
    grid = LocalGrid([{"partition-id": 0, "num-partitions": 2}, {"num-partitions": 2}])
    overrides = [*TINY, "rounds=1", "flower.connect_timeout=0.5"]
    with pytest.raises(RoundFailed, match=r"2 of 3 clients replied.*text-0: no connected SuperNode"):
        run_on_grid([*overrides, f"run_dir={tmp_path / 'all'}"], grid)
    run_on_grid([*overrides, "min_replies=2", f"run_dir={tmp_path / 'two'}"], LocalGrid(grid_configs(grid)))
    (record,) = _records(tmp_path / "two")
    (failure,) = record["failures"]
    assert {k: failure[k] for k in ("round", "stage", "cid", "node")} == {
        "round": 1,
        "stage": "fit",
        "cid": "text-0",
        "node": "none",
    }
    assert failure["error"].startswith("no connected SuperNode hosts this client; SuperNode 1001: ")
    assert "NodeConfigError" in failure["error"] and "--node-config" in failure["error"]
    assert "train/text/loss" not in record and "train/paired/loss" in record


def grid_configs(grid: LocalGrid) -> list[dict[str, Any]]:
    return [dict(context.node_config) for context in grid.contexts.values()]


def test_an_unbound_engine_says_what_is_missing() -> None:
    engine = FlowerEngine.from_config(compose([*TINY, "engine=flower"]))
    with pytest.raises(FlowerSetupError, match="no Grid"):
        engine.run_stage("fit", 1, {"image-0": Payload()})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine=ray", "config key 'engine': 'ray' is not one of embedded, flower"),
        ("flower.num_cpus=0", "config key 'flower': num_cpus must be > 0, got 0.0"),
        ("flower.num_gpus=-1", "config key 'flower': num_gpus must be >= 0"),
        ("flower.num_cpus=lots", "config key 'flower.num_cpus'"),
        ("min_replies=4", "min_replies=4 must be between 1 and 3"),
        ("client_timeout=-2", "client_timeout must be a number of seconds > 0 or null, got -2"),
    ],
)
def test_engine_config_errors_are_one_line_and_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, message: str
) -> None:
    engine = [] if override.startswith("engine") else ["engine=flower"]
    assert main(["train", *TINY, f"run_dir={tmp_path / 'run'}", *engine, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfed: error:") and len(err.splitlines()) == 1, err
    assert message in err, err


def test_embedded_replies_are_snapshots_not_views_of_the_pooled_model(tmp_path: Path) -> None:
    """Two image clients share one pooled model; each reply must keep its own client's weights."""
    run = Run(compose([*TINY, "layout.image=2", f"run_dir={tmp_path / 'run'}"]))
    _, _, replies = run.server.run_round(1, run.engine)
    first, second = (r for r in replies if r.kind == "image")
    assert first.tensors.keys() == second.tensors.keys()
    assert any(not torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
