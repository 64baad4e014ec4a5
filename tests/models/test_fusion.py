"""Granularity-aware fusion: iAFF (default) against hand-computed values, and the `gates` option."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmfed.models.fusion import (
    IAFFSettings,
    IterativeAttentionalFusion,
    TwoGateFusion,
    TwoGateSettings,
    fuse,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def set_branch(branch: nn.Sequential, squeeze: list[float], expand: list[float]) -> None:
    """A D -> 1 -> D bottleneck set to relu(squeeze . x) * expand (batch norms made exact identities)."""
    first, norm1, _, second, norm2 = branch
    with torch.no_grad():
        first.weight.copy_(torch.tensor([squeeze]))
        first.bias.zero_()
        second.weight.copy_(torch.tensor(expand).unsqueeze(1))
        second.bias.zero_()
    for norm in (norm1, norm2):  # eval mode, running mean 0 / var 1, affine 1 / 0: identity when eps = 0
        norm.eps = 0.0


def hand_set_iaff(share_global_branch: bool = False) -> IterativeAttentionalFusion:
    module = IterativeAttentionalFusion(
        4, reduction=4, share_global_branch=share_global_branch, normalize_inputs=False
    )
    set_branch(module.local_att, [1, 0, 0, 0], [1, -1, 2, 0])
    set_branch(module.global_att, [0, 1, 0, 0], [1, 1, 0, 0])
    set_branch(module.local_att2, [0, 0, 0, -2], [0, 3, 0, 1])
    if module.global_att2 is not None:
        set_branch(module.global_att2, [1, 0, 0, 0], [-1, 0, 0, 0])
    return module.eval()


LOCAL = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
GLOBAL = torch.tensor([[0.0, 1.0, 0.0, -1.0]])


def test_iaff_forward_by_hand() -> None:
    # s = f_l + f_g = [1, 1, 1, -1]; L1(s) = relu(1) [1, -1, 2, 0]; G1(s) = relu(1) [1, 1, 0, 0]
    # w1 = sigmoid([2, 0, 2, 0]); x1 = w1 f_l + (1 - w1) f_g = [s2, 0.5, s2, -0.5] with s2 = sigmoid(2)
    s2 = sigmoid(2.0)
    module = hand_set_iaff()
    first, second = module.gates(LOCAL, GLOBAL)
    assert torch.allclose(first, torch.tensor([[s2, 0.5, s2, 0.5]]), atol=1e-6)
    # L2(x1) = relu(-2 * -0.5) [0, 3, 0, 1] = [0, 3, 0, 1]; G2(x1) = relu(s2) [-1, 0, 0, 0]
    # w2 = sigmoid([-s2, 3, 0, 1]); fused = w2 f_l + (1 - w2) f_g
    w2 = [sigmoid(-s2), sigmoid(3.0), 0.5, sigmoid(1.0)]
    assert torch.allclose(second, torch.tensor([w2]), atol=1e-6)
    expected = torch.tensor([[w2[0], 1 - w2[1], w2[2], -(1 - w2[3])]])
    assert torch.allclose(module(LOCAL, GLOBAL), expected, atol=1e-6)


def test_iaff_shared_global_branch_option_is_the_reference_codes_second_iteration() -> None:
    # reference code: the second gate reads G1 again: G1(x1) = relu(0.5) [1, 1, 0, 0]
    module = hand_set_iaff(share_global_branch=True)
    assert module.global_att2 is None
    w2 = [sigmoid(0.5), sigmoid(3.5), 0.5, sigmoid(1.0)]
    expected = torch.tensor([[w2[0], 1 - w2[1], w2[2], -(1 - w2[3])]])
    assert torch.allclose(module(LOCAL, GLOBAL), expected, atol=1e-6)


def test_iaff_gate_at_one_gives_the_local_feature_at_zero_the_global_one() -> None:
    module = IterativeAttentionalFusion(8, normalize_inputs=False).eval()
    local, reference = torch.randn(3, 8), torch.randn(3, 8)
    for bias, target in ((50.0, local), (-50.0, reference)):  # sigmoid(+-100) is 1 / 0 in float32
        with torch.no_grad():
            for branch in (module.local_att2, module.global_att2):
                branch[-1].weight.zero_()
                branch[-1].bias.fill_(bias)
        assert torch.allclose(module(local, reference), target)


def test_iaff_shapes_bottlenecks_and_input_normalisation() -> None:
    module = IterativeAttentionalFusion(16)
    for branch in (module.local_att, module.global_att, module.local_att2, module.global_att2):
        assert [tuple(p.shape) for p in (branch[0].weight, branch[3].weight)] == [(4, 16), (16, 4)]
        assert isinstance(branch[1], nn.BatchNorm1d) and isinstance(branch[4], nn.BatchNorm1d)
    module.eval()
    local, reference = torch.randn(5, 16), torch.randn(5, 16)
    # inputs are L2-normalised first: scaling either feature changes nothing
    assert torch.allclose(module(3 * local, 0.5 * reference), module(local, reference), atol=1e-6)


def test_iaff_trains_with_batch_statistics_and_keeps_running_ones() -> None:
    module = IterativeAttentionalFusion(8).train()
    local = torch.randn(6, 8, requires_grad=True)
    module(local, torch.randn(6, 8)).pow(2).sum().backward()
    assert local.grad is not None
    for branch in (module.local_att, module.global_att, module.local_att2, module.global_att2):
        assert branch[0].weight.grad.abs().sum() > 0
    assert module.local_att[1].running_mean.abs().sum() > 0  # batch-norm statistics are module state
    assert "local_att.1.running_var" in module.state_dict()


def test_settings_build_the_configured_module() -> None:
    assert isinstance(IAFFSettings().build(8), IterativeAttentionalFusion)
    assert IAFFSettings(share_global_branch=True).build(8).global_att2 is None
    assert isinstance(TwoGateSettings().build(8), TwoGateFusion)
    with pytest.raises(ValueError, match="reduction"):
        IAFFSettings(reduction=0)


def test_a_paired_clients_modalities_share_one_iaff_unless_told_otherwise() -> None:
    parts = ["image_fusion", "text_fusion"]
    shared = IAFFSettings().build_parts(8, parts)
    assert shared["image_fusion"] is shared["text_fusion"]  # the reference's single module
    own = IAFFSettings(share_across_modalities=False).build_parts(8, parts)
    assert own["image_fusion"] is not own["text_fusion"]
    assert IAFFSettings().build_parts(8, ["image_fusion"]).keys() == {"image_fusion"}
    gates = TwoGateSettings().build_parts(8, parts)
    assert gates["image_fusion"] is not gates["text_fusion"]


# ---------------------------------------------------------------- the `gates` option (mmfed's earlier rule)
def test_gates_at_one_and_zero_reproduce_local_and_global_features() -> None:
    local, reference = torch.randn(3, 8), torch.randn(3, 8)
    ones, zeros = torch.ones(3, 8), torch.zeros(3, 8)
    assert torch.equal(fuse(local, reference, ones, ones[:, :1]), local)
    assert torch.equal(fuse(local, reference, zeros, zeros[:, :1]), reference)
    half = fuse(local, reference, 0.5 * ones, 0.5 * ones[:, :1])
    assert torch.allclose(half, (local + reference) / 2)


def test_two_gate_module_saturates_with_its_biases() -> None:
    module = TwoGateFusion(8)
    local, reference = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        for layer in (module.fine, module.coarse):
            layer.weight.zero_()
            layer.bias.fill_(50.0)
    assert torch.allclose(module(local, reference), local)
    with torch.no_grad():
        module.fine.bias.fill_(-50.0)
        module.coarse.bias.fill_(-50.0)
    assert torch.allclose(module(local, reference), reference)
