"""Every registered component builds from its generated config; presets compose."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmfed.cli import REPO_CONFIGS, compose
from mmfed.config import instantiate, node_for, registered

NEEDS_FILES = {
    ("model/image_encoder", "open_clip"),
    ("model/text_encoder", "open_clip"),
    ("model/text_encoder", "hf"),
}  # built from tiny local models in tests/models


def _entries() -> list[tuple[str, str]]:
    compose([])  # imports every module that registers
    groups = (
        "data",
        "partition",
        "layout",
        "training",
        "evaluation",
        "loss_term",
        "server_step",
        "model/image_encoder",
        "model/text_encoder",
    )
    return [(g, n) for g in groups for n in registered(g) if (g, n) not in NEEDS_FILES]


@pytest.mark.parametrize(("group", "name"), _entries())
def test_every_registered_component_builds_from_its_default_config(group: str, name: str) -> None:
    cls = registered(group)[name]
    cfg = OmegaConf.structured(node_for(cls))
    assert isinstance(instantiate(cfg, group), cls)


def test_defaults_live_in_the_signature() -> None:
    class Example:
        def __init__(self, alpha: float = 0.5, ks: tuple[int, ...] = (1, 5), name: str | None = None) -> None:
            pass

    cfg = OmegaConf.structured(node_for(Example))
    assert (cfg.alpha, list(cfg.ks), cfg.name) == (0.5, [1, 5], None)
    with pytest.raises(Exception, match="could not be converted to Float"):
        cfg.alpha = "high"


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(REPO_CONFIGS) / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset: str) -> None:
    cfg = compose([f"experiment={preset}"])
    assert cfg.algorithm.server_steps
