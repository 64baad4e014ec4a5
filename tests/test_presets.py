"""Every preset in configs/experiment/ (1) composes with every encoder and partition option and
(2) composes the loss terms and server steps of the method its name and comment say.

(1) A preset must not pin keys that belong to one choice of a group (e.g. `width` of the small
transformer, `alpha` of Dirichlet): it selects group options or a size (size=tiny, whose per-choice
values live in configs/sized/), so `experiment=X model/text_encoder=hf partition=iid` composes.
Every option of each group is composed at least once with every preset (4 compositions per preset
cover the 3 image encoders, 4 text encoders and the partitions; composition only, no building).

(2) The method table below names, per preset, the registered loss terms that must be active
(weight > 0), those that must not be, the server steps and client tasks, and the settings that
make the method (e.g. CreamFL's ensemble weighting). A new preset without a row fails.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any

import pytest
from omegaconf import DictConfig

from mmfed.cli import compose, config_dir
from mmfed.config import registered
from mmfed.config_schema import import_components

import_components()  # the registered classes (a composition reads config_schema.json, importing none)
CONFIGS = config_dir(None)
PRESETS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


GROUPS = ("model/image_encoder", "model/text_encoder", "partition")


@functools.cache
def _choices(group: str) -> tuple[str, ...]:
    """A group's choices: its registered structured configs (YAML options build one of them)."""
    return tuple(sorted(registered(group)))


@functools.cache
def _covering_overrides() -> tuple[tuple[str, ...], ...]:
    """Few override lists in which every choice of every group appears at least once."""
    columns = [[f"{group}={choice}" for choice in _choices(group)] for group in GROUPS]
    return tuple(tuple(o for o in row if o is not None) for row in zip_longest(*columns))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_encoder_and_partition(preset: str) -> None:
    for overrides in _covering_overrides():
        cfg = compose([f"experiment={preset}", *overrides])
        for override in overrides:  # the command line's choice wins over the preset's
            group, _, choice = override.partition("=")
            node = cfg.model[group.split("/")[1]] if group.startswith("model/") else cfg[group]
            assert node._target_.rsplit(".", 1)[-1] == registered(group)[choice].__name__, override


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIGS / "partition").glob("*.yaml")))
def test_partition_options_of_presets_compose_with_a_preset(option: str) -> None:
    cfg = compose(["experiment=smoke", f"partition={option}"])
    assert cfg.partition._target_.endswith("Partitioner")


def test_the_issue_examples_compose_and_keep_the_tiny_sizes() -> None:
    hf = compose(["experiment=smoke", "model/text_encoder=hf"])
    assert "width" not in hf.model.text_encoder and hf.model.image_encoder.width == 8
    iid = compose(["experiment=smoke", "partition=iid"])
    assert "min_partition_size" not in iid.partition
    smoke = compose(["experiment=smoke"])
    assert smoke.model.text_encoder.width == 16 and smoke.model.text_encoder.layers == 1
    assert smoke.partition.min_partition_size == 5
    assert compose(["experiment=smoke", "model/image_encoder=vit"]).model.image_encoder.width == 16
    assert compose(["experiment=smoke", "model/text_encoder=gru"]).model.text_encoder.width == 16
    assert compose([]).model.image_encoder.width == 32  # no preset: the constructor's sizes
    assert compose(["experiment=feddifrc_cifar10_nid1_a005"]).partition.alpha == 0.05
    assert compose(["experiment=fedafd_paper"]).partition.alpha == 0.1


# ----------------------------------------------------------------------------- the method table
@dataclass(frozen=True)
class Method:
    terms: frozenset[str]  # registered loss terms that must be active (weight > 0)
    steps: frozenset[str]  # registered server steps that must be present
    exact: bool = False  # no other active term and no other step (the FedAvg family)
    inactive: frozenset[str] = frozenset()  # registered terms that must be absent or weight 0
    tasks: frozenset[str] = frozenset()  # registered client tasks that must be there (prepare stage)
    settings: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    any_step: frozenset[str] = frozenset()  # at least one of these steps


TASK = frozenset({"image_ce", "text_ce", "contrastive"})
FEDAVG = Method(TASK, frozenset({"fedavg"}), exact=True)
CREAMFL = Method(
    TASK | {"creamfl"},
    frozenset({"ensemble_distill"}),
    settings={"algorithm.server_steps.distill.weighting": "creamfl"},
)
FEDAFD_SETTINGS = {"algorithm.server_steps.distill.weighting": "similarity", "model.fusion": True}
FEDAFD = Method(TASK | {"adversarial_alignment"}, frozenset({"ensemble_distill"}), settings=FEDAFD_SETTINGS)
FEDDDPM = Method(
    TASK,
    frozenset({"fedavg", "aux_correction"}),
    tasks=frozenset({"class_diffusion"}),
    settings={"algorithm.server_steps.fedddpm.trigger": "always"},
)
FEDDDPM_PLUS = Method(
    TASK,
    frozenset({"fedavg", "aux_correction"}),
    tasks=frozenset({"class_diffusion"}),
    settings={
        "algorithm.server_steps.fedddpm.trigger": "plateau",
        "algorithm.server_steps.fedddpm.rearm": False,
    },
)
# FedDifRC's teacher-to-latent maps: fitted on public pairs (teacher_space) or, on classification
# data without public pairs, from the clients (client_teacher_space, helper difrc's branch).
TEACHER_MAPS = frozenset({"teacher_space", "client_teacher_space"})
FEDDIFRC = Method(TASK | {"tdcl", "ndcr"}, frozenset({"fedavg"}), any_step=TEACHER_MAPS)

# preset -> (what it is composed with, the method its name and comment say)
TABLE: dict[str, tuple[tuple[str, ...], Method]] = {
    "default": ((), Method(TASK, frozenset({"fedavg"}), exact=True, settings={"training.precision": "auto"})),
    "smoke": ((), FEDAVG),  # size only
    "compare": ((), FEDAVG),  # size only; the table picks algorithm=...
    "testbed": ((), FEDAVG),  # world and size only; eval/evidence.py adds the method's preset
    "creamfl_real": ((), CREAMFL),  # CreamFL on its own data (algorithm=fedafd: FedAFD on it)
    "creamfl": ((), CREAMFL),
    "fedafd": ((), FEDAFD),
    "fedafd_paper": ((), FEDAFD),
    "fedafd_uniform": (
        (),
        Method(
            FEDAFD.terms,
            FEDAFD.steps,
            settings={**FEDAFD_SETTINGS, "algorithm.server_steps.distill.weighting": "uniform"},
        ),
    ),
    "fedafd_no_adversarial": (
        (),
        Method(TASK, FEDAFD.steps, inactive=frozenset({"adversarial_alignment"}), settings=FEDAFD_SETTINGS),
    ),
    "fedafd_no_fusion": (
        (),
        Method(
            FEDAFD.terms,
            FEDAFD.steps,
            settings={**FEDAFD_SETTINGS, "model.fusion": False},
        ),
    ),
    "fedddpm": ((), FEDDDPM),
    "fedddpm_plus": ((), FEDDDPM_PLUS),
    "fedddpm_tiny": (("fedddpm",), FEDDDPM),  # sizes for fedddpm / fedddpm_plus
    "feddifrc": ((), FEDDIFRC),
    "feddifrc_tdcl": (
        (),
        Method(TASK | {"tdcl"}, frozenset({"fedavg"}), inactive=frozenset({"ndcr"}), any_step=TEACHER_MAPS),
    ),
    "feddifrc_ndcr": (
        (),
        Method(TASK | {"ndcr"}, frozenset({"fedavg"}), inactive=frozenset({"tdcl"}), any_step=TEACHER_MAPS),
    ),
    "feddifrc_cifar10_nid1_a005": ((), FEDDIFRC),
    "feddifrc_cifar10_nid1_a02": ((), FEDDIFRC),
    "feddifrc_cifar10_nid1_a05": ((), FEDDIFRC),
    "feddifrc_cifar10_nid2": ((), FEDDIFRC),
    "semanticfl": ((), Method(TASK | {"semantic_consistency"}, frozenset({"semantic_anchors", "fedavg"}))),
}


def test_every_preset_has_a_row_in_the_method_table() -> None:
    assert sorted(TABLE) == PRESETS


def _names(nodes: DictConfig, group: str) -> dict[str, DictConfig]:
    """Registered name of each configured component (by its _target_) -> its config."""
    by_target = {f"{cls.__module__}.{cls.__qualname__}": name for name, cls in registered(group).items()}
    found: dict[str, DictConfig] = {}
    for key, node in (nodes or {}).items():
        target = node.get("_target_")
        assert target in by_target, f"{group} {key}: {target!r} is not a registered {group}"
        found[by_target[target]] = node
    return found


def _setting(cfg: DictConfig, dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


# The CIFAR-10 presets run FedDifRC only with helper difrc's change (a client-side teacher-map
# step, since CIFAR-10 has no public pairs). Until that step is registered they compose FedAvg: the
# cases are expected to fail; once `client_teacher_space` exists the marker is off by itself.
@contextmanager
def _difrc_pending(preset: str) -> Iterator[None]:
    pending = preset.startswith("feddifrc_cifar10_") and "client_teacher_space" not in registered(
        "server_step"
    )
    if pending:
        with pytest.raises(AssertionError):
            yield
        pytest.xfail("FedDifRC CIFAR-10 presets run FedAvg until helper difrc's client_teacher_space lands")
    else:
        yield


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_the_method_it_names(preset: str) -> None:
    if preset not in TABLE:
        pytest.fail(f"preset {preset!r} has no row in the method table")
    base, method = TABLE[preset]
    cfg = compose([f"experiment=[{','.join([*base, preset])}]"])
    with _difrc_pending(preset):
        terms = _names(cfg.algorithm.loss_terms, "loss_term")
        active = {name for name, node in terms.items() if node.get("weight", 1.0) > 0}
        steps = set(_names(cfg.algorithm.server_steps, "server_step"))
        tasks = set(_names(cfg.algorithm.get("client_tasks"), "client_task"))
        assert method.terms <= active, f"missing loss terms {sorted(method.terms - active)}"
        assert not method.inactive & active, f"terms that must be off: {sorted(method.inactive & active)}"
        assert method.steps <= steps, f"missing server steps {sorted(method.steps - steps)}"
        if method.any_step:
            assert method.any_step & steps, f"none of the server steps {sorted(method.any_step)}"
        assert method.tasks <= tasks, f"client tasks {sorted(tasks)}, expected {sorted(method.tasks)}"
        if method.exact:
            exact = (active, steps, tasks) == (method.terms, method.steps, method.tasks)
            assert exact, (sorted(active), sorted(steps), sorted(tasks))
        for key, value in method.settings.items():
            assert _setting(cfg, key) == value, key


def test_the_table_can_fail() -> None:
    """A preset that runs FedAvg does not pass as FedDifRC, CreamFL or FedDDPM+."""
    cfg = compose(["experiment=smoke"])
    terms = set(_names(cfg.algorithm.loss_terms, "loss_term"))
    assert not FEDDIFRC.terms <= terms and not CREAMFL.terms <= terms
    plus = compose(["experiment=fedddpm"])
    assert (
        _setting(plus, "algorithm.server_steps.fedddpm.trigger")
        != FEDDDPM_PLUS.settings["algorithm.server_steps.fedddpm.trigger"]
    )
