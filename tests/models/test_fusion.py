"""Granularity-aware fusion: the gates at 1 give the local feature, at 0 the global one."""

from __future__ import annotations

import torch

from mmfed.models.fusion import GranularityAwareFusion, fuse


def test_gates_at_one_and_zero_reproduce_local_and_global_features() -> None:
    local, reference = torch.randn(3, 8), torch.randn(3, 8)
    ones, zeros = torch.ones(3, 8), torch.zeros(3, 8)
    assert torch.equal(fuse(local, reference, ones, ones[:, :1]), local)
    assert torch.equal(fuse(local, reference, zeros, zeros[:, :1]), reference)
    # half-way: the per-channel and the global mix average to the mean of both features
    half = fuse(local, reference, 0.5 * ones, 0.5 * ones[:, :1])
    assert torch.allclose(half, (local + reference) / 2)


def test_module_gates_saturate_with_their_biases() -> None:
    module = GranularityAwareFusion(8)
    local, reference = torch.randn(4, 8), torch.randn(4, 8)
    with torch.no_grad():
        for layer in (module.fine, module.coarse):
            layer.weight.zero_()
            layer.bias.fill_(50.0)  # sigmoid(50) == 1 in float32
    assert torch.allclose(module(local, reference), local)
    with torch.no_grad():
        module.fine.bias.fill_(-50.0)
        module.coarse.bias.fill_(-50.0)
    assert torch.allclose(module(local, reference), reference)


def test_gradients_reach_both_gates_and_the_local_feature() -> None:
    module = GranularityAwareFusion(8)
    local = torch.randn(4, 8, requires_grad=True)
    module(local, torch.randn(4, 8)).pow(2).sum().backward()
    assert local.grad is not None and module.fine.weight.grad.abs().sum() > 0
    assert module.coarse.weight.grad.abs().sum() > 0
