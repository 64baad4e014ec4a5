"""Diffusion-guided federations end to end with a tiny random SD-architecture teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmfed.cli import compose, main
from mmfed.federation.run import train
from mmfed.teacher.features import TeacherFeatures
from mmfed.teacher.model import TeacherSettings
from mmfed.teacher.tiny import build_tiny_sd
from tests.data.fixtures import write_cifar10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("teacher") / "sd", seed=0, sample_size=16)


def overrides(teacher: Path, cache: Path, run: Path) -> list[str]:
    return [
        "quiet=true",
        f"run_dir={run}",
        f"teacher.model={teacher}",
        f"teacher.cache_dir={cache}",
        "data.n_train=120",
        "data.n_public=24",
        "data.n_val=20",
        "data.n_test=20",
    ]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_feddifrc_with_a_warm_cache_runs_no_teacher_pass(teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold_run = tmp_path / "cold"
    summary = train(compose(["experiment=[smoke,feddifrc]", *overrides(teacher, cache, cold_run)]))
    cold = records(cold_run)
    # round 1 fits the maps on public data and computes every client sample under every class prompt
    assert cold[0]["server/teacher_space/teacher/forward_batches"] > 0
    assert cold[0]["server/teacher_space/fit_seconds"] > 0
    assert "server/teacher_space/fit_seconds" not in cold[1]  # fitted once, never refitted
    for name in ("tdcl_image", "tdcl_text", "ndcr_image", "ndcr_text"):
        assert any(key.endswith(f"/{name}") for key in cold[0]), name
    assert "test/retrieval/rsum" in summary
    state = torch.load(cold_run / "checkpoints" / "last.pt", weights_only=False)
    assert state["server"]["teacher_space"]["text_map"]["matrix"].shape[1] == 16  # smoke: D = 16

    # `mmfed teacher extract` fills the rest (every caption of every row, not only those drawn so far);
    # then a whole run costs no teacher forward pass at all
    for split in ("train", "public"):
        extract = ["teacher", "extract", "experiment=smoke", *overrides(teacher, cache, tmp_path / "x")]
        assert main([*extract, f"split={split}", "features=text,image,image_classes,prompts"]) == 0
    warm_run = tmp_path / "warm"
    train(compose(["experiment=[smoke,feddifrc]", *overrides(teacher, cache, warm_run)]))
    for record in records(warm_run):
        assert record["server/teacher_space/teacher/forward_batches"] == 0
        assert (
            record["server/teacher_space/teacher/misses"] == 0
            and record["server/teacher_space/teacher/hits"] > 0
        )


def test_semanticfl_clients_need_no_teacher(teacher: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose(["experiment=[smoke,semanticfl]", *overrides(teacher, tmp_path / "cache", run)]))
    first, second = records(run)
    names = {key.rsplit("/", 1)[-1] for key in first}
    assert {"semantic_class_image", "semantic_public_image", "semantic_public_text"} <= names
    # anchors of round 2's public sample come from the cache filled in round 1 (same public split)
    assert second["server/anchors/teacher/forward_batches"] == 0
    # the paper's image representation: U-Net decoder features and VAE latents, both in one map
    image_map = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["server"]["anchors"][
        "image_map"
    ]
    settings = TeacherSettings(model=str(teacher))
    unet = sum(TeacherFeatures(settings).block_widths())
    latents = 4 * 16 * 16  # 4 latent channels at the tiny teacher's sample_size 16
    assert image_map["matrix"].shape[0] == unet + latents
    rows = image_map["matrix"].abs().sum(dim=1)
    assert rows[:unet].sum() > 0 and rows[unet:].sum() > 0  # both sources feed the anchors


def test_tdcl_conditioned_mode_recomputes_with_gradients(teacher: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = compose(
        [
            "experiment=[smoke,feddifrc_tdcl]",
            *overrides(teacher, tmp_path / "cache", run),
            "algorithm.loss_terms.tdcl.mode=conditioned",
            "algorithm.loss_terms.tdcl.negatives=2",
            "layout.text=0",
            "rounds=1",
            "training.max_steps=2",
        ]
    )
    train(cfg)
    (record,) = records(run)
    assert any(key.endswith("/tdcl_image") for key in record)
    assert record["server/teacher_space/teacher/forward_batches"] > 0


def test_a_resumed_run_loads_the_maps_instead_of_refitting(teacher: Path, tmp_path: Path) -> None:
    base = ["experiment=[smoke,feddifrc_ndcr]", *overrides(teacher, tmp_path / "cache", tmp_path / "run")]
    train(compose([*base, "rounds=1"]))
    fitted = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["server"]
    train(compose([*base, "rounds=2", "resume=true"]))
    (_, second) = records(tmp_path / "run")
    assert "server/teacher_space/fit_seconds" not in second  # loaded from the checkpoint, not refitted
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["server"]
    assert torch.equal(
        kept["teacher_space"]["image_map"]["matrix"], fitted["teacher_space"]["image_map"]["matrix"]
    )


@pytest.mark.parametrize("preset", ["feddifrc_cifar10_nid1_a05", "feddifrc_cifar10_nid2"])
def test_feddifrc_cifar10_presets_run_feddifrc_without_public_data(
    teacher: Path, tmp_path: Path, preset: str
) -> None:
    """CIFAR-10 has no public split: the clients send per-layer moments of their own images' teacher
    features once (prepare stage), the server fits the per-layer PCA from their sum, then TDCL and NDCR
    train on top of FedAvg. The maps are fitted once: round 2 and the final checkpoint hold the
    prepared ones."""
    write_cifar10(tmp_path / "cifar10", per_batch=12, n_test=20)
    run = tmp_path / "run"
    cfg = compose(
        [
            f"experiment={preset}",
            "quiet=true",
            f"run_dir={run}",
            f"teacher.model={teacher}",
            f"teacher.cache_dir={tmp_path / 'cache'}",
            f"data.root={tmp_path / 'cifar10'}",
            "data.hub_id=null",
            "model.embed_dim=16",
            "layout.image=4",
            "clients_per_round=2",
            "rounds=2",
            "training.max_steps=2",
        ]
    )
    assert set(cfg.algorithm.loss_terms) >= {"tdcl", "ndcr"}
    assert cfg.algorithm.server_steps.teacher_space._target_.endswith("ClientTeacherSpace")
    summary = train(cfg)
    first, second = records(run)
    assert first["prepare/teacher_space/clients"] == 4  # every image client, not only the sampled ones
    assert first["prepare/teacher_space/rows"] > 0 and "prepare/teacher_space/fit_seconds" in first
    assert not any("fit_seconds" in key for key in second)
    for name in ("tdcl_image", "ndcr_image"):
        assert first[f"train/{name}"] > 0 and second[f"train/{name}"] > 0
    assert "test/classification/image/acc" in summary
    prepared = torch.load(run / "checkpoints" / "prepared.pt", weights_only=False)["server"]["teacher_space"]
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["server"]["teacher_space"]
    image_map = final["image_map"]
    assert torch.equal(image_map["matrix"], prepared["image_map"]["matrix"])
    # per-layer PCA: D = 16 split 8 / 4 / 4 over the three decoder layers, a block-diagonal matrix
    assert image_map["info"]["components"] == [8, 4, 4]
    widths = image_map["info"]["widths"]
    row = col = 0
    for width, count in zip(widths, [8, 4, 4], strict=True):
        block = image_map["matrix"][row : row + width]
        assert torch.count_nonzero(block[:, :col]) == 0 and torch.count_nonzero(block[:, col + count :]) == 0
        row, col = row + width, col + count
    assert final["text_map"]["matrix"].shape[1] == 16  # the class prompts' PCA, padded to D
