"""FedDDPM / FedDDPM+ end to end on a tiny federation: the prepare stage, cost metrics and totals,
the rounds where FedDDPM+ fired, resume (after a round and inside round 1) and the Flower path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mmfed.algorithms.fedddpm import COSTS, ClassDiffusionTask
from mmfed.cli import compose
from mmfed.federation.run import Run, train
from mmfed.utils.io import load_torch
from tests.federation.test_flower_engine import LocalGrid, partitions, run_on_grid, task_identity  # noqa: F401

pytestmark = pytest.mark.slow
FEDDDPM = ["experiment=[smoke,fedddpm,fedddpm_tiny]", "quiet=true"]
PLUS = ["experiment=[smoke,fedddpm_plus,fedddpm_tiny]", "quiet=true"]


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def timeless(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without what depends on the machine's speed."""
    return {k: v for k, v in summary.items() if k != "wall_seconds" and not k.endswith("_seconds")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One uninterrupted FedDDPM run (2 rounds), read by three tests (was trained by each of them)."""
    run = tmp_path_factory.mktemp("fedddpm") / "run"
    return run, train(compose([*FEDDDPM, f"run_dir={run}"]))


def test_fedddpm_prepares_once_corrects_every_round_and_sums_its_costs(
    reference: tuple[Path, dict[str, Any]],
) -> None:
    run, summary = reference
    rows = records(run)
    assert len(rows) == 2
    first, later = rows[0], rows[1:]
    # round 1 carries the prepare stage: two image-bearing clients trained and uploaded a model
    assert first["prepare/fedddpm/models"] == 2.0 and first["prepare/fedddpm/aux_samples"] == 20.0
    assert first["prepare/fedddpm/cached_models"] == 0.0
    assert first["cost/client_diffusion_seconds"] > 0 and first["cost/sampling_seconds"] > 0
    assert 0 < first["cost/upload_bytes"] < first["bytes_up"]  # the models ride in round 1's traffic
    assert first["bytes_up"] == sum(c["up"] for c in first["clients_bytes"].values())
    assert "prepare_seconds" in first and all("prepare_seconds" not in r for r in later)
    for row in later:
        assert row["cost/client_diffusion_seconds"] == row["cost/upload_bytes"] == 0.0
        assert row["cost/sampling_seconds"] == 0.0
    for row in rows:
        assert row["server/fedddpm/fired"] == 1.0 and row["cost/correction_seconds"] > 0
    for key in (f"cost/{name}" for name in COSTS):
        assert summary[key] == pytest.approx(sum(r[key] for r in rows))
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert (run / "checkpoints" / "prepared.pt").exists()


def test_fedddpm_plus_logs_the_rounds_where_it_fired(tmp_path: Path) -> None:
    overrides = [*PLUS, f"run_dir={tmp_path / 'run'}", "rounds=4", "algorithm.server_steps.fedddpm.window=1"]
    train(compose([*overrides, "algorithm.server_steps.fedddpm.min_delta=1000"]))  # every window is slow
    rows = records(tmp_path / "run")
    fired = [r["server/fedddpm/fired"] for r in rows]
    # W=1: the first window is complete after round 2's evaluation -> fires in round 3; one-shot, so
    # round 4 (a plateau too) does not fire
    assert fired == [0.0, 0.0, 1.0, 0.0]
    assert [r["cost/correction_seconds"] > 0 for r in rows] == [False, False, True, False]
    state = load_torch(tmp_path / "run" / "checkpoints" / "last.pt")["server"]["fedddpm"]
    assert state["fired_rounds"] == [3]


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    whole = train(compose([*PLUS, f"run_dir={tmp_path / 'whole'}", "rounds=4"]))
    part = [*PLUS, f"run_dir={tmp_path / 'part'}"]
    train(compose([*part, "rounds=2"]))
    resumed = train(compose([*part, "rounds=4", "resume=true"]))
    assert timeless(resumed) == timeless(whole)
    ours, theirs = records(tmp_path / "part"), records(tmp_path / "whole")
    assert [timeless(r) for r in ours] == [timeless(r) for r in theirs]


def test_a_run_interrupted_in_round_1_reuses_the_prepare_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[Path, dict[str, Any]]
) -> None:
    whole_dir, whole = reference
    cut = [*FEDDDPM, f"run_dir={tmp_path / 'cut'}"]
    Run(compose(cut))._prepare()  # as if killed in round 1, after the prepare stage was saved

    def no_retraining(*args: object, **kwargs: object) -> None:
        raise AssertionError("a resumed run trained a client diffusion model again")

    monkeypatch.setattr(ClassDiffusionTask, "run", no_retraining)
    resumed = train(compose([*cut, "resume=true"]))
    assert timeless(resumed) == timeless(whole)
    uploaded = [records(run)[0]["cost/upload_bytes"] for run in (tmp_path / "cut", whole_dir)]
    assert uploaded[0] == uploaded[1] > 0


def test_the_prepare_stage_rides_flower_messages_and_matches_the_embedded_run(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    embedded_dir, embedded = reference
    grid = LocalGrid(partitions(2))
    flower = run_on_grid([*FEDDDPM, f"run_dir={tmp_path / 'flower'}"], grid)
    assert timeless(flower) == timeless(embedded)
    prints = [
        load_torch(run / "checkpoints" / "prepared.pt")["server"]["fedddpm"]["fingerprint"]
        for run in (embedded_dir, tmp_path / "flower")
    ]
    assert prints[0] == prints[1]
    assert any(m.metadata.group_id == "0" for m in grid.sent)  # the prepare stage went out as round 0
