"""`training.fused_optimizer`: torch's fused optimizer step (the default where the parameters
allow it) applies the same update rule as the for-loop step, up to float rounding."""

from __future__ import annotations

import pytest
import torch

import mmfed  # noqa: F401  (the torchvision guard)
from mmfed.federation.client import LocalTraining, fused_supported


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 3))


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_fused_and_for_loop_steps_agree(name: str) -> None:
    models = {fused: _model() for fused in (True, False)}
    optimizers = {
        fused: LocalTraining(optimizer=name, weight_decay=0.01, fused_optimizer=fused).make_optimizer(m)
        for fused, m in models.items()
    }
    assert optimizers[True].defaults["fused"] is True
    assert not optimizers[False].defaults["fused"]
    ids = torch.tensor([[1, 2, 3], [4, 5, 49]])
    for _ in range(5):
        for fused, model in models.items():
            optimizers[fused].zero_grad()
            model(ids).sum(1).square().sum().backward()
            optimizers[fused].step()
    before = _model()
    for (key, fused_p), loop_p, start in zip(
        models[True].named_parameters(), models[False].parameters(), before.parameters(), strict=True
    ):
        assert not torch.equal(fused_p, start), key  # five steps moved every parameter
        torch.testing.assert_close(fused_p, loop_p, rtol=1e-5, atol=1e-6, msg=key)


def test_fused_step_only_where_torch_supports_it() -> None:
    assert fused_supported([torch.nn.Parameter(torch.zeros(2))])
    assert not fused_supported([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    model = torch.nn.Linear(2, 2).to("meta")
    optimizer = LocalTraining().make_optimizer(model)  # falls back instead of failing at step()
    assert not optimizer.defaults["fused"]
