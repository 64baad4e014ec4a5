"""Drawing labelled images from a `ClassDiffusion`, with DDIM (default) or ancestral DDPM sampling.

DDIM (Song et al. 2021, eq. 12 with eta = 0) is deterministic given x_T and skips timesteps, so 25
steps replace DDPM's 1000 at a small cost in quality; DDPM (Ho et al. 2020, Alg. 2) is offered for
comparison. With classifier-free guidance (Ho & Salimans 2022, eq. 6) the noise estimate is

    eps~ = eps(x_t, t, null) + w (eps(x_t, t, y) - eps(x_t, t, null)),      w = guidance_scale

(w = 1: plain conditional sampling, one network evaluation per step instead of two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from mmfed.config import check_choice, check_positive
from mmfed.ddpm.model import ClassDiffusion

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler

SAMPLERS = ("ddim", "ddpm")


def plan_counts(
    class_counts: list[int], samples_per_class: int | None = None, total: int | None = None
) -> list[int]:
    """How many samples of each class: `samples_per_class` for every class that occurs, or `total`
    spread in proportion to `class_counts` (largest remainders, ties to the lower class index)."""
    if (samples_per_class is None) == (total is None):
        raise ValueError("give exactly one of samples_per_class and total")
    present = [c > 0 for c in class_counts]
    if not any(present):
        raise ValueError(f"class_counts={class_counts} has no class with a positive count")
    if samples_per_class is not None:
        check_positive("samples_per_class", samples_per_class)
        return [samples_per_class if p else 0 for p in present]
    assert total is not None
    check_positive("total", total)
    return apportion(total, class_counts)


def apportion(total: int, weights: list[int] | list[float]) -> list[int]:
    """Integers n_i >= 0 with sum total and n_i ~ total * w_i / sum(w) (Hamilton's largest remainders)."""
    weight_sum = float(sum(weights))
    if weight_sum <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights={list(weights)} must be >= 0 with a positive sum")
    exact = [total * w / weight_sum for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def sampler_for(model: ClassDiffusion, sampler: str, steps: int) -> DDIMScheduler | DDPMScheduler:
    """A fresh scheduler of the model's noise schedule, set to `steps` denoising steps."""
    check_choice("sampler", sampler, SAMPLERS)
    check_positive("steps", steps)
    from diffusers import DDIMScheduler, DDPMScheduler

    config = model.scheduler.config
    scheduler = DDIMScheduler.from_config(config) if sampler == "ddim" else DDPMScheduler.from_config(config)
    scheduler.set_timesteps(min(steps, config.num_train_timesteps))
    return scheduler


@torch.no_grad()
def sample_images(
    model: ClassDiffusion,
    labels: torch.Tensor,
    generator: torch.Generator,
    sampler: str = "ddim",
    steps: int = 25,
    guidance_scale: float = 1.0,
    batch_size: int = 250,
) -> torch.Tensor:
    """int64 `labels` [N] -> uint8 images [N, 3, S, S] of those classes, S = model.image_size."""
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() >= model.num_classes)):
        raise ValueError(f"labels must be a 1-d tensor of classes in [0, {model.num_classes})")
    if guidance_scale != 1.0 and not model.guidance:
        raise ValueError(f"guidance_scale={guidance_scale} needs a model trained with a null class")
    check_positive("batch_size", batch_size)
    unet = model.unet.eval()
    device, r, s = unet.device, model.resolution, model.image_size
    out = torch.empty(len(labels), 3, s, s, dtype=torch.uint8)
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        scheduler = sampler_for(model, sampler, steps)  # schedulers keep a step index: one per batch
        x = torch.randn((len(y), 3, r, r), generator=generator).to(device)  # x_T ~ N(0, I)
        guided = guidance_scale != 1.0
        classes = torch.cat([y, torch.full_like(y, model.num_classes)]) if guided else y
        for t in scheduler.timesteps:
            inputs = torch.cat([x, x]) if guided else x
            eps = unet(inputs, t, class_labels=classes).sample
            if guided:
                conditional, unconditional = eps.chunk(2)
                eps = unconditional + guidance_scale * (conditional - unconditional)
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        x = x.float().cpu().clamp(-1, 1)
        if r != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False).clamp(-1, 1)
        out[start : start + len(y)] = ((x + 1) * 127.5).round().to(torch.uint8)
    return out
