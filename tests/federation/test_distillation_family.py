"""The representation-distillation family end to end on a tiny heterogeneous federation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfed.cli import compose
from mmfed.federation.run import train

pytestmark = pytest.mark.slow
TINY = ["quiet=true", "data.n_public=48", "layout.image=2", "layout.text=2", "layout.paired=1", "rounds=2"]


def test_heterogeneous_fedafd_exchanges_features_not_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = compose(
        [
            "experiment=[smoke,fedafd]",
            *TINY,
            f"run_dir={run}",
            "algorithm.server_steps.distill.public_per_round=32",
        ]
    )
    summary = train(cfg)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        # image features from 2 image + 1 paired client, text from 2 text + 1 paired: each once
        assert record["server/distill/image/clients"] == 3.0
        assert record["server/distill/text/clients"] == 3.0
        assert "train/image/adv_intra_image" in record and "train/text/adv_cross_text" in record
        assert record["server/distill/distill_image"] > 0
    # Personal parts persist: image-1 runs a ViT (patch embedding), image-0 a CNN; both keep fusion.
    vit_state = torch.load(next((run / "client_state" / "image-1").glob("round_*.pt")), weights_only=False)
    cnn_state = torch.load(next((run / "client_state" / "image-0").glob("round_*.pt")), weights_only=False)
    assert any("patches" in k for k in vit_state["model"]) and not any(
        "patches" in k for k in cnn_state["model"]
    )
    assert any(k.startswith("image_fusion/") for k in vit_state["model"])
    assert "discriminators" in vit_state["adversarial"]
    assert not any(k.startswith("reference_") for k in vit_state["model"])  # the frozen copy is not personal
    # The global model has no heads under pure distillation: retrieval only; clients report locally.
    assert "test/retrieval/rsum" in summary and "test/classification/image/acc" not in summary
    assert set(summary["clients"]) == {"image-0", "image-1", "text-0", "text-1", "paired-0"}
    assert "local/image/classification/image/acc/mean" in summary
    assert "local/paired/retrieval/rsum@1/mean" in summary


@pytest.mark.parametrize(
    "preset",
    [
        "algorithm=fedprox",
        "algorithm=moon",
        "experiment=[smoke,creamfl]",
        "experiment=[smoke,fedafd_no_fusion]",
        "experiment=[smoke,fedafd_no_adversarial]",
        "experiment=[smoke,fedafd_uniform]",
    ],
)
def test_every_method_preset_trains(tmp_path: Path, preset: str) -> None:
    overrides = [preset] if preset.startswith("experiment") else ["experiment=smoke", preset]
    summary = train(compose([*overrides, *TINY, "rounds=1", f"run_dir={tmp_path / 'run'}"]))
    assert summary["rounds"] == 1 and "test/retrieval/rsum" in summary and summary["bytes_up"] > 0


def test_moon_keeps_the_previous_local_model_and_prox_logs_its_term(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose(["experiment=smoke", "algorithm=moon", *TINY, f"run_dir={run}"]))
    state = torch.load(next((run / "client_state" / "paired-0").glob("round_*.pt")), weights_only=False)
    assert "previous" in state["moon"] and "model" not in state  # FedAvg family: no personal parts
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/paired/moon"] > 0 for r in records)


def test_fedafd_resumed_after_a_round_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """Personal models, fusion and discriminators come back from the client state exactly (round 2
    after a resume trains from what round 1 saved: 2 + 1 + 1 rounds, not 3 + 2 + 1)."""
    base = ["experiment=[smoke,fedafd]", *TINY, "algorithm.server_steps.distill.public_per_round=32"]
    whole = train(compose([*base, "rounds=2", f"run_dir={tmp_path / 'whole'}"]))
    train(compose([*base, "rounds=1", f"run_dir={tmp_path / 'split'}"]))
    resumed = train(compose([*base, "rounds=2", "resume=true", f"run_dir={tmp_path / 'split'}"]))
    for summary in (whole, resumed):
        summary.pop("wall_seconds")
    assert resumed == whole
