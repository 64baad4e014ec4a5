"""An FL method written outside mmfed: one client loss term and one server step, in your own module.

- `FeaturePull` (loss term ``feature_pull``): a feature-space FedProx. Each client keeps the
  embeddings of its batch close to those the round's global model gives the same batch:
      L = mu/2 * mean_b || z_b - z_b^glob ||^2     for every modality the client encodes
  (z: the local model's embedding [B, D]; z^glob: the frozen global model's, received this round).
- `ClippedFedAvg` (server step ``clipped_fedavg``): FedAvg whose pseudo-gradient is clipped per
  tensor before the server applies it:
      x_{t+1} = x_t + eta * min(1, max_norm / ||Delta_t||) * Delta_t,   Delta_t = avg_k(x_k) - x_t
  built on mmfed's server-optimizer hook (`mmfed.algorithms.fedopt.ServerOptimizer.update`).

Nothing in mmfed is edited. Two ways to select them (see README.md here):
- by registered name: ``MMFED_PLUGINS=my_method`` makes `mmfed` import this module before it
  composes the config, so ``@register`` has added ``feature_pull`` and ``clipped_fedavg`` to the
  ``loss_term`` / ``server_step`` groups;
- by ``_target_``: a config names ``my_method.FeaturePull`` directly (``configs/algorithm/my_method.yaml``).
Either way this folder must be importable (``PYTHONPATH=examples/my_method``).
"""

from __future__ import annotations

import copy

import torch

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.algorithms.fedopt import ServerOptimizer
from mmfed.config import check_positive, register
from mmfed.models.multimodal import MultimodalModel


@register("loss_term", "feature_pull")
class FeaturePull(LossTerm):
    """mu/2 * mean ||z - z_glob||^2 on the batch's image and text embeddings (all client kinds)."""

    def __init__(self, mu: float = 0.1, weight: float = 1.0) -> None:
        super().__init__(weight)
        check_positive("mu", mu)
        self.mu = mu

    def begin(self, round_: ClientRound) -> None:
        # The client model holds the global weights right now (the payload was just loaded): freeze a copy.
        self._global = copy.deepcopy(round_.model).requires_grad_(False).eval()

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        losses = []
        with torch.no_grad():
            targets = {}
            if "image_emb" in out:
                targets["image_emb"] = self._global.encode_images(batch["images"])  # [B, D]
            if "text_emb" in out:
                targets["text_emb"] = self._global.encode_texts(batch["captions"])  # [B, D]
        for name, target in targets.items():
            losses.append(0.5 * self.mu * (out[name] - target).pow(2).sum(-1).mean())
        return {"feature_pull": self.weight * torch.stack(losses).sum()}


@register("server_step", "clipped_fedavg")
class ClippedFedAvg(ServerOptimizer):
    """FedAvg, then x + eta * min(1, max_norm / ||Delta||) * Delta for each tensor."""

    def __init__(self, eta: float = 1.0, max_norm: float = 1.0, transport_dtype: str = "float32") -> None:
        super().__init__(transport_dtype)
        check_positive("eta", eta)
        check_positive("max_norm", max_norm)
        self.eta, self.max_norm = eta, max_norm

    def update(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        norm = float(delta.norm())
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        return x + self.eta * scale * delta
