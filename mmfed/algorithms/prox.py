"""FedProx (Li et al., MLSys 2020, eq. 2): h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2.

`mu` is the paper's mu; w^t are the global parameters the client received this round (only the
parts the server broadcast: personal parts have no anchor).
"""

from __future__ import annotations

import torch

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.config import check_positive, register
from mmfed.models.multimodal import MultimodalModel


@register("loss_term", "prox")
class ProximalTerm(LossTerm):
    def __init__(self, mu: float = 0.01, weight: float = 1.0) -> None:
        super().__init__(weight)
        check_positive("mu", mu, strict=False)
        self.mu = mu
        self._anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def begin(self, round_: ClientRound) -> None:
        parameters = dict(round_.model.named_parameters())
        self._anchors = []
        for name in round_.payload.tensors:
            key = name.replace("/", ".", 1)  # "image_encoder/proj.weight" -> "image_encoder.proj.weight"
            if key in parameters and parameters[key].requires_grad:
                self._anchors.append((parameters[key], parameters[key].detach().clone()))  # w^t

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        if not self._anchors:
            return {}
        squared = torch.stack([(p - anchor).pow(2).sum() for p, anchor in self._anchors]).sum()
        return {"prox": self.weight * 0.5 * self.mu * squared}
