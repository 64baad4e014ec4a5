"""Structured configs generated from constructor signatures.

Why: a component's typed ``__init__`` signature *is* its config (the diffusers idea). `register`
turns a class into a Hydra structured-config node with the same keys, types and defaults, so
defaults are written once (in the signature), unknown keys are rejected by OmegaConf's struct mode,
and values are type-checked on override. Presets in ``configs/`` then only state what differs.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from hydra.core.config_store import ConfigNode, ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

T = TypeVar("T")

_SCALARS = (int, float, str, bool)
# group -> name -> class, so errors can list what exists and tests can build every entry.
REGISTRY: dict[str, dict[str, type]] = {}


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and what is allowed."""


def _omegaconf_type(annotation: Any) -> Any:
    """Map a Python annotation onto one OmegaConf can validate (others become Any)."""
    if annotation in _SCALARS:
        return annotation
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            mapped = _omegaconf_type(inner[0])
            return Any if mapped is Any else typing.Optional[mapped]  # noqa: UP045 (OmegaConf wants Optional)
        return Any
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and next(iter(kinds)) in _SCALARS else Any
    if origin in (list, tuple, Sequence):
        item = args[0] if args else Any
        mapped = _omegaconf_type(item)
        return list[mapped] if mapped in _SCALARS else list[Any]
    if origin in (dict, Mapping):
        return dict[str, Any]
    return Any


def signature_fields(target: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """``(name, OmegaConf type, default)`` of `target`'s keyword arguments, in order; the default is
    ``inspect.Parameter.empty`` for a required one (`config_schema` stores these as data)."""
    signature = inspect.signature(target)
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    return [
        (name, _omegaconf_type(hints.get(name, Any)), parameter.default)
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def make_node(class_name: str, target_path: str, fields: Sequence[tuple[str, Any, Any]]) -> type:
    """The structured-config dataclass `class_name` with Hydra's ``_target_`` and `fields` (as
    `signature_fields` gives them): one builder for `node_for` and for `config_schema`'s nodes."""
    spec: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target_path))]
    for name, annotation, default in fields:
        if default is inspect.Parameter.empty:
            field = dataclasses.field(default=MISSING)
        elif isinstance(default, (list, tuple, dict)):
            frozen = list(default) if isinstance(default, tuple) else default
            field = dataclasses.field(default_factory=lambda value=frozen: _copy(value))
        else:
            field = dataclasses.field(default=default)
        spec.append((name, annotation, field))
    return dataclasses.make_dataclass(class_name, spec)


def node_for(target: Callable[..., Any], target_path: str | None = None) -> type:
    """A dataclass whose fields are `target`'s keyword arguments, plus Hydra's ``_target_``."""
    path = target_path or f"{target.__module__}.{target.__qualname__}"
    return make_node(f"{target.__name__}Config", path, signature_fields(target))


def _copy(value: Any) -> Any:
    return [*value] if isinstance(value, list) else dict(value)


class _DeferredNode(ConfigNode):
    """A Hydra `ConfigNode` whose structured config is built when Hydra first reads it.

    Why: turning a signature into a dataclass and then into an OmegaConf node costs ~3 ms per
    registered class (~50 of them), a composition reads only the options it selects (Hydra lists a
    group's options by name), and every composition deep-copies the whole ConfigStore
    (`CachingConfigRepository`), built nodes included. The built node is kept in `_built`, one list
    shared by every copy (`__deepcopy__` too), so each class is built at most once per process and
    stays pristine: `ConfigStore.load` hands out a deep copy of it, set on its own shallow copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _DeferredNode:
        return copy.copy(self)  # shares `_built`: nobody mutates a stored node in place

    def __init__(
        self, name: str, group: str, target: type | None = None, build: Callable[[], type] | None = None
    ) -> None:
        """`build` makes the dataclass (`config_schema`'s nodes, no class at hand); default: `node_for`
        of `target`, the registered class."""
        self.name, self.group, self.package, self.provider = name, group, None, None
        self._built: list[DictConfig] = []
        self._target = target
        self._build = build

    @property  # type: ignore[override]
    def node(self) -> DictConfig:
        if not self._built:
            build = self._build or (lambda: node_for(self._target))  # type: ignore[arg-type]
            self._built.append(OmegaConf.structured(build()))
        return self._built[0]

    @node.setter
    def node(self, value: DictConfig) -> None:
        self._built = [value]  # ConfigStore.load sets its deep copy on its own shallow copy only


def store_node(group: str, name: str, node: _DeferredNode) -> None:
    """Put `node` into Hydra's ConfigStore where `ConfigStore.store` would (``repo[group...][name.yaml]``)."""
    folder = ConfigStore.instance().repo
    for part in group.split("/"):
        folder = folder.setdefault(part, {})
    folder[f"{name}.yaml"] = node


def register(group: str, name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make `cls` selectable as ``group=name`` (and buildable with `instantiate`).

    The node goes into Hydra's ConfigStore as `ConfigStore.store` would put it, deferred
    (`_DeferredNode`); `tests/test_config.py` checks it composes exactly as an eagerly stored one.
    A registration replaces the node `config_schema` stored for the same name (they are equal:
    tests/test_config_schema.py)."""

    def decorate(cls: type[T]) -> type[T]:
        REGISTRY.setdefault(group, {})[name] = cls
        store_node(group, name, _DeferredNode(f"{name}.yaml", group, cls))
        return cls

    return decorate


def config_digest(node: Any) -> str:
    """A short stable digest of a config node: ``${digest:${data}}`` names a dataset config in a string
    (e.g. for teacher caches keyed by sample id) without handing the node to `instantiate`."""
    import hashlib
    import json

    text = json.dumps(to_container(node), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


if not OmegaConf.has_resolver("digest"):
    OmegaConf.register_new_resolver("digest", config_digest)


def settings_from_overrides(
    group: str, overrides: list[str], name: str = "default"
) -> tuple[Any, dict[str, Any]]:
    """A registered component built from ``key=value`` overrides outside Hydra's composition (the
    `mmfed personalize` / `mmfed teacher pretrain` options), with its resolved config as a dict.

    An unknown key or a wrong type is a `ConfigError` naming ``<group>.<key>``.
    """
    from omegaconf.errors import OmegaConfBaseException

    node = OmegaConf.structured(node_for(registered(group)[name]))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{group}: override {item!r} is not key=value")
    problem = None
    try:
        cfg = OmegaConf.merge(node, OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as error:  # an unknown key or a wrong type, with the key's name
        key = getattr(error, "full_key", "") or "?"
        problem = f"config key '{group}.{key}': {' '.join(str(error).split('full_key:')[0].split())}"
    if problem:  # raised outside the handler: the CLI prints this line, not OmegaConf's chain
        raise ConfigError(problem)
    settings = instantiate(cfg, group)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("_target_", None)
    return settings, container


def registered(group: str) -> dict[str, type]:
    return dict(REGISTRY.get(group, {}))


def instantiate(cfg: DictConfig | Mapping[str, Any], key: str, **kwargs: Any) -> Any:
    """Build the component configured at `key`; a bad value becomes a ConfigError naming `key`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"config key '{key}': {message}") from cause
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config key '{key}': {error}") from error


def to_container(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """One-line error naming the argument, the value received and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def check_positive(name: str, value: float, strict: bool = True) -> None:
    """`value` > 0 (or >= 0 with ``strict=False``) and finite; NaN fails too (it compares False)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and value < float("inf")
    if not ok or not ((value > 0) if strict else (value >= 0)):
        raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")
