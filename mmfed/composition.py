"""Config composition for every entry point (the CLI, a Flower deployment's ServerApp, tests).

Lives below the CLI so that whatever composes a run config (e.g. `federation.flower.apps`) imports
this module, not `mmfed.cli`: imports point one way (cli -> composition -> config/validation).
Hydra composes ``configs/`` plus every component's structured config (from `config_schema`, without
importing the components); `validation` checks what Hydra cannot (unknown presets, top-level keys,
the settings constructors), so `mmfed config` and `mmfed train` reject the same inputs, with one
line naming the key, and neither imports torch before the config is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_dir(explicit: str | None = None) -> Path:
    for candidate in (explicit, os.environ.get("MMFED_CONFIG_DIR"), REPO_CONFIGS, Path.cwd() / "configs"):
        if candidate and (Path(candidate) / "config.yaml").exists():
            return Path(candidate).resolve()
    raise FileNotFoundError("no configs/config.yaml found: pass --config-dir or set MMFED_CONFIG_DIR")


def register_components() -> None:
    """Make every component selectable by name (the groups Hydra composes): from
    ``mmfed/config_schema.json`` when it is fresh, importing no component module (so `mmfed config`
    imports no torch), else by importing the modules that register them; then MMFED_PLUGINS."""
    from mmfed.config_schema import import_components, register_schema

    if not register_schema():
        import_components()
    import_plugins()


def import_plugins() -> None:
    """Import the modules named in MMFED_PLUGINS (comma-separated), so that the loss terms and server
    steps they ``register`` can be chosen by name (see examples/my_method)."""
    import importlib

    from mmfed.config import ConfigError

    for module in filter(None, (m.strip() for m in os.environ.get("MMFED_PLUGINS", "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(f"MMFED_PLUGINS: cannot import {module!r} ({error}); on PYTHONPATH?") from error


def compose(overrides: list[str], config_path: str | None = None, validate: bool = True) -> DictConfig:
    """Compose the config with overrides; unknown keys and bad values become one-line `ConfigError`s."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from mmfed.config import ConfigError
    from mmfed.validation import check_config, check_overrides

    register_components()
    folder = config_dir(config_path)
    check_overrides(overrides, folder)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(folder), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (ConfigCompositionException, MissingConfigException, OmegaConfBaseException) as error:
        raise ConfigError(one_line(error)) from error
    if validate:
        try:
            check_config(cfg)
        except OmegaConfBaseException as error:  # e.g. an interpolation that does not resolve
            raise ConfigError(one_line(error)) from error
    return cfg


def one_line(error: BaseException) -> str:
    """The most specific message in the exception chain, on one line, naming the config key if known."""
    from omegaconf.errors import OmegaConfBaseException

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:  # OmegaConf knows the full key of a bad value: say it
        key = getattr(item, "full_key", None)
        if isinstance(item, OmegaConfBaseException) and key and "$" not in str(item):
            text = " ".join(str(item).split("full_key:")[0].split())
            return f"config key '{key}': {text}"
    for item in chain:
        text = " ".join(str(item).split())
        if text and "$VALUE" not in text:
            return text.split(" Config search path:")[0]
    return type(error).__name__
