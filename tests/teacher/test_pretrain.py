"""`mmfed teacher pretrain` at a tiny size: a few steps, a few rows, the real save and load path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import regex
import torch

import mmfed  # noqa: F401  (the torchvision guard)
from mmfed.cli import main
from mmfed.config import ConfigError
from mmfed.data.synthetic import SyntheticWorld
from mmfed.teacher import pretrain as pretrain_module
from mmfed.teacher.model import StableDiffusionTeacher, TeacherSettings
from mmfed.teacher.pretrain import (
    META_FILE,
    class_conditioned,
    feddifrc_map,
    format_result,
    linear_probe,
    nearest_centroid,
    pooled_features,
    pretrain_from_overrides,
    prompt_cosine,
    prompt_prototypes,
    settings_from,
    train_parts,
)

TINY = [
    "minutes=5",  # the step caps end it
    "steps=3",
    "vae_steps=2",
    "n_public=24",
    "n_val=8",
    "resolution=16",
    "batch_size=8",
    "vae_batch_size=8",
    "text_width=16",
    "text_layers=1",
    "max_length=32",
    "vae_channels=[8,16]",
    "unet_channels=[8,16,16,16]",
    "attention_head_dim=4",
    "check_images=8",
    "check_public=24",
]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_pretrain_writes_a_teacher_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "stale.txt").write_text("an older teacher")  # replaced as a whole at the end
    result = pretrain_from_overrides([f"out={out}", *TINY], quiet=True)
    assert result["path"] == str(out)
    names = {p.name for p in out.iterdir()}
    assert names == {"model_index.json", "tokenizer", "text_encoder", "vae", "unet", "scheduler", META_FILE}
    assert leftovers(tmp_path) == []
    meta = json.loads((out / META_FILE).read_text())
    assert meta["world_seed"] == 0 and meta["settings"]["steps"] == 3
    assert meta["losses"]["unet_steps"] == 3 and meta["losses"]["vae_steps"] == 2
    assert (
        set(meta["quality"]["trained"])
        == set(meta["quality"]["random"])
        >= {
            "shape/linear_probe",
            "shape/diffusion_classifier",
            "scene/nearest_centroid",
            "shape/prompt_cosine",
        }
    )
    teacher = StableDiffusionTeacher.load(TeacherSettings(model=str(out)))
    assert teacher.resolution == 16 and teacher.text_dim == 16
    assert teacher.vae.config.scaling_factor == pytest.approx(meta["losses"]["scaling_factor"])
    features = teacher.unet_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a", "b"])
    assert {b: f.shape[1] for b, f in features.items()} == {1: 16, 2: 16, 3: 8}
    # the tokenizer knows every word of the public captions as one token (CLIP's pre-tokens)
    captions = SyntheticWorld(seed=0, n_public=24).split("public").captions
    for caption in (captions[0][0], captions[23][4]):
        pieces = regex.findall(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", caption.lower())
        assert [t.removesuffix("</w>") for t in teacher.tokenizer.tokenize(caption)] == pieces
    text = format_result(result)
    assert str(out) in text and "| shape/linear_probe |" in text


def test_a_failed_pretrain_leaves_the_old_teacher_and_no_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "model_index.json").write_text("{}")

    def fail_half_way(folder: Path, parts: dict) -> None:
        (folder / "unet").mkdir()
        raise RuntimeError("disk full")

    monkeypatch.setattr(pretrain_module, "save_sd_folder", fail_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        pretrain_from_overrides([f"out={out}", *TINY], quiet=True)
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("nope=1", r"teacher_pretrain\.nope"),
        ("minutes=soon", r"teacher_pretrain\.minutes"),
        ("minutes=0", r"teacher_pretrain\.minutes must be > 0"),
        ("steps=-1", r"teacher_pretrain\.steps must be > 0"),
        ("empty_prompt=1.5", r"teacher_pretrain\.empty_prompt must be in \[0, 1\)"),
        ("resolution=40", r"teacher_pretrain\.resolution=40 must be a multiple of 32"),
        ("steer_t=[800,100]", r"teacher_pretrain\.steer_t=\[800, 100\] must be \[low, high\]"),
        ("steer_fraction=0.6", r"teacher_pretrain\.aux_fraction \+ steer_fraction must be < 1"),
        ("unet_channels=[8,16]", r"teacher_pretrain\.unet_channels needs SD's 4 stages"),
        ("minutes", "is not key=value"),
        ("world_sizes=[huge]", r"teacher_pretrain\.world_sizes must list distinct values of .*'huge'"),
        ("world_counts=[]", r"teacher_pretrain\.world_counts must list distinct values .*\(empty\)"),
    ],
)
def test_bad_overrides_are_one_line_errors(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as error:
        pretrain_from_overrides([override], quiet=True)
    assert "\n" not in str(error.value)


def test_cli_reports_a_bad_key_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["teacher", "pretrain", "quiet=true", "nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmfed: error:") and "teacher_pretrain.nope" in err and "\n" not in err


def test_probes_on_separable_and_on_shuffled_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 5
    labels = torch.arange(90) % 3
    points = centres[labels] + torch.randn(90, 8, generator=generator)
    train, test = (points[:60], labels[:60]), (points[60:], labels[60:])
    assert nearest_centroid(*train, *test) == 1.0
    assert linear_probe(*train, *test) == 1.0
    noise = torch.randn(90, 8, generator=generator)  # features that say nothing about the labels
    assert nearest_centroid(noise[:60], labels[:60], noise[60:], labels[60:]) < 0.7


def test_prompt_cosine_on_hand_made_representations() -> None:
    same = torch.randn(5, 1, 6).expand(5, 4, 6)  # the prompts do not move an image's features
    assert prompt_cosine(same) == pytest.approx(1.0)
    basis = torch.eye(4)[None].expand(3, 4, 4) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    assert prompt_cosine(basis) == pytest.approx(0.0)  # each prompt its own direction, any scale
    # one image, three prompts: a, a and -a -> pairs (1, -1, -1) -> mean -1/3
    a = torch.tensor([1.0, 2.0, -1.0])
    assert prompt_cosine(torch.stack([a, a, -a])[None]) == pytest.approx(-1 / 3)
    # the mean is over images: one unmoved image (1) and one orthogonal one (0)
    assert prompt_cosine(torch.cat([same[:1, :4, :4], basis[:1]])) == pytest.approx(0.5)


def test_prompt_prototypes_on_hand_made_representations() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    # under prompt c, an image of class c gets +6 on axis c: the right prompt is recognisable
    base = torch.randn(40, 1, 8, generator=generator).expand(40, 4, 8).clone()
    for c in range(4):
        base[labels == c, c, c] += 6.0
    assert prompt_prototypes((base[:20], labels[:20]), (base[20:], labels[20:])) == 1.0
    unmoved = torch.randn(40, 1, 8, generator=generator).expand(40, 4, 8)
    assert prompt_prototypes((unmoved[:20], labels[:20]), (unmoved[20:], labels[20:])) < 0.7


def conditioned_cosine(folder: Path, overrides: list[str]) -> float:
    """Train the tiny teacher in memory; mean pairwise cosine of 16 public images' class-conditioned
    features, mapped as FedDifRC's TDCL reads them (per-layer PCA of the empty-prompt features)."""
    keys = {o.partition("=")[0] for o in overrides}
    settings, _ = settings_from([*(o for o in TINY if o.partition("=")[0] not in keys), *overrides])
    public = SyntheticWorld(seed=0, n_public=settings.n_public, n_val=settings.n_val).split("public")
    parts, _, _ = train_parts(settings, public, folder / "tokenizer", time.monotonic(), quiet=True)
    teacher = StableDiffusionTeacher.from_modules(parts, TeacherSettings(model=str(folder)))
    reps = class_conditioned(
        teacher, public.images[:16], public.ids[:16], teacher.prompts(public.image_classes)
    )
    widths = [teacher.block_channels[b] for b in teacher.settings.up_blocks]
    space = feddifrc_map(pooled_features(teacher, public.images, public.ids), widths, dim=16)
    return prompt_cosine(space.apply(reps.flatten(0, 1)).view(*reps.shape[:2], -1))


def test_steering_makes_class_prompts_move_the_features(tmp_path: Path) -> None:
    """The steering pairs (3c) are what makes the class prompts matter: without them the same tiny
    run leaves an image's class-conditioned features nearly parallel."""
    steer = ["steps=60", "lr=3e-3", "batch_size=16", "aux_fraction=0.25", "steer_fraction=0.5"]
    steered = conditioned_cosine(tmp_path / "steered", steer)
    plain = conditioned_cosine(tmp_path / "plain", [*steer, "steer_weight=0", "margin_weight=0"])
    assert steered < 0.9 and steered < plain - 0.1, (steered, plain)


def test_text_time_embedding_feeds_the_prompt_to_every_block_and_loads(tmp_path: Path) -> None:
    """`text_time_embedding=true` (an option, measured not to help the diffusion classifier, README):
    the saved U-Net pools the prompt into its timestep embedding, and the teacher loads it."""
    out = tmp_path / "teacher"
    pretrain_from_overrides([f"out={out}", *TINY, "text_time_embedding=true"], quiet=True)
    teacher = StableDiffusionTeacher.load(TeacherSettings(model=str(out)))
    assert teacher.unet.config.addition_embed_type == "text"
    with torch.no_grad():  # the added embedding alone moves the output: drop cross-attention's context
        for block in [*teacher.unet.down_blocks, teacher.unet.mid_block, *teacher.unet.up_blocks]:
            for attention in getattr(block, "attentions", []):
                attention.forward = lambda hidden_states, *args, **kwargs: (hidden_states,)
        latents = torch.randn(1, 4, teacher.unet.config.sample_size, teacher.unet.config.sample_size)
        contexts = torch.randn(2, 1, 32, 16)
        outputs = [teacher.unet(latents, 10, encoder_hidden_states=c).sample for c in contexts]
    assert not torch.allclose(outputs[0], outputs[1])


def test_the_world_options_restrict_what_the_teacher_is_trained_and_checked_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`world_sizes` / `world_counts` / `world_positions` reach the world of the public and val rows."""
    made: list[SyntheticWorld] = []
    original = SyntheticWorld.__init__

    def recording(self: SyntheticWorld, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(SyntheticWorld, "__init__", recording)
    options = ["world_sizes=[large]", "world_counts=[1]", "world_positions=[centre]"]
    result = pretrain_from_overrides([f"out={tmp_path / 't'}", *TINY, *options], quiet=True)
    world = made[-1]  # the one the run trained on (the settings check builds one first)
    assert {a["size"] for a in world.attributes("public")} == {"large"}
    assert {a["position"] for a in world.attributes("val")} == {"centre"}
    assert {a["count"] for a in world.attributes("val")} == {1}
    meta = json.loads((Path(result["path"]) / META_FILE).read_text())
    assert meta["settings"]["world_sizes"] == ["large"]
