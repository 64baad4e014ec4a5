"""The diffusion-classifier diagnostic: its errors are the quality check's, its summary is hand-checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import mmfed  # noqa: F401  (the torchvision guard)
from mmfed.data.synthetic import SyntheticWorld
from mmfed.teacher.model import StableDiffusionTeacher, TeacherSettings
from mmfed.teacher.pretrain import denoising_errors, diffusion_classifier, pretrain_from_overrides
from mmfed.utils.seeding import derive_seed
from tests.teacher.test_pretrain import TINY

sys.path.insert(0, str(Path(__file__).parents[2] / "eval"))
from diffusion_classifier import summarise  # noqa: E402


def test_summary_on_hand_made_errors() -> None:
    # 2 timesteps x 2 draws, 3 images, 3 classes; labels 0, 1, 2
    labels = torch.tensor([0, 1, 2])
    errors = torch.ones(4, 3, 3)
    errors[0] = torch.tensor([[0.5, 1, 1], [1, 0.5, 1], [0.5, 1, 1]])  # t0 d0: image 2 picks class 0
    errors[1] = torch.tensor([[0.9, 1, 1], [1, 0.9, 1], [1, 1, 0.2]])  # t0 d1: image 2 fixed
    errors[2] = torch.tensor([[2, 1, 1], [1, 2, 1], [1, 1, 2]])  # t1: the true class is worst
    errors[3] = torch.tensor([[2, 1, 1], [1, 2, 1], [1, 1, 2]])
    out = summarise(errors, labels, [100, 500], draws=2)
    t0, t1 = out["per_timestep"]["100"], out["per_timestep"]["500"]
    assert t0["accuracy"] == 1.0 and t1["accuracy"] == 0.0
    # t0: draw 0, image 2 beats neither wrong class (a tie is not a win); every other pair wins
    assert t0["true_beats_wrong"] == pytest.approx(5 / 6)
    assert t1["true_beats_wrong"] == 0.0
    gaps0 = [
        (1 - 0.5) / 0.5,
        (1 - 0.5) / 0.5,
        (0.5 - 1) / 1,
        (1 - 0.9) / 0.9,
        (1 - 0.9) / 0.9,
        (1 - 0.2) / 0.2,
    ]
    assert t0["relative_gap_best_wrong"] == pytest.approx(sum(gaps0) / 6)
    assert t1["relative_gap_best_wrong"] == pytest.approx(-0.5)
    # one draw per t: t0 d0 + t1 d0 sums -> image 0 (2.5 vs 2, 2) loses, ...; every draw: t1 dominates
    assert out["accuracy_one_draw"] == 0.0 and out["accuracy_all"] == 0.0
    assert out["accuracy_by_draws"] == {"1": 0.0, "2": 0.0}


def test_denoising_errors_are_the_quality_checks(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    pretrain_from_overrides([f"out={out}", *TINY], quiet=True)
    teacher = StableDiffusionTeacher.load(TeacherSettings(model=str(out)))
    val = SyntheticWorld(seed=0, n_public=24, n_val=8).split("val")
    images, keys, labels = val.images[:6], val.ids[:6], val.image_labels[:6]
    prompts = teacher.prompts(list(val.image_classes))
    errors = denoising_errors(teacher, images, keys, prompts, (100, 700), draws=2)
    assert errors.shape == (4, 6, len(prompts))
    assert not torch.equal(errors[0], errors[1])  # a second noise draw is a different draw
    single = denoising_errors(teacher, images, keys, prompts, (100, 700))
    assert torch.equal(single, errors[[0, 2]])  # draw 0 is the check's
    expected = (single.sum(0).argmin(1) == labels).float().mean().item()
    assert diffusion_classifier(teacher, images, keys, labels, prompts, (100, 700)) == expected
    # one entry by hand: image 3, class 1, t = 700, draw 0
    with torch.no_grad():
        latents = teacher.vae_latents(images[3:4])
        noise = teacher.noise(keys[3:4], derive_seed(1, "diffusion-classifier"), latents.shape[1:])
        t = torch.tensor([700])
        context = teacher.encode_text([prompts[1]]).tokens
        eps = teacher.unet(teacher.scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=context)
        assert errors[2, 3, 1].item() == pytest.approx((eps.sample - noise).square().mean().item(), rel=1e-5)
