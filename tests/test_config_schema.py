"""`mmfed/config_schema.json`: the registry as data, so that `mmfed config` imports no torch.

The committed file must be what the classes make of themselves (else: regenerate it, the failure
says how), composing through it must give exactly what composing through the classes gives, a
stale file must send the composition back to the classes, and composing + validating (the default
config, presets, algorithms, and the errors) must not import torch or any component module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

import mmfed.config_schema as config_schema
from mmfed.cli import compose
from mmfed.config import REGISTRY, ConfigError, _DeferredNode, node_for
from mmfed.config_schema import COMMAND, SCHEMA_FILE, dataclass_for, entry_for, import_components

ROOT = Path(__file__).resolve().parent.parent
# modules a composition must not import: torch, and the components' (torch-importing) modules
HEAVY = ("torch", "mmfed.algorithms", "mmfed.models.encoders", "mmfed.federation.client",
         "mmfed.evaluation", "mmfed.teacher.model", "mmfed.data.sources", "mmfed.data.synthetic",
         "mmfed.data.samples")  # fmt: skip


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def _python(script: str) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter (imports are what is tested), from the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("MMFED_PLUGINS", "MMFED_CONFIG_DIR")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=ROOT, env=env
    )


def test_the_committed_schema_is_what_the_classes_make() -> None:
    """Fails after an edit of a registered class's module (or its bases', `mmfed/config.py`) until
    the file is regenerated: the hashes are part of the file. Fresh interpreter: nothing but the
    component modules has registered there."""
    result = _python("import sys; from mmfed.config_schema import main; sys.exit(main([]))")
    assert result.returncode == 0, f"{SCHEMA_FILE.name} is stale: run `{COMMAND}` ({result.stderr.strip()})"


def _describe(node: Any) -> Any:
    """A node's values, types and flags (what composing, merging and checking values read)."""
    meta = node._metadata
    kind = {"ref_type": str(meta.ref_type), "optional": meta.optional, "class": type(node).__name__}
    if isinstance(node, DictConfig):
        kind["type"] = getattr(OmegaConf.get_type(node), "__name__", None)  # the dataclass's name
        kind["value"] = None if node._is_none() else {key: _describe(node._get_node(key)) for key in node}
    elif isinstance(node, ListConfig):
        kind["element_type"] = str(meta.element_type)
        kind["value"] = OmegaConf.to_container(node)
    else:
        kind["value"] = node._value()
    return kind


def test_every_entry_builds_the_node_that_node_for_builds() -> None:
    import_components()
    schema = _schema()
    assert {(e["group"], e["name"]) for e in schema["components"]} <= {
        (g, n) for g, names in REGISTRY.items() for n in names
    }
    for entry in schema["components"]:
        cls = REGISTRY[entry["group"]][entry["name"]]
        where = f"{entry['group']}/{entry['name']}: regenerate with {COMMAND}"
        assert entry == entry_for(entry["group"], entry["name"], cls), where
        from_schema = OmegaConf.structured(dataclass_for(entry))
        from_class = OmegaConf.structured(node_for(cls))
        assert _describe(from_schema) == _describe(from_class), where


def test_types_round_trip_as_text() -> None:
    for text in ("int", "float", "str", "bool", "Any", "Optional[int]", "list[int]", "list[Any]",
                 "Optional[list[str]]", "dict[str, Any]", "Optional[dict[str, Any]]"):  # fmt: skip
        assert config_schema.type_text(config_schema.parse_type(text)) == text
    with pytest.raises(ValueError, match="unknown field type 'tuple\\[int\\]'"):
        config_schema.parse_type("tuple[int]")


def test_a_default_that_is_not_data_is_refused() -> None:
    class Odd:
        def __init__(self, where: Path = Path("x")) -> None:
            pass

    with pytest.raises(ValueError, match="the default where=.* is not plain data"):
        entry_for("loss_term", "odd", Odd)


def test_a_stale_source_is_named(tmp_path: Path) -> None:
    schema = _schema()
    relative = "mmfed/data/partition.py"
    copy = tmp_path / relative
    copy.parent.mkdir(parents=True)
    copy.write_bytes((ROOT / relative).read_bytes())
    schema["sources"] = {relative: schema["sources"][relative]}
    assert config_schema.stale_sources(schema, tmp_path) == []
    copy.write_bytes(copy.read_bytes() + b"# an edit\n")
    assert config_schema.stale_sources(schema, tmp_path) == [relative]
    copy.unlink()
    assert config_schema.stale_sources(schema, tmp_path) == [relative]


@pytest.fixture
def uncached() -> Any:
    """The schema's per-process caches, cleared before and after (the test changes what they read)."""
    caches = (config_schema.fresh_schema, config_schema.register_schema, config_schema._checks)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_a_stale_schema_sends_the_composition_to_the_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uncached: None
) -> None:
    from mmfed import composition

    schema = _schema()
    first = next(iter(schema["sources"]))
    schema["sources"][first] = "0" * 64  # as if the file had been edited since
    stale = tmp_path / "config_schema.json"
    stale.write_text(json.dumps(schema))
    monkeypatch.setattr(config_schema, "SCHEMA_FILE", stale)
    imported: list[bool] = []
    monkeypatch.setattr(config_schema, "import_components", lambda: imported.append(True))
    composition.register_components()
    assert imported == [True]
    assert config_schema.check_target("mmfed.federation.client.LocalTraining") == (
        "mmfed.federation.client.LocalTraining"
    )  # the class itself checks (its module is imported anyway)
    monkeypatch.setattr(config_schema, "SCHEMA_FILE", SCHEMA_FILE)
    for cache in (config_schema.fresh_schema, config_schema.register_schema, config_schema._checks):
        cache.cache_clear()
    imported.clear()
    composition.register_components()
    assert imported == []  # fresh: nothing imported
    base = config_schema.check_target("mmfed.federation.client.LocalTraining")
    assert base == "mmfed.settings.LocalTrainingBase"


# Equal nodes (above) compose equally; these cases check it end to end on presets that reach every
# group (the README's evidence runs, the real-data wiring, the guided methods) at ~0.2 s per compose.
CASES = [
    [],
    *[[f"experiment={p}"] for p in ("smoke", "testbed", "compare", "creamfl_real", "fedafd", "feddifrc")],
    *[[f"experiment={p}"] for p in ("fedddpm_plus", "semanticfl")],
    *[[f"algorithm={a}"] for a in ("fedyogi", "moon", "fedddpm")],
    ["experiment=[smoke,fedddpm]", "partition=iid"],
    ["partition=shards", "model/text_encoder=gru", "model/image_encoder=vit", "model/lora=default"],
    ["+partition@partition_by_kind.image=shards"],
]
BAD = [
    ["partition.alpah=1"],
    ["partition.alpha=-1"],
    ["training.lr=fast"],
    ["training.optimizer=lbfgs"],
    ["evaluation.ks=[0]"],
    ["teacher.dtype=float16"],
    ["layout.image=-1"],
    ["flower.num_cpus=0"],
    ["device=gpu"],
    ["model.embed_dim=0"],
    ["partition=shards", "partition.classes_per_client=0"],
    ["+partition@partition_by_kind.image=shards", "partition_by_kind.image.classes_per_client=0"],
    ["algorithm=fedprox", "algorithm.loss_terms.prox.mu=high"],
]


def _outcomes() -> list[str]:
    texts = [OmegaConf.to_yaml(compose(case)) for case in CASES]
    for case in BAD:
        with pytest.raises(ConfigError) as error:
            compose(case)
        texts.append(str(error.value))
    return texts


def test_composing_through_the_schema_gives_what_the_classes_give() -> None:
    """Every preset and algorithm, some options, and the errors: the same text either way (this
    process has the classes; their ConfigStore nodes are swapped for the schema's, then restored)."""
    from hydra.core.config_store import ConfigStore

    import_components()
    through_classes = _outcomes()
    store = ConfigStore.instance()
    kept = {}
    for entry in _schema()["components"]:
        group, name = entry["group"], entry["name"]
        kept[group, name] = store._load(f"{group}/{name}.yaml")
        built = _DeferredNode(f"{name}.yaml", group, build=lambda entry=entry: dataclass_for(entry))
        store._open(group)[f"{name}.yaml"] = built
    try:
        through_schema = _outcomes()
    finally:
        for (group, name), node in kept.items():
            store._open(group)[f"{name}.yaml"] = node
    assert through_schema == through_classes


NO_TORCH = """
    import sys
    from mmfed.composition import compose
    from mmfed.config import ConfigError
    from mmfed.cli import main

    for case in {cases!r}:
        compose(case)
    errors = []
    for case in {bad!r}:
        try:
            compose(case)
        except ConfigError as error:
            errors.append(str(error))
    assert len(errors) == {n_bad}, errors
    assert main(["config", "algorithm=fedddpm"]) == 0
    assert main(["config", "partition.alpah=1"]) == 2
    assert main(["train", "partition.alpha=-1"]) == 2  # a train config error, before any torch import
    heavy = sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith({heavy!r}))
    print("HEAVY", heavy)
"""


def test_composing_and_validating_import_no_torch() -> None:
    cases = [[], ["algorithm=fedddpm"], ["experiment=testbed"], ["experiment=[smoke,fedddpm]"],
             ["experiment=creamfl_real"], ["partition=shards", "device=cuda:1"]]  # fmt: skip
    script = NO_TORCH.format(cases=cases, bad=BAD, n_bad=len(BAD), heavy=HEAVY[1:])
    result = _python(script)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout


def test_the_settings_groups_are_checked_by_torch_free_classes() -> None:
    """The classes `check_config` builds (per the schema) import no torch, for every settings group."""
    from mmfed.validation import CHEAP_GROUPS

    checks = sorted({e["check"] for e in _schema()["components"] if e["group"] in CHEAP_GROUPS})
    assert "mmfed.settings.LocalTrainingBase" in checks and "mmfed.settings.TeacherSettingsBase" in checks
    script = f"""
        import importlib, sys
        for path in {checks!r}:
            module, _, name = path.rpartition(".")
            getattr(importlib.import_module(module), name)
        print("TORCH", "torch" in sys.modules)
    """
    result = _python(script)
    assert result.returncode == 0, result.stderr
    assert "TORCH False" in result.stdout
