"""FedProx (Li et al., MLSys 2020, eq. 2): h_k(w; w^t) = F_k(w) + mu/2 ||w - w^t||^2.

`mu` is the paper's mu; w^t are the global parameters the client received this round: every
trained parameter the server sent and the client loaded. Tensors the client keeps for itself
(LoRA adapters, personal heads: `models.lora.is_personal`) and parts the server did not send have
no anchor. Parameters are matched to payload tensors by their exchanged names
(`MultimodalModel.part_parameters`), which for a LoRA-wrapped model are the un-adapted model's.
"""

from __future__ import annotations

import torch

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.config import check_positive, register
from mmfed.models.lora import is_personal
from mmfed.models.multimodal import MultimodalModel


@register("loss_term", "prox")
class ProximalTerm(LossTerm):
    def __init__(self, mu: float = 0.01, weight: float = 1.0) -> None:
        super().__init__(weight)
        check_positive("mu", mu, strict=False)
        self.mu = mu
        self._anchors: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def begin(self, round_: ClientRound) -> None:
        model = round_.model
        parameters = model.part_parameters()  # "image_encoder/proj.weight" -> parameter
        self._anchors = []
        for name in round_.payload.tensors:
            param = parameters.get(name)
            if param is not None and param.requires_grad and not is_personal(model, name):
                self._anchors.append((param, param.detach().clone()))  # w^t, as loaded from the payload

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        if not self._anchors:
            return {}
        squared = torch.stack([(p - anchor).pow(2).sum() for p, anchor in self._anchors]).sum()
        return {"prox": self.weight * 0.5 * self.mu * squared}
