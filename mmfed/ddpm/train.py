"""Training a class-conditional diffusion model on one client's labelled images, within a budget.

The objective is DDPM's simplified loss (Ho et al. 2020, eq. 14):

    L = E_{x_0, y, t, eps} || eps - eps_theta( sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, y ) ||^2

with t ~ U{0, T-1}, eps ~ N(0, I) and x_0 the image scaled to [-1, 1] at the model's resolution.
For classifier-free guidance (Ho & Salimans 2022) the label y is replaced by the null class with
probability `label_dropout`, so one network learns both eps(x_t, t, y) and eps(x_t, t, null).

The budget is `max_steps` optimiser steps and/or `max_seconds` of wall time, whichever ends first;
every random draw (initial weights, batch order, t, eps, label dropout) comes from streams derived
from the seed, so a budget of steps gives the same model on every run on the same hardware.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmfed.config import check_positive
from mmfed.console import bar_disabled
from mmfed.ddpm.model import ClassDiffusion
from mmfed.utils.seeding import torch_generator


@dataclass(frozen=True)
class DiffusionBudget:
    """How long a client may train: optimiser steps and/or seconds (None: no limit of that kind)."""

    max_steps: int | None = 400
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("a diffusion budget needs max_steps or max_seconds (both are null)")
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)
        if self.max_seconds is not None:
            check_positive("max_seconds", self.max_seconds)


@dataclass(frozen=True)
class TrainReport:
    steps: int
    seconds: float
    loss: float  # mean loss over the last (up to) 50 steps
    stopped_by: str  # "max_steps" | "max_seconds"


def to_model_space(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, r, r] in [-1, 1] (antialiased resize when H != r)."""
    x = images.float().div(127.5).sub(1.0)
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    return x


def train_diffusion(
    model: ClassDiffusion,
    images: torch.Tensor,
    labels: torch.Tensor,
    budget: DiffusionBudget,
    seed: int,
    stream: str = "",
    batch_size: int = 32,
    lr: float = 1e-3,
    label_dropout: float = 0.1,
    progress: bool = True,
    description: str = "diffusion",
) -> TrainReport:
    """Train `model.unet` in place on uint8 `images` [N, 3, H, W] with int64 `labels` [N]."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) must be non-empty and aligned")
    if labels.min() < 0 or labels.max() >= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got [{labels.min()}, {labels.max()}]")
    if not 0 <= label_dropout < 1 or (label_dropout > 0 and not model.guidance):
        raise ValueError(f"label_dropout={label_dropout} must be in [0, 1) and 0 without guidance")
    check_positive("batch_size", batch_size)
    unet, schedule = model.unet, model.scheduler
    device = unet.device
    data = to_model_space(images, model.resolution)  # [N, 3, r, r], prepared once
    generator = torch_generator(seed, "ddpm-train", stream)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    num_timesteps = schedule.config.num_train_timesteps
    unet.train()
    recent: list[float] = []
    steps, began = 0, time.perf_counter()
    bar = tqdm(
        total=budget.max_steps, desc=description, unit="step", leave=False, disable=bar_disabled(progress)
    )
    order = torch.randperm(len(data), generator=generator)
    cursor = 0
    stopped_by = "max_steps"
    while budget.max_steps is None or steps < budget.max_steps:
        if budget.max_seconds is not None and time.perf_counter() - began >= budget.max_seconds:
            stopped_by = "max_seconds"
            break
        if cursor + batch_size > len(order):  # a new epoch: a fresh permutation from the same stream
            order, cursor = torch.randperm(len(data), generator=generator), 0
        rows = order[cursor : cursor + batch_size]
        cursor += batch_size
        x0, y = data[rows].to(device), labels[rows].clone()
        if label_dropout > 0:  # classifier-free guidance: the null class with probability p_uncond
            drop = torch.rand(len(y), generator=generator) < label_dropout
            y[drop] = model.num_classes
        t = torch.randint(0, num_timesteps, (len(x0),), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        x_t = schedule.add_noise(x0, eps.to(device), t.to(device))  # sqrt(abar_t) x_0 + sqrt(1-abar_t) eps
        loss = F.mse_loss(unet(x_t, t.to(device), class_labels=y.to(device)).sample, eps.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        steps += 1
        recent = [*recent[-49:], float(loss.detach())]
        bar.update(1)
        if steps % 10 == 0:
            bar.set_postfix_str(f"loss={sum(recent) / len(recent):.4f}")
    bar.close()
    unet.eval()
    return TrainReport(
        steps=steps,
        seconds=time.perf_counter() - began,
        loss=sum(recent) / len(recent) if recent else float("nan"),
        stopped_by=stopped_by,
    )
