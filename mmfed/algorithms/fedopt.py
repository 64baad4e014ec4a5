"""Server optimizers on the FedAvg pseudo-gradient: FedAvgM, FedAdagrad, FedAdam, FedYogi.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (arXiv 2003.00295), Algorithm 2, and
FedAvgM (Hsu et al. 2019, the momentum baseline of Reddi et al.). Each round the modality-wise
FedAvg step (`fedavg.py`) averages what the clients sent; the difference to the round's global
weights is the pseudo-gradient, which a server optimizer applies:

    Delta_t = avg_k(x_k) - x_t                                  (per tensor, for each averaged part)
    m_t     = beta_1 m_{t-1} + (1 - beta_1) Delta_t
    v_t     = v_{t-1} + Delta_t^2                                FedAdagrad
            = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)   FedYogi
            = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2            FedAdam
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

    FedAvgM:  m_t = beta m_{t-1} + Delta_t;  x_{t+1} = x_t + eta m_t

Code name -> paper symbol: `eta` = eta (server lr), `beta_1`, `beta_2`, `tau` (adaptivity),
`v_init` = v_{-1} (the paper asks v_{-1} >= tau^2; default tau^2), FedAvgM's `server_learning_rate`
= eta and `server_momentum` = beta (Flower's names). The client learning rate eta_l is
`training.lr`; clients train exactly as under FedAvg (`training.optimizer`, AdamW by default; the
paper's clients run plain SGD). m_{-1} = 0.

The optimizer runs on every weight-averaged part, per part: a part that no sampled client trained
this round (e.g. the text head in a round with no text client) keeps its weights and its moments;
its moments do not decay. Only parameters are optimised; float buffers (batch-norm statistics)
take FedAvg's average, as they are statistics, not weights (the paper is silent).

Defaults: Flower 1.41's strategies (read in its source, flwr/serverapp/strategy/): FedAdam
eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3; FedYogi eta 0.01, same betas and tau; FedAdagrad eta
0.1, tau 1e-3 and no momentum (beta_1 = 0; Algorithm 2 allows beta_1 > 0). FedAvgM: lr 1.0 as
Flower, momentum 0.9 (Flower's 0.0 would make it plain FedAvg; 0.9 is the usual heavy-ball value).
The paper tunes eta and tau per task on a grid: on a new task sweep eta (`mmfed train -m`).

Named options, off by default (departures from the paper):
- `bias_correction=true` (FedAdam): Flower's / Adam's step size eta sqrt(1 - beta_2^t) / (1 - beta_1^t).
- `v_init=0`: v_{-1} = 0 as Flower initialises it (the paper's analysis needs v_{-1} >= tau^2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mmfed.algorithms.base import ServerRound
from mmfed.algorithms.fedavg import WEIGHT_PREFIX, ModalityFedAvg
from mmfed.config import check_positive, register
from mmfed.protocol import Reply


def _check_decay(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


class ServerOptimizer(ModalityFedAvg):
    """FedAvg, then `update` (the one hook) moves each averaged parameter along its pseudo-gradient.

    State (the optimizer's moments per tensor and the step count) is in `state_dict`, so a resumed
    run continues with the same moments.
    """

    def __init__(self, transport_dtype: str = "float32") -> None:
        super().__init__(transport_dtype)
        self.moments: dict[str, dict[str, torch.Tensor]] = {}  # "part/param" -> {"m": ..., "v": ...}
        self.steps = 0  # t: server optimizer steps taken (rounds with at least one reply)

    def update(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x_{t+1} from x_t and Delta_t for the tensor named `key` (keeps its moments in `self.moments`)."""
        raise NotImplementedError

    def aggregate(self, round_: ServerRound, replies: list[Reply]) -> dict[str, float]:
        model = round_.global_model
        parts = sorted(
            {
                name[len(WEIGHT_PREFIX) :].partition("/")[0]
                for reply in replies
                for name in reply.tensors
                if name.startswith(WEIGHT_PREFIX)
            }
        )
        before = {
            part: {n: p.detach().clone() for n, p in getattr(model, part).named_parameters()}
            for part in parts
            if model.has(part)
        }
        metrics = super().aggregate(round_, replies)  # the global model now holds avg_k(x_k)
        if not before:
            return metrics
        self.steps += 1
        squared = 0.0
        with torch.no_grad():
            for part, old in before.items():
                for name, param in getattr(model, part).named_parameters():
                    x = old[name]
                    delta = param.detach() - x
                    squared += float(delta.double().pow(2).sum())
                    param.copy_(self.update(f"{part}/{name}", x, delta))
        metrics["pseudo_gradient_norm"] = math.sqrt(squared)
        return metrics

    def _moment(self, key: str, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        slot = self.moments.setdefault(key, {})
        if name not in slot:
            slot[name] = torch.full_like(like, fill)
        return slot[name]

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {k: dict(v) for k, v in self.moments.items()}, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.moments = {k: dict(v) for k, v in state.get("moments", {}).items()}
        self.steps = int(state.get("steps", 0))


@register("server_step", "fedavgm")
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum: m_t = beta m_{t-1} + Delta_t; x_{t+1} = x_t + eta m_t."""

    def __init__(
        self,
        server_learning_rate: float = 1.0,
        server_momentum: float = 0.9,
        transport_dtype: str = "float32",
    ) -> None:
        super().__init__(transport_dtype)
        check_positive("server_learning_rate", server_learning_rate)
        _check_decay("server_momentum", server_momentum)
        self.server_learning_rate, self.server_momentum = server_learning_rate, server_momentum

    def update(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self._moment(key, "m", x)
        m.mul_(self.server_momentum).add_(delta)
        return x + self.server_learning_rate * m


class AdaptiveServerOptimizer(ServerOptimizer):
    """Reddi et al.'s Algorithm 2 with the second-moment rule `second_moment` left to the subclass."""

    def __init__(
        self,
        eta: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        v_init: float | None = None,
        bias_correction: bool = False,
        transport_dtype: str = "float32",
    ) -> None:
        super().__init__(transport_dtype)
        check_positive("eta", eta)
        check_positive("tau", tau)
        _check_decay("beta_1", beta_1)
        _check_decay("beta_2", beta_2)
        if v_init is not None and v_init < 0:
            raise ValueError(f"v_init must be >= 0 (or null for tau^2), got {v_init!r}")
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau
        self.v_init = tau**2 if v_init is None else v_init
        self.bias_correction = bias_correction

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """v_{t-1} -> v_t in place."""
        raise NotImplementedError

    def update(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        m = self._moment(key, "m", x)
        v = self._moment(key, "v", x, self.v_init)
        m.mul_(self.beta_1).add_(delta, alpha=1.0 - self.beta_1)  # m_t
        self.second_moment(v, delta * delta)  # v_t
        eta = self.eta
        if self.bias_correction:  # Flower's FedAdam step size (Kingma & Ba's alpha_t)
            steps = self._moment(key, "t", torch.zeros((), dtype=torch.float64))
            t = float(steps.add_(1))  # steps this tensor took (a part skips rounds nobody trained it)
            eta = eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)
        return x + eta * m / (v.sqrt() + self.tau)


@register("server_step", "fedadagrad")
class FedAdagrad(AdaptiveServerOptimizer):
    """v_t = v_{t-1} + Delta_t^2 (beta_2 is unused)."""

    def __init__(
        self,
        eta: float = 0.1,
        beta_1: float = 0.0,
        tau: float = 1e-3,
        v_init: float | None = None,
        transport_dtype: str = "float32",
    ) -> None:
        super().__init__(eta, beta_1, 0.0, tau, v_init, False, transport_dtype)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.add_(delta_sq)


@register("server_step", "fedadam")
class FedAdam(AdaptiveServerOptimizer):
    """v_t = beta_2 v_{t-1} + (1 - beta_2) Delta_t^2."""

    def __init__(
        self,
        eta: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        v_init: float | None = None,
        bias_correction: bool = False,
        transport_dtype: str = "float32",
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau, v_init, bias_correction, transport_dtype)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta_2).add_(delta_sq, alpha=1.0 - self.beta_2)


@register("server_step", "fedyogi")
class FedYogi(AdaptiveServerOptimizer):
    """v_t = v_{t-1} - (1 - beta_2) Delta_t^2 sign(v_{t-1} - Delta_t^2)."""

    def __init__(
        self,
        eta: float = 0.01,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        v_init: float | None = None,
        transport_dtype: str = "float32",
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau, v_init, False, transport_dtype)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_((1.0 - self.beta_2) * delta_sq * torch.sign(v - delta_sq))
