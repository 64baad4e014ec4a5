"""Checks of a composed run config that no single constructor owns: one line naming the key.

Why here: `mmfed config` and `mmfed train` (and a Flower deployment's ServerApp) all compose through
`mmfed.composition.compose`, which calls `check_overrides` before Hydra and `check_config` after it,
so a config that `mmfed config` prints is one `mmfed train` accepts. Component values (a
partitioner's alpha, the optimiser, the layout) are validated by their constructors; `check_config`
builds the cheap ones (no data, no model weights, no torch: `mmfed.settings`) so their errors
surface at composition too, before anything imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mmfed.config import ConfigError, instantiate

ENGINES = ("embedded", "flower")
CLIENT_KINDS = ("image", "text", "paired")
# groups whose constructors are cheap settings (no data read, no weights loaded, no torch import; see
# mmfed.settings): built at composition
CHEAP_GROUPS = ("partition", "layout", "training", "evaluation", "flower", "teacher")
# The device types torch.device accepts (torch 2.13: c10/core/DeviceType.cpp), so that `device` is
# checked as torch parses it without importing torch (tests/test_validation.py compares with torch).
DEVICE_TYPES = (
    "cpu", "cuda", "ipu", "xpu", "mkldnn", "opengl", "opencl", "ideep", "hip", "ve", "fpga", "maia",
    "xla", "lazy", "vulkan", "mps", "meta", "hpu", "mtia", "privateuseone",
)  # fmt: skip
_DEVICE = re.compile(f"(?:{'|'.join(DEVICE_TYPES)})(?::(0|[1-9][0-9]*))?")
_MAX_DEVICE_INDEX = 2**31 - 1  # torch reads the index as a 32-bit int (and refuses a larger one)


def presets(configs: Path) -> list[str]:
    """The experiment presets in a config folder (``configs/experiment/<name>.yaml``)."""
    folder = configs / "experiment"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def parse_overrides(overrides: list[str]) -> list[Any]:
    """Hydra's parse of ``key=value`` overrides; a malformed one is one line naming it.

    Why: Hydra raises its parse error (``mismatched input '=' expecting <EOF>`` for
    ``run_dir=a=b``) outside the composition errors, so it reached the user as a traceback. Hydra
    does read a quoted value (``run_dir='a=b'``); the message advises that form when it parses.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    try:
        return parser.parse_overrides(overrides)
    except OverrideParseException:
        pass  # find the override at fault, outside the handler (one line, not Hydra's chain)
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as error:
            value = override.partition("=")[2]
            reason = "'=' in a value needs quotes" if "=" in value else str(error).splitlines()[0].strip()
            raise ConfigError(f"override {override!r}: {reason}{_quoting_advice(override, parser)}") from None
    raise ConfigError(f"overrides {overrides!r}: Hydra cannot parse them together")


def _quoting_advice(override: str, parser: Any) -> str:
    """``; Hydra reads a quoted value: key='a=b' (in a shell: "key='a=b'")``, when that quoted form
    parses back to the value as typed; otherwise nothing (no advice that would not work)."""
    import shlex

    from hydra.errors import OverrideParseException

    key, sep, value = override.partition("=")
    if not sep or not key or not value or value[0] in "'\"" or "\\" in value:
        return ""
    quote = "'" if "'" not in value else '"'
    if quote in value:
        return ""
    quoted = f"{key}={quote}{value}{quote}"
    try:
        parsed = parser.parse_overrides([quoted])[0]
    except OverrideParseException:
        return ""
    if parsed.value() != value:
        return ""
    shell = f'"{quoted}"' if not any(c in quoted for c in '"$`!\\') else shlex.quote(quoted)
    return f"; Hydra reads a quoted value: {quoted} (in a shell: {shell})"


def check_overrides(overrides: list[str], configs: Path) -> None:
    """Unknown experiment presets are an error listing the presets.

    The defaults list says ``optional experiment: default`` (``~experiment``: none), and Hydra skips an
    optional group entry it cannot find: ``experiment=bogus`` silently ran the default federation
    and ``experiment=[smoke,bogus]`` silently dropped ``bogus``.
    """
    parsed = parse_overrides(overrides)
    known = presets(configs)
    for override in parsed:
        if override.key_or_group != "experiment" or override.is_delete():
            continue
        value = override.value()
        names = value if isinstance(value, list) else [value]
        for name in names:
            if name is None or str(name) == "null":
                raise ConfigError(
                    "config key 'experiment': null is not a preset; '~experiment' drops the default "
                    "one (experiment=default), leaving the library's defaults"
                )
            if str(name) not in known:
                raise ConfigError(
                    f"config key 'experiment': no preset {str(name)!r} in {configs / 'experiment'}; "
                    f"presets: {', '.join(known)}"
                )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(cfg: DictConfig, key: str, minimum: int | None = None, optional: bool = False) -> None:
    value = cfg.get(key)
    if value is None and optional:
        return
    if not _is_int(value):
        raise ConfigError(f"config key '{key}': {value!r} is not an integer{' or null' if optional else ''}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config key '{key}': must be >= {minimum}, got {value}")


def _bool(cfg: DictConfig, key: str) -> None:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': {value!r} is not true or false")


def check_name(name: Any) -> None:
    """A run name names one folder under runs/: no separators, no '..' (it must not write elsewhere)."""
    text = str(name)
    if not text.strip() or text in (".", "..") or any(sep in text for sep in ("/", "\\", "\0")):
        raise ConfigError(
            f"config key 'name': {text!r} is not a plain folder name (no '/', '\\' or '..'); the run "
            "folder is runs/<name> (give run_dir=PATH to put it elsewhere)"
        )


def check_run_keys(cfg: DictConfig) -> None:
    """The top-level keys of config.yaml: types and ranges, each error naming its key."""
    _int(cfg, "seed")
    _int(cfg, "rounds", minimum=1)
    _int(cfg, "clients_per_round", minimum=1, optional=True)
    _int(cfg, "min_replies", minimum=1, optional=True)
    _int(cfg, "threads", minimum=1, optional=True)
    workers = cfg.get("workers", 1)
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"config key 'workers': must be an integer >= 1 or 'auto', got {workers!r}")
    if workers not in (1, "auto") and cfg.get("engine") == "flower":
        raise ConfigError(
            "config key 'workers': worker processes are the embedded engine's; under engine=flower "
            "clients run where Flower places them (flower.* sets their resources)"
        )
    for key in ("resume", "quiet"):
        _bool(cfg, key)
    check_name(cfg.get("name"))
    run_dir = cfg.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir.strip():
        raise ConfigError(f"config key 'run_dir': {run_dir!r} is not a folder path")
    if cfg.get("engine") not in ENGINES:
        raise ConfigError(f"config key 'engine': {cfg.get('engine')!r} is not one of {', '.join(ENGINES)}")
    _device(cfg.get("device"))
    timeout = cfg.get("client_timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
    ):
        raise ConfigError(
            "config key 'client_timeout': client_timeout must be a number of seconds > 0 or null, "
            f"got {timeout!r}"
        )
    per_kind = cfg.get("partition_by_kind") or {}
    unknown = sorted(set(per_kind) - set(CLIENT_KINDS))
    if unknown:
        raise ConfigError(
            f"config key 'partition_by_kind.{unknown[0]}': not a client kind ({', '.join(CLIENT_KINDS)})"
        )


def _device(name: Any) -> None:
    """``auto`` or a device string torch.device accepts: a device type, optionally ``:N``."""
    if name == "auto":
        return
    match = _DEVICE.fullmatch(str(name))
    if match is None or (match.group(1) is not None and int(match.group(1)) > _MAX_DEVICE_INDEX):
        raise ConfigError(f"config key 'device': {name!r} is not a device (cpu, cuda, cuda:N, auto)")


def check_model_keys(model: Any) -> None:
    """The `model` node's own numbers (its encoders are checked by their constructors)."""
    from mmfed.settings import check_model_config

    try:
        check_model_config(model)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _build_settings(node: DictConfig, key: str) -> None:
    """Build a settings node's component to run its constructor's checks, through the torch-free class
    that holds that constructor (`config_schema.check_target`: no torch, no component module)."""
    from mmfed.config_schema import check_target

    check = check_target(str(node._target_))
    instantiate(node, key, **({"_target_": check} if check != node._target_ else {}))


def _build_cheap(cfg: DictConfig, groups: Iterable[str]) -> None:
    for group in groups:
        node = cfg.get(group)
        if isinstance(node, DictConfig) and "_target_" in node:
            _build_settings(node, group)
    for kind, node in (cfg.get("partition_by_kind") or {}).items():
        _build_settings(node, f"partition_by_kind.{kind}")


def check_config(cfg: DictConfig) -> None:
    """Everything that can be checked without data or weights: top-level keys, model numbers and the
    settings groups' constructors. Raises `ConfigError` naming the first bad key."""
    check_run_keys(cfg)
    if cfg.get("model") is not None:
        check_model_keys(cfg.model)
    _build_cheap(cfg, CHEAP_GROUPS)
