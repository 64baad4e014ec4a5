"""The two kinds of algorithm parts.

A **loss term** adds named losses to a client's local objective; the trainer sums them and logs
each one, so the logged loss is the optimised loss. A **server step** contributes to what the server
broadcasts each round and consumes the clients' replies (aggregate, distill, correct ...). A method
is a recipe in config: which terms, which steps, with which weights. None of them knows the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmfed.data.layout import CLIENT_KINDS, ClientSpec
from mmfed.data.samples import MultimodalSplit
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Message, Payload, Reply

# Payload tensor names shared by server steps, loss terms and the client runtime.
PUBLIC_INDICES = "public/indices"  # int64 [N]: rows of the public split used this round
PUBLIC_CAPTIONS = "public/caption_index"  # int64 [N]: which caption of each public row
GLOBAL_IMAGE = "public/global_image"  # [N, D]: the global model's image features of the public sample
GLOBAL_TEXT = "public/global_text"  # [N, D]: ... and text features
REPR_IMAGE = "repr/image"  # reply [N, D]: a client's own image features of the public sample
REPR_TEXT = "repr/text"  # reply [N, D]

# ids list[str] (stable sample ids) | images uint8 [B,3,H,W] | captions list[str] | caption_index int64 [B]
# | image_labels / text_labels int64 [B] | public_positions int64 [P] (rows of the round's public sample)
# | public_images uint8 [P,3,H,W] / public_captions list[str] (those rows' inputs, per modality the model has)
Batch = dict[str, Any]
Outputs = dict[str, torch.Tensor]  # image_emb / text_emb [B, D]; public_image_emb / public_text_emb [P, D]


@dataclass
class ClientRound:
    """What a loss term may look at when a client's round starts."""

    cid: str
    kind: str
    round: int
    payload: Payload
    model: MultimodalModel
    state: dict[str, Any] = field(default_factory=dict)  # this term's personal state from earlier rounds
    seed: int = 0
    image_classes: list[str] = field(default_factory=list)  # class names of the client's labels (prompts)
    text_classes: list[str] = field(default_factory=list)


class LossTerm(nn.Module):
    """Base class: `kinds` says which client kinds use the term; `forward` returns weighted losses."""

    kinds: tuple[str, ...] = CLIENT_KINDS
    uses_public: bool = False  # True: the trainer adds public_*_emb outputs and batch["public_positions"]

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        self.weight = weight

    def applies_to(self, kind: str, model: MultimodalModel) -> bool:
        return kind in self.kinds and self.weight > 0

    def begin(self, round_: ClientRound) -> None:
        """Called once per client round before training (e.g. keep a frozen copy of the global model)."""

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def end(self) -> dict[str, Any]:
        """Personal state to keep with the client until its next round (empty: nothing to keep)."""
        return {}


@dataclass
class ServerRound:
    """What a server step may look at in one round."""

    round: int
    seed: int
    global_model: MultimodalModel
    clients: list[ClientSpec]
    public: MultimodalSplit | None = None  # the server's public paired data, for distillation steps
    stage: str = "fit"  # "fit" (train and reply) or "evaluate" (clients evaluate on their local test)


class ServerStep:
    """Base class. `stage` is the client stage whose replies the step consumes ("fit" by default)."""

    stage: str = "fit"
    uses_public: bool = False  # True: the run loads the public split and hands it to the step
    # True: the step also takes part in a one-time "prepare" stage (round 0) before round 1, where
    # clients run `algorithm.client_tasks` (e.g. train and upload a diffusion model once)
    prepares: bool = False
    # Global-model parts this step trains; the global model is built with the union over the steps,
    # so a part nothing trains (e.g. heads under pure distillation) is neither built nor evaluated.
    trains_parts: tuple[str, ...] = ()
    # True: what `broadcast` sends in the "evaluate" stage depends only on `round_.global_model` and
    # the client, never on the step's own state, so a run whose clients hold no personal state may
    # evaluate the best round's clients once, at the end, from best.pt (the same numbers, fewer
    # evaluations; see Run.finish). False (the safe default for a new step): evaluated at each best round.
    evaluate_from_global: bool = False

    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        """This step's part of the payload for `client`: tensors, config, and what to reply with."""
        return Payload()

    def aggregate(self, round_: ServerRound, replies: list[Reply]) -> dict[str, float]:
        """Consume the replies (update `round_.global_model` in place); return metrics to log."""
        return {}

    def observe(self, round_: int, metrics: dict[str, float]) -> None:
        """After round `round_`'s evaluation: the validation metrics (``val/...``), e.g. to detect
        slow learning. Nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class ClientTask:
    """Work a client does once, in the prepare stage, before round 1 (listed in
    ``algorithm.client_tasks``): `run` returns a message fragment (tensors, config, metrics) that
    becomes part of the client's reply, e.g. a model trained on its data and uploaded once."""

    kinds: tuple[str, ...] = CLIENT_KINDS

    def applies_to(self, kind: str) -> bool:
        return kind in self.kinds

    def run(
        self, split: MultimodalSplit, kind: str, cid: str, seed: int, device: torch.device, quiet: bool
    ) -> Message:
        raise NotImplementedError


def draw_public_sample(
    round_: ServerRound, count: int, step: str = "this server step"
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """This round's public sample: `count` distinct rows (seeded by round), one caption of each.

    Returns (row indices int64 [N], caption choices int64 [N], the chosen caption texts). Steps that
    send public data to clients use it, so their samples are drawn the same way.
    """
    from mmfed.utils.seeding import numpy_rng

    public = round_.public
    if public is None or public.images is None or public.captions is None:
        raise ValueError(f"{step} needs paired public data (the data source's 'public' split)")
    rng = numpy_rng(round_.seed, "public-sample", round_.round)
    count = min(count, len(public))
    indices = torch.from_numpy(rng.choice(len(public), count, replace=False)).long()
    captions = torch.from_numpy(rng.integers(0, 1 << 30, count)).long()
    texts = [
        public.captions[r][c % len(public.captions[r])]
        for r, c in zip(indices.tolist(), captions.tolist(), strict=True)
    ]
    return indices, captions, texts
