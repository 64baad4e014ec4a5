"""The glue guided algorithms read: cached teacher features, fingerprints, `mmfed teacher extract`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmfed.cli import main
from mmfed.data.synthetic import SyntheticWorld
from mmfed.teacher.features import (
    TeacherFeatures,
    caption_key,
    extract_split,
    split_extract_options,
    teacher_identity,
)
from mmfed.teacher.model import TeacherSettings
from mmfed.teacher.tiny import build_tiny_sd


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "sd", seed=0, sample_size=16)


def features(folder: Path, cache: Path, **settings: object) -> TeacherFeatures:
    return TeacherFeatures(TeacherSettings(model=str(folder), cache_dir=str(cache), **settings), data="d0")


def test_warm_cache_runs_no_teacher_pass_and_loads_no_teacher(folder: Path, tmp_path: Path) -> None:
    split = SyntheticWorld.tiny(n=8).split("train")
    ids, images = split.ids[:6], split.images[:6]
    cold = features(folder, tmp_path)
    first = cold.images(ids, images)
    assert cold.forward_batches > 0 and cold.stats()["misses"] == 6
    warm = features(folder, tmp_path)  # a new process's view of the same cache folder
    again = warm.images(ids, images)
    assert warm.forward_batches == 0 and warm._teacher is None  # not even loaded
    assert warm.stats()["hits"] == 6 and warm.stats()["saved_seconds"] > 0
    assert torch.allclose(first, again, atol=2e-3)  # fp16 on disk


def test_fingerprint_changes_with_the_settings_that_change_features(folder: Path, tmp_path: Path) -> None:
    split = SyntheticWorld.tiny(n=8).split("train")
    ids, images = split.ids[:4], split.images[:4]
    features(folder, tmp_path).images(ids, images)
    other_timestep = features(folder, tmp_path, timestep=500)
    other_timestep.images(ids, images)
    assert other_timestep.stats()["misses"] == 4  # a changed timestep misses
    same = features(folder, tmp_path, batch_size=3)  # batch size changes nothing
    same.images(ids, images)
    assert same.stats()["hits"] == 4 and same.forward_batches == 0
    other_data = TeacherFeatures(same.settings, data="another-dataset")  # same ids, other dataset
    other_data.images(ids, images)
    assert other_data.stats()["misses"] == 4


def test_per_class_features_and_texts(folder: Path, tmp_path: Path) -> None:
    world = SyntheticWorld.tiny(n=8)
    split = world.split("train")
    feats = features(folder, tmp_path)
    per_class = feats.images_per_class(split.ids[:3], split.images[:3], world.image_classes[:4])
    assert per_class.shape[:2] == (3, 4)
    # class prompts change the U-Net features of the same image
    assert not torch.allclose(per_class[:, 0], per_class[:, 1])
    # the entry for (sample 1, class 2) is sample 1's own, whatever else is in the batch
    alone = feats.images_per_class(split.ids[1:2], split.images[1:2], world.image_classes[:4])
    assert torch.equal(alone[0, 2], per_class[1, 2])
    texts = feats.texts([caption_key(split.ids[0], 0)], [split.captions[0][0]])
    assert texts.shape == (1, feats.teacher.text_dim)
    assert feats.prompts(world.image_classes[:3]).shape == (3, feats.teacher.text_dim)


def test_identity_follows_the_weights_without_loading_them(folder: Path, tmp_path: Path) -> None:
    first = teacher_identity(TeacherSettings(model=str(folder)))
    other = build_tiny_sd(tmp_path / "other", seed=1, sample_size=16)
    assert teacher_identity(TeacherSettings(model=str(other)))["files"] != first["files"]
    assert teacher_identity(TeacherSettings(model=str(folder))) == first


def test_extract_split_then_everything_hits(folder: Path, tmp_path: Path) -> None:
    split = SyntheticWorld.tiny(n=8).split("public")
    feats = features(folder, tmp_path)
    result = extract_split(feats, split, ["text", "image", "latents", "prompts"], quiet=True)
    assert result["entries"]["image"] == len(split) and result["entries"]["text"] == 5 * len(split)
    warm = features(folder, tmp_path)
    again = extract_split(warm, split, ["text", "image", "latents", "prompts"], quiet=True)
    assert again["teacher_forward_batches"] == 0 and again["cache"]["misses"] == 0


def test_extract_cli(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "teacher",
        "extract",
        "quiet=true",
        "experiment=smoke",
        "split=val",
        "features=image,text",
        f"teacher.model={folder}",
        f"teacher.cache_dir={tmp_path}",
    ]
    assert main(args) == 0
    assert "split val: 40 rows" in capsys.readouterr().out
    assert main(args) == 0
    assert "misses 0" in capsys.readouterr().out
    assert (
        main([*args[:-2], "features=bogus", f"teacher.model={folder}", f"teacher.cache_dir={tmp_path}"]) == 2
    )
    assert "features='bogus'" in capsys.readouterr().err


def test_split_extract_options() -> None:
    options, rest = split_extract_options(["split=train", "features=[image,text]", "data.n_train=5"])
    assert options == {"split": "train", "features": "image,text"} and rest == ["data.n_train=5"]


def test_class_condition_reads_the_same_entries_as_the_per_class_features(
    folder: Path, tmp_path: Path
) -> None:
    world = SyntheticWorld.tiny(n=8)
    split = world.split("train")
    classes = world.image_classes[:4]
    feats = features(folder, tmp_path, condition="class")
    every = feats.images_per_class(split.ids[:3], split.images[:3], classes)
    batches = feats.forward_batches
    labels = [2, 0, 3]
    own = feats.images(split.ids[:3], split.images[:3], labels=labels, classes=classes)
    assert feats.forward_batches == batches  # one cache for both reads: all hits
    assert torch.equal(own, every[torch.arange(3), torch.tensor(labels)])
    with pytest.raises(ValueError, match="teacher.condition=class needs labelled samples"):
        feats.images(split.ids[:3], split.images[:3])
