"""Crash-safe writes, strict JSON, and reads that name the file when it is not what it should be.

A reader never sees a half-written file (`atomic_write`); every JSON the project writes is strict
(RFC 8259: no NaN / Infinity, which Python's `json` would otherwise write and most parsers reject);
a truncated, empty or garbage file read back is a `CorruptFileError` naming the file, what is wrong
and what the user can do, never a traceback from the parser. Also: the keys of a run's summary.json,
read in either format (`read_summary`, `summary_metric`). No torch at import (the eval scripts, the
console and `mmfed compare` read JSON only).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: the process umask new files get


class CorruptFileError(ValueError):
    """A file the run wrote (or was given) cannot be read: the message names it and says what to do."""


def atomic_write(path: Path, write: Any) -> None:
    """`write(handle)` into a temp file beside `path`, flushed, fsync'd and renamed over it: a reader
    sees the old file or the new one, never a partial one (a crash leaves only the temp file, which
    `remove_stale_temp_files` deletes on the next run in that folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would make it (mkstemp makes files private)
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(
    folder: Path, older_than: float = 0.0, pattern: str = f".*{TEMP_SUFFIX}"
) -> list[Path]:
    """Delete the temp files a killed `atomic_write` left under `folder` (recursively); returns them.

    Only names `atomic_write` makes (hidden, ending in ``.tmp``) and only files older than
    `older_than` seconds, so a writer still running in another process keeps its file. Call it
    only while holding the folder (e.g. under the run folder's lock).
    """
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for path in folder.rglob(pattern):
        try:
            if now - path.stat().st_mtime >= older_than:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
                removed.append(path)
        except FileNotFoundError:  # another cleaner got there first
            continue
    return removed


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_dead_temp_dirs(parent: Path, prefix: str, stale_seconds: float = 24 * 3600.0) -> list[Path]:
    """Delete ``<prefix><pid>-*`` temp folders under `parent` whose process has exited (a killed
    writer's leftovers, e.g. ``.synthetic-sd.tmp-<pid>-xxxx`` of `mmfed teacher pretrain`); a name
    without a pid (older versions) goes once it is `stale_seconds` old. Returns what was removed."""
    removed = []
    for path in parent.glob(f"{prefix}*") if parent.is_dir() else []:
        head = path.name[len(prefix) :].split("-", 1)[0]
        try:
            gone = _process_gone(int(head)) if head.isdigit() else (
                time.time() - path.stat().st_mtime > stale_seconds
            )
        except FileNotFoundError:
            continue
        if gone and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_torch(obj: Any, path: str | Path) -> None:
    import torch  # here: the JSON and summary readers (eval scripts, the console) need no torch

    atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def load_torch(path: str | Path, what: str = "file", advice: str | None = None) -> Any:
    """`torch.load` on CPU; an empty, truncated or garbage file is a one-line `CorruptFileError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{what} {path} is empty (0 bytes); {advice or _REWRITE}")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError) as error:
        raise CorruptFileError(
            f"{what} {path} is not a readable torch file ({_first_line(error)}): truncated or not a "
            f"checkpoint; {advice or _REWRITE}"
        ) from error
    except Exception as error:  # unpickling garbage raises almost anything (UnpicklingError, ...)
        raise CorruptFileError(
            f"{what} {path} is not a readable torch file ({type(error).__name__}); {advice or _REWRITE}"
        ) from error


_REWRITE = "delete it and write it again (rerun the command that made it)"


def _first_line(error: BaseException) -> str:
    """The exception's first sentence (torch's zip errors run on for a paragraph)."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return f"{type(error).__name__}: {lines[0].split('. ')[0][:120]}"


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None, so the JSON written is strict.

    A NaN or infinite metric (a diverged loss, an undefined mean) is written as ``null``: strict
    parsers (browsers, jq, pandas' default engine) reject ``NaN``; ``null`` says "no value".
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: strict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(value) for value in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text (non-finite floats as null; anything else non-JSON is an error)."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def save_json(obj: Any, path: str | Path) -> None:
    text = dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def loads(text: str) -> Any:
    """Parse strict JSON: NaN / Infinity are errors (as in every parser but Python's)."""
    return json.loads(text, parse_constant=_reject_constant)


def load_json(path: str | Path, what: str = "file", advice: str | None = None) -> Any:
    """Strict JSON from `path`; empty, truncated or garbage is a one-line `CorruptFileError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{what} {path} is not text ({error.reason}); {advice or _REWRITE}") from error
    if not text.strip():
        raise CorruptFileError(f"{what} {path} is empty; {advice or _REWRITE}")
    try:
        return loads(text)
    except ValueError as error:
        raise CorruptFileError(f"{what} {path} is not valid JSON ({error}); {advice or _REWRITE}") from error


def read_jsonl(
    path: str | Path, advice: str | None = None, check: Callable[[Any], bool] = lambda record: True
) -> list[Any]:
    """Every record of a JSON-lines file; a bad line is a one-line error naming the file and line.

    `check(record)` says whether a parsed record has the shape the caller needs (e.g. a dict with
    "round"); a record that fails it is reported like a line that does not parse.
    """
    path = Path(path)
    records = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise CorruptFileError(f"{path} is not text ({error.reason}); {advice or _REWRITE}") from error
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = loads(line)
        except ValueError as error:
            raise CorruptFileError(
                f"{path} line {number} is not valid JSON ({error}); {advice or _REWRITE}"
            ) from error
        if not check(record):
            raise CorruptFileError(
                f"{path} line {number} is not a record this file should hold; {advice or _REWRITE}"
            )
        records.append(record)
    return records


def load_yaml(path: str | Path, advice: str | None = None) -> Any:
    """A run's config.yaml as a DictConfig; empty, unparsable or not a mapping is a `CorruptFileError`."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(path)
    advice = advice or "it is the run's resolved config; restore it or start a new run name"
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise
    except Exception as error:  # yaml.YAMLError, UnicodeDecodeError, OmegaConf errors
        raise CorruptFileError(
            f"config file {path} is not valid YAML ({' '.join(str(error).split())[:160]}); {advice}"
        ) from error
    if not isinstance(cfg, DictConfig) or not cfg:
        raise CorruptFileError(f"config file {path} is empty or not a mapping of config keys; {advice}")
    return cfg


def read_metrics_file(path: str | Path) -> list[Any]:
    """The per-round records of a run's metrics.jsonl; a damaged line is one line naming the file and line.

    One reader for every consumer (the run's resume checks, `mmfed report`, `mmfed compare`, resume).
    """
    return read_jsonl(
        path,
        advice="the run's per-round log: delete or repair that line (its round then has no record), or "
        "start another name=...",
        check=lambda record: isinstance(record, dict) and isinstance(record.get("round"), int),
    )


# ---- summary.json keys ------------------------------------------------------------------------------
# The first part of a metric's key names the split it was measured on: `val/` the validation split
# (the round's selection), `test/` the test split (the global model of the best round), `local/<kind>/`
# the clients' own test splits (mean/std over a kind); `chance/<metric>` is the chance level of
# `test/<metric>`. Before 2026-12 summary.json wrote the global test metrics unprefixed
# (``retrieval/rsum`` beside ``val/retrieval/rsum``); the readers below accept both formats.
TEST_PREFIX = "test/"
_BARE_METRICS = ("retrieval/", "classification/")  # the Evaluator's metric families, unprefixed


def summary_key(key: str) -> str:
    """The current summary.json key of `key`: a bare metric (``retrieval/rsum``) is the test metric
    ``test/retrieval/rsum``; every prefixed key (test/, val/, local/, chance/, cost/, ...) is itself."""
    return TEST_PREFIX + key if key.startswith(_BARE_METRICS) else key


def upgrade_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's summary of either format with the current keys (an old one's test metrics under test/)."""
    return {summary_key(key): value for key, value in summary.items()}


def summary_metric(summary: dict[str, Any], key: str, default: Any = None) -> Any:
    """One value of a run's summary of either format; `key` as written now or as a bare test metric
    (``summary_metric(s, "retrieval/rsum")`` is the test RSum of an old or a new summary.json)."""
    return upgrade_summary(summary).get(summary_key(key), default)


def read_summary(path: str | Path) -> dict[str, Any]:
    """A run's summary.json (strict JSON; a damaged file is one line naming it), in the current keys."""
    advice = "rerun or resume the run to rewrite it"
    summary = load_json(path, what="run summary", advice=advice)
    if not isinstance(summary, dict):
        raise CorruptFileError(f"run summary {path} is not a JSON object; {advice}")
    return upgrade_summary(summary)
