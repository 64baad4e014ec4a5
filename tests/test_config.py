"""Every registered component builds from its generated config; presets compose."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmfed.cli import REPO_CONFIGS, compose
from mmfed.config import instantiate, node_for, registered
from mmfed.config_schema import import_components

NEEDS_FILES = {
    ("model/image_encoder", "open_clip"),
    ("model/text_encoder", "open_clip"),
    ("model/text_encoder", "hf"),
}  # built from tiny local models in tests/models


def _entries() -> list[tuple[str, str]]:
    import_components()  # every module that registers (a composition reads config_schema.json instead)
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


DEFERRED_CASES = [
    [],
    ["algorithm=fedafd"],
    ["experiment=[smoke,fedddpm]", "partition=iid"],
    ["experiment=[compare,feddifrc]", "model/text_encoder=gru", "training.lr=0.5"],
]


def test_deferred_structured_configs_compose_as_eagerly_stored_ones() -> None:
    """`register` puts a `_DeferredNode` into Hydra's ConfigStore (built on first read); stored the
    ordinary way (`ConfigStore.store`, built at once), every case composes to the same config and a
    wrong value fails with the same line."""
    from hydra.core.config_store import ConfigStore

    from mmfed.config import REGISTRY, ConfigError, _DeferredNode

    def outcomes() -> list[str]:
        texts = [OmegaConf.to_yaml(compose(case)) for case in DEFERRED_CASES]
        with pytest.raises(ConfigError) as error:
            compose(["training.lr=fast"])
        return [*texts, str(error.value)]

    deferred = outcomes()
    store = ConfigStore.instance()
    kept = {(g, n): store._load(f"{g}/{n}.yaml") for g, names in REGISTRY.items() for n in names}
    assert all(isinstance(node, _DeferredNode) for node in kept.values())
    try:
        for (group, name), node in kept.items():
            store.store(group=group, name=name, node=node_for(node._target))
        eager = outcomes()
    finally:
        for (group, name), node in kept.items():
            store._open(group)[f"{name}.yaml"] = node
    assert deferred == eager


def test_a_composition_builds_only_the_options_it_selects() -> None:
    from hydra.core.config_store import ConfigStore

    from mmfed.config import REGISTRY

    store = ConfigStore.instance()
    nodes = [store._load(f"{g}/{n}.yaml") for g, names in REGISTRY.items() for n in names]
    for node in nodes:  # as in a fresh process (earlier tests here composed other options)
        node._built.clear()
    compose(["experiment=smoke"])
    built = {f"{node.group}/{node.name}" for node in nodes if node._built}
    assert {"partition/dirichlet.yaml", "server_step/fedavg.yaml"} <= built
    assert "model/image_encoder/open_clip.yaml" not in built and len(built) < len(nodes) / 2
