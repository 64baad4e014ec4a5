"""The registry's structured configs as data, so that composing a config imports no component module.

Why: a component's config is generated from its constructor's signature (`mmfed.config.node_for`),
which needs the class, i.e. its module, and the modules that register components import torch
(~2 s on a 2-core machine, more than all of Hydra): `mmfed config` and every config error paid it
only to read signatures. ``config_schema.json`` (next to this file) holds, per registered
``(group, name)``, what `node_for` makes of the class (the ``_target_``, the dataclass name, each
field's OmegaConf type and default), the class whose constructor holds its checks (``check``:
`mmfed.validation` builds that one for the settings groups, see `mmfed.settings`), and the sha256 of
every source file it was read from.

`register_schema` stores a deferred ConfigStore node per component from the file, built through
the same `mmfed.config.make_node` as `node_for`, when every source hash matches. When one differs
(a signature edited, the file not regenerated) it stores nothing and the composition imports the
modules instead (`import_components`): slower, still correct. tests/test_config_schema.py fails
until the file is regenerated, naming the command::

    python -m mmfed.config_schema --write

A hash covers whole files (the class's module, its bases' modules, the packages imported below and
`mmfed/config.py`), so any edit of them asks for a regeneration; a default read from a constant
of another module is not covered by a hash, but the test that compares every entry with `node_for`
catches it. Classes registered by MMFED_PLUGINS modules are not in the file: those modules are
always imported.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import inspect
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any

from mmfed.config import REGISTRY, _DeferredNode, make_node, signature_fields, store_node

SCHEMA_FILE = Path(__file__).resolve().with_name("config_schema.json")
ROOT = Path(__file__).resolve().parent.parent  # source paths in the file are relative to it: mmfed/...
COMMAND = "python -m mmfed.config_schema --write"
VERSION = 1
# The modules whose import registers every component Hydra composes (the groups of configs/).
COMPONENT_MODULES = (
    "mmfed.algorithms",  # loss terms, server steps, client tasks
    "mmfed.data.sources",  # the real-data sources
    "mmfed.data.synthetic",
    "mmfed.data.partition",
    "mmfed.data.layout",
    "mmfed.evaluation",
    "mmfed.federation.client",  # the `training` group
    "mmfed.federation.flower.settings",  # the `flower` group (no flwr import)
    "mmfed.models.encoders",
    "mmfed.teacher.model",  # the `teacher` group
)

logger = logging.getLogger(__name__)
_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def import_components() -> None:
    """Import the modules whose classes register structured configs (the source of truth)."""
    for module in COMPONENT_MODULES:
        importlib.import_module(module)


# ----------------------------------------------------------------------------- types as text
def type_text(kind: Any) -> str:
    """An OmegaConf field type (as `mmfed.config._omegaconf_type` makes them) as text: ``Optional[int]``."""
    if kind is Any:
        return "Any"
    if kind in _SCALARS.values():
        return kind.__name__
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union and len(args) == 2 and type(None) in args:
        return f"Optional[{type_text(next(a for a in args if a is not type(None)))}]"
    if origin is list and len(args) == 1:
        return f"list[{type_text(args[0])}]"
    if origin is dict and len(args) == 2:
        return f"dict[{type_text(args[0])}, {type_text(args[1])}]"
    raise ValueError(f"config schema: no text form for the field type {kind!r}")


def parse_type(text: str) -> Any:
    """The inverse of `type_text`."""
    if text == "Any":
        return Any
    if text in _SCALARS:
        return _SCALARS[text]
    head, bracket, rest = text.partition("[")
    if bracket and rest.endswith("]"):
        inner = rest[:-1]
        if head == "Optional":
            return typing.Optional[parse_type(inner)]  # noqa: UP045 (OmegaConf wants Optional)
        if head == "list":
            return list[parse_type(inner)]  # type: ignore[misc]
        if head == "dict":
            key, _, value = inner.partition(", ")
            return dict[parse_type(key), parse_type(value)]  # type: ignore[misc]
    raise ValueError(f"config schema: unknown field type {text!r}")


def _is_data(value: Any) -> bool:
    """JSON reads `value` back equal (tuples come back as lists, as `node_for` stores them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_data(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_data(item) for key, item in value.items())
    return False


# ----------------------------------------------------------------------------- generating
def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def constructor_owner(cls: type) -> type:
    """The class in `cls`'s MRO that defines the ``__init__`` it runs (`cls` itself if none does)."""
    owner = next((c for c in cls.__mro__ if "__init__" in vars(c)), object)
    return cls if owner is object else owner


def entry_for(group: str, name: str, cls: type) -> dict[str, Any]:
    """What `node_for(cls)` makes of `cls`, as JSON data."""
    fields: list[dict[str, Any]] = []
    for field, kind, default in signature_fields(cls):
        item: dict[str, Any] = {"name": field, "type": type_text(kind)}
        if default is not inspect.Parameter.empty:
            if not _is_data(default):
                raise ValueError(
                    f"config schema: {group}/{name} ({_path(cls)}): the default {field}={default!r} is not "
                    "plain data (None, bool, int, float, str, lists and str-keyed dicts of them)"
                )
            item["default"] = json.loads(json.dumps(default))
        fields.append(item)
    return {
        "group": group,
        "name": name,
        "target": _path(cls),
        "class": f"{cls.__name__}Config",
        "check": _path(constructor_owner(cls)),
        "fields": fields,
    }


def _source_files() -> list[str]:
    """Files whose edits can change an entry: every registered class's module and its bases' (in
    mmfed), the component packages' ``__init__``s (which modules register) and `mmfed/config.py`."""
    files = {Path(sys.modules["mmfed.config"].__file__ or "")}
    files.update(Path(sys.modules[module].__file__ or "") for module in COMPONENT_MODULES)
    for names in REGISTRY.values():
        for cls in names.values():
            files.update(
                Path(inspect.getfile(c)) for c in cls.__mro__ if c.__module__.split(".")[0] == "mmfed"
            )
    return sorted(path.resolve().relative_to(ROOT).as_posix() for path in files)


def _digest(relative: str, root: Path = ROOT) -> str | None:
    try:
        return hashlib.sha256((root / relative).read_bytes()).hexdigest()
    except OSError:
        return None


def generate() -> dict[str, Any]:
    """The schema of what `import_components` registers; run in a fresh interpreter (`main`), where
    nothing else (a plugin, a test's class) has registered."""
    import_components()
    components = [
        entry_for(group, name, REGISTRY[group][name])
        for group in sorted(REGISTRY)
        for name in sorted(REGISTRY[group])
    ]
    return {
        "about": f"Generated by `{COMMAND}` from the registered classes' signatures; do not edit.",
        "version": VERSION,
        "sources": {relative: _digest(relative) for relative in _source_files()},
        "components": components,
    }


def dumps(schema: dict[str, Any]) -> str:
    """JSON with one line per field and per source file (short diffs, few merge conflicts)."""
    lines = ["{"]
    lines.append(f'  "about": {json.dumps(schema["about"])},')
    lines.append(f'  "version": {json.dumps(schema["version"])},')
    lines.append('  "sources": {')
    sources = list(schema["sources"].items())
    lines += [
        f"    {json.dumps(k)}: {json.dumps(v)}{',' if i < len(sources) - 1 else ''}"
        for i, (k, v) in enumerate(sources)
    ]
    lines.append("  },")
    lines.append('  "components": [')
    for i, entry in enumerate(schema["components"]):
        head = {key: value for key, value in entry.items() if key != "fields"}
        lines.append(f'    {json.dumps(head)[:-1]}, "fields": [')
        fields = entry["fields"]
        lines += [f"      {json.dumps(f)}{',' if j < len(fields) - 1 else ''}" for j, f in enumerate(fields)]
        lines.append(f"    ]}}{',' if i < len(schema['components']) - 1 else ''}")
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- reading
def stale_sources(schema: dict[str, Any], root: Path = ROOT) -> list[str]:
    """The source files whose content no longer has the hash recorded in `schema`."""
    return [
        relative
        for relative, digest in schema.get("sources", {}).items()
        if _digest(relative, root) != digest
    ]


@functools.cache
def fresh_schema() -> dict[str, Any] | None:
    """The committed schema if every source it was read from is unchanged, else None."""
    try:
        schema = json.loads(SCHEMA_FILE.read_text())
    except (OSError, ValueError) as error:
        logger.info("no usable %s (%s): composing through the component modules", SCHEMA_FILE.name, error)
        return None
    if schema.get("version") != VERSION:
        logger.info(
            "%s has version %r, not %r: regenerate it with %s",
            SCHEMA_FILE.name,
            schema.get("version"),
            VERSION,
            COMMAND,
        )
        return None
    stale = stale_sources(schema)
    if stale:
        logger.info(
            "%s is stale (%s changed): composing through the component modules; regenerate it with %s",
            SCHEMA_FILE.name,
            ", ".join(stale),
            COMMAND,
        )
        return None
    return schema


def dataclass_for(entry: dict[str, Any]) -> type:
    """The structured-config dataclass of a schema entry: `node_for`'s, without the class."""
    fields = [
        (f["name"], parse_type(f["type"]), f.get("default", inspect.Parameter.empty)) for f in entry["fields"]
    ]
    return make_node(entry["class"], entry["target"], fields)


@functools.cache
def register_schema() -> bool:
    """Store a deferred ConfigStore node for every component of the fresh schema whose class is not
    registered already (an imported module's own node wins; both are equal). False when the schema
    is stale or missing: the caller imports the modules (`import_components`). Once per process."""
    schema = fresh_schema()
    if schema is None:
        return False
    for entry in schema["components"]:
        group, name = entry["group"], entry["name"]
        if name not in REGISTRY.get(group, {}):
            build = functools.partial(dataclass_for, entry)
            store_node(group, name, _DeferredNode(f"{name}.yaml", group, build=build))
    return True


@functools.cache
def _checks() -> dict[str, str]:
    schema = fresh_schema()
    return {entry["target"]: entry["check"] for entry in schema["components"]} if schema else {}


def check_target(target: str) -> str:
    """The class to build to check a config whose ``_target_`` is `target`: the torch-free class
    holding its constructor (`mmfed.settings`) when the fresh schema knows `target`, else `target`."""
    return _checks().get(target, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmfed.config_schema", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--write", action="store_true", help=f"(re)write {SCHEMA_FILE.name}")
    args = parser.parse_args(argv)
    text = dumps(generate())
    if args.write:
        SCHEMA_FILE.write_text(text)
        print(f"wrote {SCHEMA_FILE}")
        return 0
    current = SCHEMA_FILE.read_text() if SCHEMA_FILE.exists() else ""
    if current == text:
        print(f"{SCHEMA_FILE} is up to date")
        return 0
    print(f"{SCHEMA_FILE} is stale: run {COMMAND}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
