"""Small class-conditional image diffusion models (diffusers), for diffusion-generated auxiliary data.

`model.py`: `ClassDiffusion` (U-Net + noise schedule + labels metadata; folder and message forms);
`train.py`: DDPM training within a step/time budget; `sample.py`: DDIM/DDPM sampling with
classifier-free guidance and per-class counts. Nothing here knows about federation.
"""

from mmfed.ddpm.model import ClassDiffusion, build_unet, noise_schedule
from mmfed.ddpm.sample import SAMPLERS, apportion, plan_counts, sample_images
from mmfed.ddpm.train import DiffusionBudget, TrainReport, train_diffusion

__all__ = [
    "SAMPLERS",
    "ClassDiffusion",
    "DiffusionBudget",
    "TrainReport",
    "apportion",
    "build_unet",
    "noise_schedule",
    "plan_counts",
    "sample_images",
    "train_diffusion",
]
