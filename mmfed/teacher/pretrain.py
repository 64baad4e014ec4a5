"""``mmfed teacher pretrain``: a small Stable-Diffusion-architecture teacher for the synthetic world.

No pretrained SD can be downloaded here, and a random teacher guides nothing, so this trains one
with SD's own classes (CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel,
DDPMScheduler) on the synthetic world's *public* split (image-caption pairs; the split a server may
hold), within a wall-clock budget, and saves it in SD's layout where `StableDiffusionTeacher.load`
reads it like a hub model. Training, in SD's order:

1. **VAE** (`vae_fraction` of the budget): x -> posterior q(z|x) -> x_hat, loss
   ``||x_hat - x||^2 + kl_weight * KL(q(z|x) || N(0, I))`` (SD adds perceptual and GAN terms; at
   32 px the squared error is enough). Then frozen; ``scaling_factor`` = 1 / std of the public
   latents (how SD's 0.18215 was chosen), so the U-Net sees unit-variance latents.
2. **Text encoder + U-Net** jointly, DDPM's epsilon objective (Ho et al. 2020, eq. 14):
   ``|| eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, c) ||^2`` with z_0 the
   posterior mean (what `StableDiffusionTeacher` reads; this small VAE's posterior is far wider
   than SD's), t ~ U{0..999} and c the hidden states of one of the row's captions, replaced by the
   empty prompt with probability `empty_prompt` (classifier-free guidance's prompt dropout) and by a
   class prompt ``a photo of a {shape or scene}`` with probability `class_prompt` (0.5: the format
   `TeacherSettings.prompt_template` feeds the teacher later, and the one FedDifRC's TDCL reads).
3. **Auxiliary losses** on the same U-Net pass (no second pass: one cost +75% per step, measured).
   Rows ``[0, aux_fraction * B)``: the *empty* prompt at t ~ U{50..500} (around the read timestep
   300); their pooled decoder features (up blocks 1-3, the teacher's default reads) are aligned,
   through linear heads that are then discarded, with (a) the pooled embedding of the row's caption
   (CLIP's symmetric InfoNCE, `contrastive_weight`) and (b) the pooled embeddings of the class prompts
   (cross-entropy against every shape prompt and every scene prompt, `prompt_weight`). Why: FedDifRC-
   style methods read exactly these things, and a few CPU minutes of denoising alone left them at
   chance on the world's classes (measured: 4 minutes, 265 steps, shape linear probe 0.085 vs 0.125
   for random weights). (b) uses the public split's shape and scene labels, the words every caption
   names, as an SD trained on web captions knows class names; a method guided by this teacher
   therefore gets label knowledge from the public data, which is what a pretrained teacher stands for.
   (c) **Steering pairs**, the next ``steer_fraction * B`` rows: one public image noised once (one eps,
   one t ~ U`steer_t`), read under its own shape prompt and under a wrong one. The pooled decoder
   features must tell which shape prompt the U-Net was given (cross-entropy against every shape
   prompt's embedding, a third head) and, centred on the empty-prompt rows' mean (what FedDifRC's
   layer-PCA map subtracts), the two features of one image must not be more parallel than
   `steer_cosine` (a hinge); `steer_weight` weighs both. Both are scale-free, and a scale-free loss
   grows the vectors it normalises (its gradient is orthogonal to them): without a check the pooled
   features reached norm 6e9 and the epsilon loss 1.0 (no denoising) in a default run, so a hinge keeps
   every row's pooled-feature RMS at most `feature_rms` (2; the untrained U-Net's is ~0.7). Why the
   pairs: TDCL contrasts an image's representation under its class prompt with the same image's
   representations under the other class prompts; if the prompts do not move the decoder features,
   positive and negatives coincide and TDCL cannot fall below log C. Denoising alone does not make them
   move at this size and budget: with the old recipe (10% class prompts, no pairs, 12 minutes) an
   image's 10 class-prompt representations in the FedDifRC runs had a mean pairwise cosine of 0.996
   (0.975 for random weights; README); with the pairs, see the quality table (`prompt_cosine`). The
   wrong-prompt row is left out of the epsilon loss: its target is still the true noise, which would
   teach the U-Net to ignore prompts. (d) `margin_weight` (0 by default): a relative-margin loss that
   the true prompt denoise the pair better than the wrong one (``softplus(-(e_wrong - e_true) / e_true
   / margin_temperature)``), i.e. training the diffusion classifier itself. Measured on the loaded
   2-core machine: in a 6-minute run (445 U-Net steps, no RMS hinge yet) it stayed at log 2; in an
   11-minute run (787 U-Net steps, 283 VAE steps) it reached 0.668 and the diffusion classifier 0.160,
   against 0.100 for the default run without it (661 and 123 steps: the machine was busier), which does
   not separate the loss from the extra steps. At equal time and load (stop 22: the two 11-minute runs
   side by side, one core each) it was worse: diffusion classifier 0.130 vs 0.155, shape linear probe
   0.210 vs 0.245, epsilon loss 0.36 vs 0.22; off by default.

Afterwards a quality check on held-out *val* pairs (never the public rows) compares the teacher
with the same architecture at random weights and with raw pixels: nearest-centroid and linear-probe
accuracy of pooled empty-prompt U-Net features (shape and scene labels), the diffusion classifier
(the class prompt that denoises the image best), class-prompt-conditioned feature prototypes and
`prompt_cosine`: the mean pairwise cosine of one val image's features under the 10 shape prompts,
read as TDCL's cached mode reads them (`TeacherFeatures.images_per_class`: pooled up blocks 1-3 at
t = 300) and mapped as its clients see them (FedDifRC's per-layer PCA, D/2, D/4, D/4 of
`check_dim` = the default embed_dim 128, fitted on the public rows' empty-prompt features);
``prompt_cosine_raw`` is the same before the map (dominated by the features' common mean).

The folder is written to a temporary sibling and renamed at the end: a crash leaves no half teacher.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmfed.config import check_positive, register, settings_from_overrides
from mmfed.console import bar_disabled
from mmfed.teacher.model import StableDiffusionTeacher, TeacherSettings, default_teacher
from mmfed.teacher.reduce import LayerMoments, Reduction, fit_layer_pca, rms_scaled
from mmfed.teacher.tiny import save_sd_folder, tiny_parts, words_of, write_tokenizer
from mmfed.utils.io import remove_dead_temp_dirs, save_json
from mmfed.utils.seeding import derive_seed, torch_generator

META_FILE = "mmfed_pretrain.json"
CLASS_TEMPLATE = "a photo of a {}"  # TeacherSettings' default prompt_template
READ_BLOCKS = (1, 2, 3)  # TeacherSettings' default up_blocks: what the contrastive loss shapes
READ_TIMESTEP = 300  # TeacherSettings' default timestep: the quality check reads here


@register("teacher_pretrain", "default")
class PretrainSettings:
    """What `mmfed teacher pretrain` trains and for how long (keys are ``key=value`` overrides).

    `minutes`: wall-clock training budget (VAE + U-Net phases; the quality check and saving add
    about two minutes: 11 keeps a default run within 15 minutes, measured 12 min 55 s on the loaded
    2-core machine). `steer_*`, `feature_rms`, `margin_*`: the steering pairs (module docstring, 3c-d);
    `check_dim`: the latent dimension D of the FedDifRC map the check reads `prompt_cosine` through.
    `text_time_embedding`: also feed an attention-pooled prompt embedding into the U-Net's timestep
    embedding (diffusers' ``addition_embed_type="text"``; SD has cross-attention only, so off by
    default; measured not to make the diffusion classifier work, README "The synthetic teacher").
    `steps` / `vae_steps`: optional caps on optimiser steps of each phase (with a cap and enough
    minutes the run is reproducible step for step). `world_seed` / `n_public` /
    `n_val`: the synthetic world whose public split is trained on and whose val split is checked;
    `world_sizes` / `world_counts` / `world_positions` restrict its objects as the federation's
    ``data.sizes`` / ``counts`` / ``positions`` do (None: all), so a teacher can be trained on the
    distribution its federation sees (the evidence testbed: ``[medium,large]``, ``[1]``, ``[centre]``).
    `threads`: torch's intra-op threads for the run (None: torch's default, i.e. OMP_NUM_THREADS).
    1 by default because the 2-core machine this was made on is shared: under load a small U-Net
    step took 0.24 s with 1 thread and 0.7-0.9 s with 2, and a default run with 2 threads made 75
    U-Net steps in 231 s where the same run with 1 thread made 1969 in about 630 s (OpenMP threads
    wait on each other when a core is busy). On a dedicated many-core machine set threads=null.
    """

    def __init__(
        self,
        out: str = "default",
        minutes: float = 11.0,
        seed: int = 0,
        world_seed: int = 0,
        world_sizes: list[str] | None = None,
        world_counts: list[int] | None = None,
        world_positions: list[str] | None = None,
        n_public: int = 2000,
        n_val: int = 500,
        resolution: int = 32,
        steps: int | None = None,
        vae_steps: int | None = None,
        vae_fraction: float = 0.12,
        batch_size: int = 64,
        vae_batch_size: int = 32,
        lr: float = 5e-4,
        vae_lr: float = 2e-3,
        kl_weight: float = 1e-5,
        empty_prompt: float = 0.1,
        class_prompt: float = 0.5,
        contrastive_weight: float = 0.5,
        prompt_weight: float = 0.5,
        aux_fraction: float = 0.5,
        steer_fraction: float = 0.25,
        steer_weight: float = 1.0,
        steer_t: list[int] = (50, 700),
        steer_cosine: float = 0.5,
        feature_rms: float | None = 2.0,
        margin_weight: float = 0.0,
        margin_temperature: float = 0.05,
        text_width: int = 64,
        text_layers: int = 3,
        max_length: int = 32,
        vae_channels: list[int] = (16, 32, 32),
        unet_channels: list[int] = (32, 64, 128, 128),
        attention_head_dim: int = 8,
        text_time_embedding: bool = False,
        check_images: int = 200,
        check_public: int = 1000,
        check_dim: int = 128,
        threads: int | None = 1,
    ) -> None:
        for key, value in (("minutes", minutes), ("n_public", n_public), ("n_val", n_val),
                           ("resolution", resolution), ("batch_size", batch_size), ("lr", lr),
                           ("vae_batch_size", vae_batch_size), ("vae_lr", vae_lr),
                           ("text_width", text_width), ("text_layers", text_layers),
                           ("max_length", max_length), ("attention_head_dim", attention_head_dim),
                           ("check_images", check_images), ("check_public", check_public),
                           ("check_dim", check_dim)):  # fmt: skip
            check_positive(f"teacher_pretrain.{key}", value)
        for key, value in (("steps", steps), ("vae_steps", vae_steps)):
            if value is not None:
                check_positive(f"teacher_pretrain.{key}", value)
        for key, value in (("vae_fraction", vae_fraction), ("empty_prompt", empty_prompt),
                           ("class_prompt", class_prompt), ("aux_fraction", aux_fraction),
                           ("steer_fraction", steer_fraction)):  # fmt: skip
            if not 0 <= value < 1:
                raise ValueError(f"teacher_pretrain.{key} must be in [0, 1), got {value!r}")
        if empty_prompt + class_prompt >= 1:
            raise ValueError("teacher_pretrain.empty_prompt + class_prompt must be < 1 (captions need rows)")
        if aux_fraction + steer_fraction >= 1:
            raise ValueError("teacher_pretrain.aux_fraction + steer_fraction must be < 1 (rows must denoise)")
        for key, value in (("kl_weight", kl_weight), ("contrastive_weight", contrastive_weight),
                           ("prompt_weight", prompt_weight), ("steer_weight", steer_weight),
                           ("margin_weight", margin_weight)):  # fmt: skip
            check_positive(f"teacher_pretrain.{key}", value, strict=False)
        check_positive("teacher_pretrain.margin_temperature", margin_temperature)
        vae_scale = 2 ** (len(vae_channels) - 1)
        if len(unet_channels) != 4:
            raise ValueError(f"teacher_pretrain.unet_channels needs SD's 4 stages, got {list(unet_channels)}")
        if resolution % (vae_scale * 8):
            raise ValueError(
                f"teacher_pretrain.resolution={resolution} must be a multiple of {vae_scale * 8} "
                f"(VAE downsampling x{vae_scale}, then the U-Net's 3 downsamplings)"
            )
        self.out = default_teacher() if out == "default" else out
        self.minutes, self.seed, self.world_seed = float(minutes), int(seed), int(world_seed)
        given = {"sizes": world_sizes, "counts": world_counts, "positions": world_positions}
        self.world_options = {name: list(value) for name, value in given.items() if value is not None}
        from mmfed.data.synthetic import SyntheticWorld

        try:  # the world's own checks, named by this config's keys
            SyntheticWorld(seed=0, n_train=1, n_public=1, n_val=1, n_test=1, **self.world_options)
        except ValueError as error:
            problem = str(error).removeprefix("SyntheticWorld: ")
            raise ValueError(f"teacher_pretrain.world_{problem}") from None
        self.n_public, self.n_val, self.resolution = n_public, n_val, resolution
        self.steps, self.vae_steps, self.vae_fraction = steps, vae_steps, vae_fraction
        self.batch_size, self.lr, self.vae_lr, self.kl_weight = batch_size, lr, vae_lr, kl_weight
        self.vae_batch_size = vae_batch_size
        self.empty_prompt, self.class_prompt = empty_prompt, class_prompt
        self.contrastive_weight, self.prompt_weight = contrastive_weight, prompt_weight
        self.aux_fraction, self.steer_fraction, self.steer_weight = aux_fraction, steer_fraction, steer_weight
        self.margin_weight, self.margin_temperature = margin_weight, margin_temperature
        steer_t = [int(v) for v in steer_t]
        if len(steer_t) != 2 or not 0 <= steer_t[0] <= steer_t[1] < 1000:
            raise ValueError(
                f"teacher_pretrain.steer_t={steer_t} must be [low, high], 0 <= low <= high < 1000"
            )
        self.steer_t = steer_t
        if not -1 <= steer_cosine <= 1:
            raise ValueError(f"teacher_pretrain.steer_cosine must be in [-1, 1], got {steer_cosine!r}")
        self.steer_cosine = float(steer_cosine)
        if feature_rms is not None:
            check_positive("teacher_pretrain.feature_rms", feature_rms)
        self.feature_rms = feature_rms
        self.text_width, self.text_layers, self.max_length = text_width, text_layers, max_length
        self.vae_channels, self.unet_channels = list(vae_channels), list(unet_channels)
        self.attention_head_dim = attention_head_dim
        self.text_time_embedding = bool(text_time_embedding)
        self.check_images, self.check_public, self.check_dim = check_images, check_public, check_dim
        if threads is not None:
            check_positive("teacher_pretrain.threads", threads)
        self.threads = threads
        self.latent_size = resolution // vae_scale


def settings_from(overrides: list[str]) -> tuple[PretrainSettings, dict[str, Any]]:
    """Settings from ``key=value`` overrides of the registered config (and the resolved config)."""
    settings, container = settings_from_overrides("teacher_pretrain", overrides)
    container["out"] = settings.out
    return settings, container


# ----------------------------------------------------------------------------- data
class PublicPairs:
    """The public split as tensors: pixels in [-1, 1], every caption tokenized once, class prompts."""

    def __init__(self, split: Any, tokenizer: Any, resolution: int) -> None:
        self.ids = split.ids
        self.shape_labels, self.scene_labels = split.image_labels, split.text_labels
        self.pixels = to_pixels(split.images, resolution)  # [N, 3, r, r]
        captions = split.captions
        self.per_row = len(captions[0])
        flat = [c for row in captions for c in row]
        self.caption_ids = tokenize(tokenizer, flat).view(len(captions), self.per_row, -1)  # [N, 5, L]
        self.empty_ids = tokenize(tokenizer, [""])[0]  # [L]
        # class prompts of both label sets, shapes first: [n_shapes + n_scenes, L]
        self.class_ids = tokenize(tokenizer, [CLASS_TEMPLATE.format(c) for c in class_names(split)])
        self.n_shapes = len(split.image_classes)

    def __len__(self) -> int:
        return len(self.ids)


def class_names(split: Any) -> list[str]:
    """Shape classes then scene classes: the names the class prompts are made of."""
    return [*split.image_classes, *split.text_classes]


def to_pixels(images: torch.Tensor, resolution: int) -> torch.Tensor:
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True)
    return x


def tokenize(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Token ids [B, L], padded to the tokenizer's max length like SD's pipelines."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class Budget:
    """Wall-clock deadline plus an optional step cap; `progress` drives the learning-rate schedule."""

    def __init__(self, seconds: float, steps: int | None) -> None:
        self.start, self.seconds, self.steps = time.monotonic(), seconds, steps

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self, step: int) -> float:
        by_time = self.elapsed() / self.seconds
        return min(1.0, max(by_time, step / self.steps if self.steps else 0.0))

    def done(self, step: int) -> bool:
        return (self.steps is not None and step >= self.steps) or self.elapsed() >= self.seconds


def lr_factor(step: int, progress: float, warmup: int = 50) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% at the end of the budget."""
    return min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def smooth(recent: dict[str, float], losses: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """Exponential moving averages of the losses (the first step starts them): what is reported."""
    return {k: 0.95 * recent[k] + 0.05 * v.item() if step > 1 else v.item() for k, v in losses.items()}


def _bar(total_seconds: float, description: str, quiet: bool) -> tqdm:
    return tqdm(
        total=round(total_seconds), desc=description, unit="s", leave=False, disable=bar_disabled(not quiet)
    )


# ----------------------------------------------------------------------------- phase 1: VAE
def train_vae(
    vae: nn.Module, pixels: torch.Tensor, settings: PretrainSettings, budget: Budget, quiet: bool
) -> dict[str, float]:
    """Reconstruction + small KL on the public images until the phase budget ends."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    generator = torch_generator(settings.seed, "pretrain", "vae")
    vae.train()
    step, recent = 0, {"recon": 0.0, "kl": 0.0}
    with _bar(budget.seconds, "teacher VAE", quiet) as bar:
        while not budget.done(step):
            rows = torch.randint(0, len(pixels), (settings.vae_batch_size,), generator=generator)
            x = pixels[rows]
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
            recon = F.mse_loss(vae.decode(z).sample, x)
            kl = posterior.kl().mean()  # summed over latent elements, mean over the batch
            loss = recon + settings.kl_weight * kl
            for group in optimizer.param_groups:
                group["lr"] = settings.vae_lr * lr_factor(step, budget.progress(step), warmup=20)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            recent = smooth(recent, {"recon": recon, "kl": kl}, step)
            bar.n = min(bar.total, round(budget.elapsed()))
            bar.set_postfix(step=step, recon=f"{recent['recon']:.4f}", kl=f"{recent['kl']:.1f}", refresh=True)
    vae.eval()
    return {"vae_steps": step, "vae_recon_mse": recent["recon"], "vae_kl": recent["kl"]}


@torch.no_grad()
def posterior_moments(
    vae: nn.Module, pixels: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every public image (the VAE is frozen from here on)."""
    means, stds = [], []
    for start in range(0, len(pixels), chunk):
        posterior = vae.encode(pixels[start : start + chunk]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


# ----------------------------------------------------------------------------- phase 2: U-Net
class ContrastiveHeads(nn.Module):
    """CLIP-style heads for the auxiliary loss; trained with the teacher and then discarded."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.image = nn.Linear(image_dim, dim)
        self.text = nn.Linear(text_dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @staticmethod
    def standardize(x: torch.Tensor) -> torch.Tensor:
        """Per-column z-scores over the rows. Why: pooled decoder features (and pooled prompt
        embeddings) of different inputs share one dominant direction (measured: mean pairwise
        cosine 0.9997), so after L2-normalisation every logit is equal and the loss is stuck at
        log(B); centring over the batch exposes the differences (SimCLR's heads use batch norm)."""
        return (x - x.mean(0)) / (x.std(0) + 1e-4)

    def embed(
        self, image_features: torch.Tensor, text_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.image(self.standardize(image_features)), dim=-1)
        text = F.normalize(self.text(self.standardize(text_features)), dim=-1)
        return image, text

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE over the batch: row i's image and caption are the positive pair."""
        image, text = self.embed(image_features, text_features)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * image @ text.T  # [B, B]
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def classify(
        self, image_features: torch.Tensor, prompt_features: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Cross-entropy of the image against every class prompt (CLIP's zero-shot classifier)."""
        image, prompts = self.embed(image_features, prompt_features)
        return F.cross_entropy(self.logit_scale.clamp(max=math.log(100)).exp() * image @ prompts.T, labels)


@contextmanager
def captured_blocks(unet: nn.Module, blocks: tuple[int, ...]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, every U-Net pass stores the outputs of up blocks `blocks` (grads flow)."""
    captured: dict[int, torch.Tensor] = {}
    handles = [
        unet.up_blocks[b].register_forward_hook(lambda m, a, out, b=b: captured.__setitem__(b, out))
        for b in blocks
    ]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def train_denoiser(
    parts: dict[str, Any],
    data: PublicPairs,
    latents: torch.Tensor,
    settings: PretrainSettings,
    budget: Budget,
    quiet: bool,
) -> dict[str, float]:
    """Text encoder + U-Net: epsilon loss on caption-conditioned latents (+ the contrastive term)."""
    text_encoder, unet, scheduler = parts["text_encoder"], parts["unet"], parts["scheduler"]
    image_dim = sum(list(reversed(settings.unet_channels))[b] for b in READ_BLOCKS)
    heads = ContrastiveHeads(image_dim, settings.text_width)
    steer_heads = ContrastiveHeads(image_dim, settings.text_width)  # prompt -> features (3c.)
    params = [*text_encoder.parameters(), *unet.parameters(), *heads.parameters(), *steer_heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-2)
    generator = torch_generator(settings.seed, "pretrain", "unet")
    steps_total = scheduler.config.num_train_timesteps
    text_encoder.train()
    unet.train()
    step, recent = 0, {"eps": 0.0, "contrastive": 0.0, "prompt": 0.0, "steer": 0.0, "margin": 0.0}
    batch = settings.batch_size
    aligned = settings.contrastive_weight > 0 or settings.prompt_weight > 0
    n_aux = round(batch * settings.aux_fraction) if aligned else 0  # rows [0, n_aux) also feed 3a-b.
    n_steer = 2 * round(batch * settings.steer_fraction / 2) if settings.steer_weight > 0 else 0
    steer = slice(n_aux, n_aux + n_steer)  # pairs: one image, one noise, one t, two shape prompts
    with _bar(budget.seconds, "teacher U-Net", quiet) as bar, captured_blocks(unet, READ_BLOCKS) as blocks:
        while not budget.done(step):
            rows = torch.randint(0, len(data), (batch,), generator=generator)
            rows[steer] = rows[steer][::2].repeat_interleave(2)
            z0 = latents[rows]  # posterior means: what the teacher reads at extraction
            choice = torch.randint(0, data.per_row, (batch,), generator=generator)
            captions = data.caption_ids[rows, choice]  # [B, L]
            shapes, scenes = data.shape_labels[rows], data.scene_labels[rows]
            # 2. the prompts: captions, `empty_prompt` empty, `class_prompt` class prompts (shape, scene) ...
            u = torch.rand(batch, generator=generator)
            ids = captions.clone()
            ids[u < settings.empty_prompt] = data.empty_ids
            use_class = (u >= settings.empty_prompt) & (u < settings.empty_prompt + settings.class_prompt)
            pick_shape = torch.rand(batch, generator=generator) < 0.5
            class_rows = torch.where(pick_shape, shapes, scenes + data.n_shapes)
            ids[use_class] = data.class_ids[class_rows[use_class]]
            t = torch.randint(0, steps_total, (batch,), generator=generator)
            # ... except the auxiliary rows: empty prompt, t ~ U{50..500} (around the read timestep)
            ids[:n_aux] = data.empty_ids
            t[:n_aux] = torch.randint(50, 501, (n_aux,), generator=generator)
            # ... and the steering pairs: the image's own shape prompt, then a wrong one, one noised image
            right = shapes[steer][::2]
            wrong = (
                right + torch.randint(1, data.n_shapes, (n_steer // 2,), generator=generator)
            ) % data.n_shapes
            steer_prompts = torch.stack([right, wrong], dim=1).flatten()  # [n_steer] shape indices
            ids[steer] = data.class_ids[steer_prompts]
            t[steer] = torch.randint(
                settings.steer_t[0], settings.steer_t[1] + 1, (n_steer // 2,), generator=generator
            ).repeat_interleave(2)
            # one text-encoder pass: conditioning prompts [B], the aux rows' captions, the class prompts
            encoded = text_encoder(torch.cat([ids, captions[:n_aux], data.class_ids]))
            context = encoded.last_hidden_state[:batch]
            noise = torch.randn(z0.shape, generator=generator)
            noise[steer] = noise[steer][::2].repeat_interleave(2, dim=0)
            eps = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=context).sample
            # a wrong prompt's target is still the noise: those rows would teach the U-Net to ignore
            # prompts, so only rows whose prompt is true of the image denoise
            errors = (eps - noise).square().mean(dim=(1, 2, 3))  # [B]
            denoise = torch.ones(batch, dtype=torch.bool)
            denoise[steer] = steer_prompts == shapes[steer]
            eps_loss = errors[denoise].mean()
            loss = eps_loss
            features = torch.cat([blocks[b].mean(dim=(2, 3)) for b in READ_BLOCKS], dim=1)
            pooled = encoded.pooler_output
            prompts = pooled[batch + n_aux :]
            # 3. the aux rows' pooled decoder features <-> their captions (a), every class prompt (b)
            contrastive, prompt, steered, margin = (torch.zeros(()) for _ in range(4))
            if n_aux:
                contrastive = heads(features[:n_aux], pooled[batch : batch + n_aux])
                prompt = (
                    heads.classify(features[:n_aux], prompts[: data.n_shapes], shapes[:n_aux])
                    + heads.classify(features[:n_aux], prompts[data.n_shapes :], scenes[:n_aux])
                ) / 2
                loss = loss + settings.contrastive_weight * contrastive + settings.prompt_weight * prompt
            # (c) the steering rows' features must tell which shape prompt the U-Net was given
            if n_steer:
                steered = steer_heads.classify(features[steer], prompts[: data.n_shapes], steer_prompts)
                # ... and the two prompts' features of one image must not be parallel once centred on the
                # empty-prompt mean (what the FedDifRC map subtracts): a hinge at cosine `steer_cosine`
                centre = (features[:n_aux] if n_aux else features).mean(0).detach()
                pair = (features[steer] - centre).view(n_steer // 2, 2, -1)
                parallel = F.relu(F.cosine_similarity(pair[:, 0], pair[:, 1], dim=-1) - settings.steer_cosine)
                steered = steered + parallel.mean()
                loss = loss + settings.steer_weight * steered
            # both steering losses are scale-free, and a scale-free loss grows what it normalises (its
            # gradient is orthogonal to the vector): measured, pooled features reached norm 6e9 and the
            # epsilon loss 1.0 in 641 steps. A hinge on their RMS (every row) keeps the scale put.
            if n_steer and settings.feature_rms:
                rms = features.square().mean(dim=1).sqrt()
                loss = loss + F.relu(rms - settings.feature_rms).mean()
            # (d) ... and the right prompt must denoise better than the wrong one (relative margin)
            if n_steer and settings.margin_weight > 0:
                pair = errors[steer].view(-1, 2)
                gap = (pair[:, 1] - pair[:, 0]) / pair[:, 0].detach().clamp_min(1e-6)
                margin = F.softplus(-gap / settings.margin_temperature).mean()
                loss = loss + settings.margin_weight * margin
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(step, budget.progress(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1
            recent = smooth(
                recent,
                {
                    "eps": eps_loss,
                    "contrastive": contrastive,
                    "prompt": prompt,
                    "steer": steered,
                    "margin": margin,
                },
                step,
            )
            bar.n = min(bar.total, round(budget.elapsed()))
            bar.set_postfix(
                step=step,
                eps=f"{recent['eps']:.4f}",
                con=f"{recent['contrastive']:.3f}",
                prompt=f"{recent['prompt']:.3f}",
                steer=f"{recent['steer']:.3f}",
                margin=f"{recent['margin']:.3f}",
                refresh=True,
            )
    text_encoder.eval()
    unet.eval()
    return {
        "unet_steps": step,
        "eps_loss": recent["eps"],
        "contrastive_loss": recent["contrastive"],
        "prompt_loss": recent["prompt"],
        "steer_loss": recent["steer"],
        "margin_loss": recent["margin"],
    }


# ----------------------------------------------------------------------------- quality check
@torch.no_grad()
def pooled_features(
    teacher: StableDiffusionTeacher, images: torch.Tensor, keys: list[str], prompt: str | None = None
) -> torch.Tensor:
    """Pooled decoder features [N, sum C] of `images` under `prompt` (None: the empty prompt)."""
    chunks = []
    for start in range(0, len(keys), 128):
        rows = slice(start, start + 128)
        prompts = None if prompt is None else [prompt] * len(keys[rows])
        chunks.append(teacher.pool(teacher.unet_features(images[rows], keys[rows], prompts=prompts)))
    return torch.cat(chunks)


def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def nearest_centroid(
    train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Accuracy of the nearest class mean (cosine, standardized features)."""
    train, test = _standardize(train, test)
    classes = int(max(train_y.max(), test_y.max())) + 1
    centroids = torch.zeros(classes, train.shape[1])
    for c in train_y.unique():
        centroids[c] = train[train_y == c].mean(0)
    scores = F.normalize(test, dim=1) @ F.normalize(centroids, dim=1).T
    return (scores.argmax(1) == test_y).float().mean().item()


def linear_probe(
    train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, l2: float = 1e-3
) -> float:
    """Accuracy of an L2-regularised multinomial logistic regression (L-BFGS, standardized features)."""
    train, test = _standardize(train, test)
    classes = int(max(train_y.max(), test_y.max())) + 1
    probe = nn.Linear(train.shape[1], classes)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train), train_y) + l2 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (probe(test).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def denoising_errors(
    teacher: StableDiffusionTeacher,
    images: torch.Tensor,
    keys: list[str],
    prompts: list[str],
    timesteps: tuple[int, ...] = (100, 300, 500, 700),
    draws: int = 1,
) -> torch.Tensor:
    """[len(timesteps) * draws, N, C]: ||eps - eps_theta(z_t, t, prompt_c)||^2 per (t, noise draw).

    Every class is scored on the same (t, eps) draws per image, so comparisons are paired; draw d of
    timestep k uses noise seed (k, d), and draw 0 is the quality check's (`diffusion_classifier`).
    """
    context = teacher.encode_text(prompts).tokens  # [C, L, Dt]
    latents = teacher.vae_latents(images)  # [N, 4, h, w]
    errors = torch.zeros(len(timesteps) * draws, len(keys), len(prompts))
    for k, step in enumerate(timesteps):
        for d in range(draws):
            seed = (
                derive_seed(k, "diffusion-classifier")
                if d == 0
                else derive_seed(k, d, "diffusion-classifier")
            )
            noise = teacher.noise(keys, seed, latents.shape[1:])
            t = torch.full((len(keys),), step)
            noisy = teacher.scheduler.add_noise(latents, noise, t)
            for c in range(len(prompts)):
                for start in range(0, len(keys), 128):
                    rows = slice(start, start + 128)
                    n = len(keys[rows])
                    eps = teacher.unet(
                        noisy[rows], t[rows], encoder_hidden_states=context[c : c + 1].expand(n, -1, -1)
                    )
                    errors[k * draws + d, rows, c] = (
                        (eps.sample.float() - noise[rows]).square().mean(dim=(1, 2, 3))
                    )
    return errors


def diffusion_classifier(
    teacher: StableDiffusionTeacher,
    images: torch.Tensor,
    keys: list[str],
    labels: torch.Tensor,
    prompts: list[str],
    timesteps: tuple[int, ...] = (100, 300, 500, 700),
) -> float:
    """Accuracy of argmin_c E_{t, eps} ||eps - eps_theta(z_t, t, prompt_c)||^2 (Li et al. 2023)."""
    errors = denoising_errors(teacher, images, keys, prompts, timesteps).sum(0)
    return (errors.argmin(1) == labels).float().mean().item()


@torch.no_grad()
def class_conditioned(
    teacher: StableDiffusionTeacher, images: torch.Tensor, keys: list[str], prompts: list[str]
) -> torch.Tensor:
    """[N, C, F]: each image's pooled decoder features under each class prompt (TDCL's cached reads,
    `TeacherFeatures.images_per_class`, without the cache)."""
    return torch.stack([pooled_features(teacher, images, keys, prompt) for prompt in prompts], dim=1)


def prompt_prototypes(
    train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """Accuracy of argmax_c cos(f(x | prompt_c), P_c), P_c = mean of f(x' | prompt_c) over class-c rows x'.

    train / test: (class-conditioned features [N, C, F] (`class_conditioned`), labels [N]). Does
    conditioning on the right prompt give the features that images of that class have under it?
    """
    (train_f, train_y), (test_f, test_y) = train, test
    mean = train_f.mean(0)  # [C, F]
    prototypes = torch.stack([(train_f[train_y == c, c] - mean[c]).mean(0) for c in range(train_f.shape[1])])
    scores = F.cosine_similarity(test_f - mean[None], prototypes[None], dim=-1)  # [N, C]
    return (scores.argmax(1) == test_y).float().mean().item()


def prompt_cosine(reps: torch.Tensor) -> float:
    """Mean over images of the mean pairwise cosine of one image's representations under different
    prompts: reps [N, C, D] -> a number in [-1, 1]. 1 means the prompts do not move the features
    (TDCL's positive and negatives are then the same vector and its loss cannot fall below log C)."""
    unit = F.normalize(reps.double(), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # [N, C, C]
    count = reps.shape[1]
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)
    return (off_diagonal / (count * (count - 1))).mean().item()


def feddifrc_map(public_features: torch.Tensor, widths: list[int], dim: int) -> Reduction:
    """The image map FedDifRC's clients read teacher features through (`teacher_space`, layer_pca):
    per decoder layer a PCA (D/2, D/4, D/4 components), scaled to unit RMS norm, fitted on the
    public rows' empty-prompt features (the map's default condition)."""
    moments = LayerMoments.of(public_features, widths)
    components = [dim // 2, dim // 4, dim - dim // 2 - dim // 4] if len(widths) == 3 else [dim] * len(widths)
    return rms_scaled(fit_layer_pca(moments, components), moments)


def teacher_scores(
    teacher: StableDiffusionTeacher, public: Any, val: Any, settings: PretrainSettings
) -> dict[str, float]:
    """The check's numbers for one teacher (public rows train the probes, val rows are scored)."""
    n_train, n_test = min(settings.check_public, len(public.ids)), min(settings.check_images, len(val.ids))
    train_x, train_keys = public.images[:n_train], public.ids[:n_train]
    test_x, test_keys = val.images[:n_test], val.ids[:n_test]
    train_f, test_f = (
        pooled_features(teacher, train_x, train_keys),
        pooled_features(teacher, test_x, test_keys),
    )
    out: dict[str, float] = {}
    for name, column in (("shape", "image_labels"), ("scene", "text_labels")):
        train_y, test_y = getattr(public, column)[:n_train], getattr(val, column)[:n_test]
        out[f"{name}/nearest_centroid"] = nearest_centroid(train_f, train_y, test_f, test_y)
        out[f"{name}/linear_probe"] = linear_probe(train_f, train_y, test_f, test_y)
    shape_prompts = teacher.prompts(list(val.image_classes))
    test_y = val.image_labels[:n_test]
    out["shape/diffusion_classifier"] = diffusion_classifier(
        teacher, test_x, test_keys, test_y, shape_prompts
    )
    n_proto = min(n_train, 300)
    train_c = class_conditioned(teacher, train_x[:n_proto], train_keys[:n_proto], shape_prompts)
    test_c = class_conditioned(teacher, test_x, test_keys, shape_prompts)  # [N, C, F]
    out["shape/prompt_prototypes"] = prompt_prototypes(
        (train_c, public.image_labels[:n_proto]), (test_c, test_y)
    )
    # how far the class prompts move one image's features, as FedDifRC's TDCL reads them (mapped), and raw
    widths = [teacher.block_channels[b] for b in teacher.settings.up_blocks]
    mapped = feddifrc_map(train_f, widths, settings.check_dim).apply(test_c.flatten(0, 1))
    out["shape/prompt_cosine"] = prompt_cosine(mapped.view(*test_c.shape[:2], -1))
    out["shape/prompt_cosine_raw"] = prompt_cosine(test_c)
    return out


def pixel_scores(public: Any, val: Any, settings: PretrainSettings) -> dict[str, float]:
    """The same probes on raw pixels (16 x 16, flattened): what any feature should beat."""
    n_train, n_test = min(settings.check_public, len(public.ids)), min(settings.check_images, len(val.ids))
    train_f = to_pixels(public.images[:n_train], 16).flatten(1)
    test_f = to_pixels(val.images[:n_test], 16).flatten(1)
    out = {}
    for name, column in (("shape", "image_labels"), ("scene", "text_labels")):
        train_y, test_y = getattr(public, column)[:n_train], getattr(val, column)[:n_test]
        out[f"{name}/nearest_centroid"] = nearest_centroid(train_f, train_y, test_f, test_y)
        out[f"{name}/linear_probe"] = linear_probe(train_f, train_y, test_f, test_y)
    return out


def random_teacher_folder(
    folder: Path, trained: Path, settings: PretrainSettings, pixels: torch.Tensor
) -> Path:
    """The same architecture at random weights (tokenizer copied), in SD's layout, for the baseline."""
    shutil.copytree(trained / "tokenizer", folder / "tokenizer")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    parts = build_parts(settings, tokenizer, derive_seed(settings.seed, "pretrain", "random-baseline"))
    mean, _ = posterior_moments(parts["vae"], pixels[:512])
    parts["vae"].register_to_config(scaling_factor=1.0 / mean.std().item())
    save_sd_folder(folder, parts)
    return folder


def quality_check(
    folder: Path, world: Any, settings: PretrainSettings, pixels: torch.Tensor
) -> dict[str, Any]:
    """Trained teacher vs random weights vs pixels on the world's val split (see the module docstring)."""
    public, val = world.split("public"), world.split("val")
    start = time.monotonic()
    trained = teacher_scores(
        StableDiffusionTeacher.load(TeacherSettings(model=str(folder))), public, val, settings
    )
    with tempfile.TemporaryDirectory(prefix="mmfed-random-teacher-") as tmp:
        random_folder = random_teacher_folder(Path(tmp), folder, settings, pixels)
        baseline = teacher_scores(StableDiffusionTeacher.load(TeacherSettings(model=str(random_folder))),
                                  public, val, settings)  # fmt: skip
    return {
        "trained": trained,
        "random": baseline,
        "pixels": pixel_scores(public, val, settings),
        "chance": {"shape": 1 / len(val.image_classes), "scene": 1 / len(val.text_classes)},
        "rows": {
            "public": min(settings.check_public, len(public.ids)),
            "val": min(settings.check_images, len(val.ids)),
        },
        "seconds": time.monotonic() - start,
    }


# ----------------------------------------------------------------------------- the command
def build_parts(settings: PretrainSettings, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Freshly initialised SD parts at the settings' sizes (torch's global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = tiny_parts(
            vocab_size=len(tokenizer.get_vocab()),
            eos_token_id=tokenizer.eos_token_id,
            sample_size=settings.latent_size,
            text_width=settings.text_width,
            text_layers=settings.text_layers,
            max_length=settings.max_length,
            vae_channels=settings.vae_channels,
            unet_channels=settings.unet_channels,
            attention_head_dim=settings.attention_head_dim,
            norm_groups=8,
            text_time_heads=max(1, settings.text_width // 16) if settings.text_time_embedding else None,
        )
    return {"tokenizer": tokenizer, **parts}


def train_parts(
    settings: PretrainSettings, public: Any, tokenizer_folder: Path, start: float, quiet: bool
) -> tuple[dict[str, Any], PublicPairs, dict[str, Any]]:
    """Phases 1-2 in memory: (the trained parts with the tokenizer written to `tokenizer_folder`, the
    public tensors, the final losses). The budget counts from `start` (time.monotonic())."""
    words = words_of(
        [c for row in public.captions for c in row] + [CLASS_TEMPLATE.format(c) for c in class_names(public)]
    )
    tokenizer = write_tokenizer(tokenizer_folder, words, settings.max_length)
    parts = build_parts(settings, tokenizer, derive_seed(settings.seed, "pretrain", "init"))
    data = PublicPairs(public, tokenizer, settings.resolution)
    seconds = settings.minutes * 60
    vae_budget = Budget(seconds * settings.vae_fraction, settings.vae_steps)
    losses: dict[str, Any] = train_vae(parts["vae"], data.pixels, settings, vae_budget, quiet)
    mean, _ = posterior_moments(parts["vae"], data.pixels)
    scaling = 1.0 / mean.std().item()  # SD's recipe: unit-variance latents for the U-Net
    parts["vae"].register_to_config(scaling_factor=scaling)
    losses["scaling_factor"] = scaling
    remaining = seconds - (time.monotonic() - start)
    losses |= train_denoiser(parts, data, mean * scaling, settings,
                             Budget(max(remaining, 1.0), settings.steps), quiet)  # fmt: skip
    return parts, data, losses


def pretrain(
    settings: PretrainSettings, quiet: bool = False, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train, save (temp folder, then rename) and check a teacher; returns path, seconds, losses, quality."""
    from mmfed.data.synthetic import SyntheticWorld

    start = time.monotonic()
    out = Path(settings.out).expanduser()
    world = SyntheticWorld(
        seed=settings.world_seed, n_public=settings.n_public, n_val=settings.n_val, **settings.world_options
    )
    public = world.split("public")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_dirs(out.parent, f".{out.name}.tmp-")  # what a killed pretrain left
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        parts, data, losses = train_parts(settings, public, tmp / "tokenizer", start, quiet)
        tokenizer = parts["tokenizer"]
        save_sd_folder(tmp, {k: v for k, v in parts.items() if k != "tokenizer"})
        train_seconds = time.monotonic() - start
        meta = {
            "settings": config or dict(vars(settings)),
            "world_seed": settings.world_seed,
            "seconds": train_seconds,
            "losses": losses,
            "vocab_size": len(tokenizer.get_vocab()),
            "torch_threads": torch.get_num_threads(),
        }
        save_json(meta, tmp / META_FILE)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    quality = quality_check(out, world, settings, data.pixels)
    meta |= {"quality": quality, "total_seconds": time.monotonic() - start}
    save_json(meta, out / META_FILE)
    return {"path": str(out), **meta}


def publish(tmp: Path, out: Path) -> None:
    """Replace `out` by the finished `tmp` folder with renames (an old teacher goes only at the end)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    tmp.chmod(0o755)  # mkdtemp makes it private; a teacher is read by other users' runs too
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def pretrain_from_overrides(overrides: list[str], quiet: bool = False) -> dict[str, Any]:
    settings, config = settings_from(overrides)
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return pretrain(settings, quiet=quiet, config=config)
    finally:
        torch.set_num_threads(threads)


def format_result(result: dict[str, Any]) -> str:
    """A few lines: where the teacher is, how long it took, the final losses, the quality table."""
    losses = result["losses"]
    lines = [
        f"teacher saved to {result['path']}",
        f"trained {result['seconds']:.0f} s (total with the check {result.get('total_seconds', 0):.0f} s): "
        f"VAE {losses['vae_steps']} steps (recon mse {losses['vae_recon_mse']:.4f}), "
        f"U-Net {losses['unet_steps']} steps (eps {losses['eps_loss']:.4f}, "
        f"contrastive {losses['contrastive_loss']:.3f}, prompt {losses['prompt_loss']:.3f}, "
        f"steer {losses.get('steer_loss', 0.0):.3f}, margin {losses.get('margin_loss', 0.0):.3f})",
    ]
    quality = result.get("quality")
    if quality:
        lines.append(
            f"quality on {quality['rows']['val']} val rows "
            f"(probes fitted on {quality['rows']['public']} public rows):"
        )
        lines.append("| metric (accuracy unless named) | trained | random weights | pixels |")
        lines.append("| --- | --- | --- | --- |")
        for key in quality["trained"]:
            pixels = quality["pixels"].get(key)
            pixel_text = f"{pixels:.3f}" if pixels is not None else "-"
            lines.append(
                f"| {key} | {quality['trained'][key]:.3f} | {quality['random'][key]:.3f} | {pixel_text} |"
            )
        chance = quality["chance"]
        lines.append(f"chance: shape {chance['shape']:.3f}, scene {chance['scene']:.3f}")
    return "\n".join(lines)
