"""Crash-safe writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write: Any) -> None:
    """`write(handle)` into a temp file beside `path`, flushed, fsync'd and renamed over it: a reader
    sees the old file or the new one, never a partial one (a crash leaves only the temp file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_torch(obj: Any, path: str | Path) -> None:
    atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def load_torch(path: str | Path) -> Any:
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def save_json(obj: Any, path: str | Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
