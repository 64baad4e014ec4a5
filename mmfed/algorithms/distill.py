"""Server-side ensemble distillation of client representations on public data.

Each round the server draws a public sample (`public_per_round` paired rows and one caption each),
sends clients its own (global) features of it, and receives every client's features of the same
sample (fp16 by default) instead of weights, so clients may run any encoder architecture. For each
modality m and public row i it aggregates the K contributing clients' features r_{k,i} (image-only
and paired clients for images, text-only and paired clients for texts; each exactly once):

    t_i = sum_k a_{k,i} r_{k,i},     a_{.,i} = softmax_k( s_{k,i} / T )

with the score s chosen by `weighting`:
- "similarity" (FedAFD, similarity-guided): s_{k,i} = cos(r_{k,i}, g^m_i), the global feature of the
  same modality;
- "creamfl" (CreamFL's representation ensemble, Yu et al. ICLR 2023): s_{k,i} = cos(r_{k,i}, g^{m'}_i),
  the global feature of the *other* modality at the paired item. The reference code scored against
  all N items (an N x N matrix that runs out of memory at 50k); we score the paired item only;
- "uniform": a_{k,i} = 1/K (the ablation without similarity weighting).
The aggregate t is then distilled into the global encoders on the same public rows (MSE or 1-cos,
`distill_weight`), together with the global model's own contrastive loss on the public pairs
(`contrastive_weight`). Aggregation runs over chunks of rows: memory O(chunk x K x D), never N x N.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import (
    GLOBAL_IMAGE,
    GLOBAL_TEXT,
    PUBLIC_CAPTIONS,
    PUBLIC_INDICES,
    REPR_IMAGE,
    REPR_TEXT,
    ServerRound,
    ServerStep,
    draw_public_sample,
)
from mmfed.algorithms.task import clip_loss
from mmfed.config import check_choice, check_positive, register
from mmfed.data.layout import ClientSpec
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import TRANSPORT_DTYPES, Payload, Reply, encode_tensors
from mmfed.utils.seeding import numpy_rng, seed_torch

WEIGHTINGS = ("similarity", "creamfl", "uniform")
DISTILL_LOSSES = ("mse", "cosine")


def ensemble(representations: torch.Tensor, anchor: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """[K, c, D] client features and [c, D] anchor -> softmax_k(cos(r_k, anchor)/T) weights [K, c].

    anchor None: uniform weights 1/K.
    """
    if anchor is None:
        return torch.full(representations.shape[:2], 1.0 / representations.shape[0])
    scores = (F.normalize(representations, dim=-1) * F.normalize(anchor, dim=-1)[None]).sum(-1)  # [K, c]
    return torch.softmax(scores / temperature, dim=0)


def aggregate(
    representations: list[torch.Tensor],
    anchor: torch.Tensor | None,
    temperature: float,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K tensors [N, D] -> (weighted aggregate [N, D], weights [K, N]), chunk by chunk of rows."""
    count, dim = representations[0].shape
    target = torch.empty(count, dim)
    weights = torch.empty(len(representations), count)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        stacked = torch.stack([r[start:stop].float() for r in representations])  # [K, c, D]
        chunk_anchor = None if anchor is None else anchor[start:stop].float()
        w = ensemble(stacked, chunk_anchor, temperature)  # [K, c]
        target[start:stop] = (w.unsqueeze(-1) * stacked).sum(0)
        weights[:, start:stop] = w
    return target, weights


@register("server_step", "ensemble_distill")
class EnsembleDistillation(ServerStep):
    uses_public = True
    trains_parts = ("image_encoder", "text_encoder", "logit_scale")

    def __init__(
        self,
        weighting: str = "similarity",
        temperature: float = 0.1,
        loss: str = "mse",
        distill_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        public_per_round: int = 1000,
        server_epochs: int = 1,
        batch_size: int = 64,
        lr: float = 1e-3,
        chunk_size: int = 1024,
        representation_dtype: str = "float16",
        send_global_encoders: bool = False,
    ) -> None:
        check_choice("weighting", weighting, WEIGHTINGS)
        check_choice("loss", loss, DISTILL_LOSSES)
        check_choice("representation_dtype", representation_dtype, tuple(TRANSPORT_DTYPES))
        for name, value in (
            ("temperature", temperature),
            ("public_per_round", public_per_round),
            ("server_epochs", server_epochs),
            ("batch_size", batch_size),
            ("lr", lr),
            ("chunk_size", chunk_size),
        ):
            check_positive(name, value)
        self.weighting, self.temperature, self.loss = weighting, temperature, loss
        self.distill_weight, self.contrastive_weight = distill_weight, contrastive_weight
        self.public_per_round, self.server_epochs, self.batch_size, self.lr = (
            public_per_round,
            server_epochs,
            batch_size,
            lr,
        )
        self.chunk_size, self.representation_dtype = chunk_size, representation_dtype
        self.send_global_encoders = send_global_encoders
        self._round_cache: tuple[int, dict[str, torch.Tensor]] | None = None

    # ------------------------------------------------------------------ broadcast
    def _sample(self, round_: ServerRound) -> dict[str, torch.Tensor]:
        """This round's public rows, caption choice and global features (computed once per round)."""
        if self._round_cache is not None and self._round_cache[0] == round_.round:
            return self._round_cache[1]
        indices, captions, texts = draw_public_sample(round_, self.public_per_round, "ensemble_distill")
        count = len(indices)
        model = round_.global_model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            image = torch.cat(
                [
                    model.encode_images(round_.public.images[indices[i : i + 256]]).cpu()
                    for i in range(0, count, 256)
                ]
            )
            text = torch.cat([model.encode_texts(texts[i : i + 256]).cpu() for i in range(0, count, 256)])
        model.train(was_training)
        sample = {
            PUBLIC_INDICES: indices,
            PUBLIC_CAPTIONS: captions,
            GLOBAL_IMAGE: image,
            GLOBAL_TEXT: text,
            "_texts": texts,
        }
        self._round_cache = (round_.round, sample)
        return sample

    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        payload = Payload()
        if self.send_global_encoders:  # frozen references for the clients' fusion modules
            parts = {
                "image": ["image_encoder"],
                "text": ["text_encoder"],
                "paired": ["image_encoder", "text_encoder"],
            }[client.kind]
            state = round_.global_model.part_state(parts)
            payload.tensors.update(encode_tensors({f"reference_{k}": v for k, v in state.items()}, "float32"))
        if round_.stage != "fit":
            return payload
        sample = self._sample(round_)
        tensors = {k: v for k, v in sample.items() if not k.startswith("_")}
        payload.tensors.update(encode_tensors(tensors, self.representation_dtype))
        payload.config["representation_dtype"] = self.representation_dtype
        payload.reply = ["representations"]
        return payload

    # ------------------------------------------------------------------ aggregate and distill
    def aggregate(self, round_: ServerRound, replies: list[Reply]) -> dict[str, float]:
        sample = self._sample(round_)
        metrics: dict[str, float] = {}
        targets: dict[str, torch.Tensor] = {}
        for modality, key, same, other in (
            ("image", REPR_IMAGE, GLOBAL_IMAGE, GLOBAL_TEXT),
            ("text", REPR_TEXT, GLOBAL_TEXT, GLOBAL_IMAGE),
        ):
            reps = [r.tensors[key] for r in replies if key in r.tensors]
            if not reps:
                continue
            anchor = {"similarity": sample[same], "creamfl": sample[other], "uniform": None}[self.weighting]
            targets[modality], weights = aggregate(reps, anchor, self.temperature, self.chunk_size)
            metrics[f"{modality}/clients"] = float(len(reps))
            metrics[f"{modality}/max_weight"] = float(weights.max(0).values.mean())
        if targets:
            metrics.update(self._distill(round_, sample, targets))
        return metrics

    def _distill(
        self, round_: ServerRound, sample: dict[str, Any], targets: dict[str, torch.Tensor]
    ) -> dict[str, float]:
        """Train the global encoders on the public rows towards the aggregated client features."""
        model: MultimodalModel = round_.global_model
        public = round_.public
        seed_torch(round_.seed, "server-distill", round_.round)
        rng = numpy_rng(round_.seed, "server-distill-batches", round_.round)
        params = [
            p
            for part in ("image_encoder", "text_encoder", "logit_scale")
            if model.has(part)
            for p in getattr(model, part).parameters()
        ]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        model.train()
        indices, texts = sample[PUBLIC_INDICES], sample["_texts"]
        totals: dict[str, float] = {}
        steps = 0
        device = model.device
        for _ in range(self.server_epochs):
            order = torch.from_numpy(rng.permutation(len(indices)))
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                if len(rows) < 2:
                    continue
                image = model.encode_images(public.images[indices[rows]])
                text = model.encode_texts([texts[i] for i in rows.tolist()])
                losses: dict[str, torch.Tensor] = {}
                for modality, emb in (("image", image), ("text", text)):
                    if modality in targets:
                        losses[f"distill_{modality}"] = self.distill_weight * self._distance(
                            emb, targets[modality][rows].to(device)
                        )
                if self.contrastive_weight > 0:
                    losses["contrastive"] = self.contrastive_weight * clip_loss(
                        image, text, model.logit_scale()
                    )
                total = torch.stack(list(losses.values())).sum()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                steps += 1
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0.0) + float(value.detach())
        return {name: value / max(steps, 1) for name, value in totals.items()}

    def _distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss == "cosine":
            return (1 - F.cosine_similarity(prediction, target, dim=-1)).mean()
        return F.mse_loss(prediction, target)
