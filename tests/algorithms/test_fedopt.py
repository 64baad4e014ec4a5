"""Server optimizers (Reddi et al. 2021) against their update equations, worked by hand over two rounds.

Each test feeds two rounds of client replies for the image encoder (one scalar pair of weights)
and compares the global weights with the equations evaluated in plain Python floats.
"""

from __future__ import annotations

import math

import pytest
import torch

from mmfed.algorithms.base import ServerRound
from mmfed.algorithms.fedavg import ModalityFedAvg
from mmfed.algorithms.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from mmfed.config import instantiate, node_for
from tests.algorithms.test_fedavg import _global, _reply

X0 = [0.5, -1.0]  # x_0: the global image encoder before round 1
D1 = [1.0, -2.0]  # Delta_1: the average of the clients' weights minus x_0 (two clients below)
D2 = [-0.5, 0.25]  # Delta_2, relative to x_1


def _two_rounds(step: ServerOptimizer) -> tuple[list[float], list[float]]:
    """x_1 and x_2 after two rounds in which image clients return x_t + Delta_t (as an average of two)."""
    model = _global()
    model.image_encoder.w.data = torch.tensor(X0)
    out = []
    for round_, delta in ((1, D1), (2, D2)):
        x = model.image_encoder.w.detach().clone()
        d = torch.tensor(delta)
        # two clients, n = 1 and n = 3, whose weighted mean is x + d: x + d + 3e and x + d - e
        e = torch.tensor([0.2, -0.4])
        replies = [
            _reply("image", 1, image_encoder=(x + d + 3 * e).tolist()),
            _reply("image", 3, image_encoder=(x + d - e).tolist()),
        ]
        step.aggregate(ServerRound(round_, 0, model, []), replies)
        out.append(model.image_encoder.w.detach().tolist())
    return out[0], out[1]


def _adaptive_by_hand(
    rule: str, eta: float, b1: float, b2: float, tau: float, v0: float
) -> list[list[float]]:
    xs = []
    for i in range(2):
        x, m, v = X0[i], 0.0, v0
        row = []
        for delta in (D1[i], D2[i]):
            m = b1 * m + (1 - b1) * delta
            if rule == "adagrad":
                v = v + delta**2
            elif rule == "adam":
                v = b2 * v + (1 - b2) * delta**2
            else:  # yogi
                v = v - (1 - b2) * delta**2 * math.copysign(1.0, v - delta**2)
            x = x + eta * m / (math.sqrt(v) + tau)
            row.append(x)
        xs.append(row)
    return [[xs[0][0], xs[1][0]], [xs[0][1], xs[1][1]]]  # [x_1, x_2]


def test_fedadam_two_rounds_by_hand() -> None:
    x1, x2 = _two_rounds(FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3))
    want = _adaptive_by_hand("adam", 0.1, 0.9, 0.99, 1e-3, 1e-6)
    # round 1, first coordinate: m = 0.1, v = 0.99e-6 + 0.01 = 0.01000099, x = 0.5 + 0.01 / (sqrt v + tau)
    assert x1[0] == pytest.approx(0.5 + 0.1 * 0.1 / (math.sqrt(0.01000099) + 1e-3), abs=1e-6)
    assert x1 == pytest.approx(want[0], abs=1e-6)
    assert x2 == pytest.approx(want[1], abs=1e-6)


def test_fedyogi_two_rounds_by_hand() -> None:
    x1, x2 = _two_rounds(FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3))
    want = _adaptive_by_hand("yogi", 0.01, 0.9, 0.99, 1e-3, 1e-6)
    # round 1: v_0 = tau^2 < Delta^2, so v grows by (1 - beta_2) Delta^2: v = 1e-6 + 0.01 (first coordinate)
    assert x1[0] == pytest.approx(0.5 + 0.01 * 0.1 / (math.sqrt(1e-6 + 0.01) + 1e-3), abs=1e-6)
    assert x1 == pytest.approx(want[0], abs=1e-6)
    assert x2 == pytest.approx(want[1], abs=1e-6)
    # Yogi and Adam differ in round 2 (Adam also shrinks v by beta_2; Yogi's change has Delta's scale)
    assert x2 != pytest.approx(_adaptive_by_hand("adam", 0.01, 0.9, 0.99, 1e-3, 1e-6)[1], abs=1e-6)


def test_fedadagrad_two_rounds_by_hand() -> None:
    x1, x2 = _two_rounds(FedAdagrad(eta=0.1, beta_1=0.0, tau=1e-3))
    want = _adaptive_by_hand("adagrad", 0.1, 0.0, 0.0, 1e-3, 1e-6)
    # round 1 without momentum: x = x_0 + eta Delta / (sqrt(tau^2 + Delta^2) + tau)
    assert x1[1] == pytest.approx(-1.0 + 0.1 * -2.0 / (math.sqrt(1e-6 + 4.0) + 1e-3), abs=1e-6)
    assert x1 == pytest.approx(want[0], abs=1e-6)
    assert x2 == pytest.approx(want[1], abs=1e-6)


def test_fedavgm_two_rounds_by_hand() -> None:
    x1, x2 = _two_rounds(FedAvgM(server_learning_rate=0.5, server_momentum=0.9))
    # m_1 = Delta_1, x_1 = x_0 + 0.5 Delta_1; m_2 = 0.9 Delta_1 + Delta_2, x_2 = x_1 + 0.5 m_2
    assert x1 == pytest.approx([0.5 + 0.5 * 1.0, -1.0 + 0.5 * -2.0], abs=1e-6)
    assert x2 == pytest.approx([1.0 + 0.5 * (0.9 - 0.5), -2.0 + 0.5 * (-1.8 + 0.25)], abs=1e-6)


def test_fedavgm_without_momentum_at_lr_1_is_fedavg() -> None:
    x1, x2 = _two_rounds(FedAvgM(server_learning_rate=1.0, server_momentum=0.0))
    y1, y2 = _two_rounds(ModalityFedAvg())  # type: ignore[arg-type]
    assert x1 == pytest.approx(y1, abs=1e-6) and x2 == pytest.approx(y2, abs=1e-6)


def test_bias_correction_is_flowers_step_size() -> None:
    x1, x2 = _two_rounds(FedAdam(eta=0.1, tau=1e-3, v_init=0.0, bias_correction=True))
    eta_1 = 0.1 * math.sqrt(1 - 0.99) / (1 - 0.9)  # t = 1
    m, v = 0.1 * 1.0, 0.01 * 1.0
    assert x1[0] == pytest.approx(0.5 + eta_1 * m / (math.sqrt(v) + 1e-3), abs=1e-6)
    eta_2 = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)  # t = 2; Delta_2 = -0.5
    m, v = 0.9 * 0.1 + 0.1 * -0.5, 0.99 * 0.01 + 0.01 * 0.25
    assert x2[0] == pytest.approx(x1[0] + eta_2 * m / (math.sqrt(v) + 1e-3), abs=1e-6)


def test_untrained_parts_keep_weights_and_moments_and_state_resumes() -> None:
    model = _global()
    step = FedAdam()
    step.aggregate(
        ServerRound(1, 0, model, []),
        [_reply("text", 2, text_encoder=[1.0, 1.0]), _reply("image", 2, image_encoder=[2.0, 0.0])],
    )
    text_v = step.moments["text_encoder/w"]["v"].clone()
    # round 2: no text client; the text encoder keeps its weights and its (undecayed) moments
    text_before = model.text_encoder.w.detach().clone()
    saved = {k: {n: t.clone() for n, t in v.items()} for k, v in step.state_dict()["moments"].items()}
    resumed = FedAdam()
    resumed.load_state_dict({"moments": saved, "steps": step.steps})
    twin = _global()
    twin.load_state_dict(model.state_dict())
    replies = [_reply("image", 2, image_encoder=[3.0, -1.0])]
    metrics = step.aggregate(ServerRound(2, 0, model, []), replies)
    resumed.aggregate(ServerRound(2, 0, twin, []), replies)
    assert torch.equal(model.text_encoder.w, text_before)
    assert torch.equal(step.moments["text_encoder/w"]["v"], text_v)
    assert torch.equal(model.image_encoder.w, twin.image_encoder.w)  # the checkpointed state continues
    assert metrics["image_encoder/clients"] == 1.0 and metrics["pseudo_gradient_norm"] > 0


@pytest.mark.parametrize("cls", [FedAvgM, FedAdagrad, FedAdam, FedYogi])
def test_builds_from_config_and_rejects_bad_values(cls: type) -> None:
    from omegaconf import OmegaConf

    assert isinstance(instantiate(OmegaConf.structured(node_for(cls)), "algorithm.server_steps.x"), cls)
    bad = {"server_momentum": 1.0} if cls is FedAvgM else {"beta_1": 1.0}
    with pytest.raises(ValueError, match="must be in"):
        cls(**bad)


@pytest.mark.slow
def test_a_resumed_run_continues_with_the_saved_moments(tmp_path) -> None:
    import json

    from mmfed.cli import main

    base = ["train", "experiment=smoke", "algorithm=fedyogi", "quiet=true"]
    assert main([*base, f"run_dir={tmp_path / 'whole'}", "rounds=3"]) == 0
    assert main([*base, f"run_dir={tmp_path / 'cut'}", "rounds=2"]) == 0
    assert main([*base, f"run_dir={tmp_path / 'cut'}", "rounds=3", "resume=true"]) == 0

    def last(name: str) -> dict:
        record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        return {k: v for k, v in record.items() if k.startswith(("val/", "server/"))}

    assert last("cut") == last("whole")  # without the moments round 3 would differ
