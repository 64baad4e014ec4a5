"""Per-client personalization of a finished federation: a personal head plus LoRA adapters (peft).

``mmfed personalize RUN_DIR [key=value ...]`` rebuilds the run (``Federation(cfg)`` from
``RUN_DIR/config.yaml``, the global model from ``checkpoints/best.pt``) and, for every client:

1. takes the global model's parts of the client's kind (image: image encoder + head; text: text
   encoder + head; paired: both encoders + temperature) and evaluates them on the client's local
   test split (held out from its own distribution by the layout): the *global* score;
2. injects LoRA adapters into the encoders (`mmfed.models.lora`), freezes every base weight (and
   batch-norm statistics), and trains adapters + head with the client's task loss on its own
   training rows, through the one client training loop (`ClientApp`);
3. evaluates again (the *personalized* score) and saves the adapters in peft's format
   (``<cid>/<part>/adapter_config.json`` + ``adapter_model.safetensors``), the head
   (``<cid>/heads.safetensors``) and their sizes. `load_personalized` puts them back onto the
   global model and reproduces the client's predictions exactly.

Scores: accuracy for image and text clients; for paired clients retrieval R@1 on their local pairs,
the mean of image->text and text->image. Results: ``RUN_DIR/personalized/summary.json`` (per client,
and mean/std per kind) and ``RUN_DIR/personalized/clients.png`` (bars: global vs personalized).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from mmfed.config import (
    check_choice,
    check_positive,
    node_for,
    register,
    registered,
    settings_from_overrides,
)
from mmfed.data.layout import ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.evaluation import Evaluator
from mmfed.models.lora import (
    HEAD_PARTS,
    AdaptedModel,
    LoraSettings,
    add_adapters,
    clone_parts,
    count_parameters,
    load_adapted_tower,
)
from mmfed.models.multimodal import KIND_PARTS, MultimodalModel, build_model
from mmfed.protocol import Payload
from mmfed.utils.io import load_json, save_json
from mmfed.utils.seeding import derive_seed, seed_torch

TASK_TERMS = ("image_ce", "text_ce", "contrastive")  # the task loss of each client kind
SCORES = {  # the headline local-test score of each client kind
    "image": "classification/image/acc",
    "text": "classification/text/acc",
    "paired": "retrieval/R@1",  # (i2t R@1 + t2i R@1) / 2
}
OUT = "personalized"
HEADS_FILE = "heads.safetensors"
CLIENT_FILE = "client.json"


@register("personalize", "default")
class PersonalizeSettings:
    """How each client personalizes: local training of adapters + head, and the adapters' shape.

    `image_target_modules` / `text_target_modules` override the per-encoder default targets
    (`mmfed.models.lora.default_targets`); `clients` limits the run to some client ids;
    `checkpoint` is ``best``, ``last`` or a path to a global-model state dict.
    """

    def __init__(
        self,
        epochs: int = 5,
        lr: float = 3e-3,
        batch_size: int = 32,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        grad_clip: float | None = 1.0,
        rank: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        image_target_modules: list[str] | None = None,
        text_target_modules: list[str] | None = None,
        checkpoint: str = "best",
        clients: list[str] | None = None,
        device: str | None = None,
    ) -> None:
        from mmfed.federation.client import LocalTraining

        check_positive("epochs", epochs)
        self.training = LocalTraining(epochs, batch_size, optimizer, lr, weight_decay, grad_clip)
        self.lora = LoraSettings(rank, alpha, dropout, image_target_modules, text_target_modules)
        self.checkpoint, self.clients, self.device = checkpoint, clients, device


def settings_from(overrides: list[str]) -> tuple[PersonalizeSettings, dict[str, Any]]:
    """Settings from ``key=value`` overrides of the registered ``personalize`` config (and the config)."""
    return settings_from_overrides("personalize", overrides)


# ----------------------------------------------------------------------------- one client
def client_parts(
    global_model: MultimodalModel, kind: str, make_heads: Callable[[list[str]], MultimodalModel]
) -> MultimodalModel:
    """Copies of the global model's parts of `kind`.

    A head the global model lacks (a distillation-only server trains encoders only) is made new by
    `make_heads`: the client then personalizes a fresh head on the global encoders.
    """
    model = clone_parts(global_model, KIND_PARTS[kind])
    missing = [p for p in KIND_PARTS[kind] if p in HEAD_PARTS and not model.has(p)]
    if not missing:
        return model
    heads = make_heads(missing)
    parts = {p: getattr(model, p) for p in model.part_names} | {p: getattr(heads, p) for p in missing}
    return MultimodalModel(parts).to(global_model.device)


def score(kind: str, metrics: dict[str, float]) -> float | None:
    """The client's headline score from the evaluator's metrics (None: no local test split)."""
    if kind == "paired":
        pair = [metrics.get("retrieval/i2t/R@1"), metrics.get("retrieval/t2i/R@1")]
        return None if None in pair else (pair[0] + pair[1]) / 2
    return metrics.get(SCORES[kind])


def train_adapters(
    model: AdaptedModel, spec: ClientSpec, data: Any, settings: PersonalizeSettings, seed: int
) -> dict[str, float]:
    """Train `model`'s trainable tensors (adapters, heads) on the client's rows with its task loss.

    Runs the federation's one client loop (`ClientApp`) on an empty fit payload, so personalization
    shares batching, seeding and loss bookkeeping with federated training.
    """
    import mmfed.algorithms  # noqa: F401  (registers the task loss terms)
    from mmfed.federation.client import ClientApp, ModelPool

    terms = OmegaConf.create(
        {name: OmegaConf.structured(node_for(registered("loss_term")[name])) for name in TASK_TERMS}
    )
    pool = ModelPool(lambda kind, variant: model, model.device)
    app = ClientApp(spec, data, pool, terms, settings.training, derive_seed(seed, "personalize"))
    reply, _ = app(Payload(stage="fit", round=0), {})
    return reply.metrics


def adapter_sizes(model: AdaptedModel, folder: Path) -> dict[str, Any]:
    """Adapter size in parameters and bytes, and as a fraction of the adapted encoders' parameters."""
    adapters = model.adapter_state()
    adapted = [getattr(model, p) for p in model.adapted_parts]
    encoder_params = sum(count_parameters(t, adapters=False) for t in adapted)
    params = sum(t.numel() for t in adapters.values())
    heads = [getattr(model, p) for p in HEAD_PARTS if model.has(p)]
    return {
        "adapter_params": params,
        "adapter_bytes": sum(t.numel() * t.element_size() for t in adapters.values()),
        "adapter_file_bytes": sum(f.stat().st_size for f in folder.glob("*/adapter_model.safetensors")),
        "encoder_params": encoder_params,
        "adapter_fraction": params / encoder_params if encoder_params else 0.0,
        "head_params": sum(p.numel() for head in heads for p in head.parameters()),
        "parts": list(model.adapted_parts),
    }


def save_personalized(model: AdaptedModel, kind: str, folder: Path) -> None:
    """Adapters in peft's format (one folder per encoder part) and the heads as safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for part in model.adapted_parts:
        getattr(model, part).save_pretrained(str(folder / part))
    heads = {
        k: v.detach().cpu().contiguous()
        for k, v in model.part_state([p for p in HEAD_PARTS if model.has(p)]).items()
    }
    save_file(heads, str(folder / HEADS_FILE))
    save_json({"kind": kind, "parts": list(model.part_names), "adapted": list(model.adapted_parts)},
              folder / CLIENT_FILE)  # fmt: skip


def load_personalized(global_model: MultimodalModel, folder: str | Path) -> AdaptedModel:
    """A client's personalized model: the global model's parts + the client's saved adapters and head."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_file = folder / CLIENT_FILE
    if not meta_file.exists():
        raise FileNotFoundError(f"{meta_file} does not exist: not a personalized client folder")
    meta = load_json(meta_file)
    heads = load_file(str(folder / HEADS_FILE))
    parts: dict[str, nn.Module] = {}
    for part in meta["parts"]:
        if part in meta["adapted"]:
            parts[part] = load_adapted_tower(copy.deepcopy(getattr(global_model, part)), folder / part)
        elif part in HEAD_PARTS:
            weight = heads[f"{part}/weight"]
            parts[part] = nn.Linear(weight.shape[1], weight.shape[0])
        else:
            parts[part] = copy.deepcopy(getattr(global_model, part))
    model = AdaptedModel(parts, train_base=False).to(global_model.device)
    model.load_part_state(heads)
    return model.eval()


@dataclass
class Personalizer:
    """What every client's personalization shares: the global model, settings, evaluator, seed."""

    global_model: MultimodalModel
    settings: PersonalizeSettings
    evaluator: Evaluator
    seed: int
    make_heads: Callable[[list[str]], MultimodalModel]  # new heads, for a global model without them

    @classmethod
    def from_run(cls, run_dir: str | Path, settings: PersonalizeSettings) -> tuple[Personalizer, Any]:
        """Rebuild the run in `run_dir` from its config and global checkpoint; also returns its Federation."""
        from mmfed.federation.run import Federation, load_global_weights, load_run_config

        run_dir = Path(run_dir)
        config_file = run_dir / "config.yaml"
        if not config_file.exists():
            raise FileNotFoundError(f"{config_file} does not exist: is {run_dir} an mmfed run folder?")
        cfg = load_run_config(config_file)
        if settings.device is not None:
            cfg.device = settings.device
        name = settings.checkpoint
        path = run_dir / "checkpoints" / f"{name}.pt" if name in ("best", "last") else Path(name)
        if not path.exists():
            raise FileNotFoundError(
                f"checkpoint {path} does not exist (config key 'personalize.checkpoint'={name!r}): "
                "train the run first"
            )
        federation = Federation(cfg)
        model = federation.global_model()
        load_global_weights(path, model, config_file)  # best.pt | last.pt

        def make_heads(parts: list[str]) -> MultimodalModel:
            return build_model(cfg.model, parts, federation.num_image_classes, federation.num_text_classes)

        return cls(model.eval(), settings, federation.evaluator, int(cfg.seed), make_heads), federation

    def client(
        self, spec: ClientSpec, data: Any, test: MultimodalSplit | None, folder: Path
    ) -> tuple[dict[str, Any], AdaptedModel]:
        """Global vs personalized local-test metrics of one client; saves its adapters and head."""
        has_test = test is not None and len(test) > 0
        start = clone_parts(self.global_model, KIND_PARTS[spec.kind])
        before = self.evaluator.evaluate(start, test) if has_test else {}
        seed_torch(self.seed, "personalize-init", spec.cid)  # a new head (if any) and LoRA A's init
        model = client_parts(self.global_model, spec.kind, self.make_heads)
        adapted = add_adapters(model, self.settings.lora, train_base=False)
        train = train_adapters(adapted, spec, data, self.settings, self.seed)
        after = self.evaluator.evaluate(adapted, test) if has_test else {}
        save_personalized(adapted, spec.kind, folder)
        row = {
            "kind": spec.kind,
            "metric": SCORES[spec.kind],
            "global": score(spec.kind, before),
            "personalized": score(spec.kind, after),
            "train_rows": len(data),
            "test_rows": len(test) if test is not None else 0,
            "global_metrics": before,
            "personalized_metrics": after,
            "train": train,
            **adapter_sizes(adapted, folder),
        }
        return row, adapted


# ----------------------------------------------------------------------------- a run
def summarize(clients: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Mean and population std over the clients of each kind, e.g. ``image/global/mean``."""
    summary: dict[str, float] = {}
    for kind in ("image", "text", "paired"):
        rows = [c for c in clients.values() if c["kind"] == kind]
        for key in ("global", "personalized", "adapter_fraction"):
            values = [r[key] for r in rows if r[key] is not None]
            if values:
                summary[f"{kind}/{key}/mean"] = statistics.fmean(values)
                summary[f"{kind}/{key}/std"] = statistics.pstdev(values)
        gains = [
            r["personalized"] - r["global"] for r in rows if None not in (r["global"], r["personalized"])
        ]
        if gains:
            summary[f"{kind}/gain/mean"] = statistics.fmean(gains)
    return summary


def personalize_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Personalize every client of the run in `run_dir`; writes ``personalized/`` and returns its summary."""
    run_dir = Path(run_dir)
    settings, settings_cfg = settings_from(list(overrides or []))
    began = time.perf_counter()
    personalizer, federation = Personalizer.from_run(run_dir, settings)
    known = [c.cid for c in federation.clients]
    for cid in settings.clients or []:
        check_choice("personalize.clients", cid, known)
    out = run_dir / OUT
    clients: dict[str, dict[str, Any]] = {}
    for spec in federation.clients:
        if settings.clients and spec.cid not in settings.clients:
            continue
        app = federation.client_app(spec.cid)
        clients[spec.cid], _ = personalizer.client(spec, app.data, app.test_data, out / spec.cid)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "settings": settings_cfg,
        **summarize(clients),
        "wall_seconds": round(time.perf_counter() - began, 3),
        "clients": clients,
    }
    save_json(summary, out / "summary.json")
    plot_clients(clients, out / "clients.png", title=run_dir.name)
    return summary


def plot_clients(clients: dict[str, dict[str, Any]], path: Path, title: str = "") -> Path:
    """Per-client bars: global vs personalized local-test score (accuracy or mean R@1, in %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(clients)
    values = {key: [clients[c][key] or 0.0 for c in names] for key in ("global", "personalized")}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(names) + 1.5), 3.4), dpi=110)
    positions = torch.arange(len(names)).float()
    for offset, key in ((-0.2, "global"), (0.2, "personalized")):
        ax.bar((positions + offset).tolist(), values[key], width=0.4, label=key)
    labels = [f"{c}\n{'R@1' if clients[c]['kind'] == 'paired' else 'acc'}" for c in names]
    ax.set_xticks(positions.tolist(), labels, fontsize=7)
    ax.set_ylabel("local test score (%)")
    ax.set_title(f"{title}: global vs personalized (LoRA)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """A short table for the terminal: per client and per kind, global -> personalized."""
    lines = [f"{'client':12} {'metric':26} {'global':>7} {'personal':>8} {'adapter/encoder':>15}"]
    for cid, row in summary["clients"].items():
        cells = [f"{row[k]:7.1f}" if row[k] is not None else f"{'-':>7}" for k in ("global", "personalized")]
        lines.append(f"{cid:12} {row['metric']:26} {cells[0]} {cells[1]:>8} {row['adapter_fraction']:15.2%}")
    for kind in ("image", "text", "paired"):
        if f"{kind}/global/mean" in summary:
            lines.append(
                f"{kind + ' mean':12} {SCORES[kind]:26} {summary[f'{kind}/global/mean']:7.1f} "
                f"{summary[f'{kind}/personalized/mean']:8.1f}"
            )
    return "\n".join(lines)
