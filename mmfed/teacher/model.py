"""The frozen Stable Diffusion teacher: text embeddings, VAE latents and U-Net decoder features.

FedDifRC (and similar methods) read a pretrained text-to-image diffusion model as a frozen teacher:
the CLIP text encoder embeds class prompts, and the U-Net's decoder ("up") blocks, run on a noised
VAE latent of an image, give features that carry the model's semantics. This module loads the parts
of an SD 1.x / 2.x checkpoint (or a distilled U-Net with the same layout, or `mmfed teacher
pretrain`'s small one) with ``from_pretrained(subfolder=...)`` and exposes exactly those reads.

Noise is drawn per sample from a generator seeded by (noise seed, sample id), never from a batch
stream, so a sample's features do not depend on which batch it was in and the cache may key on the
sample id. The U-Net is stopped right after the deepest requested decoder block (a forward hook
raises, the caller catches), so asking for block 1 of 4 skips blocks 2-3 and the output conv.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import mmfed  # noqa: F401  (the torchvision guard, before diffusers/transformers)
from mmfed.config import register
from mmfed.settings import (  # noqa: F401  (this module's API too)
    CONDITIONS,
    TEACHER_DEVICES,
    TEACHER_DTYPES,
    TeacherSettingsBase,
    default_teacher,
    mmfed_home,
)
from mmfed.utils.seeding import torch_generator

DEFAULT_TEACHER = str(mmfed_home() / "teachers" / "synthetic-sd")  # written by `mmfed teacher pretrain`
DTYPES = {name: getattr(torch, name) for name in TEACHER_DTYPES}
DEVICES = TEACHER_DEVICES
PART_FOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@register("teacher", "sd")
class TeacherSettings(TeacherSettingsBase):
    """Which diffusion model to read and how (`TeacherSettingsBase`: the signature, i.e. the ``teacher``
    config group, and its checks, torch-free so that `mmfed config` checks them without torch)."""

    def resolved_device(self) -> torch.device:
        """`device` with ``auto`` resolved; half precision on a CPU is refused here too."""
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        if self.dtype != "float32" and device == "cpu":
            raise ValueError(
                f"teacher.dtype={self.dtype!r} needs a GPU but teacher.device=auto found none; "
                "use teacher.dtype=float32"
            )
        return torch.device(device)


class TeacherLoadError(FileNotFoundError):
    """The teacher could not be loaded; the message names the model, revision, where and why."""


@dataclass
class TextFeatures:
    pooled: torch.Tensor  # [B, Dt] float32 cpu: CLIP's pooled output (the EOS token's final state)
    tokens: torch.Tensor  # [B, L, Dt] float32 cpu: the last hidden state (what the U-Net attends to)


class _StopForward(Exception):
    """Raised by the hook of the deepest requested up block: the rest of the U-Net is not needed."""


# ----------------------------------------------------------------------------- loading
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def _is_path_like(model: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that is not an existing folder is a path."""
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _load_error(model: str, revision: str | None, where: str, why: str) -> TeacherLoadError:
    hint = ""
    if Path(model).expanduser() == Path(default_teacher()):
        hint = "; the default teacher is made by `mmfed teacher pretrain`"
    first = why.strip().splitlines()[0].rstrip(".") if why.strip() else "unknown error"
    rev = f" (revision {revision})" if revision else ""
    return TeacherLoadError(f"could not load teacher '{model}'{rev} from {where}: {first}{hint}")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_PROBE = 1 << 20  # bytes hashed at each end of a weight file


def folder_fingerprint(folder: Path) -> str:
    """sha256 of a model folder's contents, without loading or reading whole weight files.

    Config and tokenizer files (.json, .txt) are hashed whole; each weight file by its size and its
    first and last MiB (a re-trained or edited teacher changes them; hashing multi-GB files would cost
    more than a warm feature cache saves). Names and contents only, never times: a copied teacher is
    the same teacher and keeps its cached features.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.suffix in (".json", ".txt"):
            digest.update(rel.encode() + b"\0" + path.read_bytes())
        elif path.suffix in _WEIGHT_SUFFIXES:
            size = path.stat().st_size
            with path.open("rb") as handle:
                head = handle.read(_PROBE)
                handle.seek(max(0, size - _PROBE))
                tail = handle.read(_PROBE)
            digest.update(f"{rel}\0{size}\0".encode() + head + tail)
    return digest.hexdigest()


def _hub_revision(model: str, revision: str | None) -> str:
    """The commit a hub model was loaded at (its cache snapshot), else the requested revision."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, "model_index.json", revision=revision)
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return Path(cached).parent.name
    return revision or "main"


def _pin_eval(module: nn.Module) -> nn.Module:
    """Freeze `module` and keep it in eval mode: a later ``.train()`` (e.g. from a parent) is a no-op."""
    module.requires_grad_(False)
    module.eval()
    for sub in module.modules():
        sub.train = MethodType(lambda self, mode=True: self, sub)  # type: ignore[method-assign]
    return module


@dataclass
class _Parts:
    """The loaded modules of one checkpoint, shared by every settings object that reads it."""

    tokenizer: Any
    text_encoder: nn.Module
    vae: nn.Module
    unet: nn.Module
    scheduler: Any
    identity_revision: str
    empty_tokens: torch.Tensor | None = None  # the empty prompt's hidden states, encoded once


def _load_parts(settings: TeacherSettings, device: torch.device) -> _Parts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model, revision = settings.model, settings.revision
    folder = Path(model).expanduser()
    local = folder.is_dir()
    if not local and _is_path_like(model):
        raise _load_error(model, revision, str(folder), "the folder does not exist")
    if local:
        where = str(folder)
        for part in ("model_index.json", *PART_FOLDERS):
            if not (folder / part).exists():
                raise _load_error(model, revision, where, f"it has no '{part}' (not an SD folder layout)")
        source = str(folder)
    else:
        where = (
            f"the Hugging Face cache {_hub_cache()}"
            if settings.local_files_only or _offline()
            else (f"the Hugging Face hub (cache {_hub_cache()})")
        )
        source = model
    kwargs = {"revision": revision, "local_files_only": settings.local_files_only or _offline()}
    classes = {
        "tokenizer": CLIPTokenizer,
        "text_encoder": CLIPTextModel,
        "vae": AutoencoderKL,
        "unet": UNet2DConditionModel,
        "scheduler": DDPMScheduler,
    }
    dtype = DTYPES[settings.dtype]
    # the dtype at load time (not a later .to(dtype)), so modules a library keeps in float32 stay so
    dtype_kwargs = {
        "text_encoder": {"dtype": dtype},
        "vae": {"torch_dtype": dtype},
        "unet": {"torch_dtype": dtype},
    }
    loaded: dict[str, Any] = {}
    for part, cls in classes.items():
        try:
            loaded[part] = cls.from_pretrained(source, subfolder=part, **kwargs, **dtype_kwargs.get(part, {}))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise _load_error(model, revision, where, f"{part}: {error}") from error
    for part in dtype_kwargs:
        _pin_eval(loaded[part].to(device))
    identity_revision = (revision or folder_fingerprint(folder)) if local else _hub_revision(model, revision)
    return _Parts(**loaded, identity_revision=identity_revision)


_PARTS_CACHE: dict[tuple[str, str | None, str, str], _Parts] = {}


# ----------------------------------------------------------------------------- the teacher
class StableDiffusionTeacher:
    """A frozen SD checkpoint read through `settings` (prompts, blocks, timestep, noise seeds)."""

    def __init__(self, parts: _Parts, settings: TeacherSettings, device: torch.device) -> None:
        self.settings, self.device, self.dtype = settings, device, DTYPES[settings.dtype]
        self.tokenizer, self.text_encoder = parts.tokenizer, parts.text_encoder
        self.vae, self.unet, self.scheduler = parts.vae, parts.unet, parts.scheduler
        n_blocks = len(self.unet.up_blocks)
        self._check_blocks(settings.up_blocks)
        steps = self.scheduler.config.num_train_timesteps
        if settings.timestep >= steps:
            raise ValueError(f"teacher.timestep={settings.timestep} is out of range 0..{steps - 1}")
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = settings.resolution or self.unet.config.sample_size * self.vae_scale
        if self.resolution % self.vae_scale:
            raise ValueError(f"teacher.resolution={self.resolution} must be a multiple of {self.vae_scale}")
        self.text_dim: int = self.text_encoder.config.hidden_size
        reversed_channels = list(reversed(self.unet.config.block_out_channels))
        self.block_channels: dict[int, int] = {i: reversed_channels[i] for i in range(n_blocks)}
        self.identity: dict[str, Any] = {
            "model": settings.model,
            "revision": parts.identity_revision,
            "dtype": settings.dtype,
            "resolution": self.resolution,
        }
        self._parts = parts

    @classmethod
    def load(cls, settings: TeacherSettings) -> StableDiffusionTeacher:
        """Load the checkpoint's parts (frozen, eval pinned, on the settings' device and dtype)."""
        device = settings.resolved_device()
        return cls(_load_parts(settings, device), settings, device)

    @classmethod
    def from_modules(
        cls, modules: dict[str, Any], settings: TeacherSettings, revision: str = "in-memory"
    ) -> StableDiffusionTeacher:
        """A teacher around parts built in memory (benchmarks of full-size architectures, no disk).

        `modules` holds PART_FOLDERS' objects; they are frozen, pinned to eval and moved to the
        settings' device and dtype like loaded ones. `revision` stands in for the weights' identity.
        """
        device = settings.resolved_device()
        for part in ("text_encoder", "vae", "unet"):
            module = modules[part].to(device=device)
            if settings.dtype != "float32":  # (a float32 .to() makes diffusers warn for nothing)
                module = module.to(dtype=DTYPES[settings.dtype])
            _pin_eval(module)
        return cls(
            _Parts(**{p: modules[p] for p in PART_FOLDERS}, identity_revision=revision), settings, device
        )

    # ------------------------------------------------------------------ text
    def prompts(self, classes: list[str]) -> list[str]:
        return [self.settings.prompt_template.format(name) for name in classes]

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state [B, L, Dt], pooled [B, Dt]) on the device, padded to the max length like SD."""
        ids = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        out = self.text_encoder(ids)
        return out.last_hidden_state, out.pooler_output

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> TextFeatures:
        tokens, pooled = self._tokens(texts)
        return TextFeatures(pooled=pooled.float().cpu(), tokens=tokens.float().cpu())

    @torch.no_grad()
    def _prompt_tokens(self, prompts: Sequence[str | None]) -> torch.Tensor:
        """Hidden states of `prompts` ([B, L, Dt], device, teacher dtype); empty ones share one encoding."""
        if self._parts.empty_tokens is None:
            self._parts.empty_tokens = self._tokens([""])[0]
        rows = [i for i, p in enumerate(prompts) if p]
        out = self._parts.empty_tokens.expand(len(prompts), -1, -1).clone()
        if rows:
            out[rows] = self._tokens([prompts[i] for i in rows])[0]
        return out

    # ------------------------------------------------------------------ images
    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float in [-1, 1] at the teacher's resolution (bilinear, antialiased)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [B, 3, H, W], got {images.dtype} {list(images.shape)}")
        x = images.to(self.device).float() / 127.5 - 1.0
        if x.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x.to(self.dtype)

    @torch.no_grad()
    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE posterior mean, scaled like SD's pipelines (device, teacher dtype) [B, 4, h, w]."""
        mean = self.vae.encode(self._pixels(images)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * self.vae.config.scaling_factor

    def vae_latents(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> posterior mean * scaling_factor, float32 cpu [B, 4, h, w] (deterministic)."""
        return self._latents(images).float().cpu()

    # ------------------------------------------------------------------ U-Net
    def _check_blocks(self, blocks: Sequence[int]) -> list[int]:
        n = len(self.unet.up_blocks)
        blocks = [int(b) for b in blocks]
        if not blocks or any(b < 0 or b >= n for b in blocks) or len(set(blocks)) != len(blocks):
            raise ValueError(f"teacher.up_blocks={blocks}: this U-Net has up blocks 0..{n - 1} (distinct)")
        return blocks

    def noise(self, noise_keys: Sequence[str], seed: int, shape: Sequence[int]) -> torch.Tensor:
        """Gaussian noise [B, *shape], row i drawn from a generator seeded by (seed, noise_keys[i]).

        Drawn on the CPU, so a sample's noise is the same on any device and in any batch.
        """
        return torch.stack(
            [torch.randn(*shape, generator=torch_generator(seed, "teacher-noise", key)) for key in noise_keys]
        )

    def _decoder_features(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, blocks: list[int]
    ) -> dict[int, torch.Tensor]:
        """Outputs of up blocks `blocks` of one U-Net pass, stopped after the deepest of them."""
        captured: dict[int, torch.Tensor] = {}
        last = max(blocks)

        def hook(index: int):
            def capture(module: nn.Module, args: Any, output: Any) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == last:
                    raise _StopForward

            return capture

        handles = [self.unet.up_blocks[b].register_forward_hook(hook(b)) for b in blocks]
        try:
            self.unet(noisy, timesteps, encoder_hidden_states=context)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {b: captured[b] for b in blocks}

    def unet_features(
        self,
        images: torch.Tensor,
        noise_keys: list[str],
        prompts: list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        timestep: int | None = None,
        noise_seeds: list[int] | None = None,
        up_blocks: list[int] | None = None,
        pooled: bool = True,
    ) -> dict[int, torch.Tensor]:
        """Decoder-block features of noised images: block -> [B, C] (spatial mean) or [B, C, h, w].

        The image's VAE latent is noised to `timestep` with each of `noise_seeds` (per-sample noise
        keyed by `noise_keys`, the sample ids), the U-Net reads it conditioned on `prompts` (None or
        "" = the empty prompt) or on `prompt_embeds` [B, L, Dt]; features are averaged over seeds.
        When `prompt_embeds` requires grad, gradients flow into it (the teacher's weights get none).
        Returns float32, on `prompt_embeds`' device if given, else on the CPU.
        """
        blocks = self._check_blocks(self.settings.up_blocks if up_blocks is None else up_blocks)
        timestep = self.settings.timestep if timestep is None else int(timestep)
        seeds = list(self.settings.noise_seeds if noise_seeds is None else noise_seeds)
        if not 0 <= timestep < self.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"timestep={timestep} is out of range 0..{self.scheduler.config.num_train_timesteps - 1}"
            )
        latents = self._latents(images)
        batch = latents.shape[0]
        if len(noise_keys) != batch:
            raise ValueError(f"noise_keys has {len(noise_keys)} entries for {batch} images")
        if prompt_embeds is not None:
            context = prompt_embeds.to(self.device, self.dtype)
            out_device = prompt_embeds.device
        else:
            if prompts is not None and len(prompts) != batch:
                raise ValueError(f"prompts has {len(prompts)} entries for {batch} images")
            context = self._prompt_tokens(prompts if prompts is not None else [""] * batch)
            out_device = torch.device("cpu")
        timesteps = torch.full((batch,), timestep, device=self.device, dtype=torch.long)
        grad = prompt_embeds is not None and prompt_embeds.requires_grad and torch.is_grad_enabled()
        total: dict[int, torch.Tensor] = {}
        with torch.set_grad_enabled(grad):
            for seed in seeds:
                noise = self.noise(noise_keys, seed, latents.shape[1:]).to(self.device, self.dtype)
                noisy = self.scheduler.add_noise(latents, noise, timesteps)
                for b, value in self._decoder_features(noisy, timesteps, context, blocks).items():
                    value = value.float().mean(dim=(2, 3)) if pooled else value.float()
                    total[b] = total[b] + value if b in total else value
        return {b: (total[b] / len(seeds)).to(out_device) for b in blocks}

    def pool(self, features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-block features (maps are spatially averaged) in their order: [B, sum C]."""
        return torch.cat([f.mean(dim=(2, 3)) if f.ndim == 4 else f for f in features.values()], dim=1)


def get_teacher(settings: TeacherSettings) -> StableDiffusionTeacher:
    """The teacher for `settings`, its weights loaded once per process per (model, revision, dtype, device).

    Loss terms are built every client round; they share the loaded modules. The returned wrapper is
    new each call (cheap), so different settings (blocks, timestep, prompts) never leak into each other.
    """
    device = settings.resolved_device()
    key = (settings.model, settings.revision, settings.dtype, str(device))
    if key not in _PARTS_CACHE:
        _PARTS_CACHE[key] = _load_parts(settings, device)
    return StableDiffusionTeacher(_PARTS_CACHE[key], settings, device)
