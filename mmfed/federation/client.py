"""The client side: one local training loop, with the algorithm's loss terms plugged in.

A client is a function ``(payload, state) -> (reply, state)``. `state` is the client's personal,
serialisable state (a loss term's memory, later fusion modules and adapters); it is handed in and
out explicitly, so the engine may keep it on disk (embedded) or in Flower's ``Context.state``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmfed.algorithms.base import (
    PUBLIC_CAPTIONS,
    PUBLIC_INDICES,
    REPR_IMAGE,
    REPR_TEXT,
    Batch,
    ClientRound,
    LossTerm,
)
from mmfed.algorithms.fedavg import WEIGHT_PREFIX
from mmfed.config import check_choice, instantiate, register
from mmfed.data.layout import ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.evaluation import Evaluator
from mmfed.models.lora import is_personal
from mmfed.models.multimodal import FROZEN_PARTS, KIND_PARTS, MultimodalModel
from mmfed.protocol import Payload, Reply, encode_tensors
from mmfed.settings import LocalTrainingBase
from mmfed.utils.environment import native_bfloat16
from mmfed.utils.seeding import numpy_rng, seed_torch

# Mixed precision of the encoders' forward passes while training (`training.precision`); the keys
# and "auto" are mmfed.settings.PRECISION_NAMES (checked against each other by tests/test_validation.py).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """`training.precision` on `device`: the autocast dtype, or None for float32."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16(device) else None
    return PRECISIONS[name]


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {  # keys: mmfed.settings.OPTIMIZER_NAMES
    "sgd": lambda params, lr, wd, fused: torch.optim.SGD(
        params, lr=lr, momentum=0.9, weight_decay=wd, fused=fused
    ),
    "adam": lambda params, lr, wd, fused: torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused),
    "adamw": lambda params, lr, wd, fused: torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused),
}


def fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused (one-kernel) optimizer step can take these parameters: floating
    tensors on the CPU or a CUDA device (torch >= 2.4); elsewhere the for-loop step runs."""
    return all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)


class _Autocast:
    """Autocast to `dtype` on `device`, re-enterable (the trainer enters one per modality several
    times a step). On the CPU it also picks the math attention backend: torch 2.13's CPU
    flash-attention backward in bfloat16 runs ~17x slower than in float32 (10.3 vs 0.6 ms a call
    at the text transformer's batch shape: README, "Performance"), the math one (batched matmuls
    and softmax) is the faster there."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self._stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        if self.device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        self._stacks.append(stack)

    def __exit__(self, *exc: object) -> None:
        self._stacks.pop().close()


@register("training", "default")
class LocalTraining(LocalTrainingBase):
    """How a client trains locally each round (`LocalTrainingBase`: the signature, i.e. the
    ``training`` config group, and its checks, torch-free so that `mmfed config` checks them)."""

    def autocast(self, device: torch.device, modality: str) -> contextlib.AbstractContextManager[Any]:
        """The context a `modality` encoder's training forward runs in (a no-op for float32 or a
        modality not in `precision_modalities`)."""
        dtype = resolve_precision(self.precision, device)
        if dtype is None or modality not in self.precision_modalities:
            return contextlib.nullcontext()
        return _Autocast(device, dtype)

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        fused = self.fused_optimizer and fused_supported(params)
        return OPTIMIZERS[self.optimizer](params, self.lr, self.weight_decay, fused or None)


class ClientData:
    """A client's rows of the training split, served as batches for its modality kind.

    One epoch visits every row once: image clients see (image, image label); text clients one of the
    row's captions, drawn anew each epoch, with the row's text label; paired clients (image, one of
    its captions). Drawing one caption per row keeps an epoch's cost equal across kinds while every
    caption is still seen over the rounds.

    Missing modalities (paired clients, `layout.missing_image` / `missing_text`): a batch's complete
    rows form the batch as usual (every loss term sees aligned pairs); its rows without text come
    as ``extra_images`` (+ ``extra_image_ids``), those without an image as ``extra_captions``
    (+ ``extra_caption_index``, ``extra_text_ids``), which the trainer encodes into
    ``extra_image_emb`` / ``extra_text_emb`` and the contrastive loss uses as further negatives.
    A batch without one complete pair is skipped (with no positive, InfoNCE has no gradient).
    """

    def __init__(
        self,
        split: MultimodalSplit,
        kind: str,
        missing_image: tuple[str, ...] = (),
        missing_text: tuple[str, ...] = (),
    ) -> None:
        self.split, self.kind = split, kind
        self.no_image, self.no_text = self._mask(missing_image), self._mask(missing_text)

    def _mask(self, ids: tuple[str, ...]) -> np.ndarray | None:
        if not ids:
            return None
        row = {sample_id: i for i, sample_id in enumerate(self.split.ids)}
        unknown = [i for i in ids if i not in row]
        if unknown:
            raise ValueError(f"client {self.split.name}: missing-modality id {unknown[0]!r} not in its data")
        mask = np.zeros(len(self.split), dtype=bool)
        mask[[row[i] for i in ids]] = True
        return mask

    def __len__(self) -> int:
        return len(self.split)

    def _rows(self, idx: np.ndarray, rng: np.random.Generator, images: bool, texts: bool) -> Batch:
        split, rows = self.split, torch.from_numpy(idx)
        batch: Batch = {"ids": [split.ids[i] for i in idx]}  # stable ids: teacher caches key on them
        if images:
            batch["images"] = split.images[rows]  # uint8 [B, 3, H, W]
            if split.image_labels is not None:
                batch["image_labels"] = split.image_labels[rows]
        if texts:
            which = [int(rng.integers(len(split.captions[i]))) for i in idx]
            batch["caption_index"] = torch.tensor(which, dtype=torch.int64)  # which caption of each row
            batch["captions"] = [split.captions[i][c] for i, c in zip(idx, which, strict=True)]
            if split.text_labels is not None:
                batch["text_labels"] = split.text_labels[rows]
        return batch

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[Batch]:
        order = rng.permutation(len(self.split))
        starts = list(range(0, len(order), batch_size))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()  # a trailing batch of one joins the previous one (batch norm needs two samples)
        images, texts = self.kind in ("image", "paired"), self.kind in ("text", "paired")
        partial = images and texts and (self.no_image is not None or self.no_text is not None)
        for start, stop in zip(starts, [*starts[1:], len(order)], strict=True):
            idx = order[start:stop]
            if not partial:
                yield self._rows(idx, rng, images, texts)
                continue
            no_image = self.no_image[idx] if self.no_image is not None else np.zeros(len(idx), dtype=bool)
            no_text = self.no_text[idx] if self.no_text is not None else np.zeros(len(idx), dtype=bool)
            complete = idx[~(no_image | no_text)]
            if len(complete) == 0:
                continue
            batch = self._rows(complete, rng, True, True)
            if no_text.any():
                extra = self._rows(idx[no_text], rng, True, False)
                batch["extra_images"], batch["extra_image_ids"] = extra["images"], extra["ids"]
            if no_image.any():
                extra = self._rows(idx[no_image], rng, False, True)
                batch["extra_captions"], batch["extra_text_ids"] = extra["captions"], extra["ids"]
                batch["extra_caption_index"] = extra["caption_index"]
            yield batch


class ModelPool:
    """One reusable model per client kind and encoder variant, reset before each client.

    Never one model per client: building a model (and loading pretrained encoders) once per
    (kind, variant) keeps rounds fast and memory flat; resetting to the same initial weights keeps a
    client's result independent of who trained before it.
    """

    def __init__(self, build: Callable[[str, int], MultimodalModel], device: torch.device) -> None:
        self._build, self._device = build, device
        self._models: dict[tuple[str, int], tuple[MultimodalModel, dict[str, torch.Tensor]]] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    def get(self, kind: str, variant: int = 0) -> MultimodalModel:
        key = (kind, variant)
        if key not in self._models:
            model = self._build(kind, variant).to(self._device)
            self._models[key] = (model, copy.deepcopy(model.state_dict()))
        model, initial = self._models[key]
        model.load_state_dict(initial)
        return model


STAGES = ("prepare", "fit", "evaluate")  # "prepare": once, before round 1 (see ClientApp._prepare)
PERSONAL_MODEL = "model"  # key of the personal model parts in the client state


@dataclass
class ClientApp:
    """One client: its spec, its data, and how it trains. Call it with (payload, state).

    Model parts the server broadcasts are loaded from the payload; every other part (a
    heterogeneous encoder, a personal head, a fusion module) is *personal*: it is restored from the
    client state and saved back into it, so it stays with the client across rounds.
    """

    spec: ClientSpec
    data: ClientData
    pool: ModelPool
    loss_terms: DictConfig  # name -> loss term config
    training: LocalTraining
    seed: int
    variant: int = 0
    public: MultimodalSplit | None = None  # the public paired data, for terms and representations
    test_data: MultimodalSplit | None = None  # the client's local test split
    evaluator: Evaluator | None = None
    client_tasks: DictConfig | None = None  # name -> client task config, run in the prepare stage
    quiet: bool = False  # no progress bars from client tasks

    def __call__(self, payload: Payload, state: dict[str, Any]) -> tuple[Reply, dict[str, Any]]:
        check_choice("payload.stage", payload.stage, STAGES)
        if payload.stage == "prepare":
            return self._prepare(), state
        model = self.pool.get(self.spec.kind, self.variant)
        if PERSONAL_MODEL in state:
            model.load_part_state(state[PERSONAL_MODEL], strict_parts=False)
        received = model.load_part_state(  # LoRA adapters (and personal heads) never come from the server
            {
                k: v
                for k, v in payload.tensors.items()
                if k.partition("/")[0] in model.part_names and not is_personal(model, k)
            }
        )
        unsent = [p for p in FROZEN_PARTS if model.has(p) and p not in received]
        if unsent:  # a fusion module reading a never-loaded (random) global encoder would train silently
            raise ValueError(
                f"client {self.spec.cid}: model.fusion is on but the server sent no {unsent[0]} (the global "
                "encoder the fusion reads): use a server step that sends it (ensemble_distill with "
                "send_global_encoders=true, as algorithm=fedafd does) or set model.fusion=false"
            )
        reply = Reply(cid=self.spec.cid, kind=self.spec.kind, num_examples=self.spec.num_examples)
        if payload.stage == "evaluate":
            reply.metrics = self._evaluate(model)
            return reply, state
        terms = self._terms(payload, model, state)
        reply.metrics = self._fit(model, terms, payload)
        if "weights" in payload.reply:
            parts = [p for p in KIND_PARTS[self.spec.kind] if model.has(p)]
            weights = {
                WEIGHT_PREFIX + k: v for k, v in model.part_state(parts).items() if not is_personal(model, k)
            }
            reply.tensors.update(encode_tensors(weights, payload.config.get("weights_dtype", "float32")))
        if "representations" in payload.reply:
            reply.tensors.update(self._represent(model, payload))
        new_state: dict[str, Any] = {name: kept for name, term in terms.items() if (kept := term.end())}
        personal = [p for p in model.part_names if p not in received and p not in FROZEN_PARTS]
        own = model.part_state(personal)
        own |= {k: v for k, v in model.part_state(received).items() if is_personal(model, k)}  # adapters
        if own:
            new_state[PERSONAL_MODEL] = {k: v.detach().clone() for k, v in own.items()}
        return reply, new_state

    def _prepare(self) -> Reply:
        """The one-time prepare stage: run every configured client task that applies to this kind.

        A client task (registered in the ``client_task`` group, listed in ``algorithm.client_tasks``)
        has ``applies_to(kind) -> bool`` and ``run(split, kind, cid, seed, device, quiet) -> Message``;
        its tensors, config and metrics become this reply (e.g. a diffusion model trained on the
        client's data, uploaded once). A client no task applies to replies with nothing.
        """
        reply = Reply(cid=self.spec.cid, kind=self.spec.kind, num_examples=self.spec.num_examples)
        for name, cfg in (self.client_tasks or {}).items():
            task = instantiate(cfg, f"algorithm.client_tasks.{name}")
            if not task.applies_to(self.spec.kind):
                continue
            fragment = task.run(
                self.data.split, self.spec.kind, self.spec.cid, self.seed, self.pool.device, self.quiet
            )
            for mine, theirs in ((reply.tensors, fragment.tensors), (reply.config, fragment.config)):
                clash = mine.keys() & theirs.keys()
                if clash:
                    raise ValueError(f"two client tasks both reply with {sorted(clash)[0]!r} (task {name!r})")
                mine.update(theirs)
            reply.metrics.update(fragment.metrics)
        return reply

    def _terms(self, payload: Payload, model: MultimodalModel, state: dict[str, Any]) -> dict[str, LossTerm]:
        terms: dict[str, LossTerm] = {}
        for name, cfg in self.loss_terms.items():
            term: LossTerm = instantiate(cfg, f"algorithm.loss_terms.{name}")
            if term.applies_to(self.spec.kind, model):
                term.begin(
                    ClientRound(
                        self.spec.cid,
                        self.spec.kind,
                        payload.round,
                        payload,
                        model,
                        state.get(name, {}),
                        self.seed,
                        self.data.split.image_classes,
                        self.data.split.text_classes,
                    )
                )
                terms[name] = term
        if not terms:
            raise ValueError(
                f"client {self.spec.cid} ({self.spec.kind}): no loss term in algorithm.loss_terms applies"
            )
        return terms

    def _fit(self, model: MultimodalModel, terms: dict[str, LossTerm], payload: Payload) -> dict[str, float]:
        """The local training loop: forward each modality once, sum the terms' losses, step.

        When a term uses public data, each step also draws a public batch from this round's public
        sample and encodes it once (local features, unfused) for all such terms.
        """
        training, round_ = self.training, payload.round
        public = self._public_batches(payload) if any(t.uses_public for t in terms.values()) else None
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
                image_cast, text_cast = training.autocast(device, "image"), training.autocast(device, "text")
                if "images" in batch:
                    with image_cast:
                        out["image_emb"] = model.encode_images(batch["images"])  # [B, D]
                if "captions" in batch:
                    with text_cast:
                        out["text_emb"] = model.encode_texts(batch["captions"])  # [B, D]
                if "extra_images" in batch:  # a paired client's rows without text (missing modalities)
                    with image_cast:
                        out["extra_image_emb"] = model.encode_images(batch["extra_images"])  # [B_i, D]
                if "extra_captions" in batch:  # ... and without an image
                    with text_cast:
                        out["extra_text_emb"] = model.encode_texts(batch["extra_captions"])  # [B_t, D]
                if public is not None:
                    positions = torch.from_numpy(
                        rng.choice(public.size, min(public.size, training.batch_size), replace=False)
                    )
                    batch["public_positions"] = positions  # rows of this round's public sample
                    if model.has("image_encoder"):
                        batch["public_images"] = public.images(positions)
                        with image_cast:
                            out["public_image_emb"] = model.encode_images(batch["public_images"], fuse=False)
                    if model.has("text_encoder"):
                        batch["public_captions"] = public.texts(positions)
                        with text_cast:
                            out["public_text_emb"] = model.encode_texts(batch["public_captions"], fuse=False)
                out = {name: emb.float() for name, emb in out.items()}  # loss terms run in float32
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

    # ------------------------------------------------------------------ public data
    def _public_batches(self, payload: Payload) -> PublicSample | None:
        if PUBLIC_INDICES not in payload.tensors:
            return None
        if self.public is None:
            raise ValueError(
                f"client {self.spec.cid}: the server sent public indices but no public split is loaded"
            )
        return PublicSample(self.public, payload.tensors[PUBLIC_INDICES], payload.tensors[PUBLIC_CAPTIONS])

    @torch.no_grad()
    def _represent(self, model: MultimodalModel, payload: Payload) -> dict[str, torch.Tensor]:
        """The client's own (unfused) features of this round's public sample, per modality it has."""
        sample = self._public_batches(payload)
        if sample is None:
            raise ValueError(f"client {self.spec.cid}: representations requested without public indices")
        model.eval()
        out: dict[str, torch.Tensor] = {}
        chunks = [torch.arange(i, min(i + 256, sample.size)) for i in range(0, sample.size, 256)]
        if model.has("image_encoder"):
            out[REPR_IMAGE] = torch.cat([model.encode_images(sample.images(c), fuse=False) for c in chunks])
        if model.has("text_encoder"):
            out[REPR_TEXT] = torch.cat([model.encode_texts(sample.texts(c), fuse=False) for c in chunks])
        return encode_tensors(out, payload.config.get("representation_dtype", "float16"))

    def _evaluate(self, model: MultimodalModel) -> dict[str, float]:
        """This client's model (global parts + personal parts) on its own local test split."""
        if self.test_data is None or len(self.test_data) == 0 or self.evaluator is None:
            return {}
        return {f"local/{k}": v for k, v in self.evaluator.evaluate(model, self.test_data).items()}


@dataclass
class PublicSample:
    """This round's public sample: rows of the public split and the caption used for each."""

    split: MultimodalSplit
    indices: torch.Tensor  # int64 [N]: rows of the public split
    caption_index: torch.Tensor  # int64 [N]: which caption of each row

    @property
    def size(self) -> int:
        return len(self.indices)

    def images(self, positions: torch.Tensor) -> torch.Tensor:
        return self.split.images[self.indices[positions]]

    def texts(self, positions: torch.Tensor) -> list[str]:
        rows, which = self.indices[positions].tolist(), self.caption_index[positions].tolist()
        return [
            self.split.captions[r][c % len(self.split.captions[r])] for r, c in zip(rows, which, strict=True)
        ]
