"""Task losses, one per client kind, as ordinary loss terms.

- image-only clients: cross-entropy of the image head on the image embedding (image label);
- text-only clients: cross-entropy of the text head on the caption embedding (text label);
- paired clients: the symmetric image-text InfoNCE of CLIP (Radford et al. 2021, eq. in Fig. 3):
  logits = s * normalize(I) normalize(T)^T, L = (CE(logits, diag) + CE(logits^T, diag)) / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import Batch, LossTerm, Outputs
from mmfed.config import register
from mmfed.models.multimodal import MultimodalModel


@register("loss_term", "image_ce")
class ImageClassification(LossTerm):
    kinds = ("image",)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        logits = model.image_head(out["image_emb"])  # [B, C_img]
        return {"image_ce": self.weight * F.cross_entropy(logits, batch["image_labels"])}


@register("loss_term", "text_ce")
class TextClassification(LossTerm):
    kinds = ("text",)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        logits = model.text_head(out["text_emb"])  # [B, C_txt]
        return {"text_ce": self.weight * F.cross_entropy(logits, batch["text_labels"])}


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; row i of each is a positive pair, all other rows are negatives."""
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # [B, B]
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@register("loss_term", "contrastive")
class ContrastiveAlignment(LossTerm):
    kinds = ("paired",)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        return {
            "contrastive": self.weight * clip_loss(out["image_emb"], out["text_emb"], model.logit_scale())
        }
