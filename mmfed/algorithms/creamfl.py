"""CreamFL's client regularisers on public data (Yu et al., ICLR 2023, Sec. 3.3).

Reference code: FLAIR-THU/CreamFL ``src/algorithms/ClientTrainer.py`` (``contrast_local_inter`` and
``contrast_local_intra``, weighted by ``interintra_weight`` 0.5). The server half is
``ensemble_distill`` with ``weighting=creamfl`` (mmfed/algorithms/distill.py).

For a client's local feature l_i of public row i in modality m (its own encoder, unfused), the
global features g^m, g^{m'} of the round's public sample sent by the server (all N rows), and the
feature p_i of the same input under the client's own model as it was at the start of the round:

  inter-modal: L_inter = CE( [<l_i, g^{m'}_j> / tau]_{j=1..N}, label i )      (`inter_modal_loss`)
               the negatives are the other modality's global features of **all** public rows of
               the round's sample, not the batch;
  intra-modal: L_intra = -log( e^{<l_i, g^m_i>/tau} / (e^{<l_i, g^m_i>/tau} + e^{<l_i, p_i>/tau}) )
               MOON-style two-way: positive the global same-modality feature, negative the
               round-start local model (`moon.moon_loss`);
  L = weight * (inter_weight * L_inter + intra_weight * L_intra),  tau = 0.5, weight = 0.5.

Paper/reference symbol -> code: l = ``out["public_<m>_emb"]``; g = ``self.global_features``
(``public/global_image|text``); p = ``self._start`` (a frozen copy of the client's model made in
``begin``); tau = ``temperature``; interintra_weight = ``weight``. Features are L2-normalised
before every dot product: the reference's client encoders end in an L2 normalisation (its
``extract_conv_feature`` phase) and so do its global ones, so its dot products are cosines.
Departures, by construction of mmfed's single trainer (no option): the reference runs the two
regularisers in a separate pass over the public data after the private pass of each local epoch;
here they are added to the task loss of each local step on a public batch drawn alongside. The
reference's ``loss_scale`` rescaling (off by default there) is not offered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import GLOBAL_IMAGE, GLOBAL_TEXT, Batch, ClientRound, LossTerm, Outputs
from mmfed.algorithms.moon import _frozen, moon_loss
from mmfed.config import check_positive, register
from mmfed.models.multimodal import MultimodalModel


def inter_modal_loss(
    local: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Local features [P, D] against the other modality's global features of all N public rows
    `keys` [N, D]; the positive of local row p is key ``rows[p]`` -> mean cross-entropy.

    Log-softmax (log-sum-exp), so stable at any temperature; memory [P, N].
    """
    logits = F.normalize(local, dim=-1) @ F.normalize(keys, dim=-1).T / temperature  # [P, N]
    return F.cross_entropy(logits, rows.to(logits.device))


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

    def begin(self, round_: ClientRound) -> None:
        super().begin(round_)
        self._start = _frozen(round_.model)  # the client's own model at the start of this round

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        rows = batch["public_positions"]
        for modality, local, same, _ in self.local_and_global(batch, out):
            other = "text" if modality == "image" else "image"
            with torch.no_grad():
                if modality == "image":
                    start = self._start.encode_images(batch["public_images"], fuse=False)
                else:
                    start = self._start.encode_texts(batch["public_captions"], fuse=False)
            inter = inter_modal_loss(local, self.global_features[other], rows, self.temperature)
            intra = moon_loss(local, same, start, self.temperature)
            losses[f"creamfl_inter_{modality}"] = self.weight * self.inter_weight * inter
            losses[f"creamfl_intra_{modality}"] = self.weight * self.intra_weight * intra
        return losses
