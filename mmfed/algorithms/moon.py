"""MOON, model-contrastive federated learning (Li, He, Song, CVPR 2021, eq. 3).

  l_con = -log( exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)) )

z: the local model's representation of a private sample; z_glob: the global model's (as received
this round, frozen); z_prev: the client's own model at the end of its previous round (frozen; the
global model in its first round). Applied to every modality the client encodes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.config import check_positive, register
from mmfed.models.multimodal import MultimodalModel


def moon_loss(
    z: torch.Tensor, z_glob: torch.Tensor, z_prev: torch.Tensor, temperature: float
) -> torch.Tensor:
    """z, z_glob, z_prev: [B, D] -> mean l_con; the positive is z_glob (class 0 of the 2-way softmax)."""
    logits = torch.stack([F.cosine_similarity(z, z_glob, dim=-1), F.cosine_similarity(z, z_prev, dim=-1)], 1)
    return F.cross_entropy(logits / temperature, torch.zeros(len(z), dtype=torch.long, device=z.device))


def _frozen(model: MultimodalModel) -> MultimodalModel:
    twin = copy.deepcopy(model)
    twin.requires_grad_(False)
    return twin.eval()


@register("loss_term", "moon")
class ModelContrastive(LossTerm):
    PREVIOUS = "previous"

    def __init__(self, temperature: float = 0.5, weight: float = 1.0) -> None:
        super().__init__(weight)
        check_positive("temperature", temperature)
        self.temperature = temperature

    def begin(self, round_: ClientRound) -> None:
        self._model = round_.model
        self._global = _frozen(round_.model)
        self._previous = self._global
        if self.PREVIOUS in round_.state:
            self._previous = _frozen(round_.model)
            self._previous.load_part_state(round_.state[self.PREVIOUS])

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        losses = []
        with torch.no_grad():
            pairs = []
            if "image_emb" in out:
                pairs.append(
                    (
                        out["image_emb"],
                        self._global.encode_images(batch["images"]),
                        self._previous.encode_images(batch["images"]),
                    )
                )
            if "text_emb" in out:
                pairs.append(
                    (
                        out["text_emb"],
                        self._global.encode_texts(batch["captions"]),
                        self._previous.encode_texts(batch["captions"]),
                    )
                )
        for z, z_glob, z_prev in pairs:
            losses.append(moon_loss(z, z_glob, z_prev, self.temperature))
        return {"moon": self.weight * torch.stack(losses).mean()} if losses else {}

    def end(self) -> dict[str, Any]:
        return {self.PREVIOUS: {k: v.detach().clone() for k, v in self._model.part_state().items()}}
