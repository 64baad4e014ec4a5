"""The frozen SD teacher, on a tiny random SD-architecture model loaded through the real path.

`build_tiny_sd` writes SD's folder layout (model_index.json + tokenizer/ text_encoder/ vae/ unet/
scheduler/) to a temp folder; `StableDiffusionTeacher.load` reads it with ``from_pretrained``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import mmfed  # noqa: F401  (the torchvision guard)
from mmfed.config import instantiate, node_for, registered
from mmfed.teacher.model import (
    StableDiffusionTeacher,
    TeacherLoadError,
    TeacherSettings,
    get_teacher,
    mmfed_home,
)
from mmfed.teacher.tiny import build_tiny_sd

KEYS = ["syn-public-000000", "syn-public-000001", "syn-public-000002"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0)


@pytest.fixture(scope="module")
def teacher(folder: Path) -> StableDiffusionTeacher:
    return StableDiffusionTeacher.load(TeacherSettings(model=str(folder)))


def images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def count_calls(module: nn.Module, counter: dict[str, int], name: str):
    def hook(*_):
        counter[name] = counter.get(name, 0) + 1

    return module.register_forward_hook(hook)


# ----------------------------------------------------------------------------- loading, frozen
def test_loads_frozen_with_eval_pinned(teacher: StableDiffusionTeacher) -> None:
    parts = (teacher.text_encoder, teacher.vae, teacher.unet)
    assert all(not p.requires_grad for part in parts for p in part.parameters())
    parent = nn.ModuleDict({"unet": teacher.unet})  # e.g. a loss term holding the teacher
    parent.train()
    teacher.unet.train(True)
    teacher.text_encoder.train()
    assert not any(m.training for part in parts for m in part.modules())


def test_identity_and_sizes(teacher: StableDiffusionTeacher, folder: Path) -> None:
    assert teacher.identity["model"] == str(folder)
    assert teacher.identity["dtype"] == "float32"
    assert teacher.resolution == 16  # U-Net sample_size 8 * VAE scale 2
    assert teacher.identity["resolution"] == 16
    assert len(teacher.identity["revision"]) == 64  # sha256 of the local folder's files
    assert teacher.text_dim == 32
    assert teacher.block_channels == {0: 16, 1: 16, 2: 16, 3: 8}


def test_identity_follows_weight_contents_not_file_times(tmp_path: Path) -> None:
    folder = build_tiny_sd(tmp_path / "sd", seed=1)
    before = StableDiffusionTeacher.load(TeacherSettings(model=str(folder))).identity
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = StableDiffusionTeacher.load(TeacherSettings(model=str(folder))).identity
    assert touched == before  # contents, not times: a copied or touched teacher keeps its features
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one weight byte (the last tensor's data) changes
    weights.write_bytes(bytes(data))
    after = StableDiffusionTeacher.load(TeacherSettings(model=str(folder))).identity
    assert before["revision"] != after["revision"]
    assert {k: v for k, v in before.items() if k != "revision"} == {
        k: v for k, v in after.items() if k != "revision"
    }


def test_registered_config_builds_settings(folder: Path) -> None:
    cfg = OmegaConf.merge(
        OmegaConf.structured(node_for(registered("teacher")["sd"])),
        {"model": str(folder), "up_blocks": [2, 3], "noise_seeds": [0, 1]},
    )
    settings = instantiate(cfg, "teacher")
    assert isinstance(settings, TeacherSettings)
    assert settings.up_blocks == [2, 3] and settings.noise_seeds == [0, 1]
    assert TeacherSettings().cache_dir == str(mmfed_home() / "features")


def test_fingerprint_ignores_batch_size_device_cache_dir(folder: Path) -> None:
    base = TeacherSettings(model=str(folder)).extraction_fingerprint()
    assert TeacherSettings(model=str(folder), batch_size=3, cache_dir="/x").extraction_fingerprint() == base
    for change in ({"timestep": 10}, {"up_blocks": [3]}, {"noise_seeds": [1]}, {"condition": "class"}):
        assert TeacherSettings(model=str(folder), **change).extraction_fingerprint() != base


# ----------------------------------------------------------------------------- text and VAE
def test_encode_text_shapes_and_clip_pooling(teacher: StableDiffusionTeacher) -> None:
    texts = teacher.prompts(["circle", "red square"])
    assert texts == ["a photo of a circle", "a photo of a red square"]
    out = teacher.encode_text(texts)
    assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 16, 32)
    assert out.pooled.dtype == torch.float32 and out.pooled.device.type == "cpu"
    # CLIP's pooled output is the final state at the first end-of-text token
    ids = teacher.tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    eos = (ids == teacher.tokenizer.eos_token_id).int().argmax(dim=1)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(2), eos])


def test_vae_latents_deterministic_and_resized(teacher: StableDiffusionTeacher) -> None:
    x = images()
    first, second = teacher.vae_latents(x), teacher.vae_latents(x)
    assert first.shape == (3, 4, 8, 8) and first.dtype == torch.float32
    assert torch.equal(first, second)
    # input at the teacher's resolution goes in unresized; 32 px input is resized to 16 px
    small = images(size=16)
    pixels = teacher._pixels(small)
    torch.testing.assert_close(pixels, small.float() / 127.5 - 1)
    assert teacher._pixels(x).shape == (3, 3, 16, 16)


# ----------------------------------------------------------------------------- U-Net features
def test_feature_shapes_per_block(teacher: StableDiffusionTeacher) -> None:
    x = images()
    maps = teacher.unet_features(x, KEYS, up_blocks=[0, 1, 2, 3], pooled=False)
    assert list(maps) == [0, 1, 2, 3]
    sizes = {0: 2, 1: 4, 2: 8, 3: 8}  # latents 8x8, three downsamplings, upsampled back
    for block, value in maps.items():
        assert value.shape == (3, teacher.block_channels[block], sizes[block], sizes[block])
    pooled = teacher.unet_features(x, KEYS)  # settings: blocks 1, 2, 3
    assert list(pooled) == [1, 2, 3]
    for block, value in pooled.items():
        torch.testing.assert_close(value, maps[block].mean(dim=(2, 3)))
    assert teacher.pool(pooled).shape == (3, 16 + 16 + 8)
    torch.testing.assert_close(teacher.pool({b: maps[b] for b in (1, 2, 3)}), teacher.pool(pooled))


def test_early_stop_equals_full_forward_and_skips_later_blocks(teacher: StableDiffusionTeacher) -> None:
    x = images()
    calls: dict[str, int] = {}
    watched = {
        "up2": teacher.unet.up_blocks[2],
        "up3": teacher.unet.up_blocks[3],
        "out": teacher.unet.conv_out,
    }
    handles = [count_calls(module, calls, name) for name, module in watched.items()]
    try:
        early = teacher.unet_features(x, KEYS, up_blocks=[1], pooled=False)[1]
        assert calls == {}  # nothing after block 1 ran
        # the same pass by hand, run to the end, with a hook reading block 1
        captured = {}
        hook = teacher.unet.up_blocks[1].register_forward_hook(lambda m, a, out: captured.update(out=out))
        with torch.no_grad():
            latents = teacher._latents(x)
            t = torch.full((3,), teacher.settings.timestep)
            noisy = teacher.scheduler.add_noise(latents, teacher.noise(KEYS, 0, latents.shape[1:]), t)
            context = teacher._prompt_tokens([""] * 3)
            teacher.unet(noisy, t, encoder_hidden_states=context)
        hook.remove()
        assert calls == {"up2": 1, "up3": 1, "out": 1}
        torch.testing.assert_close(early, captured["out"])
    finally:
        for handle in handles:
            handle.remove()


def test_noise_is_per_sample_not_per_batch(teacher: StableDiffusionTeacher) -> None:
    x = images()
    together = teacher.unet_features(x, KEYS)
    apart = teacher.unet_features(x[[2, 0]], [KEYS[2], KEYS[0]])
    for block in together:
        torch.testing.assert_close(apart[block], together[block][[2, 0]], atol=1e-5, rtol=1e-5)
    noise = teacher.noise(KEYS, 0, (4, 8, 8))
    assert torch.equal(noise[1], teacher.noise([KEYS[1]], 0, (4, 8, 8))[0])
    assert not torch.equal(noise[0], noise[1])  # another sample id, another draw
    assert not torch.equal(noise[0], teacher.noise([KEYS[0]], 1, (4, 8, 8))[0])  # another seed
    renamed = teacher.unet_features(x, ["other-0", "other-1", "other-2"])
    assert not torch.allclose(renamed[1], together[1])


def test_noise_seed_ensemble_is_the_mean(teacher: StableDiffusionTeacher) -> None:
    x = images()
    single = [teacher.unet_features(x, KEYS, noise_seeds=[s]) for s in (0, 1, 2)]
    ensemble = teacher.unet_features(x, KEYS, noise_seeds=[0, 1, 2])
    for block in ensemble:
        torch.testing.assert_close(ensemble[block], sum(f[block] for f in single) / 3)
    assert not torch.allclose(single[0][1], single[1][1])


def test_prompts_condition_the_features(teacher: StableDiffusionTeacher) -> None:
    x = images()
    empty = teacher.unet_features(x, KEYS)
    blank = teacher.unet_features(x, KEYS, prompts=["", "", ""])
    prompted = teacher.unet_features(x, KEYS, prompts=teacher.prompts(["circle", "square", "star"]))
    torch.testing.assert_close(blank[1], empty[1])
    assert not torch.allclose(prompted[1], empty[1])
    mixed = teacher.unet_features(x, KEYS, prompts=["", teacher.prompts(["square"])[0], ""])
    torch.testing.assert_close(mixed[1][1], prompted[1][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1][0], empty[1][0], atol=1e-5, rtol=1e-5)


def test_prompt_embeds_take_gradients_teacher_does_not(teacher: StableDiffusionTeacher) -> None:
    x = images()
    prompts = teacher.prompts(["circle", "square", "star"])
    embeds = teacher.encode_text(prompts).tokens.requires_grad_(True)
    features = teacher.unet_features(x, KEYS, prompt_embeds=embeds)
    torch.testing.assert_close(
        features[2].detach(), teacher.unet_features(x, KEYS, prompts=prompts)[2], atol=1e-5, rtol=1e-5
    )
    teacher.pool(features).square().sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    parts = (teacher.text_encoder, teacher.vae, teacher.unet)
    assert all(p.grad is None for part in parts for p in part.parameters())
    # without grad on the embeds nothing is recorded
    assert not teacher.unet_features(x, KEYS, prompt_embeds=embeds.detach())[1].requires_grad


def test_get_teacher_shares_weights_not_settings(folder: Path) -> None:
    a = get_teacher(TeacherSettings(model=str(folder)))
    b = get_teacher(TeacherSettings(model=str(folder), up_blocks=[3], timestep=50))
    assert a.unet is b.unet and a.text_encoder is b.text_encoder
    assert a.settings.up_blocks == [1, 2, 3] and list(b.unet_features(images(1), KEYS[:1])) == [3]


# ----------------------------------------------------------------------------- errors
def test_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(TeacherLoadError, match="nowhere.*does not exist"):
        StableDiffusionTeacher.load(TeacherSettings(model=str(missing)))


def test_missing_default_teacher_suggests_pretrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMFED_HOME", str(tmp_path))
    settings = TeacherSettings()
    assert settings.model == str(tmp_path / "teachers" / "synthetic-sd")
    with pytest.raises(TeacherLoadError, match="mmfed teacher pretrain"):
        StableDiffusionTeacher.load(settings)


def test_missing_subfolder_is_named(folder: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(folder, tmp_path / "sd"))
    shutil.rmtree(broken / "unet")
    with pytest.raises(TeacherLoadError, match="no 'unet'"):
        StableDiffusionTeacher.load(TeacherSettings(model=str(broken)))


def test_uncached_hub_id_offline_names_model_and_cache() -> None:
    from huggingface_hub import constants

    settings = TeacherSettings(model="mmfed-test/no-such-model", local_files_only=True)
    with pytest.raises(TeacherLoadError) as error:
        StableDiffusionTeacher.load(settings)
    message = str(error.value)
    assert "mmfed-test/no-such-model" in message and str(constants.HF_HUB_CACHE) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"dtype": "float16"}, "teacher.dtype='float16' needs teacher.device=cuda"),
        ({"dtype": "int8"}, "teacher.dtype='int8' is not one of"),
        ({"device": "tpu"}, "teacher.device='tpu'"),
        ({"condition": "label"}, "teacher.condition='label'"),
        ({"up_blocks": [1, 1]}, "teacher.up_blocks"),
        ({"noise_seeds": []}, "teacher.noise_seeds"),
        ({"prompt_template": "a photo"}, "teacher.prompt_template"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern.replace("(", r"\(").replace("[", r"\[")):
        TeacherSettings(**kwargs)


def test_up_blocks_out_of_range_names_valid_range(folder: Path, teacher: StableDiffusionTeacher) -> None:
    with pytest.raises(ValueError, match=r"teacher.up_blocks=\[4\].*0\.\.3"):
        teacher.unet_features(images(1), KEYS[:1], up_blocks=[4])
    with pytest.raises(ValueError, match=r"teacher.up_blocks=\[1, 7\].*0\.\.3"):
        StableDiffusionTeacher.load(TeacherSettings(model=str(folder), up_blocks=[1, 7]))
    with pytest.raises(ValueError, match=r"teacher.timestep=5000.*0\.\.999"):
        StableDiffusionTeacher.load(TeacherSettings(model=str(folder), timestep=5000))


def test_bad_images_and_keys(teacher: StableDiffusionTeacher) -> None:
    with pytest.raises(ValueError, match="uint8"):
        teacher.vae_latents(images().float())
    with pytest.raises(ValueError, match="noise_keys has 2 entries for 3 images"):
        teacher.unet_features(images(), KEYS[:2])
