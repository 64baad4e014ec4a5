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
from mmfed.models.fusion import IAFFSettings
from mmfed.settings import check_model_config  # noqa: F401  (this module's API too)

PARTS = (
    "image_encoder", "text_encoder", "image_head", "text_head", "logit_scale",
    # FedAFD fusion: personal fusion modules and frozen copies of the global encoders they read
    "image_fusion", "text_fusion", "reference_image_encoder", "reference_text_encoder",
)  # fmt: skip
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "image": ("image_encoder", "image_head"),
    "text": ("text_encoder", "text_head"),
    "paired": ("image_encoder", "text_encoder", "logit_scale"),
    "global": ("image_encoder", "text_encoder", "image_head", "text_head", "logit_scale"),
}
FUSION_PARTS: dict[str, tuple[str, ...]] = {
    "image_encoder": ("image_fusion", "reference_image_encoder"),
    "text_encoder": ("text_fusion", "reference_text_encoder"),
}
FROZEN_PARTS = ("reference_image_encoder", "reference_text_encoder")


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
        if not 0 < init_temperature < math.inf:
            raise ValueError(f"config key 'model.init_temperature': must be > 0, got {init_temperature!r}")
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

    def encode_images(self, images: torch.Tensor, normalize: bool = False, fuse: bool = True) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> [B, D]; fused with the global encoder's feature when the model has fusion."""
        return self._encode("image", images, normalize, fuse)

    def encode_texts(self, texts: list[str], normalize: bool = False, fuse: bool = True) -> torch.Tensor:
        """captions -> [B, D]; fused with the global encoder's feature when the model has fusion."""
        return self._encode("text", texts, normalize, fuse)

    def _encode(self, modality: str, raw: object, normalize: bool, fuse: bool) -> torch.Tensor:
        emb = self._tower_forward(getattr(self, f"{modality}_encoder"), raw)  # [B, D]
        if fuse and self.has(f"{modality}_fusion"):
            with torch.no_grad():  # the reference is the frozen global encoder
                reference = self._tower_forward(getattr(self, f"reference_{modality}_encoder"), raw)
            emb = getattr(self, f"{modality}_fusion")(emb, reference)
        return F.normalize(emb, dim=-1) if normalize else emb

    def _tower_forward(self, tower: Tower, raw: object) -> torch.Tensor:
        prepared = tower.prepare(raw)
        if isinstance(prepared, dict):
            return tower({k: v.to(self.device) for k, v in prepared.items()})
        return tower(prepared.to(self.device))

    def train(self, mode: bool = True) -> MultimodalModel:
        """Frozen reference encoders stay in eval mode (batch-norm statistics, dropout) whatever `mode` is."""
        super().train(mode)
        for part in FROZEN_PARTS:
            if self.has(part):
                getattr(self, part).eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tensor_name(self, key: str) -> str:
        """How a part's tensor is named in payloads, replies and states (`AdaptedModel` drops peft's
        wrapper names, so both agree with the un-adapted model)."""
        return key

    def part_state(self, parts: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Flat ``"part/param"`` -> tensor for the requested parts (all when None)."""
        state: dict[str, torch.Tensor] = {}
        for part in parts if parts is not None else self.part_names:
            for key, value in getattr(self, part).state_dict().items():
                state[f"{part}/{self.tensor_name(key)}"] = value
        return state

    def part_parameters(self, parts: Iterable[str] | None = None) -> dict[str, nn.Parameter]:
        """Flat ``"part/param"`` -> parameter, named as in `part_state` (so as payload tensors are)."""
        return {
            f"{part}/{self.tensor_name(key)}": param
            for part in (parts if parts is not None else self.part_names)
            for key, param in getattr(self, part).named_parameters()
        }

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
    model_cfg: DictConfig,
    parts: Iterable[str],
    num_image_classes: int | None,
    num_text_classes: int | None,
    image_encoder: DictConfig | None = None,
    text_encoder: DictConfig | None = None,
    fusion: bool = False,
) -> MultimodalModel:
    """Build the requested parts from the ``model`` config.

    `image_encoder` / `text_encoder` override the config's encoders (model heterogeneity: a client
    may use another architecture than the global model). With `fusion`, every encoder gets a fusion
    module (``model.fusion_module``, default iAFF) and a frozen reference tower of the *global*
    architecture (``model.image_encoder`` ...).
    """
    check_model_config(model_cfg)
    embed_dim = int(model_cfg.embed_dim)
    encoders = {
        "image_encoder": image_encoder or model_cfg.image_encoder,
        "text_encoder": text_encoder or model_cfg.text_encoder,
    }
    wanted = list(parts)
    fusion_cfg = model_cfg.get("fusion_module") if fusion else None
    fusion_settings = instantiate(fusion_cfg, "model.fusion_module") if fusion_cfg else IAFFSettings()
    if fusion:
        wanted += [extra for part in parts for extra in FUSION_PARTS.get(part, ())]
    built: dict[str, nn.Module] = {}
    fusion_parts: dict[str, nn.Module] = {}
    for part in wanted:
        if part in encoders:
            built[part] = Tower(instantiate(encoders[part], f"model.{part}"), embed_dim)
        elif part.startswith("reference_"):
            base = part.removeprefix("reference_")
            built[part] = Tower(instantiate(getattr(model_cfg, base), f"model.{base}"), embed_dim)
            built[part].requires_grad_(False)
        elif part in ("image_fusion", "text_fusion"):
            if not fusion_parts:  # built where the first one falls (one module may serve both)
                fusion_parts = fusion_settings.build_parts(
                    embed_dim, [p for p in wanted if p.endswith("_fusion")]
                )
            built[part] = fusion_parts[part]
        elif part == "image_head" and num_image_classes:
            built[part] = nn.Linear(embed_dim, num_image_classes)
        elif part == "text_head" and num_text_classes:
            built[part] = nn.Linear(embed_dim, num_text_classes)
        elif part == "logit_scale":
            built[part] = LogitScale(float(model_cfg.init_temperature))
    return MultimodalModel(built)
