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


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    scale: torch.Tensor,
    extra_image_emb: torch.Tensor | None = None,
    extra_text_emb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE; row i of each is a positive pair, all other rows are negatives.

    Unpaired samples (a paired client's missing modalities) are further negatives: texts without
    an image ([B_t, D]) in the image-to-text direction, images without text ([B_i, D]) in the
    text-to-image direction. Without them this is exactly CLIP's loss.
    """
    image, text = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    target = torch.arange(len(image), device=image.device)
    if extra_image_emb is None and extra_text_emb is None:
        logits = scale * image @ text.T  # [B, B]
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    if extra_text_emb is not None:
        text_all = torch.cat([text, F.normalize(extra_text_emb, dim=-1)])
    else:
        text_all = text
    if extra_image_emb is not None:
        image_all = torch.cat([image, F.normalize(extra_image_emb, dim=-1)])
    else:
        image_all = image
    i2t = scale * image @ text_all.T  # [B, B + B_t]
    t2i = scale * text @ image_all.T  # [B, B + B_i]
    return (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2


@register("loss_term", "contrastive")
class ContrastiveAlignment(LossTerm):
    kinds = ("paired",)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        loss = clip_loss(
            out["image_emb"],
            out["text_emb"],
            model.logit_scale(),
            out.get("extra_image_emb"),  # missing modalities: unpaired samples as negatives
            out.get("extra_text_emb"),
        )
        return {"contrastive": self.weight * loss}
