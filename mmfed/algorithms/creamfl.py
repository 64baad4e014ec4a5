"""CreamFL's client regularisers (Yu et al., ICLR 2023, Sec. 3.3), on the public sample.

For the local feature l_i of public row i in modality m and the global features g sent this round:
- inter-modal: InfoNCE of l_i against the global features of the *other* modality, positive g^{m'}_i;
- intra-modal: InfoNCE of l_i against the global features of the *same* modality, positive g^m_i;
negatives are the other rows of the public batch. L = inter_weight * L_inter + intra_weight * L_intra.
The server-side half is `ensemble_distill` with ``weighting=creamfl``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import GLOBAL_IMAGE, GLOBAL_TEXT, Batch, ClientRound, LossTerm, Outputs
from mmfed.config import check_positive, register
from mmfed.models.multimodal import MultimodalModel


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i of `queries` [P, D] against all rows of `keys` [P, D]; key i is its positive.

    Computed with log-softmax (log-sum-exp), so it is stable at any temperature.
    """
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature  # [P, P]
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


class _GlobalFeatures(LossTerm):
    """Shared by the public-data terms: keeps this round's global features of the public sample."""

    uses_public = True

    def begin(self, round_: ClientRound) -> None:
        tensors = round_.payload.tensors
        if GLOBAL_IMAGE not in tensors or GLOBAL_TEXT not in tensors:
            raise ValueError(
                f"loss term {type(self).__name__} needs a server step that sends public features "
                "(e.g. ensemble_distill)"
            )
        device = round_.model.device
        self.global_features = {
            "image": tensors[GLOBAL_IMAGE].float().to(device),
            "text": tensors[GLOBAL_TEXT].float().to(device),
        }

    def local_and_global(
        self, batch: Batch, out: Outputs
    ) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(modality, local [P, D], global same-modality [P, D], global other-modality [P, D])."""
        rows = batch["public_positions"]
        found = []
        for modality, other in (("image", "text"), ("text", "image")):
            local = out.get(f"public_{modality}_emb")
            if local is not None:
                found.append(
                    (modality, local, self.global_features[modality][rows], self.global_features[other][rows])
                )
        return found


@register("loss_term", "creamfl")
class CreamFLRegularizers(_GlobalFeatures):
    def __init__(
        self,
        inter_weight: float = 1.0,
        intra_weight: float = 1.0,
        temperature: float = 0.5,
        weight: float = 0.5,
    ) -> None:
        super().__init__(weight)
        check_positive("temperature", temperature)
        self.inter_weight, self.intra_weight, self.temperature = inter_weight, intra_weight, temperature

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for modality, local, same, other in self.local_and_global(batch, out):
            losses[f"creamfl_inter_{modality}"] = (
                self.weight * self.inter_weight * info_nce(local, other, self.temperature)
            )
            losses[f"creamfl_intra_{modality}"] = (
                self.weight * self.intra_weight * info_nce(local, same, self.temperature)
            )
        return losses
