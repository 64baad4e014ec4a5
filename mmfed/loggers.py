"""Experiment trackers: every metric of ``metrics.jsonl`` also goes to TensorBoard and/or W&B.

``logger=tensorboard`` writes an event folder ``<run_dir>/tensorboard``; ``logger=wandb`` logs to
Weights & Biases in offline mode (files under ``<run_dir>/wandb``, upload later with
``wandb sync <run_dir>/wandb/offline-run-*``; set ``WANDB_MODE=online`` to stream instead); several
at once with ``logger=[tensorboard,wandb]``. A metric keeps its ``metrics.jsonl`` name and its step
is the round; nested records (``clients_bytes``) are flattened with ``/``; lists and strings
(``failures``) are not scalars and stay in ``metrics.jsonl`` only. Nothing here ever logs in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

LOGGERS = ("tensorboard", "wandb")


class MetricsLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics record, named as in metrics.jsonl (nested keys joined by '/')."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


class TensorBoardLogger:
    """Scalars into ``<run_dir>/tensorboard``; on resume, events after the resumed round are dropped."""

    def __init__(self, run_dir: Path, start_round: int = 1) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=start_round if start_round > 1 else None
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # once a round: a killed run keeps every finished round

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One W&B run per run folder (its id comes from the folder, so a resume continues it)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str = "mmfed") -> None:
        import hashlib

        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asks for it
        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=project,
            name=run_dir.name,
            id=run_id,
            dir=str(run_dir),
            config=config,
            resume="allow",
            mode=os.environ["WANDB_MODE"],
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits for W&B's writer process: finish() alone may return before the file is whole


def logger_names(value: Any) -> list[str]:
    """`logger` as a list: null, one name, or a list of names; an unknown name is an error naming it."""
    if value is None or value == "" or value == "none":
        return []
    names = [value] if isinstance(value, str) else list(value)
    for name in names:
        if name not in LOGGERS:
            raise ValueError(f"logger={name!r} is not one of {', '.join(LOGGERS)}")
    return list(dict.fromkeys(names))


class Loggers:
    """The configured loggers as one: `log(record, round)` sends a metrics.jsonl record to each."""

    def __init__(self, loggers: Iterable[MetricsLogger] = ()) -> None:
        self.loggers = list(loggers)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        if self.loggers:
            values = scalars(record)
            for logger in self.loggers:
                logger.log(values, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []


def open_loggers(cfg: Any, run_dir: Path, start_round: int = 1) -> Loggers:
    """The loggers `cfg.logger` names (none by default); `cfg.wandb_project` names the W&B project."""
    from mmfed.config import ConfigError, to_container

    try:
        names = logger_names(to_container(cfg.get("logger")))
    except ValueError as error:
        raise ConfigError(f"config key 'logger': {error}") from error
    loggers: list[MetricsLogger] = []
    for name in names:
        try:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(run_dir, start_round))
            else:
                project = str(cfg.get("wandb_project", "mmfed"))
                loggers.append(WandbLogger(run_dir, to_container(cfg), project))
        except ImportError as error:
            raise ConfigError(
                f"config key 'logger': {name} needs the '{error.name}' package: pip install 'mmfed[track]'"
            ) from error
    return Loggers(loggers)
