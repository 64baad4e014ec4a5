"""Granularity-aware fusion of a client's local feature with the global model's feature (FedAFD).

A client's task head reads a mix of its own feature f_l and the global encoder's feature f_g of the
same input, with two learned gates computed from both features [f_l; f_g]:
- fine, per channel:  g_f = sigmoid(W_f [f_l; f_g] + b_f)            in (0, 1)^D
- coarse, global:     g_c = sigmoid(w_c^T [f_l; f_g] + b_c)            in (0, 1)
  fused = 1/2 [ g_f * f_l + (1 - g_f) * f_g ]  +  1/2 [ g_c f_l + (1 - g_c) f_g ]
so gates at 1 give the local feature, gates at 0 the global one. The module is personal client state.
"""

from __future__ import annotations

import torch
from torch import nn


def fuse(
    local: torch.Tensor, reference: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor
) -> torch.Tensor:
    """local, reference, fine: [B, D]; coarse: [B, 1] -> [B, D]."""
    per_channel = fine * local + (1 - fine) * reference
    whole = coarse * local + (1 - coarse) * reference
    return 0.5 * (per_channel + whole)


class GranularityAwareFusion(nn.Module):
    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.fine = nn.Linear(2 * embed_dim, embed_dim)
        self.coarse = nn.Linear(2 * embed_dim, 1)

    def gates(self, local: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([local, reference], dim=-1)  # [B, 2D]
        return torch.sigmoid(self.fine(both)), torch.sigmoid(self.coarse(both))  # [B, D], [B, 1]

    def forward(self, local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.gates(local, reference)
        return fuse(local, reference, fine, coarse)
