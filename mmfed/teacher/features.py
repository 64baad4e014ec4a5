"""What guided algorithms read from the teacher: cached features of samples, prompts and captions.

`TeacherFeatures` joins the frozen teacher (model.py) and the persistent cache (cache.py): every call
looks its keys up first and runs the teacher only on misses, one batch at a time, committing each
batch to disk. A warm cache therefore costs no teacher forward pass and not even a teacher load
(the teacher is loaded lazily, on the first miss).

Keys: a sample id (plus ``#c`` for caption c, ``|class=k`` for class prompt k). Sample ids are stable
within a dataset, not across datasets (the synthetic world names rows ``syn-train-000001`` whatever
its seed), so every sample-keyed cache's fingerprint includes a digest of the data config.

`mmfed teacher extract` (``extract_from_overrides``) fills the cache for one split ahead of training.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmfed.config import ConfigError, check_choice
from mmfed.data.samples import MultimodalSplit
from mmfed.teacher.cache import FeatureCache, fingerprint_digest
from mmfed.teacher.model import StableDiffusionTeacher, TeacherSettings, folder_fingerprint, get_teacher

FEATURE_KINDS = ("text", "prompts", "image", "image_classes", "latents")


def caption_key(sample_id: str, caption: int) -> str:
    return f"{sample_id}#{caption}"


def class_key(sample_id: str, label: int) -> str:
    return f"{sample_id}|class={label}"


def settings_from(teacher: Mapping[str, Any] | TeacherSettings | None) -> TeacherSettings:
    """`TeacherSettings` from a config mapping (a term's ``teacher: ${teacher}``) or None (defaults)."""
    if isinstance(teacher, TeacherSettings):
        return teacher
    values = dict(
        OmegaConf.to_container(teacher, resolve=True) if isinstance(teacher, DictConfig) else teacher or {}
    )
    values.pop("_target_", None)
    try:
        return TeacherSettings(**values)
    except TypeError as error:
        raise ConfigError(f"teacher: {error}") from error


class TeacherFeatures:
    """Cached teacher features; the teacher itself is loaded only when a key is missing."""

    def __init__(self, settings: TeacherSettings, data: str = "") -> None:
        self.settings = settings
        self.data_digest = data  # `config_digest` of the data config the sample ids belong to
        self._teacher: StableDiffusionTeacher | None = None
        self._caches: dict[str, FeatureCache] = {}
        self.forward_batches = 0  # teacher forward passes run by this object (0 on a warm cache)
        self._identity: dict[str, Any] | None = None

    # ------------------------------------------------------------------ plumbing
    @property
    def teacher(self) -> StableDiffusionTeacher:
        if self._teacher is None:
            self._teacher = get_teacher(self.settings)
        return self._teacher

    @property
    def cache_root(self) -> str:
        return self.settings.cache_dir  # TeacherSettings resolved "default" to $MMFED_HOME/features

    def _cache(
        self, kind: str, extra: Mapping[str, Any] | None = None, per_sample: bool = True
    ) -> FeatureCache:
        """One cache folder per feature kind and fingerprint of everything that changes the features."""
        fingerprint: dict[str, Any] = {"kind": kind, "teacher": self.teacher_identity()}
        if kind == "image":
            fingerprint |= self.settings.extraction_fingerprint()
        elif kind == "image_classes":  # every class prompt is explicit: teacher.condition plays no part
            fingerprint |= {
                k: v for k, v in self.settings.extraction_fingerprint().items() if k != "condition"
            }
        else:  # text and latents depend on neither timestep, blocks nor noise
            fingerprint |= {
                k: v
                for k, v in self.settings.extraction_fingerprint().items()
                if k in ("dtype", "resolution", "prompt_template")
            }
        if per_sample:
            fingerprint["data"] = self.data_digest
        fingerprint |= dict(extra or {})
        digest = fingerprint_digest(fingerprint)
        if digest not in self._caches:
            self._caches[digest] = FeatureCache(self.cache_root, fingerprint, name=kind)
        return self._caches[digest]

    def teacher_identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = teacher_identity(self.settings)
        return self._identity

    def block_widths(self) -> list[int]:
        """Channels of each pooled decoder block in `up_blocks` order (the layers of `images`' columns):
        from a local folder's ``unet/config.json`` without loading weights, else from the loaded U-Net."""
        config = Path(self.settings.model).expanduser() / "unet" / "config.json"
        if self._teacher is None and config.is_file():
            channels = list(reversed(json.loads(config.read_text())["block_out_channels"]))
        else:
            channels = [self.teacher.block_channels[i] for i in range(len(self.teacher.block_channels))]
        return [int(channels[b]) for b in self.settings.up_blocks]

    def _batched(self, positions: list[int], run: Any) -> torch.Tensor:
        out = []
        size = self.settings.batch_size
        for start in range(0, len(positions), size):
            out.append(run(positions[start : start + size]).float().cpu())
            self.forward_batches += 1
        return torch.cat(out)

    def stats(self) -> dict[str, float]:
        """Cache hits, misses and seconds, summed over every feature kind used so far."""
        total = {"hits": 0.0, "misses": 0.0, "compute_seconds": 0.0, "saved_seconds": 0.0}
        for cache in self._caches.values():
            for key, value in cache.stats.as_dict().items():
                total[key] = total.get(key, 0.0) + float(value)
        return total

    # ------------------------------------------------------------------ features
    def texts(self, keys: Sequence[str], texts: Sequence[str], progress: str | None = None) -> torch.Tensor:
        """Pooled text-encoder embeddings [B, Dt] of captions, keyed by `caption_key`."""
        return self._cache("text").get(
            list(keys),
            lambda pos: self._batched(pos, lambda p: self.teacher.encode_text([texts[i] for i in p]).pooled),
            progress=progress,
        )

    def prompts(self, classes: Sequence[str]) -> torch.Tensor:
        """Pooled text-encoder embeddings [C, Dt] of the class prompts (template from the settings)."""
        prompts = [self.settings.prompt_template.format(name) for name in classes]
        return self._cache("prompts", per_sample=False).get(
            prompts,
            lambda pos: self._batched(
                pos, lambda p: self.teacher.encode_text([prompts[i] for i in p]).pooled
            ),
        )

    def images(
        self,
        ids: Sequence[str],
        images: torch.Tensor,
        captions: Sequence[str] | None = None,
        caption_index: Sequence[int] | None = None,
        progress: str | None = None,
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Pooled U-Net decoder features [B, F] under `teacher.condition`: the empty prompt, the sample's
        caption (`captions`, `caption_index`) or its class prompt (`labels` into `classes`)."""
        condition = self.settings.condition
        if condition == "class":
            if labels is None or not classes:
                raise ConfigError(
                    "teacher.condition=class needs labelled samples and class names; these have no labels: "
                    "use teacher.condition=empty"
                )
            pairs = [(row, int(label)) for row, label in enumerate(labels)]
            return self._class_prompted(ids, images, pairs, classes, progress)
        if condition == "caption":
            if captions is None or caption_index is None:
                raise ConfigError(
                    "teacher.condition=caption needs captions; these samples have none (image-only clients): "
                    "use teacher.condition=empty"
                )
            keys = [caption_key(i, int(c)) for i, c in zip(ids, caption_index, strict=True)]
        else:
            keys = list(ids)

        def run(pos: list[int]) -> torch.Tensor:
            prompts = None if condition == "empty" else [captions[i] for i in pos]  # type: ignore[index]
            feats = self.teacher.unet_features(images[pos], [ids[i] for i in pos], prompts=prompts)
            return self.teacher.pool(feats)

        return self._cache("image").get(keys, lambda pos: self._batched(pos, run), progress=progress)

    def images_per_class(
        self, ids: Sequence[str], images: torch.Tensor, classes: Sequence[str], progress: str | None = None
    ) -> torch.Tensor:
        """[B, C, F]: each image's pooled U-Net features conditioned on every class prompt (TDCL, cached)."""
        count = len(classes)
        if count < 2:
            raise ConfigError(f"class-prompt features need at least 2 classes, got {list(classes)}")
        pairs = [(row, k) for row in range(len(ids)) for k in range(count)]  # row-major: sample, then class
        return self._class_prompted(ids, images, pairs, classes, progress).view(len(ids), count, -1)

    def _class_prompted(
        self,
        ids: Sequence[str],
        images: torch.Tensor,
        pairs: list[tuple[int, int]],
        classes: Sequence[str],
        progress: str | None,
    ) -> torch.Tensor:
        """[len(pairs), F]: features of image `row` under the prompt of class `k`, for each (row, k).
        One cache for every use of class prompts (TDCL's all-classes reads, NDCR's own-class reads)."""
        prompts = [self.settings.prompt_template.format(name) for name in classes]
        keys = [class_key(ids[row], k) for row, k in pairs]

        def run(pos: list[int]) -> torch.Tensor:
            rows = [pairs[p][0] for p in pos]
            feats = self.teacher.unet_features(
                images[rows], [ids[r] for r in rows], prompts=[prompts[pairs[p][1]] for p in pos]
            )
            return self.teacher.pool(feats)

        return self._cache("image_classes", {"classes": list(classes)}).get(
            keys, lambda pos: self._batched(pos, run), progress=progress
        )

    def latents(self, ids: Sequence[str], images: torch.Tensor, progress: str | None = None) -> torch.Tensor:
        """VAE posterior-mean latents, flattened [B, 4*h*w] (deterministic; no noise, no prompt)."""

        def run(pos: list[int]) -> torch.Tensor:
            return self.teacher.vae_latents(images[pos]).flatten(1)

        return self._cache("latents").get(list(ids), lambda pos: self._batched(pos, run), progress=progress)


def teacher_identity(settings: TeacherSettings) -> dict[str, Any]:
    """Which weights the features come from, computed without loading them: a local folder by its
    contents (`folder_fingerprint`), a hub id by id and revision (pin `teacher.revision` for features
    that must not follow a moving branch)."""
    folder = Path(settings.model).expanduser()
    identity: dict[str, Any] = {"model": settings.model, "revision": settings.revision}
    if folder.is_dir():
        identity["files"] = folder_fingerprint(folder)[:16]
    return identity


_SHARED: dict[str, TeacherFeatures] = {}


def teacher_features(teacher: Mapping[str, Any] | TeacherSettings | None, data: str = "") -> TeacherFeatures:
    """One `TeacherFeatures` per process and (teacher settings, data digest): loss terms are rebuilt
    every client round, the teacher and the cache index must not be."""
    settings = settings_from(teacher)
    key = fingerprint_digest({"settings": vars(settings), "data": data})
    if key not in _SHARED:
        _SHARED[key] = TeacherFeatures(settings, data)
    return _SHARED[key]


# ---------------------------------------------------------------------- mmfed teacher extract
EXTRACT_OPTIONS = {"split": "public", "features": "text,image"}


def split_extract_options(overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """``split=...`` and ``features=...`` are extraction options; everything else composes the config."""
    options, rest = dict(EXTRACT_OPTIONS), []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key in EXTRACT_OPTIONS:
            options[key] = value.strip("[]")
        else:
            rest.append(item)
    return options, rest


def extract_split(
    features: TeacherFeatures,
    split: MultimodalSplit,
    kinds: Sequence[str],
    quiet: bool = False,
    chunk: int = 256,
) -> dict[str, Any]:
    """Fill the cache with the teacher's features of every row of `split` (what is cached is skipped)."""
    for kind in kinds:
        check_choice("features", kind, FEATURE_KINDS)
    started = time.perf_counter()
    stats_before, batches_before = features.stats(), features.forward_batches
    counts: dict[str, int] = {}
    rows = list(range(len(split)))
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        ids = [split.ids[i] for i in part]
        label = None if quiet else f"{split.name} rows {start}-{start + len(part) - 1}"
        if "text" in kinds and split.captions is not None:
            keys = [caption_key(split.ids[i], c) for i in part for c in range(len(split.captions[i]))]
            texts = [cap for i in part for cap in split.captions[i]]
            features.texts(keys, texts, progress=label and f"text {label}")
            counts["text"] = counts.get("text", 0) + len(keys)
        if split.images is None:
            continue
        needs_images = {"image", "image_classes", "latents"} & set(kinds)
        images = split.images[torch.tensor(part)] if needs_images else None
        if "image" in kinds:
            caps = None if split.captions is None else [split.captions[i][0] for i in part]
            labels = None if split.image_labels is None else split.image_labels[torch.tensor(part)].tolist()
            features.images(
                ids, images, caps, [0] * len(part), label and f"image {label}", labels, split.image_classes
            )
            counts["image"] = counts.get("image", 0) + len(part)
        if "image_classes" in kinds and split.image_classes:
            features.images_per_class(ids, images, split.image_classes, progress=label and f"classes {label}")
            counts["image_classes"] = counts.get("image_classes", 0) + len(part) * len(split.image_classes)
        if "latents" in kinds:
            features.latents(ids, images, progress=label and f"latents {label}")
            counts["latents"] = counts.get("latents", 0) + len(part)
    if counts:  # one file per cache instead of one per 256-row chunk: later runs open a single map
        for cache in features._caches.values():
            cache.compact()
    if "prompts" in kinds:
        for classes in (split.image_classes, split.text_classes):
            if classes:
                features.prompts(classes)
                counts["prompts"] = counts.get("prompts", 0) + len(classes)
    return {
        "split": split.name,
        "rows": len(split),
        "entries": counts,
        "seconds": time.perf_counter() - started,
        "teacher_forward_batches": features.forward_batches - batches_before,
        "cache": {k: v - stats_before.get(k, 0.0) for k, v in features.stats().items()},
        "cache_root": features.cache_root,
    }


def extract_from_overrides(cfg: DictConfig, options: Mapping[str, str]) -> dict[str, Any]:
    """`mmfed teacher extract`: the run config's data and teacher, one split, the requested feature kinds."""
    from mmfed.config import config_digest, instantiate

    source = instantiate(cfg.data, "data")
    split = source.split(options["split"])
    kinds = [k.strip() for k in options["features"].split(",") if k.strip()]
    features = teacher_features(cfg.teacher, config_digest(cfg.data))
    return extract_split(features, split, kinds, quiet=bool(cfg.get("quiet", False)))


def format_extraction(result: Mapping[str, Any]) -> str:
    cache = result["cache"]
    entries = ", ".join(f"{k} {v}" for k, v in result["entries"].items())
    return (
        f"split {result['split']}: {result['rows']} rows; entries {entries}\n"
        f"cache hits {int(cache['hits'])}, misses {int(cache['misses'])}, "
        f"computed in {cache['compute_seconds']:.1f} s, "
        f"saved {cache['saved_seconds']:.1f} s; teacher forward batches {result['teacher_forward_batches']}; "
        f"wall {result['seconds']:.1f} s\ncache: {result['cache_root']}"
    )
