"""Teacher feature extraction throughput: early stop vs all decoder blocks vs a full U-Net forward.

`StableDiffusionTeacher.unet_features` stops the U-Net after the deepest requested up block (a
forward hook raises). This measures what that saves, in images/s of one call on one batch
(VAE encode + noise + U-Net), for three variants within one run, so the ratios compare like
with like on whatever machine runs it:

- ``early``: ``up_blocks=[1]`` (blocks 2-3 and the output conv skipped);
- ``all``: ``up_blocks=[0, 1, 2, 3]`` (everything but the output norm/conv);
- ``full``: the plain SD forward ``unet(z_t, t, c).sample`` on the same latents, noise and prompt.

    python eval/bench_teacher.py                               # a tiny random SD (CPU, seconds)
    python eval/bench_teacher.py --model ~/.cache/mmfed/teachers/synthetic-sd
    python eval/bench_teacher.py --arch sd15 --device cuda --dtype float16 --batch 16

``--arch sd15`` builds Stable Diffusion 1.5's U-Net, VAE and text encoder from their configs (written
below) with random weights: no download, the same compute as the real model. Writes a markdown
table to stdout and JSON to eval/results/bench_teacher/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import mmfed  # noqa: F401  (the torchvision guard, before diffusers/transformers)
from mmfed.teacher.model import StableDiffusionTeacher, TeacherSettings
from mmfed.teacher.tiny import DEFAULT_VOCAB, SD_SCHEDULER, build_tiny_sd, write_tokenizer

RESULTS = Path(__file__).resolve().parent / "results" / "bench_teacher"

# Stable Diffusion 1.5's configs (runwayml/stable-diffusion-v1-5: unet/, vae/, text_encoder/config.json)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}


def sd15_teacher(settings: TeacherSettings) -> StableDiffusionTeacher:
    """SD 1.5's architecture at random weights, in memory (a small word-level tokenizer stands in)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp), list(DEFAULT_VOCAB), max_length=77)
    text = CLIPTextConfig(**SD15_TEXT, eos_token_id=tokenizer.eos_token_id, bos_token_id=0, pad_token_id=1)
    modules = {
        "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(text),
        "vae": AutoencoderKL(**SD15_VAE),
        "unet": UNet2DConditionModel(**SD15_UNET),
        "scheduler": DDPMScheduler(**SD_SCHEDULER),
    }
    return StableDiffusionTeacher.from_modules(modules, settings, revision="sd15-random")


def full_forward(teacher: StableDiffusionTeacher, images: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """SD's plain U-Net call on the inputs `unet_features` would build (latents, per-sample noise, prompt)."""
    with torch.no_grad():
        latents = teacher._latents(images)
        noise = teacher.noise(keys, teacher.settings.noise_seeds[0], latents.shape[1:])
        t = torch.full((len(keys),), teacher.settings.timestep, device=teacher.device)
        noisy = teacher.scheduler.add_noise(latents, noise.to(latents), t)
        context = teacher._prompt_tokens([""] * len(keys))
        return teacher.unet(noisy, t, encoder_hidden_states=context).sample.float().cpu()


def timed(run: Any, device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an SD folder or hub id (default: a tiny random SD)")
    parser.add_argument("--arch", choices=("sd15",), help="build this architecture with random weights")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_sd(Path(tmp) / "tiny-sd"))
        settings = TeacherSettings(
            model=model if not args.arch else "in-memory",
            dtype=args.dtype,
            device=args.device,
            resolution=args.resolution,
        )
        teacher = sd15_teacher(settings) if args.arch else StableDiffusionTeacher.load(settings)
        name = args.arch or (Path(args.model).name if args.model else "tiny-random")
        generator = torch.Generator().manual_seed(0)
        size = teacher.resolution
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=generator)
        keys = [f"bench-{i}" for i in range(args.batch)]
        last = len(teacher.unet.up_blocks) - 1
        variants = {
            "early": lambda: teacher.unet_features(images, keys, up_blocks=[1]),
            "all": lambda: teacher.unet_features(images, keys, up_blocks=list(range(last + 1))),
            "full": lambda: full_forward(teacher, images, keys),
        }
        rows = {}
        for variant, run in variants.items():
            seconds = timed(run, teacher.device, args.repeats, args.warmup)
            median = statistics.median(seconds)
            rows[variant] = {"median_s": median, "images_per_s": args.batch / median, "seconds": seconds}
    full = rows["full"]["images_per_s"]
    for row in rows.values():
        row["speed_vs_full"] = row["images_per_s"] / full
    device_name = (
        torch.cuda.get_device_name(teacher.device) if teacher.device.type == "cuda" else platform.processor()
    )
    result = {
        "model": name,
        "resolution": teacher.resolution,
        "dtype": args.dtype,
        "device": str(teacher.device),
        "device_name": device_name or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "repeats": args.repeats,
        "up_blocks": last + 1,
        "variants": rows,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(f"{name}, {teacher.resolution}px, {args.dtype} on {result['device']} ({result['device_name']}), "
          f"batch {args.batch}, median of {args.repeats}")  # fmt: skip
    print("| variant | images/s | x full forward |")
    print("| --- | --- | --- |")
    for variant, row in rows.items():
        print(f"| {variant} | {row['images_per_s']:.1f} | {row['speed_vs_full']:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{args.dtype}-{result['device']}-{args.batch}")
    out = RESULTS / f"{slug.strip('-')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
