"""The persistent teacher feature cache: compute a frozen teacher's features once, reuse them forever.

A frozen teacher gives a sample the same features under the same settings, so they are stored on disk
(float16, memory-mapped) in a folder named by a digest of the settings (`fingerprint`) and shared
by rounds, clients, runs and processes. Layout of a cache folder:

    <root>/<name>-<digest>/
      fingerprint.json                   the settings, checked on open (a digest collision is an error)
      shard-<host>-<pid>-<uuid>.npy      float16 [rows, *shape]: one chunk of computed features
      shard-<host>-<pid>-<uuid>.json     {"keys", "shape", "seconds", ...}: the commit marker

Crash safety: a shard's data file is written to a temporary file, fsync'd and renamed, and only then
its JSON, the same way. A reader only knows shards through their JSON, so a data file whose writer
died before the JSON is never read (it is deleted once its writer is gone) and a truncated file is
never renamed into place. Several writers never share a file name (host, pid and a uuid), a reader
that misses a key rescans the folder, and a key stored twice (two writers raced) is read from the
first shard that has it: the teacher is frozen, so both hold the same values.

Integrity: a marker stores ``checksum``, the sha256 of its keys (JSON) and of the data file's bytes,
verified when a process first reads the shard. A shard whose data was truncated, overwritten (same-size
random bytes, a NaN payload) or whose keys were swapped fails it: a warning names the shard file, the
shard is set aside as ``corrupt-<name>.npy/.json`` (kept for inspection, never read again) and its
keys are recomputed. A marker without a checksum (written before checksums) is read as before, but a
NaN in its data is still refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mmfed.config import check_positive
from mmfed.console import bar_disabled
from mmfed.utils.io import atomic_write, load_json, save_json

FINGERPRINT_FILE = "fingerprint.json"
SHARD_PREFIX = "shard-"
CORRUPT_PREFIX = "corrupt-"  # a shard that failed its checksum, set aside
MAX_REPAIRS = 8  # a get() sets aside at most this many corrupt shards before it gives up
log = logging.getLogger("mmfed")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: anything larger would be stored as inf
STALE_SECONDS = 24 * 3600.0  # an uncommitted file this old is an orphan even if its writer's pid is alive
ComputeFn = Callable[[list[int]], torch.Tensor | np.ndarray]


def canonical_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint as plain JSON values (tuples -> lists, paths -> strings, numpy -> Python), so
    equal settings compare and hash equal however they were spelled."""
    if not isinstance(fingerprint, Mapping):
        raise TypeError(f"a fingerprint must be a mapping, got {type(fingerprint).__name__}")
    return _plain(fingerprint, "fingerprint")


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError(f"{where} is {value!r}: a fingerprint holds finite numbers only")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"{where} is a {type(value).__name__}: a fingerprint holds JSON values only")


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, floats as their shortest repr), first 16 hex chars."""
    text = json.dumps(canonical_fingerprint(fingerprint), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class CacheStats:
    """What the cache did for one `FeatureCache` object, cumulatively."""

    hits: int = 0
    misses: int = 0
    compute_seconds: float = 0.0  # spent in `compute` (this object)
    saved_seconds: float = 0.0  # hits x mean compute seconds per entry (from every shard, across runs)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class _Shard:
    name: str  # file stem: <name>.npy holds the data, <name>.json committed it
    keys: list[str]
    seconds: float  # compute time of the entries this shard covers
    computed: int  # how many computed entries those seconds cover (a compacted shard keeps the sums)
    data: np.ndarray | None = None  # memory-mapped on first read
    checksum: str | None = None  # sha256 of keys + data file (None: a marker written before checksums)


class FeatureCache:
    """Features keyed by (sample key, fingerprint of everything that changes them)."""

    def __init__(self, root: str | Path, fingerprint: Mapping[str, Any], name: str = "features") -> None:
        if not name or not re.fullmatch(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*", name):
            raise ValueError(f"cache name {name!r} must be letters, digits, '_', '.' or inner '-'")
        self.fingerprint = canonical_fingerprint(fingerprint)
        self.folder = Path(root) / f"{name}-{fingerprint_digest(self.fingerprint)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_fingerprint()
        self.stats = CacheStats()
        self.shape: tuple[int, ...] | None = None
        self._reset()
        self._remove_orphans()

    # ---- public API -------------------------------------------------------------------------------
    def get(
        self,
        keys: Sequence[str],
        compute: ComputeFn,
        chunk: int = 256,
        progress: str | None = None,
    ) -> torch.Tensor:
        """float32 [len(keys), *shape] in key order; `compute(positions)` is called, one chunk of
        missing keys at a time, only for keys no process has committed yet (or whose shard failed
        its checksum: that shard is set aside and its keys computed again)."""
        check_positive("chunk", chunk)
        keys = _check_keys(keys)
        computed, hits = 0, None
        for _ in range(MAX_REPAIRS):
            missing = self._missing(keys)
            if missing:
                self._scan()  # another process may have committed them since
                missing = self._missing(keys)
            hits = len(keys) - len(missing) if hits is None else hits
            if missing:
                self._compute(keys, missing, compute, chunk, progress)
            computed += len(missing)
            try:
                out = self._gather(keys)
                break
            except CorruptShardError as error:
                self._set_aside(error)
        else:
            raise CorruptShardError(
                self.folder, f"shards kept failing their checksum after {MAX_REPAIRS} repairs"
            )
        self.stats.misses += computed
        self.stats.hits += hits or 0
        self.stats.saved_seconds += (hits or 0) * self.seconds_per_entry()
        return torch.from_numpy(out)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if key not in self._index:
            self._scan()
        return key in self._index

    def __len__(self) -> int:
        self._scan()
        return len(self._index)

    def keys(self) -> list[str]:
        self._scan()
        return list(self._index)

    def seconds_per_entry(self) -> float:
        """Mean compute seconds per entry over every committed shard (so known across runs)."""
        computed = sum(shard.computed for shard in self._shards)
        return sum(shard.seconds for shard in self._shards) / computed if computed else 0.0

    def compact(self) -> None:
        """Merge every committed shard into one (written and committed like any shard, then the old
        ones are uncommitted and deleted): fewer files to open after a big extraction. Shards other
        processes commit meanwhile are left alone, and readers holding the old index reload it; run
        it from one process at a time."""
        self._scan()
        if len(self._shards) < 2:
            return
        merged, self._shards = self._shards, []  # dropped from view while their files go
        keys = list(self._index)
        locations = np.array([self._index[key] for key in keys], dtype=np.int64).reshape(-1, 2)
        assert self.shape is not None
        shape = (len(keys), *self.shape)

        def write(handle: Any) -> None:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": shape}
            )
            for shard_id, rows in _runs(locations):  # in key order: runs of consecutive keys per shard
                handle.write(np.ascontiguousarray(self._open(merged[shard_id])[rows]).tobytes())

        seconds, computed = sum(s.seconds for s in merged), sum(s.computed for s in merged)
        self._commit(write, keys, self.shape, seconds, computed)
        for shard in merged:  # uncommit first: a crash in between leaves duplicates, never a hole
            (self.folder / f"{shard.name}.json").unlink(missing_ok=True)
        for shard in merged:
            shard.data = None
            (self.folder / f"{shard.name}.npy").unlink(missing_ok=True)
        self._reset()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.folder)!r}, entries={len(self._index)}, shape={self.shape})"

    # ---- the index --------------------------------------------------------------------------------
    def _reset(self) -> None:
        """Forget the in-memory index and rebuild it from the committed shards on disk."""
        self._index: dict[str, tuple[int, int]] = {}  # key -> (shard id, row): first shard wins
        self._shards: list[_Shard] = []
        self._seen: set[str] = set()
        self._scan()

    def _scan(self) -> None:
        """Add shards committed (by any process) since the last scan."""
        for marker in sorted(self.folder.glob(f"{SHARD_PREFIX}*.json")):
            if marker.stem in self._seen:
                continue
            try:
                meta = load_json(marker)
            except FileNotFoundError:  # compacted away by another process between glob and read
                continue
            except (OSError, ValueError) as error:
                raise ValueError(f"unreadable shard marker {marker}: {error}") from error
            self._add_shard(marker, meta)

    def _add_shard(self, marker: Path, meta: Any) -> None:
        try:
            keys, shape = list(meta["keys"]), tuple(int(n) for n in meta["shape"])
            seconds, computed = float(meta["seconds"]), int(meta.get("computed", len(keys)))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"shard marker {marker} lacks keys/shape/seconds: {error}") from error
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            raise ValueError(f"shard {marker} holds features of shape {shape}, the cache {self.shape}")
        checksum = meta.get("checksum")
        shard_id = len(self._shards)
        self._shards.append(_Shard(marker.stem, keys, seconds, computed, checksum=checksum))
        self._seen.add(marker.stem)
        for row, key in enumerate(keys):
            self._index.setdefault(key, (shard_id, row))

    def _missing(self, keys: list[str]) -> list[int]:
        """Positions of the first occurrence of each key not in the index."""
        seen: set[str] = set()
        missing = []
        for position, key in enumerate(keys):
            if key not in self._index and key not in seen:
                seen.add(key)
                missing.append(position)
        return missing

    # ---- reading ----------------------------------------------------------------------------------
    def _open(self, shard: _Shard) -> np.ndarray:
        """The shard's data, memory-mapped; checked once against its marker (checksum, shape, NaN)."""
        if shard.data is None:
            path = self.folder / f"{shard.name}.npy"
            if shard.checksum is not None and file_checksum(path, shard.keys) != shard.checksum:
                raise CorruptShardError(path, "its bytes or keys do not match the checksum in its marker")
            try:
                data = np.load(path, mmap_mode="r")
            except FileNotFoundError:
                raise
            except (ValueError, OSError, EOFError) as error:  # truncated or not a .npy file
                raise CorruptShardError(path, f"not a readable .npy file ({error})") from error
            expected = (len(shard.keys), *(self.shape or ()))
            if data.dtype != np.float16 or data.shape != expected:
                raise CorruptShardError(
                    path, f"holds {data.dtype} {data.shape}, its marker says float16 {expected}"
                )
            if shard.checksum is None and np.isnan(data).any():  # written before checksums
                raise CorruptShardError(path, "holds NaN (never written by the cache)")
            shard.data = data
        return shard.data

    def _set_aside(self, error: CorruptShardError) -> None:
        """Rename a corrupt shard's files to ``corrupt-...`` (never read again), warn, reload the index."""
        stem = error.path.stem
        log.warning("feature cache: %s; set aside as corrupt-%s.* and its keys recomputed", error, stem)
        for suffix in (".json", ".npy"):  # the marker first: a crash in between leaves no hole
            source = self.folder / f"{stem}{suffix}"
            try:
                source.rename(self.folder / f"{CORRUPT_PREFIX}{stem}{suffix}")
            except FileNotFoundError:  # another process set it aside first
                pass
        self._reset()

    def _gather(self, keys: list[str], retry: bool = True) -> np.ndarray:
        """One np.take per shard over all the rows wanted from it (no per-row Python copies)."""
        out = np.empty((len(keys), *(self.shape or ())), dtype=np.float32)
        if not keys:
            return out
        locations = np.array([self._index[key] for key in keys], dtype=np.int64)
        order = np.argsort(locations[:, 0], kind="stable")
        shard_ids, starts = np.unique(locations[order, 0], return_index=True)
        for shard_id, positions in zip(shard_ids, np.split(order, starts[1:]), strict=True):
            try:
                data = self._open(self._shards[shard_id])
            except FileNotFoundError as error:  # another process compacted it away: reload, start over
                if not retry:
                    raise FileNotFoundError(f"committed shard data is gone: {error.filename}") from error
                self._reset()
                return self._gather(keys, retry=False)
            out[positions] = np.take(data, locations[positions, 1], axis=0)
        return out

    # ---- writing ----------------------------------------------------------------------------------
    def _compute(
        self, keys: list[str], missing: list[int], compute: ComputeFn, chunk: int, progress: str | None
    ) -> None:
        with tqdm(
            total=len(missing), desc=progress, unit="sample", disable=bar_disabled(progress is not None)
        ) as bar:
            for start in range(0, len(missing), chunk):
                positions = missing[start : start + chunk]
                began = time.perf_counter()
                values = compute(list(positions))
                seconds = time.perf_counter() - began
                self.stats.compute_seconds += seconds
                chunk_keys = [keys[p] for p in positions]
                values = self._check_values(values, chunk_keys)
                write = partial(_save_rows, rows=values)
                self._commit(write, chunk_keys, tuple(values.shape[1:]), seconds, len(chunk_keys))
                self._scan()
                bar.update(len(positions))

    def _check_values(self, values: Any, keys: list[str]) -> np.ndarray:
        """float16 rows of a computed chunk, after the checks that keep inf/NaN/ragged data out."""
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float32).numpy()
        elif isinstance(values, np.ndarray):
            values = values.astype(np.float32, copy=False)
        else:
            raise TypeError(f"compute returned {type(values).__name__}; expected a tensor or array")
        if values.ndim == 0 or values.shape[0] != len(keys):
            raise ValueError(
                f"compute returned shape {tuple(values.shape)} for {len(keys)} keys (first {keys[0]!r})"
            )
        shape = tuple(values.shape[1:])
        if self.shape is not None and shape != self.shape:
            raise ValueError(f"compute returned entries of shape {shape}; {self.folder} holds {self.shape}")
        rows = values.reshape(len(keys), -1)
        for bad, what in ((np.isnan(rows), "NaN"), (np.abs(rows) > FLOAT16_MAX, "out of float16 range")):
            row_has = bad.any(axis=1)
            if row_has.any():
                row = int(np.argmax(row_has))
                raise ValueError(
                    f"feature of key {keys[row]!r} is {what} (|value| <= {FLOAT16_MAX:g} allowed); not cached"
                )
        return values.astype(np.float16)

    def _commit(
        self,
        write: Callable[[Any], None],
        keys: list[str],
        shape: tuple[int, ...],
        seconds: float,
        computed: int,
    ) -> str:
        """Data first, then the JSON marker that makes it visible (with the checksum of both); both
        atomic and fsync'd."""
        name = f"{SHARD_PREFIX}{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        digest = _keys_hash(keys)

        def hashed(handle: Any) -> None:
            write(_HashingWriter(handle, digest))

        atomic_write(self.folder / f"{name}.npy", hashed)
        marker = {
            "keys": keys,
            "shape": list(shape),
            "seconds": seconds,
            "computed": computed,
            "checksum": digest.hexdigest(),
        }
        save_json(marker, self.folder / f"{name}.json")
        _fsync_dir(self.folder)
        return name

    def _check_fingerprint(self) -> None:
        path = self.folder / FINGERPRINT_FILE
        if path.exists():
            try:
                stored = load_json(path)
            except ValueError as error:
                raise ValueError(f"unreadable {path}: {error}") from error
            if stored != self.fingerprint:
                raise ValueError(
                    f"{self.folder} was made for another fingerprint (digest collision or edited "
                    f"{FINGERPRINT_FILE}): stored {stored}, asked {self.fingerprint}"
                )
        else:
            save_json(self.fingerprint, path)

    def _remove_orphans(self) -> None:
        """Delete uncommitted shard files (data without marker, temporaries) whose writer is gone."""
        for path in self.folder.iterdir():
            stem = _shard_stem(path.name)
            if stem is None or stem in self._seen or (self.folder / f"{stem}.json").exists():
                continue
            try:
                if _writer_gone(stem) or time.time() - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()
            except FileNotFoundError:  # its writer committed or cleaned it meanwhile
                pass


class CorruptShardError(ValueError):
    """A committed shard failed its checks; the message names the shard file and what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"shard {path}: {reason}")
        self.path = path


class _HashingWriter:
    """A binary file handle that also feeds every byte written to a hash."""

    def __init__(self, handle: Any, digest: Any) -> None:
        self.handle, self.digest = handle, digest

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, ... of the real handle
        return getattr(self.handle, name)


def _keys_hash(keys: list[str]) -> Any:
    digest = hashlib.sha256()
    digest.update(json.dumps(keys, separators=(",", ":")).encode() + b"\n")
    return digest


def file_checksum(path: Path, keys: list[str]) -> str:
    """sha256 of a shard's keys (JSON) followed by its data file's bytes (what `_commit` stores)."""
    digest = _keys_hash(keys)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


_SHARD_FILE = re.compile(rf"\.?({SHARD_PREFIX}[A-Za-z0-9_]+-\d+-[0-9a-f]+)\.(?:npy|json)(?:\..*\.tmp)?")
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def _check_keys(keys: Sequence[str]) -> list[str]:
    if isinstance(keys, str):
        raise TypeError("keys must be a sequence of strings, got one string")
    keys = list(keys)
    for position, key in enumerate(keys):
        if not isinstance(key, str) or not key or "\n" in key or "\r" in key:
            raise ValueError(f"cache key #{position} {key!r} must be a non-empty string without newlines")
    return keys


def _save_rows(handle: Any, rows: np.ndarray) -> None:
    np.save(handle, rows, allow_pickle=False)


def _runs(locations: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Split (shard, row) locations, in order, into runs from one shard: (shard id, rows)."""
    breaks = np.flatnonzero(np.diff(locations[:, 0])) + 1
    return [(int(run[0, 0]), run[:, 1]) for run in np.split(locations, breaks) if len(run)]


def _shard_stem(filename: str) -> str | None:
    """`shard-<host>-<pid>-<uuid>` of a shard file or of its temporary (`.shard-...npy.XXXX.tmp`)."""
    match = _SHARD_FILE.fullmatch(filename)
    return match.group(1) if match else None


def _writer_gone(stem: str) -> bool:
    """True when the process that wrote this shard ran on this host and has exited."""
    host, pid = stem[len(SHARD_PREFIX) :].rsplit("-", 2)[:2]
    if host != _HOST:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable (a power cut after commit keeps the shard)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
