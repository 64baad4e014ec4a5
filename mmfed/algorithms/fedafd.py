"""FedAFD's client side: bi-level adversarial alignment (BAA) and granularity-aware fusion (GFF).

After Tan et al., "FedAFD: Multimodal Federated Learning via Adversarial Fusion and Distillation"
(CVPR 2026, arXiv 2603.04890); reference code Chao2433/FedAFD (src/algorithms/ClientTrainer_fedafd.py
for image/text clients, MMClientTrainer_fedafd.py for paired ones). The server side, similarity-guided
ensemble distillation (SED), is `ensemble_distill` with ``weighting: similarity`` (distill.py).

Paper -> code:
- local feature l^m_i of public row i, modality m       -> ``out["public_{m}_emb"]`` (unfused; L2-normalised)
- global features g^m_i (sent by the server each round) -> ``public/global_{m}`` (`_GlobalFeatures`)
- intra-modal discriminator D_intra: l^m vs g^m          -> ``discriminators["intra"]``
- inter-modal discriminator D_inter: l^m vs g^{m'}       -> ``discriminators["cross"]`` (m': other modality)
- discriminator objective (real = global, fake = local):
    L_D = BCE(D(g), 1) + BCE(D(sg(l)), 0), summed over levels  -> `discriminator_loss`
- alignment (generator) loss of the local encoder, non-saturating:
    L_adv = BCE(D(l), 1) = -log sigmoid(D(l))                 -> `generator_loss`, logged ``adv_{level}_{m}``
- loss weight lambda (reference ``interintra_weight`` 0.5) -> ``weight`` x ``intra_weight`` | ``cross_weight``
- GFF: fused = iAFF(l, g), read by the task heads           -> `mmfed.models.fusion` (``model.fusion``,
  ``model/fusion_module``), which ``algorithm=fedafd`` switches on (configs/algorithm/fedafd.yaml)

Each step alternates as in the reference: (1) the client's discriminators take one step of their
Adam optimiser on weight x L_D summed over levels and modalities (local features detached), then
(2) the encoder's loss weight x L_adv is computed
with the updated discriminators, which are frozen for it (no gradient reaches them). The
discriminators are MLPs D -> 128 -> 64 -> 1 with LeakyReLU(0.2) (the reference's depth), Adam with
lr 1e-4 and PyTorch's default betas (the reference's); they output **logits** and the loss is
``binary_cross_entropy_with_logits``. The reference ends its discriminator with ``nn.Sigmoid`` and
then applies BCE-with-logits, i.e. a sigmoid twice (its outputs are squashed into (0.5, 0.73) and
the loss can never approach 0): that defect is not reproduced (tests/algorithms/test_fedafd.py).
Features are L2-normalised before the discriminators: the reference's client features are
L2-normalised by its encoders. Discriminators are personal client state, kept across rounds.

Named options and departures (all off by default unless said):
- ``per_modality`` (off): a paired client gets its own pair of discriminators per modality; the
  reference (and the default) uses one D_intra and one D_inter for both of a paired client's
  modalities (its ``D_same`` / ``D_cross``). Image- and text-only clients have one modality anyway.
- ``betas`` (default (0.9, 0.999), the reference's Adam default; mmfed used (0.5, 0.999) before);
  ``weight`` 0.5 is the reference's ``interintra_weight`` (mmfed used 0.1 before).
- Ablations: ``weight: 0`` (experiment=fedafd_no_adversarial) removes the term entirely (a term of
  weight 0 does not apply); ``model.fusion=false`` (experiment=fedafd_no_fusion) removes fusion.
- Departure: the reference runs BAA as a separate pass over the public data before the local
  epoch (its encoder steps on L_adv alone); here L_adv is added to each local step's loss, with a
  public batch per step (the framework's one training loop), and the discriminators' Adam state is
  fresh every round (the reference keeps its optimiser across rounds).
- Departure (fusion, models/fusion.py): the fusion module is personal state kept across rounds and
  trained by the client's optimiser; the reference re-creates its iAFF every round and trains it
  with its own Adam (lr 5e-3, wd 1e-2 on image/text clients; 1e-4, 0.1 on paired ones). As in the
  reference, a paired client's two modalities share one iAFF (``share_across_modalities``).
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
    """BCE(D(global), 1) + BCE(D(local), 0) on logits (global features are 'real')."""
    return F.binary_cross_entropy_with_logits(
        real_logits, torch.ones_like(real_logits)
    ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The encoder's side: make the discriminator call local features global, BCE(D(local), 1)."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator(dim: int, hidden: tuple[int, ...] | list[int]) -> nn.Sequential:
    """An MLP dim -> hidden... -> 1 with LeakyReLU(0.2) between layers, ending in a *logit*."""
    layers: list[nn.Module] = []
    width = dim
    for size in hidden:
        layers += [nn.Linear(width, size), nn.LeakyReLU(0.2)]
        width = size
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


@register("loss_term", "adversarial_alignment")
class BiLevelAdversarialAlignment(_GlobalFeatures):
    STATE = "discriminators"

    def __init__(
        self,
        intra_weight: float = 1.0,
        cross_weight: float = 1.0,
        disc_lr: float = 1e-4,
        disc_hidden: tuple[int, ...] = (128, 64),
        betas: tuple[float, ...] = (0.9, 0.999),
        per_modality: bool = False,
        weight: float = 0.5,
    ) -> None:
        super().__init__(weight)
        check_positive("disc_lr", disc_lr)
        for size in disc_hidden:
            check_positive("disc_hidden", size)
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers, got {list(betas)}")
        self.level_weights = {"intra": intra_weight, "cross": cross_weight}
        self.disc_lr, self.disc_hidden, self.betas = disc_lr, tuple(disc_hidden), tuple(betas)
        self.per_modality = per_modality
        self.last_discriminator_loss = float("nan")  # the latest step's L_D (for tests and inspection)

    def key(self, level: str, modality: str) -> str:
        return f"{level}_{modality}" if self.per_modality else level

    def begin(self, round_: ClientRound) -> None:
        super().begin(round_)
        dim = self.global_features["image"].shape[1]
        modalities = [m for m in ("image", "text") if round_.model.has(f"{m}_encoder")]
        keys = dict.fromkeys(self.key(level, m) for m in modalities for level in LEVELS)
        self.discriminators = nn.ModuleDict({k: discriminator(dim, self.disc_hidden) for k in keys}).to(
            round_.model.device
        )
        if self.STATE in round_.state:
            self.discriminators.load_state_dict(round_.state[self.STATE])
        self.disc_optimizer = torch.optim.Adam(
            self.discriminators.parameters(), lr=self.disc_lr, betas=self.betas
        )

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        pairs = []  # (modality, level, discriminator, local [P, D], global [P, D]), features normalised
        for modality, local, same, other in self.local_and_global(batch, out):
            local = F.normalize(local, dim=-1)
            for level, real in (("intra", same), ("cross", other)):
                disc = self.discriminators[self.key(level, modality)]
                pairs.append((modality, level, disc, local, F.normalize(real, dim=-1)))
        if not pairs:
            return {}
        # (1) one discriminator step on every level and modality, local features detached
        self.discriminators.requires_grad_(True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss_d = (
            self.weight
            * torch.stack(
                [discriminator_loss(disc(real), disc(local.detach())) for _, _, disc, local, real in pairs]
            ).sum()
        )
        loss_d.backward()
        self.disc_optimizer.step()
        self.last_discriminator_loss = float(loss_d.detach())
        # (2) the encoder's loss through the updated, now frozen, discriminators
        self.discriminators.requires_grad_(False)
        return {
            f"adv_{level}_{modality}": self.weight * self.level_weights[level] * generator_loss(disc(local))
            for modality, level, disc, local, _ in pairs
        }

    def end(self) -> dict[str, Any]:
        return {self.STATE: {k: v.detach().clone() for k, v in self.discriminators.state_dict().items()}}
