"""What every real-data source shares: where data is looked for, one clear error when it is missing,
image stores and their verification, held-out validation splits.

A source follows the `SyntheticWorld` interface: ``split(name) -> MultimodalSplit`` (built on first
use, then kept), ``image_classes``, ``text_classes``. Constructors only store settings: nothing is
read until a split is asked for, so every registered config builds instantly and a missing dataset
fails where it is used, with one line that names the dataset, every place tried and what to put
where.

Where a source looks, in order: the standard local layout under ``root``; a `datasets` dataset
saved with ``save_to_disk`` at ``root``; ``hub_id`` (a folder saved with ``save_to_disk``, or a
Hugging Face hub id loaded with ``datasets.load_dataset``, which also finds the local HF cache).
``root`` defaults to ``$MMFED_DATA_DIR/<dataset>`` (``MMFED_DATA_DIR`` defaults to ``./data``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mmfed.config import check_choice
from mmfed.data.samples import CorruptImageError, LazyImages, MultimodalSplit, to_rgb_uint8
from mmfed.utils.seeding import numpy_rng

log = logging.getLogger("mmfed.data")

DATA_DIR_ENV = "MMFED_DATA_DIR"
VERIFY_MODES = ("none", "open", "decode")
RECIPES = "data_recipes/README.md"


class DataNotFoundError(FileNotFoundError):
    """No copy of a dataset was found; the message lists every place tried and what to put where.

    Its advice names config keys as they are written on the command line (``data.root=FOLDER``);
    a source inside another config (a composite's role) is re-raised `under` its key, and a command
    that knows its own command line (`mmfed eval`) adds it, so the advice is a command to run.
    """

    def __init__(
        self,
        dataset: str,
        tried: str,
        hint: str,
        options: dict[str, str],
        prefix: str = "data.",
        command: str | None = None,
    ) -> None:
        self.dataset, self.tried, self.hint, self.options = dataset, tried, hint, options
        self.prefix, self.command = prefix, command
        advised = self.advised_overrides()
        if not advised:
            advice = f"See {RECIPES}."
        elif command:
            others = f" (or {' / '.join(advised[1:])})" if len(advised) > 1 else ""
            advice = f"Then run: {command} {advised[0]}{others}; see {RECIPES}."
        else:
            advice = f"Or pass {' or '.join(advised)} (see {RECIPES})."
        super().__init__(f"dataset '{dataset}' not found. Tried: {tried}. {hint} {advice}")

    def advised_overrides(self) -> list[str]:
        """The ``key=VALUE`` overrides the message advises, e.g. ``data.root=FOLDER``."""
        return [f"{self.prefix}{key}={value}" for key, value in self.options.items()]

    def under(self, prefix: str | None = None, command: str | None = None) -> DataNotFoundError:
        """The same error for a source configured at `prefix` (``data.paired.``) / advising `command`."""
        return DataNotFoundError(
            self.dataset, self.tried, self.hint, self.options, prefix or self.prefix, command or self.command
        )


def default_root(folder: str) -> Path:
    """``$MMFED_DATA_DIR/<folder>`` (``./data/<folder>`` when the variable is unset)."""
    return Path(os.environ.get(DATA_DIR_ENV, "data")) / folder


def hub_offline() -> bool:
    """True when the Hugging Face libraries will not contact the hub (HF_HUB_OFFLINE and friends)."""
    from huggingface_hub import constants

    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = any(os.environ.get(flag, "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags)
    return bool(constants.HF_HUB_OFFLINE) or env


class Attempts:
    """The places a source looked for its data, and why each failed; becomes one error line."""

    def __init__(self, dataset: str) -> None:
        self.dataset, self.items = dataset, []

    def add(self, where: str, why: str) -> None:
        self.items.append(f"{where} ({why})")

    def error(self, hint: str, options: Sequence[str] = ("root", "hub_id")) -> DataNotFoundError:
        """The not-found error; `options` are the source's keys a user can point elsewhere."""
        placeholders = {"hub_id": "OWNER/NAME"}
        return DataNotFoundError(
            self.dataset,
            "; ".join(self.items) or "nothing",
            hint,
            {key: placeholders.get(key, "FOLDER") for key in options},
        )


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_hf(target: str, attempts: Attempts) -> Any | None:
    """A `datasets` Dataset/DatasetDict from a saved folder or a hub id; None (and why) if unavailable.

    The hub is reached through `datasets.load_dataset`, which also serves the local HF cache; when
    HF_HUB_OFFLINE is set (or there is no network) the failure says so.
    """
    import datasets

    path = Path(target).expanduser()
    if path.exists():
        if not is_saved_dataset(path):
            attempts.add(f"saved `datasets` folder {path}", "no dataset_dict.json or state.json there")
            return None
        return datasets.load_from_disk(str(path))
    if "/" not in target or target.startswith((".", "/", "~")):
        attempts.add(f"hub id / saved folder '{target}'", "no such folder, and not a hub id (owner/name)")
        return None
    offline = hub_offline()
    unreachable = not offline and not hub_reachable()
    try:
        if unreachable:  # only the local HF cache can serve it: ask it at once, not after 20 s of retries
            with _offline_mode():
                return datasets.load_dataset(target)
        return datasets.load_dataset(target)
    except Exception as error:  # the hub client raises many types; each becomes the reason
        if offline:
            why = "HF_HUB_OFFLINE is set and it is not in the local HF cache"
        elif unreachable:
            why = f"no connection to {_endpoint()[0]} (no network?) and not in the local HF cache"
        elif isinstance(error, ConnectionError | OSError):
            why = f"the hub could not be reached (no network?): {_short(error)}"
        else:
            why = _short(error)
        attempts.add(f"hub dataset '{target}'", why)
        return None


def _endpoint() -> tuple[str, int]:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds (once per process).

    Without it `datasets` retries for ~20 s, logging each retry, before it gives up. Behind a proxy
    (HTTPS_PROXY / HTTP_PROXY set) the direct connection says nothing: assume reachable.
    """
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    try:
        socket.create_connection(_endpoint(), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """`datasets` / `huggingface_hub` offline mode for one call: the flags both libraries read at call
    time (HF_HUB_OFFLINE is read from the environment only when they are imported)."""
    from unittest import mock

    import datasets
    from huggingface_hub import constants

    with (
        mock.patch.object(constants, "HF_HUB_OFFLINE", True),
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
    ):
        yield


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def hf_parts(loaded: Any) -> dict[str, Any]:
    """{split name: Dataset} from whatever `load_from_disk`/`load_dataset` returned."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    if isinstance(loaded, datasets.Dataset):
        return {str(loaded.split) if loaded.split is not None else "train": loaded}
    raise ValueError(f"expected a datasets Dataset or DatasetDict, got {type(loaded).__name__}")


def pick_part(parts: dict[str, Any], names: Sequence[str], dataset: str) -> Any:
    """The first of `names` among the loaded splits; an error lists what there is."""
    for name in names:
        if name in parts:
            return parts[name]
    raise ValueError(
        f"dataset '{dataset}': none of the splits {', '.join(names)} in the loaded dataset "
        f"(it has {', '.join(parts) or 'none'})"
    )


# --------------------------------------------------------------------------------------------
# Image stores: where the pixels of row i are
# --------------------------------------------------------------------------------------------


class FileStore:
    """Images as files on disk (JPEG, PNG, ...), opened by PIL on access."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, row: int) -> Image.Image:
        return Image.open(self.paths[row])

    def where(self, row: int) -> str:
        return self.paths[row]


class ArrayStore:
    """Images already in memory as RGB uint8 [N, H, W, 3] (CIFAR's pickle batches)."""

    def __init__(self, array: np.ndarray, origin: str) -> None:
        if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
            raise ValueError(f"{origin}: images must be uint8 [N, H, W, 3], got {array.dtype} {array.shape}")
        self.array, self.origin = array, origin

    def __len__(self) -> int:
        return len(self.array)

    def open(self, row: int) -> np.ndarray:
        return self.array[row]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[rows]

    def where(self, row: int) -> str:
        return f"{self.origin} row {row}"


class HFImageStore:
    """An image column of one or more `datasets` splits, decoded by PIL (not by `datasets`) on access.

    The column is cast to ``Image(decode=False)`` so each access reads one row's bytes (the Arrow
    table is memory-mapped) and decoding errors carry our sample id.
    """

    def __init__(
        self, parts: dict[str, Any], column: str, refs: Sequence[tuple[str, int]], origin: str
    ) -> None:
        from datasets import Image as ImageFeature

        self.parts = {
            name: part.select_columns([column]).cast_column(column, ImageFeature(decode=False))
            for name, part in parts.items()
        }
        self.column, self.refs, self.origin = column, list(refs), origin

    def __len__(self) -> int:
        return len(self.refs)

    def open(self, row: int) -> Image.Image:
        part, index = self.refs[row]
        value = self.parts[part][int(index)][self.column]
        if value is None:
            raise ValueError("no image in this row")
        if value.get("bytes"):
            return Image.open(BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
        raise ValueError("image row has neither bytes nor a path")

    def where(self, row: int) -> str:
        part, index = self.refs[row]
        return f"{self.origin} split '{part}' row {index}"


def _check_one(store: Any, row: int, size: int, mode: str) -> str | None:
    """Why row `row` of `store` is unusable, or None when it is fine."""
    try:
        image = store.open(row)
        if mode == "decode":
            to_rgb_uint8(image, size)
        elif isinstance(image, Image.Image):
            width, height = image.size  # parsed from the header by Image.open
            if width < 1 or height < 1:
                return "image has no pixels"
    except FileNotFoundError:
        return "file is missing"
    except (OSError, ValueError, SyntaxError) as error:
        return _short(error)
    return None


def verify_images(store: Any, rows: np.ndarray, size: int, mode: str) -> dict[int, str]:
    """{position in `rows`: reason} for the rows that cannot be used.

    "open" parses each file's header (fast: no pixel decoding; finds missing, empty, truncated-header
    and non-image files); "decode" decodes every image fully (slow; also finds truncated data);
    "none" checks nothing (a bad file then fails when its batch is decoded, naming the sample).
    """
    check_choice("verify_images", mode, VERIFY_MODES)
    if mode == "none" or isinstance(store, ArrayStore) or len(rows) == 0:
        return {}
    workers = max(1, min(16, 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmfed-verify") as pool:
        reasons = pool.map(lambda row: _check_one(store, int(row), size, mode), rows.tolist(), chunksize=64)
        return {i: why for i, why in enumerate(reasons) if why is not None}


def drop_bad_images(
    dataset: str, split: str, ids: list[str], bad: dict[int, str], skip_corrupt: bool, where: Any
) -> tuple[list[int], dict[str, str]]:
    """(positions kept, {skipped sample id: reason}); unusable images are an error unless skip_corrupt.

    Nothing is dropped silently: the error names the samples and files, a skip is logged and the
    skipped ids travel with the split (`MultimodalSplit.skipped`) into the run's metrics.
    """
    if not bad:
        return list(range(len(ids))), {}
    named = [f"'{ids[i]}' ({where(i)}: {why})" for i, why in sorted(bad.items())[:3]]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    if not skip_corrupt:
        raise CorruptImageError(
            f"dataset '{dataset}' split '{split}': {len(bad)} unreadable image(s): {', '.join(named)}{more}; "
            "fix or remove them, or set skip_corrupt=true to leave them out (they are counted and reported)"
        )
    log.warning(
        "%s/%s: skipping %d unreadable image(s): %s%s", dataset, split, len(bad), ", ".join(named), more
    )
    skipped = {ids[i]: why for i, why in sorted(bad.items())}
    return [i for i in range(len(ids)) if i not in bad], skipped


def holdout(n: int, fraction: float, seed: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of an official train split, seeded, both sorted.

    Model selection needs a split that is neither trained on nor the test split; datasets without an
    official validation split hold out `fraction` of their training rows (the same rows for a given
    seed, whatever the run's seed).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    order = numpy_rng(seed, dataset, "validation-holdout").permutation(n)
    n_val = int(round(n * fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class DataSource:
    """Base of the real-data sources: split caching, names, the skipped-sample count."""

    name: ClassVar[str] = "data"
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(self) -> None:
        self._splits: dict[str, MultimodalSplit] = {}

    def split(self, name: str) -> MultimodalSplit:
        """Split `name` (one of SPLITS), read on first use and kept."""
        if name not in self.SPLITS:
            raise ValueError(
                f"dataset '{self.name}' has no split '{name}'; allowed: {', '.join(self.SPLITS)}"
            )
        if name not in self._splits:
            self._splits[name] = self._build(name)
        return self._splits[name]

    def _build(self, name: str) -> MultimodalSplit:
        raise NotImplementedError

    @property
    def image_classes(self) -> list[str]:
        return []

    @property
    def text_classes(self) -> list[str]:
        return []

    def data_metrics(self) -> dict[str, float]:
        """``data/<dataset>/<split>/skipped``: samples left out of each split read so far."""
        return {f"data/{self.name}/{name}/skipped": float(len(s.skipped)) for name, s in self._splits.items()}


def image_column(
    store: Any,
    ids: list[str],
    rows: np.ndarray,
    size: int,
    *,
    dataset: str,
    split: str,
    verify: str,
    skip_corrupt: bool,
) -> tuple[LazyImages, list[int], dict[str, str]]:
    """A verified lazy image column over `rows` of `store`, plus (positions kept, skipped ids)."""
    bad = verify_images(store, rows, size, verify)
    kept, skipped = drop_bad_images(
        dataset, split, ids, bad, skip_corrupt, lambda i: store.where(int(rows[i]))
    )
    return LazyImages(store, [ids[i] for i in kept], size, rows[kept]), kept, skipped
