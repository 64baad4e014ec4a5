"""mmfed.ddpm: save/load and message round trips, per-class counts, sampling, budgeted training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmfed  # noqa: F401  (the torchvision guard, before diffusers)
from mmfed.ddpm import (
    ClassDiffusion,
    DiffusionBudget,
    apportion,
    build_unet,
    noise_schedule,
    plan_counts,
    sample_images,
    train_diffusion,
)
from mmfed.utils.seeding import seed_torch, torch_generator

CLASSES = 3


def tiny(seed: int = 0, guidance: bool = True) -> ClassDiffusion:
    seed_torch(seed, "test-unet")
    return ClassDiffusion(
        unet=build_unet(CLASSES, resolution=8, block_out_channels=(8, 8), guidance=guidance),
        scheduler=noise_schedule(num_train_timesteps=50),
        num_classes=CLASSES,
        image_size=16,
        guidance=guidance,
        label_counts=[4, 0, 2],
    )


def data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=generator)
    return images, torch.arange(n) % CLASSES


def eps(model: ClassDiffusion) -> torch.Tensor:
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.unet.eval()(x, torch.tensor([3, 40]), class_labels=torch.tensor([0, 3])).sample


def test_save_and_load_a_folder_give_the_same_model(tmp_path: Path) -> None:
    model = tiny()
    train_diffusion(model, *data(), DiffusionBudget(max_steps=2), seed=0, progress=False)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "unet" / "config.json").exists()  # diffusers' save_pretrained layout
    loaded = ClassDiffusion.load(tmp_path / "m")
    assert (
        loaded.meta()
        == model.meta()
        == {
            "num_classes": 3,
            "image_size": 16,
            "guidance": True,
            "label_counts": [4, 0, 2],
        }
    )
    assert loaded.scheduler.config.num_train_timesteps == 50
    assert torch.equal(eps(loaded), eps(model))
    assert loaded.fingerprint() == model.fingerprint()
    with pytest.raises(FileNotFoundError, match="class_diffusion.json"):
        ClassDiffusion.load(tmp_path)


def test_message_round_trip_and_fingerprint() -> None:
    model = tiny()
    tensors, config = model.to_message()
    assert all(name.startswith("unet/") for name in tensors)
    rebuilt = ClassDiffusion.from_message(tensors, config)
    assert torch.equal(eps(rebuilt), eps(model))
    assert rebuilt.fingerprint() == model.fingerprint()
    assert tiny(seed=1).fingerprint() != model.fingerprint()
    with pytest.raises(ValueError, match="lacks 'image_size'"):
        ClassDiffusion.from_message(tensors, {k: v for k, v in config.items() if k != "image_size"})


def test_class_embedding_must_match_the_null_class() -> None:
    with pytest.raises(ValueError, match="num_class_embeds=3 does not match"):
        ClassDiffusion(build_unet(CLASSES, 8, (8, 8), guidance=False), noise_schedule(), CLASSES, 16, True)


def test_apportion_and_plan_counts_by_hand() -> None:
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]  # equal remainders: the lower index first
    assert apportion(7, [5, 0, 2]) == [5, 0, 2]
    assert apportion(5, [3, 1]) == [4, 1]  # 3.75, 1.25 -> 3, 1, and the larger remainder gets the rest
    assert plan_counts([30, 0, 10], total=8) == [6, 0, 2]
    assert plan_counts([30, 0, 10], samples_per_class=5) == [5, 0, 5]
    with pytest.raises(ValueError, match="exactly one"):
        plan_counts([1, 2], samples_per_class=2, total=4)
    with pytest.raises(ValueError, match="no class with a positive count"):
        plan_counts([0, 0], total=4)


def test_samples_have_the_requested_labels_size_and_are_seeded() -> None:
    model = tiny()
    labels = torch.tensor([0, 0, 2, 1, 2])
    a = sample_images(model, labels, torch_generator(0, "s"), steps=3, guidance_scale=2.0, batch_size=2)
    b = sample_images(model, labels, torch_generator(0, "s"), steps=3, guidance_scale=2.0, batch_size=2)
    assert a.shape == (5, 3, 16, 16) and a.dtype == torch.uint8  # resized to the data's image size
    assert torch.equal(a, b)
    ddpm = sample_images(model, labels, torch_generator(0, "s"), sampler="ddpm", steps=3)
    assert ddpm.shape == a.shape and not torch.equal(ddpm, a)
    with pytest.raises(ValueError, match="classes in \\[0, 3\\)"):
        sample_images(model, torch.tensor([3]), torch_generator(0, "s"), steps=2)
    with pytest.raises(ValueError, match="needs a model trained with a null class"):
        sample_images(tiny(guidance=False), labels, torch_generator(0, "s"), steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="sampler='ddpm2' is not one of"):
        sample_images(model, labels, torch_generator(0, "s"), sampler="ddpm2")


def test_training_respects_the_budget_and_replays_from_the_seed() -> None:
    images, labels = data()
    a, b, c = tiny(), tiny(), tiny()
    report = train_diffusion(
        a, images, labels, DiffusionBudget(max_steps=3), seed=5, stream="k", progress=False
    )
    train_diffusion(b, images, labels, DiffusionBudget(max_steps=3), seed=5, stream="k", progress=False)
    train_diffusion(c, images, labels, DiffusionBudget(max_steps=3), seed=6, stream="k", progress=False)
    assert (report.steps, report.stopped_by) == (3, "max_steps") and report.loss > 0
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.fingerprint() != tiny().fingerprint()  # it trained
    stopped = train_diffusion(
        tiny(), images, labels, DiffusionBudget(max_steps=None, max_seconds=1e-9), seed=5, progress=False
    )
    assert (stopped.steps, stopped.stopped_by) == (0, "max_seconds")


def test_training_input_errors_name_the_problem() -> None:
    images, labels = data()
    with pytest.raises(ValueError, match="needs max_steps or max_seconds"):
        DiffusionBudget(max_steps=None, max_seconds=None)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 3\\)"):
        train_diffusion(tiny(), images, labels + 1, DiffusionBudget(max_steps=1), seed=0, progress=False)
    with pytest.raises(ValueError, match="label_dropout=0.1 must be in \\[0, 1\\) and 0 without guidance"):
        train_diffusion(
            tiny(guidance=False), images, labels, DiffusionBudget(max_steps=1), seed=0, progress=False
        )
    with pytest.raises(ValueError, match="resolution=10 must be >= 8 and divisible by"):
        build_unet(3, resolution=10, block_out_channels=(8, 8, 8))
