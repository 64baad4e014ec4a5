"""Server-side ensemble distillation of client representations on public data.

Papers: FedAFD's similarity-guided ensemble distillation, SED (Tan et al., CVPR 2026, arXiv
2603.04890), and CreamFL's representation ensemble (Yu et al., ICLR 2023, Sec. 3.2). Reference code:
Chao2433/FedAFD ``algorithms/MMFL_fedafd.py`` (``agg_method='SED'``) and FLAIR-THU/CreamFL
``src/algorithms/MMFL.py`` (``agg_method='con_w'``).

Each round the server draws a public sample (`public_per_round` paired rows, one caption each),
sends clients its own (global) features g of it, and receives every client's features r_k of the
same rows (fp16 by default) instead of weights, so clients may run any encoder architecture. For
each modality m the K clients that have m (image-only and paired clients for images, text-only and
paired clients for texts; each exactly once) are combined row by row:

    s_{k,i} = log softmax_j ( <r_{k,i}, a_j> / T )  at j = i, over all N public rows   (score="contrastive")
    w_{.,i} = softmax_k ( s_{.,i} )                                            (`aggregate`, weights [K, N])
    t_i     = sum_k w_{k,i} r_{k,i}                                            (`aggregate`, target [N, D])

and t is distilled into the global encoders on the same rows: distill_weight * MSE(global feature, t)
(the reference's ``kd_weight``: 0.3 in CreamFL's code, 0.4 in FedAFD's; set by each algorithm's
config), plus the global model's own contrastive loss on the public pairs (`contrastive_weight`).

Paper symbol -> code: r_{k,i} = ``representations[k][i]`` (a client's ``repr/image`` or ``repr/text``
reply); a_j = ``anchor[j]``, the global features sent this round (``public/global_image|text``, the
server model's features of the round's public sample, computed once per round); s = ``contrastive_scores``;
w = the weights returned by ``aggregate``; t = its target; T = ``temperature``.

Named options (defaults = the papers; where they are silent, the reference code):
- ``weighting`` picks the anchor a: "similarity" (FedAFD SED: the global features of the **same**
  modality), "creamfl" (CreamFL: the global features of the **other** modality, image reps against
  global text features and vice versa), "uniform" (w = 1/K, the ablation without weighting).
- ``score``: "contrastive" (the published rule above, default) or "paired_cosine" (mmfed's earlier
  rule, s_{k,i} = cos(r_{k,i}, a_i) / T at the paired row only; it drops the denominator over all
  rows and so rewards a client whose features are close to *every* row, e.g. a collapsed one).
- ``temperature`` T: 1.0 (the reference code has none; its features are unit vectors, so its logits
  are cosines in [-1, 1]). mmfed's earlier rule used ``score=paired_cosine temperature=0.1``.
- ``unit_features`` (default true, as the reference: its encoders end in an L2 normalisation):
  client and global features are L2-normalised before scoring, aggregating and distilling (the
  global model's output is normalised in the MSE). false: raw features everywhere.
How it is computed (ours, not a departure in the result): the reference builds an N x N fp32 matrix
per client and takes exp of raw logits (out of memory at 50k rows, CreamFL issue #10; overflow for
large logits). Here the scores are computed chunk by chunk of rows: a [chunk, N] block of logits at a
time, its log-sum-exp shifted by a per-row bound from Cauchy-Schwarz (||r_i|| max_j ||a_j|| / T)
so no exp overflows; memory O(chunk x N + N x D), never N x N.
Departures by construction of mmfed's server loop (no option): the reference trains the global model
contrastively on the public data in a pass of its own at the start of each round, then computes g,
and distills only the kd term after aggregation; here g is the global model as the round starts and
the contrastive loss is trained together with the distillation after aggregation. CreamFL's
reference adds the image and text kd terms a second time when paired clients take part (an
effective kd weight of 0.6); each modality's term is counted once here.
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
SCORES = ("contrastive", "paired_cosine")
DISTILL_LOSSES = ("mse", "cosine")
# Logits are shifted down so that none exceeds _SAFE_EXP: sum_j exp stays below N e^60, finite in
# float32 for any N < 1e12. A row whose shifted exp-sum falls below _UNDERFLOW (its bound was far above
# its largest logit) is recomputed with a max-shifted log-sum-exp instead.
_SAFE_EXP = 60.0
_UNDERFLOW = 1e-30


def _rows(features: torch.Tensor, start: int, stop: int, device: torch.device, unit: bool) -> torch.Tensor:
    """Rows [start, stop) as float32 on `device`, L2-normalised when `unit`."""
    rows = features[start:stop].to(device=device, dtype=torch.float32)
    return F.normalize(rows, dim=-1) if unit else rows


def row_logits(
    queries: torch.Tensor, keys: torch.Tensor, temperature: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[c, D] x [N, D] -> [c, N] logits <q_i, k_j> / T. The ensemble's only product of features
    (tests spy on it: it must never be asked for an N x N block)."""
    logits = torch.matmul(queries, keys.T, out=out)
    return logits.div_(temperature) if temperature != 1.0 else logits


def contrastive_scores(
    representations: torch.Tensor,
    keys: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    unit: bool = True,
) -> torch.Tensor:
    """One client's [N, D] features against the anchor `keys` [N, D] -> s [N]:
    s_i = log softmax_j(<r_i, k_j>/T) at j = i, over all N rows (`keys` as given; the rows of
    `representations` are L2-normalised when `unit`).

    Chunk by chunk of rows: one [chunk, N] logits buffer, reused. No max pass: b_i = ||r_i||
    max_j ||k_j|| / T bounds every logit of row i (Cauchy-Schwarz), so row i is shifted by
    max(0, b_i - 60) and exponentiated in place without overflow (for unit features and T >= 1/60
    no shift at all: one exp pass and one sum pass over the block, which keeps the whole score within
    ~1.3x of the plain matmuls on CPU); a row whose shifted sum underflows is redone with
    torch.logsumexp.
    """
    count, device = len(representations), keys.device
    key_norm = float(keys.norm(dim=-1).max()) if count else 0.0
    scores = torch.empty(count, device=device)
    buffer = torch.empty(min(chunk_size, count), count, device=device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        rows = _rows(representations, start, stop, device, unit)  # [c, D]
        logits = row_logits(rows, keys, temperature, out=buffer[: stop - start])  # [c, N]
        positive = logits.diagonal(offset=start).clone()  # [c]: <r_i, k_i> / T
        bound = rows.norm(dim=-1) * (key_norm / temperature)  # [c], >= every logit of its row
        shift = (bound - _SAFE_EXP).clamp_(min=0.0)  # [c]; all 0 for unit features and T >= 1/60
        if bool(shift.any()):  # else skip the pass: no logit exceeds _SAFE_EXP, exp cannot overflow
            logits.sub_(shift[:, None])
        sums = logits.exp_().sum(dim=1)  # [c], each <= N e^_SAFE_EXP
        lse = shift + sums.log()
        low = (sums < _UNDERFLOW).nonzero().flatten()
        if len(low):
            lse[low] = torch.logsumexp(row_logits(rows[low], keys, temperature), dim=1)
        scores[start:stop] = positive - lse
    return scores


def paired_cosine_scores(
    representations: torch.Tensor,
    anchor: torch.Tensor,
    temperature: float = 0.1,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """mmfed's earlier rule (``score=paired_cosine``): s_i = cos(r_i, a_i) / T at the paired row only."""
    count, device = len(representations), torch.device(device)
    scores = torch.empty(count, device=device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        rows = _rows(representations, start, stop, device, True)
        scores[start:stop] = (rows * _rows(anchor, start, stop, device, True)).sum(-1) / temperature
    return scores


def aggregate(
    representations: list[torch.Tensor],
    anchor: torch.Tensor | None,
    score: str = "contrastive",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    unit_features: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """K client tensors [N, D] and the anchor [N, D] (None: uniform weights) ->
    (target t [N, D], weights w [K, N]), w = softmax over clients of the chosen score.

    Memory beyond the inputs: the anchor as float32, one [chunk, N] logits block, w and t.
    """
    check_choice("score", score, SCORES)
    device = torch.device(device)
    clients = len(representations)
    count, dim = representations[0].shape
    if anchor is None:
        weights = torch.full((clients, count), 1.0 / clients, device=device)
    else:
        if score == "paired_cosine":
            scores = [
                paired_cosine_scores(r, anchor, temperature, chunk_size, device) for r in representations
            ]
        else:
            keys = _rows(anchor, 0, count, device, unit_features)  # [N, D], float32
            scores = [
                contrastive_scores(r, keys, temperature, chunk_size, unit_features) for r in representations
            ]
        weights = torch.softmax(torch.stack(scores), dim=0)  # [K, N]
    target = torch.empty(count, dim, device=device)
    for start in range(0, count, chunk_size):
        stop = min(start + chunk_size, count)
        stacked = torch.stack([_rows(r, start, stop, device, unit_features) for r in representations])
        target[start:stop] = (weights[:, start:stop, None] * stacked).sum(0)  # [c, D]
    return target, weights


@register("server_step", "ensemble_distill")
class EnsembleDistillation(ServerStep):
    uses_public = True
    trains_parts = ("image_encoder", "text_encoder", "logit_scale")
    evaluate_from_global = True  # outside the fit stage: the global encoders (send_global_encoders)

    def __init__(
        self,
        weighting: str = "similarity",
        score: str = "contrastive",
        temperature: float = 1.0,
        unit_features: bool = True,
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
        check_choice("score", score, SCORES)
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
        self.weighting, self.score, self.temperature, self.loss = weighting, score, temperature, loss
        self.unit_features = unit_features
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
        device = round_.global_model.device if round_.global_model is not None else torch.device("cpu")
        for modality, key, same, other in (
            ("image", REPR_IMAGE, GLOBAL_IMAGE, GLOBAL_TEXT),
            ("text", REPR_TEXT, GLOBAL_TEXT, GLOBAL_IMAGE),
        ):
            reps = [r.tensors[key] for r in replies if key in r.tensors]
            if not reps:
                continue
            anchor = {"similarity": sample[same], "creamfl": sample[other], "uniform": None}[self.weighting]
            targets[modality], weights = aggregate(
                reps, anchor, self.score, self.temperature, self.chunk_size, self.unit_features, device
            )
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
                        prediction = F.normalize(emb, dim=-1) if self.unit_features else emb
                        losses[f"distill_{modality}"] = self.distill_weight * self._distance(
                            prediction, targets[modality][rows.to(targets[modality].device)].to(device)
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
