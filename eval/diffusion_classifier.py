"""Why a teacher's diffusion classifier is (or is not) above chance: accuracy per timestep and with
more noise draws, on the val rows `mmfed teacher pretrain`'s quality check scores.

The quality check reads 4 timesteps x 1 noise draw. If accuracy grows with draws, the check's
estimate is noise-limited; if one timestep range carries the signal, the U-Net uses the prompt there
only; if neither, the conditional model itself does not tell the classes apart. Also reported: how
often the true prompt denoises better than a wrong one (paired, per (t, draw): 0.5 means the prompt
does not help), and the mean relative error gap between the best wrong prompt and the true one. The
raw errors [T x draws, N, C] are saved next to the JSON (`.pt`) for other summaries.

    python eval/diffusion_classifier.py TEACHER_FOLDER [--timesteps 50 150 ... 950] [--draws 3]
                                        [--images 200] [--out eval/results/diffusion_classifier]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import mmfed  # noqa: F401  (the torchvision guard before diffusers)
from mmfed.data.synthetic import SyntheticWorld
from mmfed.teacher.model import StableDiffusionTeacher, TeacherSettings
from mmfed.teacher.pretrain import denoising_errors


def summarise(errors: torch.Tensor, labels: torch.Tensor, timesteps: list[int], draws: int) -> dict:
    """errors [T * draws, N, C] -> accuracy per timestep, per number of draws, and paired win rates."""
    per_t = errors.view(len(timesteps), draws, *errors.shape[1:])
    rows = torch.arange(len(labels))
    true = errors[:, rows, labels]  # [T * draws, N]
    wrong = errors.clone()
    wrong[:, rows, labels] = float("inf")
    out: dict = {
        "accuracy_all": (errors.sum(0).argmin(1) == labels).float().mean().item(),
        "accuracy_one_draw": (per_t[:, 0].sum(0).argmin(1) == labels).float().mean().item(),
        "accuracy_by_draws": {
            str(d): (per_t[:, :d].sum((0, 1)).argmin(1) == labels).float().mean().item()
            for d in range(1, draws + 1)
        },
        "per_timestep": {},
    }
    for k, step in enumerate(timesteps):
        e = per_t[k]  # [draws, N, C]
        t_true, t_wrong = (
            true.view(len(timesteps), draws, -1)[k],
            wrong.view(len(timesteps), draws, *e.shape[1:])[k],
        )
        win = ((t_true[..., None] < t_wrong) & t_wrong.isfinite()).float()  # [draws, N, C]; not the label
        win_rate = (win.sum(-1) / (e.shape[-1] - 1)).mean().item()
        gap = ((t_wrong.min(-1).values - t_true) / t_true).mean().item()
        out["per_timestep"][str(step)] = {
            "accuracy": (e.sum(0).argmin(1) == labels).float().mean().item(),
            "true_beats_wrong": win_rate,
            "relative_gap_best_wrong": gap,
            "mean_error_true": t_true.mean().item(),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", type=Path)
    parser.add_argument("--timesteps", type=int, nargs="+", default=list(range(50, 1000, 100)))
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("eval/results/diffusion_classifier"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    val = SyntheticWorld(seed=args.world_seed, n_public=2000, n_val=500).split("val")  # pretrain's world
    teacher = StableDiffusionTeacher.load(TeacherSettings(model=str(args.teacher)))
    images, keys, labels = val.images[: args.images], val.ids[: args.images], val.image_labels[: args.images]
    prompts = teacher.prompts(list(val.image_classes))
    errors = denoising_errors(teacher, images, keys, prompts, tuple(args.timesteps), args.draws)
    result = {
        "teacher": str(args.teacher),
        "command": " ".join(["python", *sys.argv]),
        "images": len(keys),
        "classes": len(prompts),
        "timesteps": args.timesteps,
        "draws": args.draws,
        "threads": args.threads,
        "seconds": time.monotonic() - start,
        **summarise(errors, labels, args.timesteps, args.draws),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.teacher.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    torch.save({"errors": errors, "labels": labels, "timesteps": args.timesteps}, path.with_suffix(".pt"))
    print(f"accuracy: one draw per t {result['accuracy_one_draw']:.3f}, all {len(errors)} draws "
          f"{result['accuracy_all']:.3f}, by draws per t {result['accuracy_by_draws']}")  # fmt: skip
    for step, row in result["per_timestep"].items():
        print(f"  t={step:>4}: acc {row['accuracy']:.3f}  true beats wrong {row['true_beats_wrong']:.3f}  "
              f"gap {row['relative_gap_best_wrong']:+.4f}  error {row['mean_error_true']:.4f}")  # fmt: skip
    print(f"wrote {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
