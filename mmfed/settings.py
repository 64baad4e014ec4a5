"""The torch-free half of the settings groups a composition checks: ``training``, ``evaluation``,
``teacher``, and the ``model`` node's own numbers.

Why here: `mmfed config` (and a config error) must answer in well under 2 s, and ``import torch``
alone takes about that on a 2-core machine. `mmfed.validation.check_config` builds each settings
group's component so that its constructor's checks run at composition, but the classes that do the
work (`federation.client.LocalTraining`, `evaluation.Evaluator`, `teacher.model.TeacherSettings`)
live in modules that import torch. Their constructors (signature, checks, stored values) are these
bases instead; the working classes subclass them without touching ``__init__``, so the signature,
and with it the config and its ``_target_``, stay theirs. `mmfed/config_schema.json` records, per
registered class, the class whose constructor it runs (its ``check``), and the composition builds
that one. The other settings groups' modules (`data.partition`, `data.layout`,
`federation.flower.settings`) import no torch themselves and are built as they are.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from mmfed.config import check_choice, check_positive

OPTIMIZER_NAMES = ("sgd", "adam", "adamw")  # `federation.client.OPTIMIZERS` builds each
PRECISION_NAMES = ("float32", "bfloat16", "auto")  # `federation.client.resolve_precision` maps them to dtypes
BACKENDS = ("auto", "torch", "faiss")  # retrieval search (`metrics.retrieval`)
TEACHER_DTYPES = ("float32", "float16", "bfloat16")  # `teacher.model.DTYPES` maps them to torch's
TEACHER_DEVICES = ("cpu", "cuda", "auto")
CONDITIONS = ("empty", "class", "caption")


def mmfed_home() -> Path:
    """Where mmfed keeps teachers and feature caches: $MMFED_HOME, default ~/.cache/mmfed."""
    return Path(os.environ.get("MMFED_HOME", "~/.cache/mmfed")).expanduser()


def default_teacher() -> str:
    """The default teacher folder under the current $MMFED_HOME (written by `mmfed teacher pretrain`)."""
    return str(mmfed_home() / "teachers" / "synthetic-sd")


def check_model_config(model_cfg: Any) -> None:
    """The model node's own numbers; a bad one is a ValueError naming the key (the CLI's one line)."""
    embed_dim = model_cfg.get("embed_dim")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"config key 'model.embed_dim': must be an integer >= 1, got {embed_dim!r}")
    temperature = model_cfg.get("init_temperature")
    number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not number or not 0 < temperature < math.inf:
        raise ValueError(f"config key 'model.init_temperature': must be a number > 0, got {temperature!r}")


class LocalTrainingBase:
    """How a client trains locally each round (a fresh optimizer every round, as in FedAvg): the
    ``training`` group's constructor; `federation.client.LocalTraining` adds the optimizer.

    `precision="bfloat16"` runs the encoders' forward passes (and so their backward) under
    `torch.autocast` in bfloat16; the embeddings are cast back to float32 before the loss terms, so
    every method's loss, the teacher and the optimizer's state stay float32. Why: on CPUs with
    native bfloat16 (AVX512-BF16 / AMX) convolutions and matmuls run faster (measured in README,
    "Performance"); on CPUs without it bfloat16 is emulated and slower. `precision="auto"` takes
    bfloat16 where the training device computes it natively (a CPU whose oneDNN reports bfloat16
    support, a CUDA device with bfloat16) and float32 elsewhere; `summary.json` records which
    (`environment.cpu_native_bfloat16`).
    float32 by default: an engineering option of ours, not part of any method, and it changes the
    numbers; the default federation (`experiment=default`) opts in with `auto`.
    `precision_modalities` limits it to some encoders. On the CPU attention then runs on torch's
    math backend (its flash-attention backward in bfloat16 is ~17x slower than in float32).

    `fused_optimizer=True` steps the optimizer with torch's fused kernel (one pass over all
    parameters) where the parameters allow it (CPU or CUDA floats), else the for-loop step: the
    same update rule, up to float rounding, and on the CPU 6.5x faster for the text encoder's 1.4M
    parameters (README, "Performance"). `false` restores the for-loop step of torch's CPU default.
    """

    def __init__(
        self,
        local_epochs: int = 1,
        batch_size: int = 64,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        max_steps: int | None = None,
        precision: str = "float32",
        precision_modalities: tuple[str, ...] = ("image", "text"),
        fused_optimizer: bool = True,
    ) -> None:
        check_positive("local_epochs", local_epochs)
        check_positive("batch_size", batch_size)
        check_choice("optimizer", optimizer, OPTIMIZER_NAMES)
        check_choice("precision", precision, PRECISION_NAMES)
        for modality in precision_modalities:
            check_choice("precision_modalities", modality, ("image", "text"))
        check_positive("lr", lr)
        if max_steps is not None:
            check_positive("max_steps", max_steps)
        check_positive("weight_decay", weight_decay, strict=False)
        if grad_clip is not None:  # 0 or null: no clipping; a negative norm would flip the gradient
            check_positive("grad_clip", grad_clip, strict=False)
        self.local_epochs, self.batch_size, self.optimizer = local_epochs, batch_size, optimizer
        self.lr, self.weight_decay, self.grad_clip, self.max_steps = lr, weight_decay, grad_clip, max_steps
        self.precision, self.precision_modalities = precision, tuple(precision_modalities)
        self.fused_optimizer = bool(fused_optimizer)


class EvaluatorBase:
    """The ``evaluation`` group's constructor; `evaluation.Evaluator` adds the evaluation."""

    def __init__(
        self,
        batch_size: int = 256,
        ks: tuple[int, ...] = (1, 5, 10),
        fold_size: int = 1000,
        chunk_size: int = 256,
        backend: str = "auto",
        selection_metric: str = "retrieval/rsum",
    ) -> None:
        check_choice("backend", backend, BACKENDS)
        for name, value in (("batch_size", batch_size), ("fold_size", fold_size), ("chunk_size", chunk_size)):
            check_positive(name, value)
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks={list(ks)} must list ranks >= 1")
        self.batch_size, self.ks, self.fold_size = batch_size, tuple(ks), fold_size
        self.chunk_size, self.backend, self.selection_metric = chunk_size, backend, selection_metric


class TeacherSettingsBase:
    """Which diffusion model to read and how; the signature is the ``teacher`` config group
    (`teacher.model.TeacherSettings` adds the torch device).

    `model`: ``default`` (the pretrained synthetic-world teacher under $MMFED_HOME), a Hugging Face
    hub id or a local folder in SD's layout. `up_blocks`: indices of the U-Net decoder blocks whose
    outputs are the features (FedDifRC reads its layers 2-4, i.e. blocks 1, 2, 3 of SD's four).
    `noise_seeds`: features are averaged over one noise draw per seed. `condition`: which prompt the
    U-Net sees (the empty one, the class prompt, or the sample's caption; chosen by the caller).
    """

    def __init__(
        self,
        model: str = "default",
        revision: str | None = None,
        local_files_only: bool = False,
        dtype: str = "float32",
        device: str = "cpu",
        resolution: int | None = None,
        prompt_template: str = "a photo of a {}",
        up_blocks: list[int] = (1, 2, 3),
        timestep: int = 300,
        noise_seeds: list[int] = (0,),
        condition: str = "empty",
        batch_size: int = 16,
        cache_dir: str = "default",
    ) -> None:
        check_choice("teacher.dtype", dtype, TEACHER_DTYPES)
        if device not in TEACHER_DEVICES and not device.startswith("cuda:"):
            raise ValueError(
                f"teacher.device={device!r} is not one of {', '.join(map(repr, TEACHER_DEVICES))} or 'cuda:N'"
            )
        check_choice("teacher.condition", condition, CONDITIONS)
        if dtype != "float32" and device == "cpu":
            raise ValueError(
                f"teacher.dtype={dtype!r} needs teacher.device=cuda; use teacher.dtype=float32 on cpu"
            )
        if resolution is not None:
            check_positive("teacher.resolution", resolution)
        if "{}" not in prompt_template:
            raise ValueError(f"teacher.prompt_template={prompt_template!r} has no '{{}}' for the class name")
        up_blocks, noise_seeds = [int(b) for b in up_blocks], [int(s) for s in noise_seeds]
        if not up_blocks or min(up_blocks) < 0 or len(set(up_blocks)) != len(up_blocks):
            raise ValueError(f"teacher.up_blocks={up_blocks} must be distinct block indices >= 0")
        if not noise_seeds:
            raise ValueError("teacher.noise_seeds must name at least one seed")
        if timestep < 0:
            raise ValueError(f"teacher.timestep must be >= 0, got {timestep}")
        check_positive("teacher.batch_size", batch_size)
        self.model = default_teacher() if model == "default" else model
        self.revision, self.local_files_only = revision, local_files_only
        self.dtype, self.device, self.resolution = dtype, device, resolution
        self.prompt_template, self.up_blocks, self.timestep = prompt_template, up_blocks, int(timestep)
        self.noise_seeds, self.condition, self.batch_size = noise_seeds, condition, batch_size
        self.cache_dir = str(mmfed_home() / "features") if cache_dir == "default" else cache_dir

    def extraction_fingerprint(self) -> dict[str, Any]:
        """Every setting that changes a feature value (not batch size, device or cache folder).

        Callers combine it with `StableDiffusionTeacher.identity`, which pins the weights themselves.
        """
        return {
            "model": self.model,
            "revision": self.revision,
            "dtype": self.dtype,
            "resolution": self.resolution,
            "prompt_template": self.prompt_template,
            "up_blocks": list(self.up_blocks),
            "timestep": self.timestep,
            "noise_seeds": list(self.noise_seeds),
            "condition": self.condition,
        }
