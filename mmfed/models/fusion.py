"""Granularity-aware fusion of a client's local feature with the global model's feature (FedAFD).

A client's task head reads fuse(f_l, f_g): its own (personalized) feature f_l of an input mixed with
the frozen global encoder's feature f_g of the same input. Two fusion modules, chosen by the
``model/fusion_module`` config group (read only when ``model.fusion`` is true):

``iaff`` (default): iterative attentional feature fusion (iAFF, Dai et al., "Attentional Feature
Fusion", WACV 2021), the module FedAFD's reference code (Chao2433/FedAFD) uses. A gate is computed
from the sum of a *local* and a *global* channel-attention branch, each a bottleneck
D -> D/r -> D (r = 4: Linear, BatchNorm, ReLU, Linear, BatchNorm), and applied twice:
    w1 = sigmoid(L1(f_l + f_g) + G1(f_l + f_g))          in (0, 1)^D
    x1 = w1 * f_l + (1 - w1) * f_g
    w2 = sigmoid(L2(x1) + G2(x1))
    fused = w2 * f_l + (1 - w2) * f_g
so a gate at 1 gives the local feature, at 0 the global one.

*On 1-D feature vectors.* iAFF was designed for feature maps [B, C, H, W]: the local branch is a
pointwise (1x1) convolution bottleneck applied at every position, the global branch the same
bottleneck after global average pooling over the positions. FedAFD fuses embedding *vectors*: the
reference code reshapes [B, D] to [B, D, 1] and runs Conv1d(kernel 1) + BatchNorm1d branches, with
AdaptiveAvgPool1d(1) in the global ones. On one position a 1x1 convolution is a linear layer and the
pooling is the identity, so here both branches are the same bottleneck MLP on the vector (Linear +
BatchNorm1d, exactly the reference's arithmetic), with their own weights; "local" and "global" name
their roles in iAFF, not a different receptive field. BatchNorm normalises each channel over the
batch in training (a client's batches are never of size 1, see `ClientData.batches`) and uses its
running statistics in evaluation; those statistics are personal client state like the weights.

Inputs are L2-normalised first (`normalize_inputs`, default on): the reference fuses the
L2-normalised client feature (its encoders' ``extract_conv_feature`` output) with the global
model's normalised embedding.

Named options:
- ``share_across_modalities`` (on, as the reference): a paired client's image and text features go
  through one shared iAFF module (its parts ``image_fusion`` and ``text_fusion`` are the same module,
  saved under both names); off: a module per modality.
- ``share_global_branch`` (off): the reference code builds a second global branch but reuses the
  first one (``global_att``) in the second iteration; iAFF, and so the paper, uses its own G2.
- ``model/fusion_module=gates``: mmfed's earlier fusion (not the paper's): a per-channel gate
  g_f = sigmoid(W_f [f_l; f_g]) and a scalar gate g_c = sigmoid(w_c^T [f_l; f_g]),
  fused = 1/2 [g_f f_l + (1 - g_f) f_g] + 1/2 [g_c f_l + (1 - g_c) f_g].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmfed.config import check_positive, register


def channel_attention(channels: int, reduction: int) -> nn.Sequential:
    """The iAFF bottleneck on [B, C] vectors: C -> C/r -> C, batch-normalised (1x1 convs on one position)."""
    inner = max(1, channels // reduction)
    return nn.Sequential(
        nn.Linear(channels, inner),
        nn.BatchNorm1d(inner),
        nn.ReLU(),
        nn.Linear(inner, channels),
        nn.BatchNorm1d(channels),
    )


def mix(local: torch.Tensor, reference: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """gate * local + (1 - gate) * reference (gate broadcasts: [B, D] or [B, 1])."""
    return gate * local + (1 - gate) * reference


class IterativeAttentionalFusion(nn.Module):
    """iAFF on [B, D] features: two attention gates, the second computed from the first fusion."""

    def __init__(
        self,
        embed_dim: int,
        reduction: int = 4,
        share_global_branch: bool = False,
        normalize_inputs: bool = True,
    ) -> None:
        super().__init__()
        self.local_att = channel_attention(embed_dim, reduction)
        self.global_att = channel_attention(embed_dim, reduction)
        self.local_att2 = channel_attention(embed_dim, reduction)
        # reference code: the second iteration reads the first global branch again
        self.global_att2 = None if share_global_branch else channel_attention(embed_dim, reduction)
        self.normalize_inputs = normalize_inputs

    def gates(self, local: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w1, w2), each [B, D] in (0, 1), for inputs already normalised when `normalize_inputs`."""
        both = local + reference
        first = torch.sigmoid(self.local_att(both) + self.global_att(both))
        fused_once = mix(local, reference, first)
        second_global = self.global_att2 if self.global_att2 is not None else self.global_att
        second = torch.sigmoid(self.local_att2(fused_once) + second_global(fused_once))
        return first, second

    def forward(self, local: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.normalize_inputs:
            local, reference = F.normalize(local, dim=-1), F.normalize(reference, dim=-1)
        _, second = self.gates(local, reference)
        return mix(local, reference, second)


def fuse(
    local: torch.Tensor, reference: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor
) -> torch.Tensor:
    """The `gates` option's rule. local, reference, fine: [B, D]; coarse: [B, 1] -> [B, D]."""
    return 0.5 * (mix(local, reference, fine) + mix(local, reference, coarse))


class TwoGateFusion(nn.Module):
    """The `gates` option: a per-channel and a scalar gate, both read from [f_l; f_g]."""

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


class FusionSettings:
    """What a ``model/fusion_module`` entry builds: `build` one module; `build_parts` the fusion parts."""

    share_across_modalities = False

    def build(self, embed_dim: int) -> nn.Module:
        raise NotImplementedError

    def build_parts(self, embed_dim: int, parts: list[str]) -> dict[str, nn.Module]:
        """One module per fusion part (``image_fusion``, ``text_fusion``), or one shared by both."""
        if self.share_across_modalities and parts:
            shared = self.build(embed_dim)
            return dict.fromkeys(parts, shared)
        return {part: self.build(embed_dim) for part in parts}


@register("model/fusion_module", "iaff")
class IAFFSettings(FusionSettings):
    """``model/fusion_module=iaff`` (default): see `IterativeAttentionalFusion`.

    `share_across_modalities` (on, the reference's choice): a paired client fuses its image and its
    text features with the same iAFF module (the reference's single ``gff``); off: one per modality.
    """

    def __init__(
        self,
        reduction: int = 4,
        share_global_branch: bool = False,
        normalize_inputs: bool = True,
        share_across_modalities: bool = True,
    ) -> None:
        check_positive("reduction", reduction)
        self.reduction, self.share_global_branch = reduction, share_global_branch
        self.normalize_inputs, self.share_across_modalities = normalize_inputs, share_across_modalities

    def build(self, embed_dim: int) -> nn.Module:
        return IterativeAttentionalFusion(
            embed_dim, self.reduction, self.share_global_branch, self.normalize_inputs
        )


@register("model/fusion_module", "gates")
class TwoGateSettings(FusionSettings):
    """``model/fusion_module=gates``: mmfed's earlier two-gate fusion (a named option, not the paper's)."""

    def build(self, embed_dim: int) -> nn.Module:
        return TwoGateFusion(embed_dim)
