"""The model a client trains and the server aggregates, as named *parts*.

Parts are the unit of aggregation: ``image_encoder`` (image tower + projection to D),
``text_encoder`` (text tower + projection), ``image_head`` and ``text_head`` (classification on the
shared embedding) and ``logit_scale`` (the contrastive temperature). A client builds only the parts
its modality kind trains; the global model has all of them. FedAvg averages a part over exactly the
clients that sent it, which is what makes aggregation modality-wise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from mmfed.config import check_choice, instantiate

PARTS = ("image_encoder", "text_encoder", "image_head", "text_head", "logit_scale")
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "image": ("image_encoder", "image_head"),
    "text": ("text_encoder", "text_head"),
    "paired": ("image_encoder", "text_encoder", "logit_scale"),
    "global": PARTS,
}


class Tower(nn.Module):
    """An encoder followed by the linear projection into the shared latent space of dimension D."""

    def __init__(self, encoder: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = nn.Linear(encoder.output_dim, embed_dim)

    def prepare(self, raw: Any) -> Any:
        return self.encoder.prepare(raw)

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.projection(self.encoder(inputs))  # [B, D]


class LogitScale(nn.Module):
    """Learnable inverse temperature of the contrastive loss, stored as log(1/tau) (CLIP)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)


class MultimodalModel(nn.Module):
    def __init__(self, parts: dict[str, nn.Module]) -> None:
        super().__init__()
        for name in parts:
            check_choice("part", name, PARTS)
        self.part_names = tuple(name for name in PARTS if name in parts)
        for name in self.part_names:
            self.add_module(name, parts[name])

    def has(self, part: str) -> bool:
        return part in self.part_names

    def encode_images(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, D]."""
        tower: Tower = self.image_encoder
        emb = tower(tower.prepare(images).to(self.device))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_texts(self, texts: list[str], normalize: bool = False) -> torch.Tensor:
        """captions -> [B, D]."""
        tower: Tower = self.text_encoder
        tokens = {k: v.to(self.device) for k, v in tower.prepare(texts).items()}
        emb = tower(tokens)
        return F.normalize(emb, dim=-1) if normalize else emb

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def part_state(self, parts: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Flat ``"part/param"`` -> tensor for the requested parts (all when None)."""
        state: dict[str, torch.Tensor] = {}
        for part in parts if parts is not None else self.part_names:
            for key, value in getattr(self, part).state_dict().items():
                state[f"{part}/{key}"] = value
        return state

    def load_part_state(self, state: dict[str, torch.Tensor], strict_parts: bool = True) -> list[str]:
        """Load ``"part/param"`` tensors; returns the parts that were loaded."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            part, _, param = key.partition("/")
            if part not in self.part_names:
                if strict_parts:
                    raise KeyError(
                        f"tensor '{key}' is for part '{part}', which this model does not have "
                        f"(it has {', '.join(self.part_names)})"
                    )
                continue
            grouped.setdefault(part, {})[param] = value
        for part, part_state in grouped.items():
            getattr(self, part).load_state_dict(part_state, strict=True)
        return list(grouped)


def build_model(
    model_cfg: DictConfig, parts: Iterable[str], num_image_classes: int | None, num_text_classes: int | None
) -> MultimodalModel:
    """Build the requested parts from the ``model`` config (encoders by registry name, D, heads)."""
    embed_dim = int(model_cfg.embed_dim)
    built: dict[str, nn.Module] = {}
    for part in parts:
        if part == "image_encoder":
            built[part] = Tower(instantiate(model_cfg.image_encoder, "model.image_encoder"), embed_dim)
        elif part == "text_encoder":
            built[part] = Tower(instantiate(model_cfg.text_encoder, "model.text_encoder"), embed_dim)
        elif part == "image_head" and num_image_classes:
            built[part] = nn.Linear(embed_dim, num_image_classes)
        elif part == "text_head" and num_text_classes:
            built[part] = nn.Linear(embed_dim, num_text_classes)
        elif part == "logit_scale":
            built[part] = LogitScale(float(model_cfg.init_temperature))
    return MultimodalModel(built)
