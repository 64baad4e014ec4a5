"""``mmfed train name=NAME resume=true``: continue a run with the config saved in its folder.

Why: a run is its folder. Asking for every original override again (``experiment=...``,
``partition.alpha=...``) only invites a mismatch; the folder already holds the resolved config
(``config.yaml``). So a resume reads it, applies what a resume may change (`ADJUSTABLE`), and
treats any other override as a question: if it asks for what the saved config already has, fine;
if it asks for something else, that is an error naming each such key with both values, never a
silent choice of one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmfed.config import ConfigError
from mmfed.utils.io import read_metrics_file

ADJUSTABLE = ("resume", "quiet", "rounds", "logger", "wandb_project")  # more rounds, other log outputs
IDENTITY = ("name", "run_dir")  # which folder: never compared (name defaults to the current time)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), node


def _select(container: dict[str, Any], key: str) -> Any:
    node: Any = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _override_key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def _differences(requested: Any, stored: Any, key: str) -> Iterator[tuple[str, Any, Any]]:
    """(key, requested, saved) at the shallowest keys where the two differ."""
    if isinstance(requested, dict) and isinstance(stored, dict):
        for part in sorted({*requested, *stored}):
            yield from _differences(
                requested.get(part, _MISSING), stored.get(part, _MISSING), f"{key}.{part}"
            )
    elif requested != stored:
        yield key, requested, stored


def _rounds_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    records = read_metrics_file(metrics)
    return max((record["round"] for record in records), default=0)


def resume_config(overrides: list[str], compose: Callable[[list[str]], DictConfig]) -> DictConfig:
    """The config to train with: `compose(overrides)`, or for a resume the folder's saved config.

    A key counts as asked for when an override names it or a group choice (``experiment=...``)
    changes it from the defaults; asking for a value other than the saved one is a `ConfigError`.
    `ADJUSTABLE` keys take the override's value when one is given, else the saved one.
    """
    cfg = compose(overrides)
    config_file = Path(cfg.run_dir) / "config.yaml"
    if not cfg.resume or not config_file.is_file():  # no resume, or nothing to resume (Run says so)
        return cfg
    from mmfed.federation.run import load_run_config  # one-line errors for a damaged config.yaml

    saved = load_run_config(config_file)
    named = {_override_key(o) for o in overrides}
    requested = OmegaConf.to_container(cfg, resolve=True)
    defaults = OmegaConf.to_container(
        compose([o for o in overrides if _override_key(o) in IDENTITY]), resolve=True
    )
    stored = OmegaConf.to_container(saved, resolve=True)
    asked = {key for key, value in _leaves(requested) if _select(defaults, key) != value}
    asked |= {key for key in named if _select(requested, key) is not _MISSING}
    conflicts: dict[str, tuple[Any, Any]] = {}
    for key in sorted(asked, key=lambda k: (k not in named, k)):  # what the user typed comes first
        if key.split(".")[0] in (*ADJUSTABLE, *IDENTITY) or any(key.startswith(f"{c}.") for c in conflicts):
            continue
        for where, wanted, had in _differences(_select(requested, key), _select(stored, key), key):
            conflicts.setdefault(where, (wanted, had))
    if conflicts:
        shown = "; ".join(
            f"{key}={_show(a)} (saved: {_show(b)})" for key, (a, b) in list(conflicts.items())[:3]
        )
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise ConfigError(
            f"resume=true continues the config saved in {config_file}, but the overrides ask for "
            f"{shown}{more}; drop them (only {', '.join(ADJUSTABLE)} may change) or start a new name=..."
        )
    adjusted = {key: cfg[key] for key in ADJUSTABLE if key in named or key == "resume"}
    rounds = int(adjusted.get("rounds", saved.rounds))
    done = _rounds_done(config_file.parent)
    if rounds < done:
        raise ConfigError(
            f"config key 'rounds': rounds={rounds} is fewer than the {done} rounds {config_file.parent} "
            f"has done; pass rounds={done} or more"
        )
    adjusted.update({key: cfg[key] for key in IDENTITY})  # the folder asked for, also a copied or moved one
    return OmegaConf.merge(saved, adjusted)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    if isinstance(value, dict):
        return "{...}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
