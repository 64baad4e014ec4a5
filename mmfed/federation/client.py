"""The client side: one local training loop, with the algorithm's loss terms plugged in.

A client is a function ``(payload, state) -> (reply, state)``. `state` is the client's personal,
serialisable state (a loss term's memory, later fusion modules and adapters); it is handed in and
out explicitly, so the engine may keep it on disk (embedded) or in Flower's ``Context.state``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mmfed.algorithms.base import Batch, ClientRound, LossTerm
from mmfed.algorithms.fedavg import WEIGHT_PREFIX
from mmfed.config import check_choice, check_positive, instantiate, register
from mmfed.data.layout import ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.models.multimodal import KIND_PARTS, MultimodalModel
from mmfed.protocol import Payload, Reply, encode_tensors
from mmfed.utils.seeding import numpy_rng, seed_torch

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
}


@register("training", "default")
class LocalTraining:
    """How a client trains locally each round (a fresh optimizer every round, as in FedAvg)."""

    def __init__(
        self,
        local_epochs: int = 1,
        batch_size: int = 64,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        grad_clip: float | None = 1.0,
        max_steps: int | None = None,
    ) -> None:
        check_positive("local_epochs", local_epochs)
        check_positive("batch_size", batch_size)
        check_choice("optimizer", optimizer, tuple(OPTIMIZERS))
        check_positive("lr", lr)
        if max_steps is not None:
            check_positive("max_steps", max_steps)
        self.local_epochs, self.batch_size, self.optimizer = local_epochs, batch_size, optimizer
        self.lr, self.weight_decay, self.grad_clip, self.max_steps = lr, weight_decay, grad_clip, max_steps

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return OPTIMIZERS[self.optimizer](params, self.lr, self.weight_decay)


class ClientData:
    """A client's rows of the training split, served as batches for its modality kind.

    One epoch visits every row once: image clients see (image, image label); text clients one of the
    row's captions, drawn anew each epoch, with the row's text label; paired clients (image, one of
    its captions). Drawing one caption per row keeps an epoch's cost equal across kinds while every
    caption is still seen over the rounds.
    """

    def __init__(self, split: MultimodalSplit, kind: str) -> None:
        self.split, self.kind = split, kind

    def __len__(self) -> int:
        return len(self.split)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[Batch]:
        split = self.split
        order = rng.permutation(len(split))
        starts = list(range(0, len(order), batch_size))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()  # a trailing batch of one joins the previous one (batch norm needs two samples)
        for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
            idx = order[start:stop]
            rows = torch.from_numpy(idx)
            batch: Batch = {}
            if self.kind in ("image", "paired"):
                batch["images"] = split.images[rows]  # uint8 [B, 3, H, W]
                if split.image_labels is not None:
                    batch["image_labels"] = split.image_labels[rows]
            if self.kind in ("text", "paired"):
                batch["captions"] = [split.captions[i][rng.integers(len(split.captions[i]))] for i in idx]
                if split.text_labels is not None:
                    batch["text_labels"] = split.text_labels[rows]
            yield batch


class ModelPool:
    """One reusable model per client kind, reset before each client: never one model per client.

    Building a model (and loading pretrained encoders) once per kind keeps rounds fast; resetting
    to the same initial weights keeps a client's result independent of who trained before it.
    """

    def __init__(self, build: Callable[[str], MultimodalModel], device: torch.device) -> None:
        self._build, self._device = build, device
        self._models: dict[str, tuple[MultimodalModel, dict[str, torch.Tensor]]] = {}

    def get(self, kind: str) -> MultimodalModel:
        if kind not in self._models:
            model = self._build(kind).to(self._device)
            self._models[kind] = (model, copy.deepcopy(model.state_dict()))
        model, initial = self._models[kind]
        model.load_state_dict(initial)
        return model


@dataclass
class ClientApp:
    """One client: its spec, its data, and how it trains. Call it with (payload, state)."""

    spec: ClientSpec
    data: ClientData
    pool: ModelPool
    loss_terms: DictConfig  # name -> loss term config
    training: LocalTraining
    seed: int

    def __call__(self, payload: Payload, state: dict[str, Any]) -> tuple[Reply, dict[str, Any]]:
        model = self.pool.get(self.spec.kind)
        global_state = {k: v for k, v in payload.tensors.items() if k.partition("/")[0] in model.part_names}
        model.load_part_state(global_state)
        if payload.stage != "fit":
            raise ValueError(f"client stage {payload.stage!r} is not one of 'fit'")
        terms = self._terms(payload, model, state)
        metrics = self._fit(model, terms, payload.round)
        reply = Reply(
            cid=self.spec.cid, kind=self.spec.kind, num_examples=self.spec.num_examples, metrics=metrics
        )
        if "weights" in payload.reply:
            parts = [p for p in KIND_PARTS[self.spec.kind] if model.has(p)]
            weights = {WEIGHT_PREFIX + k: v for k, v in model.part_state(parts).items()}
            reply.tensors.update(encode_tensors(weights, payload.config.get("weights_dtype", "float32")))
        new_state = {name: kept for name, term in terms.items() if (kept := term.end())}
        return reply, new_state

    def _terms(self, payload: Payload, model: MultimodalModel, state: dict[str, Any]) -> dict[str, LossTerm]:
        terms: dict[str, LossTerm] = {}
        for name, cfg in self.loss_terms.items():
            term: LossTerm = instantiate(cfg, f"algorithm.loss_terms.{name}")
            if term.applies_to(self.spec.kind, model):
                term.begin(
                    ClientRound(
                        self.spec.cid, self.spec.kind, payload.round, payload, model, state.get(name, {})
                    )
                )
                terms[name] = term
        if not terms:
            raise ValueError(
                f"client {self.spec.cid} ({self.spec.kind}): no loss term in algorithm.loss_terms applies"
            )
        return terms

    def _fit(self, model: MultimodalModel, terms: dict[str, LossTerm], round_: int) -> dict[str, float]:
        """The local training loop: forward each modality once, sum the terms' losses, step."""
        training = self.training
        seed_torch(self.seed, "client-fit", round_, self.spec.cid)  # dropout etc.: replayable on resume
        rng = numpy_rng(self.seed, "client-batches", round_, self.spec.cid)
        optimizer = training.make_optimizer(model)
        model.train()
        sums: dict[str, float] = {}
        steps = 0
        device = model.device
        for _ in range(training.local_epochs):
            for batch in self.data.batches(rng, training.batch_size):
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out: dict[str, torch.Tensor] = {}
                if "images" in batch:
                    out["image_emb"] = model.encode_images(batch["images"])  # [B, D]
                if "captions" in batch:
                    out["text_emb"] = model.encode_texts(batch["captions"])  # [B, D]
                losses: dict[str, torch.Tensor] = {}
                for term in terms.values():
                    for name, value in term(batch, out, model).items():
                        if name in losses:
                            raise ValueError(f"two loss terms both return a loss named {name!r}")
                        losses[name] = value
                total = torch.stack(list(losses.values())).sum()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if training.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
                optimizer.step()
                steps += 1
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                sums["loss"] = sums.get("loss", 0.0) + float(total.detach())
                if training.max_steps and steps >= training.max_steps:
                    break
            if training.max_steps and steps >= training.max_steps:
                break
        return {f"train/{name}": value / max(steps, 1) for name, value in sums.items()} | {
            "train/steps": float(steps)
        }
