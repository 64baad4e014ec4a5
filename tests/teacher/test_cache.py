"""The persistent teacher feature cache: computed once, fp16 on disk, crash-safe, shared by processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import mmfed.teacher.cache as cache_module
from mmfed.teacher.cache import CacheStats, FeatureCache, fingerprint_digest

FINGERPRINT = {"teacher": "tiny-sd", "timestep": 261, "prompt": "a photo of a {}", "size": (32, 32)}
SHAPE = (3, 4)


def feature(key: str) -> np.ndarray:
    """A deterministic feature per key (what a frozen teacher gives), exactly representable in fp16."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).integers(-512, 512, size=SHAPE).astype(np.float32) / 4


class Teacher:
    """A compute callback that records which positions it was asked for."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.calls: list[list[int]] = []

    def __call__(self, positions: list[int]) -> torch.Tensor:
        self.calls.append(list(positions))
        return torch.from_numpy(np.stack([feature(self.keys[p]) for p in positions]))

    @property
    def computed(self) -> list[int]:
        return [p for call in self.calls for p in call]


def never(positions: list[int]) -> np.ndarray:
    raise AssertionError(f"compute called for positions {positions} on a warm cache")


def expected(keys: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([feature(key) for key in keys]))


def ids(n: int, start: int = 0) -> list[str]:
    return [f"coco/{i}|class={i % 7}" for i in range(start, start + n)]


def shard_files(cache: FeatureCache, suffix: str) -> list[Path]:
    return sorted(
        path
        for path in cache.folder.iterdir()
        if path.name.startswith("shard-") and path.name.endswith(suffix)
    )


# ---- fingerprints -------------------------------------------------------------------------------------
def test_fingerprint_digest_is_canonical_json() -> None:
    digest = fingerprint_digest({"b": 0.1 + 0.2, "a": (1, 2)})
    canonical = '{"a":[1,2],"b":0.30000000000000004}'  # sorted keys, tuple -> list, float repr
    assert digest == hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert digest == fingerprint_digest({"a": [1, 2], "b": 0.30000000000000004})
    assert digest == fingerprint_digest({"a": [np.int64(1), 2], "b": np.float64(0.1) + 0.2})
    assert digest != fingerprint_digest({"a": [2, 1], "b": 0.30000000000000004})
    assert fingerprint_digest({"p": Path("/x/y")}) == fingerprint_digest({"p": "/x/y"})
    with pytest.raises(TypeError, match=r"fingerprint\.model\.weights is a object"):
        fingerprint_digest({"model": {"weights": object()}})
    with pytest.raises(ValueError, match=r"fingerprint\.scale is nan"):
        fingerprint_digest({"scale": float("nan")})


def test_folder_is_named_by_the_digest_and_checks_its_fingerprint(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT, name="text-embeddings")
    assert cache.folder == tmp_path / f"text-embeddings-{fingerprint_digest(FINGERPRINT)}"
    stored = json.loads((cache.folder / "fingerprint.json").read_text())
    assert stored == {**FINGERPRINT, "size": [32, 32]}
    assert (
        FeatureCache(tmp_path, {**FINGERPRINT, "size": [32, 32]}, name="text-embeddings").folder
        == cache.folder
    )
    other = FeatureCache(tmp_path, {**FINGERPRINT, "timestep": 500}, name="text-embeddings")
    assert other.folder != cache.folder
    (cache.folder / "fingerprint.json").write_text(json.dumps({**stored, "timestep": 1}))  # tampered
    with pytest.raises(ValueError, match=rf"{cache.folder.name} was made for another fingerprint"):
        FeatureCache(tmp_path, FINGERPRINT, name="text-embeddings")
    with pytest.raises(ValueError, match="cache name 'a/b'"):
        FeatureCache(tmp_path, FINGERPRINT, name="a/b")


# ---- computing once ------------------------------------------------------------------------------------
def test_cold_then_warm_get_computes_each_key_once(tmp_path) -> None:
    keys = ids(10)
    teacher = Teacher(keys)
    cache = FeatureCache(tmp_path, FINGERPRINT)
    out = cache.get(keys, teacher, chunk=4)
    assert out.dtype == torch.float32 and out.shape == (10, *SHAPE)
    assert torch.equal(out, expected(keys))
    assert teacher.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # positions into keys, chunk by chunk
    assert (cache.stats.hits, cache.stats.misses) == (0, 10) and cache.stats.compute_seconds > 0
    assert len(shard_files(cache, ".json")) == 3 and len(cache) == 10

    warm = FeatureCache(tmp_path, FINGERPRINT)  # another run
    shuffled = keys[::-1] + keys[:3]
    assert torch.equal(warm.get(shuffled, never), expected(shuffled))
    assert (warm.stats.hits, warm.stats.misses, warm.stats.compute_seconds) == (13, 0, 0.0)
    markers = [json.loads(path.read_text()) for path in shard_files(cache, ".json")]
    per_entry = sum(m["seconds"] for m in markers) / sum(len(m["keys"]) for m in markers)
    assert warm.stats.saved_seconds == pytest.approx(13 * per_entry) and per_entry > 0
    assert set(warm.stats.as_dict()) == {"hits", "misses", "compute_seconds", "saved_seconds"}


def test_partial_hit_computes_only_missing_keys_once_each(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(ids(5), Teacher(ids(5)))
    keys = ids(3, start=3) + ids(3, start=3) + ["new"]  # 3, 4 cached; 5 missing, asked twice; "new"
    teacher = Teacher(keys)
    assert torch.equal(cache.get(keys, teacher), expected(keys))
    assert teacher.computed == [2, 6]
    assert (cache.stats.hits, cache.stats.misses) == (0 + 5, 5 + 2)  # the repeated 5 counts as a hit
    assert "new" in cache and "absent" not in cache and 7 not in cache
    assert sorted(cache.keys()) == sorted(ids(6) + ["new"])
    assert cache.get([], never).shape == (0, *SHAPE)


def test_stored_as_fp16_and_read_memory_mapped(tmp_path, monkeypatch) -> None:
    keys = ids(6)
    cache = FeatureCache(tmp_path, FINGERPRINT)
    values = torch.full((6, *SHAPE), 1 / 3)  # not representable in fp16
    cache.get(keys, lambda positions: values[positions])
    (data_file,) = shard_files(cache, ".npy")
    on_disk = np.load(data_file)
    assert on_disk.dtype == np.float16 and on_disk.shape == (6, *SHAPE)
    modes = []
    real_load = np.load
    monkeypatch.setattr(
        np,
        "load",
        lambda *args, **kwargs: modes.append(kwargs.get("mmap_mode")) or real_load(*args, **kwargs),
    )
    out = FeatureCache(tmp_path, FINGERPRINT).get(keys, never)
    assert modes == ["r"]
    assert torch.equal(out, torch.full((6, *SHAPE), float(np.float16(1 / 3))))


def test_gather_is_one_take_per_shard(tmp_path, monkeypatch) -> None:
    keys = ids(10_000)
    FeatureCache(tmp_path, FINGERPRINT).get(
        keys, lambda p: np.tile(np.arange(len(p), dtype=np.float32)[:, None, None], (1, *SHAPE)), chunk=2_500
    )
    takes = []
    real_take = np.take
    monkeypatch.setattr(
        np, "take", lambda a, rows, axis=None: takes.append(len(rows)) or real_take(a, rows, axis=axis)
    )
    order = np.random.default_rng(0).permutation(10_000)
    out = FeatureCache(tmp_path, FINGERPRINT).get([keys[i] for i in order], never)
    assert sorted(takes) == [2_500] * 4  # 4 shards, one vectorised gather each
    torch.testing.assert_close(
        out[:, 0, 0], torch.from_numpy((order % 2_500).astype(np.float16).astype(np.float32))
    )


def test_progress_bar_only_when_there_are_misses(tmp_path, capsys, monkeypatch) -> None:
    import mmfed.teacher.cache

    # as on a terminal (off one, tqdm draws no bar at all: mmfed.console.bar_disabled)
    monkeypatch.setattr(mmfed.teacher.cache, "bar_disabled", lambda wanted=True: not wanted)
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(ids(3), Teacher(ids(3)), progress="text embeddings")
    assert "text embeddings" in capsys.readouterr().err
    cache.get(ids(3), never, progress="text embeddings")
    cache.get(ids(4, start=10), Teacher(ids(4, start=10)))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ---- bad input ------------------------------------------------------------------------------------------
def test_keys_are_validated(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    for bad, shown in (("", "''"), ("a\nb", r"'a\\nb'"), (3, "3")):
        with pytest.raises(ValueError, match=rf"cache key #1 {shown} must be a non-empty string"):
            cache.get(["ok", bad], never)
    with pytest.raises(TypeError, match="got one string"):
        cache.get("abc", never)
    with pytest.raises(ValueError, match="chunk must be > 0"):
        cache.get(["ok"], never, chunk=0)


@pytest.mark.parametrize(
    ("value", "message"),
    [(float("nan"), "is NaN"), (70_000.0, "out of float16 range"), (-float("inf"), "out of float16 range")],
)
def test_values_fp16_cannot_hold_are_refused_naming_the_key(tmp_path, value, message) -> None:
    keys = ids(6)
    cache = FeatureCache(tmp_path, FINGERPRINT)

    def compute(positions: list[int]) -> np.ndarray:
        rows = np.stack([feature(keys[p]) for p in positions])
        if 4 in positions:
            rows[positions.index(4), 1, 2] = value
        return rows

    with pytest.raises(ValueError, match=rf"key '{keys[4]}' is {message}"):
        cache.get(keys, compute, chunk=3)
    assert sorted(cache.keys()) == sorted(keys[:3])  # the earlier chunk stays; the bad one is not stored
    assert cache.get(keys[:3], never).isfinite().all()


def test_ragged_or_wrong_sized_computes_are_refused(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(["a"], lambda p: np.zeros((1, *SHAPE)))
    with pytest.raises(ValueError, match=r"compute returned shape \(1, 3, 4\) for 2 keys \(first 'b'\)"):
        cache.get(["b", "c"], lambda p: np.zeros((1, *SHAPE)))
    with pytest.raises(ValueError, match=r"entries of shape \(4, 3\);.* holds \(3, 4\)"):
        cache.get(["b"], lambda p: np.zeros((1, 4, 3)))
    with pytest.raises(TypeError, match="compute returned list"):
        cache.get(["b"], lambda p: [[0.0]])
    assert cache.keys() == ["a"]


# ---- crashes ---------------------------------------------------------------------------------------------
def _extract_in_child(root: str, keys: list[str], crash: str) -> None:
    """Runs in a forked child: extract `keys` in chunks of 4 and die the way `crash` says."""
    teacher = Teacher(keys)

    def compute(positions: list[int]) -> torch.Tensor:
        if crash == "exit in compute" and len(teacher.calls) == 1:
            os._exit(3)
        return teacher(positions)

    if crash == "kill before marker":  # the 2nd chunk's data file is in place, its JSON never comes
        real_save_json = cache_module.save_json

        def save_json(obj, path):
            if Path(path).name.startswith("shard-") and len(teacher.calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real_save_json(obj, path)

        cache_module.save_json = save_json
    if crash == "kill mid-write":  # half of the 2nd chunk's data reaches the temporary file
        real_save_rows = cache_module._save_rows

        def save_rows(handle, rows):
            if len(teacher.calls) == 2:
                handle.write(b"\x93NUMPY\x01\x00" + b"\x00" * 40)
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_save_rows(handle, rows)

        cache_module._save_rows = save_rows
    FeatureCache(root, FINGERPRINT).get(keys, compute, chunk=4)
    os._exit(0)


@pytest.mark.parametrize("crash", ["exit in compute", "kill before marker", "kill mid-write"])
def test_a_crashed_extraction_keeps_exactly_its_committed_chunks(tmp_path, crash) -> None:
    keys = ids(10)
    child = multiprocessing.get_context("fork").Process(
        target=_extract_in_child, args=(str(tmp_path), keys, crash)
    )
    child.start()
    child.join(timeout=60)
    assert child.exitcode in (3, -signal.SIGKILL), child.exitcode
    folder = tmp_path / f"features-{fingerprint_digest(FINGERPRINT)}"
    uncommitted = [path for path in folder.iterdir() if path.name.endswith((".tmp", ".npy"))]
    assert len(uncommitted) == (1 if crash == "exit in compute" else 2)  # the dead writer's leftovers ...
    cache = FeatureCache(tmp_path, FINGERPRINT)  # ... which a new cache never reads, and removes
    left = sorted(path.name for path in folder.iterdir())
    assert len(shard_files(cache, ".json")) == 1 and len(shard_files(cache, ".npy")) == 1, left
    assert not [name for name in left if name.endswith(".tmp")], left
    assert sorted(cache.keys()) == sorted(keys[:4])
    teacher = Teacher(keys)
    assert torch.equal(cache.get(keys, teacher, chunk=4), expected(keys))
    assert teacher.computed == list(range(4, 10))


def test_uncommitted_files_of_a_dead_writer_are_ignored_then_removed(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(["a"], Teacher(["a"]))
    dead = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    host = cache_module._HOST
    orphan = cache.folder / f"shard-{host}-{dead.pid}-abc123.npy"
    np.save(orphan, np.zeros((1, *SHAPE), np.float16))
    partial = cache.folder / f".shard-{host}-{dead.pid}-def456.json.x1y2.tmp"
    partial.write_text('{"keys": ["b"')
    alive = cache.folder / f"shard-{host}-{os.getpid()}-fed987.npy"  # a live writer, about to commit
    np.save(alive, np.zeros((1, *SHAPE), np.float16))
    FeatureCache(tmp_path, FINGERPRINT)
    assert not orphan.exists() and not partial.exists() and alive.exists()
    assert cache.keys() == ["a"]


# ---- sharing -----------------------------------------------------------------------------------------------
def test_a_reader_rescans_for_keys_another_cache_committed(tmp_path) -> None:
    reader = FeatureCache(tmp_path, FINGERPRINT)
    assert len(reader) == 0
    writer = FeatureCache(tmp_path, FINGERPRINT)
    writer.get(ids(8), Teacher(ids(8)))
    assert torch.equal(reader.get(ids(8), never), expected(ids(8)))
    assert reader.stats.hits == 8


def _extract_range(root: str, keys: list[str], barrier) -> None:
    barrier.wait()
    FeatureCache(root, FINGERPRINT).get(keys, Teacher(keys), chunk=5)
    os._exit(0)


def test_processes_sharing_a_folder_with_overlapping_keys(tmp_path) -> None:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    ranges = [ids(30, start=0), ids(30, start=15), ids(30, start=25)]
    children = [
        context.Process(target=_extract_range, args=(str(tmp_path), keys, barrier)) for keys in ranges
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0, 0]
    cache = FeatureCache(tmp_path, FINGERPRINT)
    stored = [key for path in shard_files(cache, ".json") for key in json.loads(path.read_text())["keys"]]
    assert len(stored) >= 55 and all(
        len(json.loads(p.read_text())["keys"]) <= 5 for p in shard_files(cache, ".json")
    )
    everything = ids(55)
    assert sorted(cache.keys()) == sorted(everything)
    assert torch.equal(cache.get(everything, never), expected(everything))


def test_duplicate_keys_across_shards_first_shard_wins(tmp_path) -> None:
    first = FeatureCache(tmp_path, FINGERPRINT)
    first.get(["x", "y"], Teacher(["x", "y"]))
    racer = FeatureCache(tmp_path, FINGERPRINT)
    racer._index.clear()  # as if it had raced the first writer: it computes "x" again (marked: + 1)
    racer.get(["x"], lambda positions: expected(["x"]) + 1)
    markers = shard_files(first, ".json")
    assert len(markers) == 2
    first_x = 0 if json.loads(markers[0].read_text())["keys"] == ["x", "y"] else 1
    fresh = FeatureCache(tmp_path, FINGERPRINT)
    assert len(fresh) == 2 and torch.equal(fresh.get(["y"], never), expected(["y"]))
    assert torch.equal(fresh.get(["x"], never), expected(["x"]) + first_x)  # the shard that sorts first


def test_compact_merges_shards_and_keeps_values_and_timing(tmp_path) -> None:
    keys = ids(23)
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(keys, Teacher(keys), chunk=5)
    cache.get(keys[:2] + ["extra"], Teacher(keys[:2] + ["extra"]))
    per_entry = cache.seconds_per_entry()
    assert len(shard_files(cache, ".json")) == 6
    cache.compact()
    assert len(shard_files(cache, ".json")) == 1 and len(shard_files(cache, ".npy")) == 1
    assert not [path for path in cache.folder.iterdir() if path.name.endswith(".tmp")]
    everything = keys + ["extra"]
    assert torch.equal(cache.get(everything, never), expected(everything))
    reopened = FeatureCache(tmp_path, FINGERPRINT)
    assert reopened.seconds_per_entry() == pytest.approx(per_entry)
    assert torch.equal(reopened.get(everything[::-1], never), expected(everything[::-1]))
    reopened.compact()  # one shard: nothing to do
    assert len(shard_files(reopened, ".json")) == 1


def test_a_reader_survives_another_process_compacting(tmp_path) -> None:
    keys = ids(12)
    FeatureCache(tmp_path, FINGERPRINT).get(keys, Teacher(keys), chunk=4)
    reader = FeatureCache(tmp_path, FINGERPRINT)  # indexed 3 shards, opened none yet
    FeatureCache(tmp_path, FINGERPRINT).compact()
    assert torch.equal(reader.get(keys, never), expected(keys))


def test_stats_start_empty() -> None:
    assert CacheStats().as_dict() == {"hits": 0, "misses": 0, "compute_seconds": 0.0, "saved_seconds": 0.0}


def test_a_committed_shard_whose_data_is_gone_is_an_error_naming_it(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(["a"], Teacher(["a"]))
    (data_file,) = shard_files(cache, ".npy")
    data_file.unlink()
    with pytest.raises(FileNotFoundError, match=rf"committed shard data is gone: .*{data_file.name}"):
        FeatureCache(tmp_path, FINGERPRINT).get(["a"], never)


# ---- integrity ---------------------------------------------------------------------------------------------
def _same_size_random(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).bytes(size))


def _nan_payload(path: Path) -> None:
    data = np.load(path)
    data[0, 0, 0] = np.nan
    np.save(path, data)  # same size, valid .npy: only the checksum sees it


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _swapped_keys(path: Path) -> None:
    marker = path.with_suffix(".json")
    meta = json.loads(marker.read_text())
    meta["keys"][0], meta["keys"][1] = meta["keys"][1], meta["keys"][0]
    marker.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_same_size_random, _nan_payload, _truncated, _swapped_keys])
def test_a_damaged_shard_is_set_aside_naming_it_and_its_keys_recomputed(tmp_path, caplog, damage) -> None:
    keys = ids(8)
    FeatureCache(tmp_path, FINGERPRINT).get(keys, Teacher(keys), chunk=4)  # two shards of 4
    cache = FeatureCache(tmp_path, FINGERPRINT)
    damaged = shard_files(cache, ".npy")[0]
    damage(damaged)
    teacher = Teacher(keys)
    with caplog.at_level("WARNING", logger="mmfed"):
        assert torch.equal(FeatureCache(tmp_path, FINGERPRINT).get(keys, teacher, chunk=4), expected(keys))
    assert len(teacher.computed) == 4  # exactly the damaged shard's keys
    assert damaged.name in caplog.text and "set aside" in caplog.text
    assert (damaged.parent / f"corrupt-{damaged.name}").exists()
    assert torch.equal(FeatureCache(tmp_path, FINGERPRINT).get(keys, never), expected(keys))  # repaired


def test_markers_carry_a_checksum_of_keys_and_data(tmp_path) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(["a", "b"], Teacher(["a", "b"]))
    (marker,) = shard_files(cache, ".json")
    meta = json.loads(marker.read_text())
    assert meta["checksum"] == cache_module.file_checksum(marker.with_suffix(".npy"), ["a", "b"])


def test_a_marker_without_checksum_is_read_but_a_nan_in_it_is_refused(tmp_path, caplog) -> None:
    cache = FeatureCache(tmp_path, FINGERPRINT)
    cache.get(["a", "b"], Teacher(["a", "b"]))
    (marker,) = shard_files(cache, ".json")
    meta = json.loads(marker.read_text())
    del meta["checksum"]  # as written before checksums existed
    marker.write_text(json.dumps(meta))
    assert torch.equal(FeatureCache(tmp_path, FINGERPRINT).get(["a", "b"], never), expected(["a", "b"]))
    _nan_payload(marker.with_suffix(".npy"))
    teacher = Teacher(["a", "b"])
    with caplog.at_level("WARNING", logger="mmfed"):
        assert torch.equal(FeatureCache(tmp_path, FINGERPRINT).get(["a", "b"], teacher), expected(["a", "b"]))
    assert teacher.computed == [0, 1] and "holds NaN" in caplog.text
