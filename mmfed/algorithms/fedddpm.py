"""FedDDPM and FedDDPM+: diffusion-generated auxiliary data that corrects the global model.

After Peng et al., "Federated Learning for Diffusion Models" (arXiv:2503.06426, 2025), which
introduces FedDDPM and FedDDPM+; the slow-learning rule below is this code's own, configurable
choice (the abstract describes detection and a one-shot correction, not a rule).

Before round 1 every client with labelled images trains a small class-conditional DDPM (Ho et al.
2020) on its own data and uploads it once (`ClassDiffusionTask`, a *client task* of the one-time
"prepare" stage). The server samples an
auxiliary labelled set D_aux from the uploaded models (DDIM, Song et al. 2021) whose class counts
approximate the global label distribution p(y) = sum_k n_k(y) / sum_k n_k (clients report counts,
never data), and after the round's aggregation fine-tunes the global model on D_aux
(`AuxDataCorrection`):

    w <- w - lr * grad_w  CE( h(f(x_aux)), y_aux ),    `correction_steps` AdamW steps on the image
                                                       encoder f and image head h (text side untouched)

FedDDPM corrects after every aggregation (`trigger: always`). FedDDPM+ (`trigger: plateau`)
corrects only when learning is slow: `SlowLearningDetector` watches a validation metric of the
global model and, as in the paper, performs a **one-shot** correction: the first detected plateau
fires it, and it never fires again. `rearm: true` (our option, off by default) re-arms the detector
after each correction, so every later plateau fires again; `server/<step>/fired` in metrics.jsonl
says in which rounds it fired.

Departures of ours (named options, off by default): `rearm` (a correction per plateau instead of
the paper's one).

Who generates class c: every uploaded model whose client holds class c, in proportion to its count
n_k(c) (largest remainders), so a client generates only classes it has seen, and mostly those it has
seen most. Text-only clients do not take part: a class-conditional *image* model cannot be trained
without images, and generating captions by diffusion is out of scope; their payload in the prepare
stage asks for nothing and they reply with nothing (0 bytes). Paired clients take part with their
images and image labels; a client whose split has no image labels cannot condition on a class and
is reported (`ddpm/skipped_no_labels`), not silently dropped.

Cost (per round in metrics.jsonl, summed in summary.json): `cost/client_diffusion_seconds` (sum over
clients of their diffusion training time), `cost/upload_bytes` (the uploaded models, as sent),
`cost/sampling_seconds` (server), `cost/correction_seconds` (server); zero in rounds without them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmfed.algorithms.base import ClientTask, ServerRound, ServerStep
from mmfed.config import check_choice, check_positive, register
from mmfed.data.layout import ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.ddpm import ClassDiffusion, DiffusionBudget, apportion, build_unet, noise_schedule, plan_counts
from mmfed.ddpm.sample import SAMPLERS, sample_images
from mmfed.ddpm.train import train_diffusion
from mmfed.protocol import TRANSPORT_DTYPES, Message, Payload, Reply, encode_tensors
from mmfed.utils.io import save_json
from mmfed.utils.seeding import numpy_rng, seed_torch, torch_generator

log = logging.getLogger("mmfed")

DIFFUSION_TENSORS = "ddpm/"  # reply tensors "ddpm/unet/<param>": an uploaded diffusion model
DIFFUSION_CONFIG = "ddpm"  # reply config key: the model's config (ClassDiffusion.to_message)
REPORT_FILE = "training_report.json"  # in a cached model's folder, written last
COSTS = ("client_diffusion_seconds", "upload_bytes", "sampling_seconds", "correction_seconds")
TRIGGERS = ("always", "plateau")
RULES = ("best", "last")


# ----------------------------------------------------------------------------- client task
@register("client_task", "class_diffusion")
class ClassDiffusionTask(ClientTask):
    """Prepare stage, client side: train a class-conditional DDPM on the client's labelled images.

    A client task runs once, before round 1, on clients whose kind is in `kinds`; it returns a
    message fragment (tensors, config, metrics) that becomes part of the client's reply.
    Text-only clients have no images and do not take part (see the module docstring).

    Defaults fit a 2-core CPU (measured ~0.05 s per step, 600 steps ~30 s per client): a 0.26M
    parameter U-Net at 16 px (samples are resized to the data's size). Class fidelity at this budget
    is low (see eval/compare_fedddpm.py); 32 px, (32, 64, 64) and thousands of steps want a GPU.

    `cache_dir` (optional): a client keeps the models it trained (`ClassDiffusion.save`), keyed by
    its data, the settings and the seed, and uploads the kept one when asked again for exactly that
    model (e.g. FedDDPM and FedDDPM+ runs of one federation). The reply then reports the training
    time measured when the model was trained, with `ddpm/cached` = 1, so costs stay comparable.
    """

    kinds: tuple[str, ...] = ("image", "paired")

    def __init__(
        self,
        resolution: int = 16,
        block_out_channels: tuple[int, ...] = (16, 32, 32),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "squaredcos_cap_v2",
        guidance: bool = True,
        label_dropout: float = 0.1,
        max_steps: int | None = 600,
        max_seconds: float | None = None,
        batch_size: int = 32,
        lr: float = 1e-3,
        transport_dtype: str = "float16",
        cache_dir: str | None = None,
    ) -> None:
        check_choice("transport_dtype", transport_dtype, tuple(TRANSPORT_DTYPES))
        self.cache_dir = cache_dir
        self.budget = DiffusionBudget(max_steps, max_seconds)
        self.architecture = {
            "resolution": resolution,
            "block_out_channels": tuple(block_out_channels),
            "layers_per_block": layers_per_block,
            "norm_num_groups": norm_num_groups,
            "guidance": guidance,
        }
        self.schedule = {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule}
        build_unet(1, **self.architecture)  # bad architecture settings fail at build, naming the key
        noise_schedule(**self.schedule)
        self.label_dropout = label_dropout if guidance else 0.0
        self.batch_size, self.lr, self.transport_dtype = batch_size, lr, transport_dtype

    def run(
        self, split: MultimodalSplit, kind: str, cid: str, seed: int, device: torch.device, quiet: bool
    ) -> Message:
        del kind
        if split.image_labels is None or not split.image_classes:
            log.warning("client %s: no image labels, so no class-conditional diffusion model", cid)
            return Message(metrics={"ddpm/skipped_no_labels": 1.0})
        images = split.images[torch.arange(len(split))]  # uint8 [N, 3, H, W] (lazy columns decode here)
        entry = (
            Path(self.cache_dir) / self._cache_key(images, split.image_labels, cid, seed)
            if self.cache_dir
            else None
        )
        if entry is not None and (entry / REPORT_FILE).exists():  # the same data, settings and seed
            model = ClassDiffusion.load(entry).to(device)
            report = {**json.loads((entry / REPORT_FILE).read_text()), "ddpm/cached": 1.0}
        else:
            classes = len(split.image_classes)
            model, report = self._train(images, split.image_labels, classes, cid, seed, device, quiet)
            if entry is not None:
                self._store(model, report, entry)
        tensors, config = model.to_message()
        return Message(
            tensors=encode_tensors(
                {DIFFUSION_TENSORS + k: v for k, v in tensors.items()}, self.transport_dtype
            ),
            config={DIFFUSION_CONFIG: config},
            metrics=report,
        )

    def _train(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        cid: str,
        seed: int,
        device: torch.device,
        quiet: bool,
    ) -> tuple[ClassDiffusion, dict[str, float]]:
        seed_torch(seed, "ddpm-init", cid)  # the U-Net's initial weights
        model = ClassDiffusion(
            unet=build_unet(num_classes, **self.architecture).to(device),
            scheduler=noise_schedule(**self.schedule),
            num_classes=num_classes,
            image_size=int(images.shape[-1]),
            guidance=bool(self.architecture["guidance"]),
            label_counts=torch.bincount(labels, minlength=num_classes).tolist(),
        )
        report = train_diffusion(
            model,
            images,
            labels,
            self.budget,
            seed,
            stream=cid,
            batch_size=self.batch_size,
            lr=self.lr,
            label_dropout=self.label_dropout,
            progress=not quiet,
            description=f"{cid} diffusion",
        )
        return model, {
            "ddpm/seconds": report.seconds,
            "ddpm/steps": float(report.steps),
            "ddpm/loss": report.loss,
            "ddpm/stopped_by_time": float(report.stopped_by == "max_seconds"),
            "ddpm/cached": 0.0,
        }

    # ------------------------------------------------------------------ the optional model cache
    def _cache_key(self, images: torch.Tensor, labels: torch.Tensor, cid: str, seed: int) -> str:
        """Everything the trained model depends on: the data's bytes, the settings, seed and client id
        (its random streams). With `max_seconds` the model also depends on speed: a cached one may
        have trained for more or fewer steps than a fresh one would."""
        digest = hashlib.sha256()
        settings = {
            **self.architecture,
            **self.schedule,
            "budget": [self.budget.max_steps, self.budget.max_seconds],
            "label_dropout": self.label_dropout,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": seed,
            "cid": cid,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode())
        digest.update(images.contiguous().numpy().tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]

    @staticmethod
    def _store(model: ClassDiffusion, report: dict[str, float], entry: Path) -> None:
        """Write to a temporary folder and rename it into place: a reader sees a whole entry or none."""
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        model.save(staging)
        save_json(report, staging / REPORT_FILE)
        try:
            staging.rename(entry)
        except OSError:  # another process stored the same entry first
            shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------- slow-learning rule
class SlowLearningDetector:
    """Fires on the first plateau of a validation metric (FedDDPM+'s one-shot correction).

    The detector keeps the values observed since it started (with `rearm`: since it last fired);
    NaN values are skipped (a metric that could not be computed says nothing about progress).
    With W = `window` and at least W + 1 values v_0..v_n, the gain over the window is

        rule "best":  max(v_{n-W+1..n}) - max(v_{0..n-W})   (did the last W rounds beat the best before?)
        rule "last":  v_n - v_{n-W}                        (did the metric rise over the last W rounds?)

    on the values negated when `higher_is_better` is false (a loss). Learning is slow when
    gain < `min_delta`; the detector then fires. By default (the paper's one-shot correction) it is
    then spent and never fires again. With `rearm` (our option) it forgets its values instead, so the
    next detection needs a fresh window of W + 1 values and every later plateau fires again.
    """

    def __init__(
        self,
        window: int = 2,
        min_delta: float = 1.0,
        rule: str = "best",
        higher_is_better: bool = True,
        rearm: bool = False,
    ) -> None:
        check_positive("window", window)
        check_choice("rule", rule, RULES)
        if not math.isfinite(min_delta):
            raise ValueError(f"min_delta must be a finite number, got {min_delta!r}")
        self.window, self.min_delta, self.rule = int(window), float(min_delta), rule
        self.sign = 1.0 if higher_is_better else -1.0
        self.rearm = bool(rearm)
        self.values: list[float] = []
        self.spent = False  # fired once and not re-armed: never fires again

    def observe(self, value: float) -> None:
        if not math.isnan(value):
            self.values.append(float(value))

    def gain(self) -> float | None:
        """The window's gain, or None while fewer than window + 1 values were observed."""
        w, v = self.window, [self.sign * value for value in self.values]  # higher is better now
        if len(v) < w + 1:
            return None
        return max(v[-w:]) - max(v[:-w]) if self.rule == "best" else v[-1] - v[-1 - w]

    def check(self) -> bool:
        """True if learning is slow now; then the detector is spent (or, with `rearm`, starts afresh)."""
        if self.spent:
            return False
        gain = self.gain()
        if gain is None or gain >= self.min_delta:
            return False
        self.values = []
        self.spent = not self.rearm
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "spent": self.spent}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [float(v) for v in state.get("values", [])]
        self.spent = bool(state.get("spent", False))


# ----------------------------------------------------------------------------- server step
def assign_generators(plan: Sequence[int], client_counts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Split each class's sample count over the models whose clients hold that class.

    plan[c]: samples of class c; client_counts[k][c]: client k's count of class c. Returns
    per_model[k][c] with sum_k per_model[k][c] = plan[c], proportional to client_counts[k][c]
    (largest remainders). A class no client holds cannot be planned (ValueError).
    """
    per_model = [[0] * len(plan) for _ in client_counts]
    for c, wanted in enumerate(plan):
        if wanted == 0:
            continue
        holders = [counts[c] for counts in client_counts]
        if sum(holders) == 0:
            raise ValueError(
                f"{wanted} samples planned for class {c}, which no uploaded model was trained on"
            )
        for k, share in enumerate(apportion(wanted, holders)):
            per_model[k][c] = share
    return per_model


@register("server_step", "aux_correction")
class AuxDataCorrection(ServerStep):
    """Sample D_aux from the clients' diffusion models once; fine-tune the global model on it.

    Runs after the aggregation step (config order). `trigger: always` is FedDDPM, `trigger: plateau`
    FedDDPM+ (`metric`, `window`, `min_delta`, `rule`, `higher_is_better`, `rearm`:
    `SlowLearningDetector`; one-shot unless `rearm`).
    Per-class counts: `samples_per_class` for every class some client holds, or (when null)
    `total_samples` spread by the global label distribution.
    """

    prepares = True  # takes part in the one-time prepare stage (clients upload their models)
    trains_parts = ("image_encoder", "image_head")
    evaluate_from_global = True  # sends nothing

    def __init__(
        self,
        samples_per_class: int | None = None,
        total_samples: int = 500,
        sampler: str = "ddim",
        sampling_steps: int = 25,
        guidance_scale: float = 3.0,
        sample_batch_size: int = 250,
        correction_steps: int = 20,
        batch_size: int = 64,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        keep_norm_statistics: bool = True,
        trigger: str = "always",
        metric: str = "val/classification/image/acc",
        window: int = 2,
        min_delta: float = 1.0,
        rule: str = "best",
        higher_is_better: bool = True,
        rearm: bool = False,
    ) -> None:
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("trigger", trigger, TRIGGERS)
        for name, value in (
            ("total_samples", total_samples),
            ("sampling_steps", sampling_steps),
            ("guidance_scale", guidance_scale),
            ("sample_batch_size", sample_batch_size),
            ("batch_size", batch_size),
            ("lr", lr),
        ):
            check_positive(name, value)
        check_positive("correction_steps", correction_steps, strict=False)
        if samples_per_class is not None:
            check_positive("samples_per_class", samples_per_class)
        self.samples_per_class, self.total_samples = samples_per_class, total_samples
        self.sampling = {
            "sampler": sampler,
            "steps": sampling_steps,
            "guidance_scale": guidance_scale,
        }
        self.sample_batch_size = sample_batch_size
        self.correction_steps, self.batch_size, self.lr = correction_steps, batch_size, lr
        self.weight_decay, self.keep_norm_statistics = weight_decay, keep_norm_statistics
        self.trigger, self.metric = trigger, metric
        self.detector = SlowLearningDetector(window, min_delta, rule, higher_is_better, rearm)
        self.aux_images: torch.Tensor | None = None  # uint8 [N, 3, H, W]
        self.aux_labels: torch.Tensor | None = None  # int64 [N]
        self.fingerprint = ""
        self.fired_rounds: list[int] = []

    # ------------------------------------------------------------------ prepare: models -> D_aux
    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        return Payload()  # the clients' diffusion settings are their client task's config

    def aggregate(self, round_: ServerRound, replies: list[Reply]) -> dict[str, float]:
        if round_.stage == "prepare":
            return self._prepare(round_, replies)
        fired = self._should_fire()
        metrics = {f"cost/{name}": 0.0 for name in COSTS} | {"fired": float(fired)}
        if fired:
            began = time.perf_counter()
            metrics.update(self.correct(round_.global_model, round_.seed, round_.round))
            metrics["cost/correction_seconds"] = time.perf_counter() - began
            self.fired_rounds.append(round_.round)
        return metrics

    def _prepare(self, round_: ServerRound, replies: list[Reply]) -> dict[str, float]:
        uploads = [r for r in replies if any(k.startswith(DIFFUSION_TENSORS) for k in r.tensors)]
        if not uploads:
            raise ValueError(
                "aux_correction: no client uploaded a diffusion model (it needs image or paired clients "
                "with image labels, and algorithm.client_tasks with a class_diffusion task)"
            )
        models = [
            ClassDiffusion.from_message(
                {
                    k[len(DIFFUSION_TENSORS) :]: v
                    for k, v in r.tensors.items()
                    if k.startswith(DIFFUSION_TENSORS)
                },
                r.config[DIFFUSION_CONFIG],
            ).to(round_.global_model.device)
            for r in uploads
        ]
        classes = {m.num_classes for m in models}
        if len(classes) != 1:
            raise ValueError(
                f"aux_correction: uploaded models disagree on the number of classes {sorted(classes)}"
            )
        counts = [m.label_counts for m in models]
        global_counts = [sum(column) for column in zip(*counts, strict=True)]
        plan = plan_counts(
            global_counts, self.samples_per_class, None if self.samples_per_class else self.total_samples
        )
        per_model = assign_generators(plan, counts)
        began = time.perf_counter()
        images, labels = [], []
        for reply, model, assigned in zip(uploads, models, per_model, strict=True):
            wanted = torch.repeat_interleave(torch.arange(len(assigned)), torch.tensor(assigned))
            if len(wanted) == 0:
                continue
            generator = torch_generator(round_.seed, "aux-sample", reply.cid)
            images.append(
                sample_images(model, wanted, generator, batch_size=self.sample_batch_size, **self.sampling)
            )
            labels.append(wanted)
        sampling_seconds = time.perf_counter() - began
        self.aux_images, self.aux_labels = torch.cat(images), torch.cat(labels)
        self.fingerprint = self._fingerprint(uploads, models)
        log.info(
            "aux_correction: sampled %d images in %.1fs (%s)",
            len(self.aux_labels),
            sampling_seconds,
            self.fingerprint[:12],
        )
        metrics: dict[str, float] = {f"cost/{name}": 0.0 for name in COSTS}
        metrics["cost/client_diffusion_seconds"] = sum(r.metrics.get("ddpm/seconds", 0.0) for r in uploads)
        metrics["cost/upload_bytes"] = float(sum(r.nbytes for r in uploads))
        metrics["cost/sampling_seconds"] = sampling_seconds
        metrics["models"] = float(len(uploads))
        metrics["cached_models"] = sum(r.metrics.get("ddpm/cached", 0.0) for r in uploads)
        metrics["aux_samples"] = float(len(self.aux_labels))
        metrics["aux_classes"] = float(sum(1 for n in plan if n))
        metrics["diffusion_steps"] = sum(r.metrics["ddpm/steps"] for r in uploads) / len(uploads)
        metrics["diffusion_loss"] = sum(r.metrics["ddpm/loss"] for r in uploads) / len(uploads)
        return metrics

    def _fingerprint(self, uploads: list[Reply], models: list[ClassDiffusion]) -> str:
        """Identifies D_aux: the uploaded models (by client) and every setting that shapes the samples."""
        digest = hashlib.sha256()
        for reply, model in sorted(zip(uploads, models, strict=True), key=lambda pair: pair[0].cid):
            digest.update(f"{reply.cid}:{model.fingerprint()}".encode())
        settings = {
            **self.sampling,
            "samples_per_class": self.samples_per_class,
            "total_samples": self.total_samples,
        }
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------ FedDDPM+: when to correct
    def observe(self, round_: int, metrics: dict[str, float]) -> None:
        """After each round's evaluation: feed the watched validation metric to the detector."""
        del round_
        if self.trigger != "plateau":
            return
        if self.metric not in metrics:
            raise ValueError(
                f"aux_correction: metric={self.metric!r} is not among the validation metrics "
                f"({', '.join(sorted(metrics))})"
            )
        self.detector.observe(float(metrics[self.metric]))

    def _should_fire(self) -> bool:
        return self.trigger == "always" or self.detector.check()

    # ------------------------------------------------------------------ the correction
    def correct(self, model: nn.Module, seed: int, round_: int) -> dict[str, float]:
        """`correction_steps` AdamW steps of image CE on D_aux, image encoder and image head only."""
        if self.aux_images is None or self.aux_labels is None:
            raise RuntimeError("aux_correction: no auxiliary data (the prepare stage did not run)")
        if self.correction_steps == 0:
            return {"correction_loss": float("nan")}
        params = [p for part in ("image_encoder", "image_head") for p in getattr(model, part).parameters()]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        seed_torch(seed, "aux-correction", round_)  # dropout
        rng = numpy_rng(seed, "aux-correction-batches", round_)
        was_training = model.training
        model.train()
        if self.keep_norm_statistics:  # D_aux must not shift the running statistics of real data
            for module in model.image_encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        losses = []
        size = len(self.aux_labels)
        for _ in range(self.correction_steps):
            rows = torch.from_numpy(rng.choice(size, min(self.batch_size, size), replace=False))
            logits = model.image_head(model.encode_images(self.aux_images[rows]))  # [B, C]
            loss = F.cross_entropy(logits, self.aux_labels[rows].to(logits.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
        model.train(was_training)
        return {"correction_loss": sum(losses) / len(losses)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "aux_images": self.aux_images,
            "aux_labels": self.aux_labels,
            "fingerprint": self.fingerprint,
            "detector": self.detector.state_dict(),
            "fired_rounds": list(self.fired_rounds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.aux_images, self.aux_labels = state.get("aux_images"), state.get("aux_labels")
        self.fingerprint = state.get("fingerprint", "")
        self.detector.load_state_dict(state.get("detector", {}))
        self.fired_rounds = list(state.get("fired_rounds", []))
