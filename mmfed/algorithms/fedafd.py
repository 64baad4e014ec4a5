"""FedAFD's client side: bi-level adversarial alignment (its fusion lives in mmfed/models/fusion.py).

On the public sample, discriminators learn to tell a client's local features from the global ones,
and the local encoder learns to fool them, at two levels, for each modality m the client has:
- intra-modal: D^m_intra separates local l^m_i from global g^m_i (same modality);
- cross-modal: D^m_cross separates local l^m_i from global g^{m'}_i of the paired item.
Each step alternates (GAN-style): (1) the discriminators take one step of their own optimizer on
  L_D = BCE(D(g), 1) + BCE(D(stopgrad(l)), 0),
then (2) the encoder's loss is L_adv = BCE(D(l), 1). Discriminators output *logits* and the loss is
``binary_cross_entropy_with_logits``: no sigmoid is applied before it (the reference code applied it
twice). Features are L2-normalised first, so the discriminators judge direction, not scale. The
discriminators are personal client state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfed.algorithms.base import Batch, ClientRound, Outputs
from mmfed.algorithms.creamfl import _GlobalFeatures
from mmfed.config import check_positive, register
from mmfed.models.multimodal import MultimodalModel

LEVELS = ("intra", "cross")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """BCE(D(global), 1) + BCE(D(local), 0) on logits."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The encoder's side: make the discriminator call local features global, BCE(D(local), 1)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def _discriminator(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))


@register("loss_term", "adversarial_alignment")
class BiLevelAdversarialAlignment(_GlobalFeatures):
    STATE = "discriminators"

    def __init__(
        self,
        intra_weight: float = 1.0,
        cross_weight: float = 1.0,
        disc_lr: float = 1e-3,
        disc_hidden: int = 128,
        weight: float = 0.1,
    ) -> None:
        super().__init__(weight)
        check_positive("disc_lr", disc_lr)
        check_positive("disc_hidden", disc_hidden)
        self.level_weights = {"intra": intra_weight, "cross": cross_weight}
        self.disc_lr, self.disc_hidden = disc_lr, disc_hidden

    def begin(self, round_: ClientRound) -> None:
        super().begin(round_)
        dim = self.global_features["image"].shape[1]
        modalities = [m for m in ("image", "text") if round_.model.has(f"{m}_encoder")]
        self.discriminators = nn.ModuleDict(
            {f"{level}_{m}": _discriminator(dim, self.disc_hidden) for m in modalities for level in LEVELS}
        ).to(round_.model.device)
        if self.STATE in round_.state:
            self.discriminators.load_state_dict(round_.state[self.STATE])
        self.disc_optimizer = torch.optim.Adam(
            self.discriminators.parameters(), lr=self.disc_lr, betas=(0.5, 0.999)
        )

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for modality, local, same, other in self.local_and_global(batch, out):
            local = F.normalize(local, dim=-1)
            for level, real in (("intra", same), ("cross", other)):
                disc = self.discriminators[f"{level}_{modality}"]
                real = F.normalize(real, dim=-1)
                # (1) discriminator step, on detached local features
                self.disc_optimizer.zero_grad(set_to_none=True)
                discriminator_loss(disc(real), disc(local.detach())).backward()
                self.disc_optimizer.step()
                # (2) the encoder's adversarial loss (its gradient into `disc` is discarded at (1) next step)
                losses[f"adv_{level}_{modality}"] = (
                    self.weight * self.level_weights[level] * generator_loss(disc(local))
                )
        return losses

    def end(self) -> dict[str, Any]:
        return {self.STATE: {k: v.detach().clone() for k, v in self.discriminators.state_dict().items()}}
