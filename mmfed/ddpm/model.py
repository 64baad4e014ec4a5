"""A small class-conditional image diffusion model: a diffusers `UNet2DModel` + its noise schedule.

Why a wrapper: what a client uploads and the server samples from is more than the U-Net weights:
the noise schedule it was trained with, which class index means "no class" (classifier-free
guidance), the resolution it models and the data's image size (samples are resized back to it), and
the client's label counts. `ClassDiffusion` keeps them together and moves them as one unit, either
as a folder (`save` / `load`: diffusers' `save_pretrained` for the U-Net and the scheduler, plus a
small JSON) or as named tensors and a config dict (`to_message` / `from_message`: what a federated
reply carries, so it rides both engines).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmfed.config import check_choice, check_positive
from mmfed.utils.io import save_json

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
META_FILE = "class_diffusion.json"
UNET_PREFIX = "unet/"  # tensor names in a message: "unet/<parameter>"

if TYPE_CHECKING:  # diffusers costs seconds to import: only code that builds a model imports it
    from diffusers import DDPMScheduler, UNet2DModel


def build_unet(
    num_classes: int,
    resolution: int = 16,
    block_out_channels: Sequence[int] = (32, 64, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    guidance: bool = True,
) -> UNet2DModel:
    """A convolution-only U-Net with a class embedding (one extra "null" class when `guidance`).

    No attention blocks: at 16-32 px and a few hundred steps they cost ~3x the time (measured on
    this CPU) for no visible gain on the synthetic shapes. The class embedding is added to the time
    embedding (`num_class_embeds`), the standard class conditioning of diffusers' U-Net.
    """
    from diffusers import UNet2DModel

    check_positive("num_classes", num_classes)
    check_positive("layers_per_block", layers_per_block)
    if resolution < 8 or resolution % (2 ** (len(block_out_channels) - 1)):
        raise ValueError(
            f"resolution={resolution} must be >= 8 and divisible by 2**(len(block_out_channels)-1)="
            f"{2 ** (len(block_out_channels) - 1)}"
        )
    if not block_out_channels or any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"block_out_channels={list(block_out_channels)} must be non-empty multiples of "
            f"norm_num_groups={norm_num_groups}"
        )
    levels = len(block_out_channels)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        add_attention=False,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_classes + (1 if guidance else 0),
    )


def noise_schedule(
    num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2"
) -> DDPMScheduler:
    """The forward process q(x_t | x_0) (Ho et al. 2020); cosine betas suit small images
    (Nichol & Dhariwal 2021)."""
    check_positive("num_train_timesteps", num_train_timesteps)
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


@dataclass
class ClassDiffusion:
    """A class-conditional diffusion model and what is needed to sample from it."""

    unet: UNet2DModel
    scheduler: DDPMScheduler  # the training noise schedule; samplers are built from its config
    num_classes: int
    image_size: int  # the data's image side: samples are resized to it
    guidance: bool = True  # class index `num_classes` is the null class (classifier-free guidance)
    label_counts: list[int] = field(default_factory=list)  # the training labels' counts per class

    def __post_init__(self) -> None:
        expected = self.num_classes + (1 if self.guidance else 0)
        if self.unet.config.num_class_embeds != expected:
            raise ValueError(
                f"unet.num_class_embeds={self.unet.config.num_class_embeds} does not match num_classes="
                f"{self.num_classes} with guidance={self.guidance} (expected {expected})"
            )
        if self.label_counts and len(self.label_counts) != self.num_classes:
            raise ValueError(
                f"label_counts has {len(self.label_counts)} entries, num_classes is {self.num_classes}"
            )

    def to(self, device: torch.device | str) -> ClassDiffusion:
        self.unet.to(device)
        return self

    @property
    def null_class(self) -> int | None:
        return self.num_classes if self.guidance else None

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size)

    def meta(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "guidance": self.guidance,
            "label_counts": list(self.label_counts),
        }

    # ------------------------------------------------------------------ transport
    def to_message(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(named float32 tensors, JSON-able config): everything `from_message` needs."""
        tensors = {UNET_PREFIX + k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}
        config = {
            "unet": _plain(dict(self.unet.config)),
            "scheduler": _plain(dict(self.scheduler.config)),
            **self.meta(),
        }
        return tensors, config

    @classmethod
    def from_message(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> ClassDiffusion:
        missing = [key for key in ("unet", "scheduler", "num_classes", "image_size") if key not in config]
        if missing:
            raise ValueError(f"diffusion model config lacks {missing[0]!r} (has {', '.join(sorted(config))})")
        from diffusers import DDPMScheduler, UNet2DModel

        unet = UNet2DModel.from_config(config["unet"])
        state = {k[len(UNET_PREFIX) :]: v for k, v in tensors.items() if k.startswith(UNET_PREFIX)}
        unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return cls(
            unet=unet,
            scheduler=DDPMScheduler.from_config(config["scheduler"]),
            num_classes=int(config["num_classes"]),
            image_size=int(config["image_size"]),
            guidance=bool(config.get("guidance", True)),
            label_counts=[int(c) for c in config.get("label_counts", [])],
        )

    # ------------------------------------------------------------------ folders
    def save(self, directory: str | Path) -> Path:
        """`directory/unet` and `directory/scheduler` (diffusers `save_pretrained`) + a JSON of the rest."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        save_json(self.meta(), directory / META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ClassDiffusion:
        directory = Path(directory)
        meta_file = directory / META_FILE
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file} not found: not a folder written by ClassDiffusion.save")
        meta = json.loads(meta_file.read_text())
        from diffusers import DDPMScheduler, UNet2DModel

        return cls(
            unet=UNet2DModel.from_pretrained(directory / "unet"),
            scheduler=DDPMScheduler.from_pretrained(directory / "scheduler"),
            **meta,
        )

    def fingerprint(self) -> str:
        """sha256 of the weights (names, dtypes, bytes) and the config: equal iff the models are equal."""
        tensors, config = self.to_message()
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        for name in sorted(tensors):
            tensor = tensors[name].contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config as plain JSON types, without its bookkeeping keys (``_name_or_path``,
    ``_diffusers_version`` ...), so a model's config does not depend on where it was loaded from."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))
