"""Teacher feature extraction throughput: early stop vs all decoder blocks vs a full U-Net forward.

`StableDiffusionTeacher.unet_features` stops the U-Net after the deepest requested up block (a
forward hook raises). This measures what that saves, in images/s of one call on one batch
(VAE encode + noise + U-Net), for three variants within one run, so the ratios compare like
with like on whatever machine runs it:

- ``early``: ``up_blocks=[1]`` (blocks 2-3 and the output conv skipped);
- ``all``: ``up_blocks=[0, 1, 2, 3]`` (everything but the output norm/conv);
- ``full``: the plain SD forward ``unet(z_t, t, c).sample`` on the same latents, noise and prompt.

Each variant runs for every ``--dtypes`` entry (default float32, plus bfloat16 where the CPU runs
it natively: oneDNN's bf16 check), repetitions interleaved across all (variant, dtype) pairs, median
of ``--repeats``; ratios are to the float32 full forward of the same run.

The default model is the synthetic teacher (`mmfed teacher pretrain`, $MMFED_HOME/teachers/
synthetic-sd); where that folder does not exist, the same architecture (PretrainSettings' sizes:
32 px, VAE 4x, U-Net 32-64-128-128, a 3-layer 64-wide text encoder) at random weights, which costs
the same per image.

    python eval/bench_teacher.py                               # the synthetic teacher (CPU)
    python eval/bench_teacher.py --model tiny                  # a very small random SD (seconds)
    python eval/bench_teacher.py --arch sd15 --device cuda --dtypes float16 --batch 16

``--arch sd15`` builds Stable Diffusion 1.5's U-Net, VAE and text encoder from their configs (written
below) with random weights: no download, the same compute as the real model. Writes a markdown
table to stdout and JSON to eval/results/bench_teacher/.
"""

from __future__ import annotations

import argparse
import functools
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
from mmfed.teacher.model import DTYPES, StableDiffusionTeacher, TeacherSettings, default_teacher
from mmfed.teacher.tiny import DEFAULT_VOCAB, SD_SCHEDULER, build_tiny_sd, save_sd_folder, write_tokenizer
from mmfed.utils.environment import native_bfloat16

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


def synthetic_architecture(folder: Path) -> Path:
    """The synthetic teacher's architecture (PretrainSettings defaults) at random weights, in SD's layout."""
    from mmfed.teacher.pretrain import PretrainSettings, build_parts

    settings = PretrainSettings(out=str(folder))
    tokenizer = write_tokenizer(folder / "tokenizer", list(DEFAULT_VOCAB), settings.max_length)
    save_sd_folder(folder, build_parts(settings, tokenizer, seed=0))
    return folder


def load_teacher(model: str, args: argparse.Namespace, dtype: str) -> StableDiffusionTeacher:
    """The teacher in `dtype`. TeacherSettings allows half dtypes only on CUDA, so a CPU bfloat16
    teacher is loaded in float32 and cast here (what a CPU bf16 option would do)."""
    cpu_half = torch.device(args.device).type == "cpu" and dtype != "float32"
    settings = TeacherSettings(
        model=model, dtype="float32" if cpu_half else dtype, device=args.device, resolution=args.resolution
    )
    teacher = sd15_teacher(settings) if args.arch else StableDiffusionTeacher.load(settings)
    if cpu_half:
        teacher.dtype = DTYPES[dtype]
        for part in (teacher.text_encoder, teacher.vae, teacher.unet):
            part.to(dtype=DTYPES[dtype])
    return teacher


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
    parser.add_argument("--model", help="an SD folder or hub id, or 'tiny' (default: the synthetic teacher)")
    parser.add_argument("--arch", choices=("sd15",), help="build this architecture with random weights")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--dtypes", default=None, help="comma-separated; default float32[,bfloat16]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = torch.device(args.device).type == "cpu"
    dtypes = (
        args.dtypes.split(",")
        if args.dtypes
        else ["float32"] + (["bfloat16"] if on_cpu and native_bfloat16(torch.device("cpu")) else [])
    )

    with tempfile.TemporaryDirectory() as tmp:
        if args.arch:
            model, name = "in-memory", args.arch
        elif args.model == "tiny":
            model, name = str(build_tiny_sd(Path(tmp) / "tiny-sd")), "tiny-random"
        elif args.model:
            model, name = args.model, Path(args.model).name
        elif Path(default_teacher()).is_dir():
            model, name = default_teacher(), "synthetic-sd"
        else:
            model, name = str(synthetic_architecture(Path(tmp) / "synthetic-arch")), "synthetic-arch-random"
        runs: dict[tuple[str, str], Any] = {}
        teacher = None
        for dtype in dtypes:
            teacher = load_teacher(model, args, dtype)
            generator = torch.Generator().manual_seed(0)
            size = teacher.resolution
            images = torch.randint(
                0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=generator
            )
            keys = [f"bench-{i}" for i in range(args.batch)]
            last = len(teacher.unet.up_blocks) - 1
            runs[("early", dtype)] = functools.partial(teacher.unet_features, images, keys, up_blocks=[1])
            runs[("all", dtype)] = functools.partial(
                teacher.unet_features, images, keys, up_blocks=list(range(last + 1))
            )
            runs[("full", dtype)] = functools.partial(full_forward, teacher, images, keys)
        assert teacher is not None
        for run in runs.values():
            for _ in range(args.warmup):
                run()
        seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved: every (variant, dtype) once per repetition
            for key, run in runs.items():
                seconds[key] += timed(run, teacher.device, 1, 0)
    rows = {}
    for (variant, dtype), times in seconds.items():
        median = statistics.median(times)
        rows[f"{variant}/{dtype}"] = {
            "median_s": median,
            "images_per_s": args.batch / median,
            "seconds": times,
        }
    base = rows[f"full/{dtypes[0]}"]["images_per_s"]
    for row in rows.values():
        row["speed_vs_full_" + dtypes[0]] = row["images_per_s"] / base
    device_name = (
        torch.cuda.get_device_name(teacher.device) if teacher.device.type == "cuda" else platform.processor()
    )
    result = {
        "model": name,
        "resolution": teacher.resolution,
        "dtypes": dtypes,
        "bf16_native": native_bfloat16(torch.device("cpu")) if on_cpu else None,
        "device": str(teacher.device),
        "device_name": device_name or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "repeats": args.repeats,
        "up_blocks": len(teacher.unet.up_blocks),
        "variants": rows,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    where = f"{result['device']} ({result['device_name']}), {result['torch_threads']} torch threads"
    print(
        f"{name}, {teacher.resolution}px on {where}, batch {args.batch}, median of {args.repeats} interleaved"
    )
    print(f"| variant | dtype | images/s | x full {dtypes[0]} |")
    print("| --- | --- | --- | --- |")
    for key, row in rows.items():
        variant, dtype = key.split("/")
        print(
            f"| {variant} | {dtype} | {row['images_per_s']:.1f} | {row['speed_vs_full_' + dtypes[0]]:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "-".join(dtypes)
    slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{tag}-{result['device']}-{args.batch}")
    out = RESULTS / f"{slug.strip('-')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
