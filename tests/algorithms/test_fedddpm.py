"""FedDDPM parts: the slow-learning rule on scripted sequences, who generates which class, sampled
labels follow the requested counts, the cost metrics, and a correction that touches only the image side."""

from __future__ import annotations

import math

import pytest
import torch

from mmfed.algorithms.base import ServerRound
from mmfed.algorithms.fedddpm import (
    DIFFUSION_TENSORS,
    AuxDataCorrection,
    ClassDiffusionTask,
    SlowLearningDetector,
    assign_generators,
)
from mmfed.cli import compose
from mmfed.data.synthetic import SyntheticWorld
from mmfed.models.multimodal import KIND_PARTS, build_model
from mmfed.protocol import Reply

TINY_TASK = {"resolution": 8, "block_out_channels": (8, 8), "max_steps": 2, "batch_size": 8}


def fires(detector: SlowLearningDetector, values: list[float]) -> list[int]:
    """The 1-based positions after which the detector fired (it sees values[:i] before deciding)."""
    fired = []
    for i, value in enumerate(values, start=1):
        detector.observe(value)
        if detector.check():
            fired.append(i)
    return fired


# ----------------------------------------------------------------------------- slow-learning rule
def test_the_correction_is_one_shot_by_default() -> None:
    # W=2: the first check is possible after 3 values; a flat sequence fires at 3 and never again,
    # however long the plateaus that follow (the paper's one-shot correction).
    assert fires(SlowLearningDetector(window=2, min_delta=1.0), [10.0] * 10) == [3]
    # a plateau, a recovery, then a second plateau: only the first fires
    values = [10.0, 10.0, 10.0, 13.0, 16.0, 19.0, 19.0, 19.0, 19.0]
    assert fires(SlowLearningDetector(window=2, min_delta=1.0), values) == [3]
    spent = SlowLearningDetector(window=2, min_delta=1.0)
    fires(spent, [10.0] * 3)
    restored = SlowLearningDetector(window=2, min_delta=1.0)
    restored.load_state_dict(spent.state_dict())  # a resumed run stays spent
    assert restored.spent and fires(restored, [10.0] * 6) == []


def test_rearm_fires_on_every_plateau_after_a_fresh_window() -> None:
    # rearm (our option): after firing the values are forgotten; a flat sequence needs 3 new values
    # (4, 5, 6) before it can fire again, at 6, then 9.
    assert fires(SlowLearningDetector(window=2, min_delta=1.0, rearm=True), [10.0] * 10) == [3, 6, 9]
    values = [10.0, 10.0, 10.0, 13.0, 16.0, 19.0, 19.0, 19.0, 19.0]
    # after the first fire at 3: (13, 16, 19) improves; (19, 19) vs 16 gains 3 at 7; at 8 the window
    # (19, 19) vs best before 19 gains 0: fires; then a fresh window needs 3 more values
    assert fires(SlowLearningDetector(window=2, min_delta=1.0, rearm=True), values) == [3, 8]


def test_steady_improvement_never_fires() -> None:
    assert fires(SlowLearningDetector(window=2, min_delta=1.0), [10.0 + 1.5 * i for i in range(12)]) == []
    assert (
        fires(SlowLearningDetector(window=3, min_delta=0.5, rule="last"), [float(i) for i in range(12)]) == []
    )


def test_the_window_boundary_and_the_threshold() -> None:
    # best rule, W=2: gain = max(last 2) - max(before). [10, 10.5, 11] -> 11 - 10 = 1.0: not < 1.0.
    detector = SlowLearningDetector(window=2, min_delta=1.0)
    assert fires(detector, [10.0, 10.5]) == []  # two values: no window yet
    assert detector.gain() is None
    assert fires(detector, [11.0]) == []
    assert detector.gain() == pytest.approx(1.0)
    # one more value, 10.9: window (11, 10.9) vs before (10, 10.5) -> 0.5 < 1: fires.
    assert fires(detector, [10.9]) == [1]
    assert detector.values == []


def test_best_rule_ignores_a_single_dip_that_the_last_rule_sees() -> None:
    values = [10.0, 14.0, 12.0, 15.5]  # after 4 values, W=2: best (12, 15.5) vs (10, 14) = 1.5; last 15.5-14
    assert fires(SlowLearningDetector(window=2, min_delta=1.0, rule="best"), values) == []
    # last rule at value 3: 12 - 10 = 2 (no); at value 4: 15.5 - 14 = 1.5 (no); dip at 3 with W=1: 12-14 < 1
    assert fires(SlowLearningDetector(window=1, min_delta=1.0, rule="last"), values) == [3]


def test_a_nan_metric_is_skipped_not_counted() -> None:
    detector = SlowLearningDetector(window=2, min_delta=1.0)
    assert fires(detector, [10.0, math.nan, 10.0, math.nan]) == []  # only two real values so far
    assert detector.values == [10.0, 10.0]
    assert fires(detector, [10.0]) == [1]


def test_lower_is_better_and_state_round_trip() -> None:
    detector = SlowLearningDetector(window=2, min_delta=0.1, higher_is_better=False)
    assert fires(detector, [1.0, 0.8, 0.6, 0.55, 0.54]) == [5]  # a loss that stops falling
    detector.observe(3.0)
    copy = SlowLearningDetector(window=2, min_delta=0.1, higher_is_better=False)
    copy.load_state_dict(detector.state_dict())
    assert copy.values == [3.0]
    with pytest.raises(ValueError, match="rule='mean' is not one of"):
        SlowLearningDetector(rule="mean")


# ----------------------------------------------------------------------------- who generates what
def test_each_class_is_generated_by_its_holders_in_proportion() -> None:
    client_counts = [[30, 10, 0], [0, 30, 5]]
    assert assign_generators([4, 8, 3], client_counts) == [[4, 2, 0], [0, 6, 3]]
    with pytest.raises(ValueError, match="class 2, which no uploaded model"):
        assign_generators([1, 1, 1], [[3, 1, 0]])


# ----------------------------------------------------------------------------- prepare stage
@pytest.fixture(scope="module")
def uploads() -> list[Reply]:
    """Two clients' replies from the real client task: one holds shapes 0 and 1, the other 1 and 2."""
    train = SyntheticWorld.tiny(n=120).split("train")
    task = ClassDiffusionTask(**TINY_TASK)
    replies = []
    for cid, classes in (("image-0", (0, 1)), ("paired-0", (1, 2))):
        rows = [i for i, label in enumerate(train.image_labels.tolist()) if label in classes]
        split = train.subset(rows, name=cid)
        message = task.run(split, cid.split("-")[0], cid, seed=0, device=torch.device("cpu"), quiet=True)
        replies.append(
            Reply(
                message.tensors,
                message.config,
                message.metrics,
                cid=cid,
                kind="image",
                num_examples=len(rows),
            )
        )
    return replies


@pytest.fixture(scope="module")
def global_model() -> torch.nn.Module:
    cfg = compose(["experiment=smoke"])
    return build_model(cfg.model, KIND_PARTS["global"], 10, 4)


def test_the_client_task_uploads_a_model_with_its_label_counts(uploads: list[Reply]) -> None:
    first = uploads[0]
    assert all(name.startswith(DIFFUSION_TENSORS + "unet/") for name in first.tensors)
    assert {t.dtype for t in first.tensors.values()} == {torch.float16}  # transport_dtype
    counts = first.config["ddpm"]["label_counts"]
    assert len(counts) == 10 and counts[2:] == [0] * 8 and sum(counts) == first.num_examples
    assert first.metrics["ddpm/steps"] == 2.0
    assert ClassDiffusionTask().applies_to("paired") and not ClassDiffusionTask().applies_to("text")


def test_a_kept_model_is_reused_only_for_the_same_data_settings_and_seed(tmp_path) -> None:
    train = SyntheticWorld.tiny(n=40).split("train")
    task = ClassDiffusionTask(**TINY_TASK, cache_dir=str(tmp_path))
    cpu = torch.device("cpu")
    first = task.run(train, "image", "image-0", seed=0, device=cpu, quiet=True)
    again = task.run(train, "image", "image-0", seed=0, device=cpu, quiet=True)
    assert (first.metrics["ddpm/cached"], again.metrics["ddpm/cached"]) == (0.0, 1.0)
    assert again.metrics["ddpm/seconds"] == first.metrics["ddpm/seconds"]  # the cost when it was trained
    assert first.tensors.keys() == again.tensors.keys()
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert again.config == first.config
    other_seed = task.run(train, "image", "image-0", seed=1, device=cpu, quiet=True)
    other_data = task.run(train.subset(range(30)), "image", "image-0", seed=0, device=cpu, quiet=True)
    assert other_seed.metrics["ddpm/cached"] == other_data.metrics["ddpm/cached"] == 0.0
    assert len(list(tmp_path.iterdir())) == 3


def _prepare(step: AuxDataCorrection, uploads: list[Reply], model: torch.nn.Module) -> dict[str, float]:
    text_reply = Reply(cid="text-0", kind="text", num_examples=50)  # takes no part: replies with nothing
    return step.aggregate(ServerRound(0, 0, model, [], stage="prepare"), [*uploads, text_reply])


def test_sampled_labels_follow_samples_per_class(uploads: list[Reply], global_model: torch.nn.Module) -> None:
    step = AuxDataCorrection(samples_per_class=3, sampling_steps=2)
    metrics = _prepare(step, uploads, global_model)
    assert torch.bincount(step.aux_labels, minlength=10).tolist() == [3, 3, 3] + [0] * 7
    assert step.aux_images.shape == (9, 3, 32, 32) and step.aux_images.dtype == torch.uint8
    assert metrics["models"] == 2.0 and metrics["aux_classes"] == 3.0
    assert metrics["cost/upload_bytes"] == sum(r.nbytes for r in uploads)
    assert metrics["cost/client_diffusion_seconds"] == pytest.approx(
        sum(r.metrics["ddpm/seconds"] for r in uploads)
    )
    assert metrics["cost/sampling_seconds"] > 0 and metrics["cost/correction_seconds"] == 0.0


def test_a_total_is_spread_by_the_global_label_distribution(
    uploads: list[Reply], global_model: torch.nn.Module
) -> None:
    step = AuxDataCorrection(total_samples=20, sampling_steps=2)
    _prepare(step, uploads, global_model)
    global_counts = [a + b for a, b in zip(*(r.config["ddpm"]["label_counts"] for r in uploads), strict=True)]
    expected = [20 * c / sum(global_counts) for c in global_counts]
    got = torch.bincount(step.aux_labels, minlength=10).tolist()
    assert sum(got) == 20 and all(abs(g - e) < 1 for g, e in zip(got, expected, strict=True))


def test_the_fingerprint_names_models_and_sampling_settings(
    uploads: list[Reply], global_model: torch.nn.Module
) -> None:
    prints = []
    for steps in (2, 2, 3):
        step = AuxDataCorrection(samples_per_class=1, sampling_steps=steps)
        _prepare(step, uploads, global_model)
        prints.append(step.fingerprint)
    assert prints[0] == prints[1] != prints[2]


def test_no_upload_is_an_error(global_model: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="no client uploaded a diffusion model"):
        _prepare(AuxDataCorrection(), [], global_model)


# ----------------------------------------------------------------------------- correction
def _aux_step(**kwargs: object) -> AuxDataCorrection:
    step = AuxDataCorrection(correction_steps=3, batch_size=4, lr=1e-2, **kwargs)  # type: ignore[arg-type]
    step.aux_images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    step.aux_labels = torch.arange(8) % 10
    return step


def test_the_correction_changes_the_image_side_only(global_model: torch.nn.Module) -> None:
    model = global_model
    before = {k: v.clone() for k, v in model.part_state().items()}
    metrics = _aux_step().aggregate(ServerRound(1, 0, model, []), [])
    after = {k: v.clone() for k, v in model.part_state().items()}
    changed = {k.partition("/")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"image_encoder", "image_head"}
    bn_stats = [k for k in before if k.startswith("image_encoder/") and "running_" in k]
    assert bn_stats and all(torch.equal(before[k], after[k]) for k in bn_stats)  # keep_norm_statistics
    assert metrics["fired"] == 1.0 and metrics["cost/correction_seconds"] > 0
    assert metrics["cost/upload_bytes"] == 0.0 and math.isfinite(metrics["correction_loss"])
    _aux_step(keep_norm_statistics=False).aggregate(ServerRound(2, 0, model, []), [])
    assert any(not torch.equal(after[k], model.part_state()[k]) for k in bn_stats)


def test_plateau_trigger_corrects_only_when_the_detector_fires(global_model: torch.nn.Module) -> None:
    step = _aux_step(trigger="plateau", window=1, min_delta=1.0)
    fired = []
    for round_, acc in enumerate([10.0, 20.0, 20.0, 20.0, 30.0], start=1):
        metrics = step.aggregate(ServerRound(round_, 0, global_model, []), [])
        fired.append(metrics["fired"])
        assert (metrics["cost/correction_seconds"] > 0) == bool(metrics["fired"])
        step.observe(round_, {"val/classification/image/acc": acc})
    # round 3 sees (10, 20): gain 10; round 4 sees (20, 20): fires; round 5: spent (one-shot)
    assert fired == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert step.fired_rounds == [4]
    restored = AuxDataCorrection(trigger="plateau", window=1)
    restored.load_state_dict(step.state_dict())
    assert restored.fired_rounds == [4] and torch.equal(restored.aux_labels, step.aux_labels)
    with pytest.raises(ValueError, match="metric='val/classification/image/acc' is not among"):
        step.observe(6, {"val/retrieval/rsum": 1.0})


def test_the_plateau_step_fires_once_and_rearm_fires_again(global_model: torch.nn.Module) -> None:
    flat = [10.0] * 7  # every window of W=1 is a plateau
    for rearm, expected in ((False, [3]), (True, [3, 5, 7])):
        step = _aux_step(trigger="plateau", window=1, min_delta=1.0, rearm=rearm)
        for round_, acc in enumerate(flat, start=1):
            step.aggregate(ServerRound(round_, 0, global_model, []), [])
            step.observe(round_, {"val/classification/image/acc": acc})
        assert step.fired_rounds == expected, rearm
