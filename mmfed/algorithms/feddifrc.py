"""FedDifRC (Wang et al., "FedDifRC: Unlocking the Potential of Text-to-Image Diffusion Models in
Heterogeneous Federated Learning", ICCV 2025, arXiv 2507.06482; reference code hwang52/FedDifRC).

Client loss L = L_CE + L_TDCL + L_NDCR (weights 1; ``loss_terms.tdcl.weight`` / ``ndcr.weight``) on
FedAvg. Code names -> paper symbols:

- ``z`` (``out["image_emb"]``, the local encoder's embedding)    -> z_i = h_k(x_i)
- ``reps[i, k]`` (`TextDrivenContrastive`)                       -> F_i under prompt P_c, c = candidates[i, k]
- ``candidates[i, 0]`` = the label y_i; ``candidates[i, 1:]``    -> N_i, the non-matching class prompts
- ``tdcl_loss(..., normalizer="mean_distance")``                 -> s(z_i, F) = cos(z_i, F) / U
- ``temperature``                                               -> tau (0.04, the reference code's)
- teacher features via `TeacherView.image` (per-layer PCA map)    -> F_i / H_i: decoder layers 2-4, each
  PCA-reduced (D/2, D/4, D/4 = 256/128/128 at D = 512), concatenated (teacher_space.py)
- `NoiseDrivenConsistency` target, ``teacher.timestep`` (300)    -> H_i, x_i noised to t and denoised
- ``consistency_loss(..., "l2")``                               -> L_NDCR = sum_q (z_iq - H_iq)^2

**TDCL.** L_i = log(1 + sum_{j in N_i} exp(s(z_i, F_ij)/tau) / exp(s(z_i, F_iy)/tau)), i.e.
-log softmax over sample i's *own* candidates at its positive, computed as ``logsumexp(logits) -
logits[y]`` in float32 (the reference code's exp(cos / 0.04) / sum overflows). Each sample's negatives
are its own representations under the other prompts, never another sample's (the reference code's
single softmax over the whole batch contrasts samples with each other's representations).
U: the paper defines it as "the mean distance between all sample embeddings and the current diffusion
representation"; the reference code has no U. Ours (the paper silent on the distance and the batch):
U_ik = mean over the batch's embeddings z_b of ||z_b/|z_b| - F_ik/|F_ik| || (Euclidean distance of
unit vectors, so U is scale-free like the cosine it divides), a statistic without gradient.
Texts (our multimodal extension): a caption embedding against the mapped text embeddings of the
class prompts.

**NDCR.** The local embedding is pulled towards the teacher's denoising representation of the same
sample at ``teacher.timestep`` (paper: t = 300 best, 999 bad; the reference code's timestep option,
default 999, is never read): squared error (paper; the maps scale teacher features to unit
RMS norm). Texts: the caption's text-encoder embedding.

**Teacher modes** (``loss_terms.tdcl.mode``; every preset names the one it runs):
- ``conditioned`` (paper: the local feature injected into SD as a condition; the term's default): z,
  mapped back into the text-embedding space (`TeacherView.text_to_teacher`, scaled by
  ``condition_scale``), is added to the prompt's token embeddings and the U-Net runs with gradients
  to z, once per candidate class per step:
  C (or 1 + ``negatives``) U-Net passes per sample per step (as the reference code's unused
  ``forward_condition_list`` adds the condition to the prompt embeddings). Measured:
  eval/bench_tdcl_modes.py (the README's cost table): ~300x a cached step on the tiny test teacher on
  CPU, unaffordable there for a real run, so **every preset sets mode=cached** and says so.
- ``cached`` (reference code: static features extracted once): F(x, P_c) does not depend on the local
  model, so it is computed once per (sample, class) and read from the teacher cache every later step
  and round. Cost per step: a cache read.

**Options** (paper default first): ``normalizer`` mean_distance | none (reference code);
``temperature`` 0.04; ``negatives`` None (all C - 1, paper) | k drawn per sample (ours); ``mode``
conditioned (paper) | cached (reference code; what the presets run); ``distance`` l2 | cosine (ours);
``center_classes`` false | true (ours: subtract each sample's mean class representation first, for
teachers whose prompts barely move the features); ``modalities`` image, text (text is ours). Map
options live on the server step (teacher_space.py): ``image_reduction`` layer_pca (paper) | ridge |
pca (ours), ``layer_components``.

**Departures of ours** (options, off in the paper presets): the text side; ``center_classes``;
``distance=cosine``; ``image_reduction=ridge`` (shared image-text space for multimodal clients); the
per-layer PCA reads block-pooled features (spatial means) where the reference code runs PCA over every
pixel position and takes the spatial L2 norm of each component; the maps are fitted once (public split,
or without one from the clients' summed feature moments, `ClientTeacherSpace`), never per batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import Batch, ClientRound, LossTerm, Outputs
from mmfed.algorithms.teacher_space import TeacherView, normalized
from mmfed.config import check_choice, check_positive, register
from mmfed.models.multimodal import MultimodalModel
from mmfed.teacher.features import caption_key
from mmfed.utils.seeding import torch_generator

MODES = ("cached", "conditioned")
NORMALIZERS = ("mean_distance", "none")
DISTANCES = ("cosine", "l2")
MODALITIES = ("image", "text")


def tdcl_loss(
    z: torch.Tensor,
    reps: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    normalizer: str = "mean_distance",
) -> torch.Tensor:
    """Per-sample contrast over each sample's own candidates: z [B, D], reps [B, K, D] (row i: sample
    i's representations under its K candidate prompts), target [B] (which candidate is the positive)
    -> mean loss, in log-sum-exp form and float32 (finite at tau = 0.04 whatever s and z's dtype).

    ``normalizer=mean_distance`` (paper): s(z_i, F_ik) = cos(z_i, F_ik) / U_ik with U_ik the mean over
    the batch's embeddings z_b of the distance ||z_b/|z_b| - F_ik/|F_ik| || (a statistic, no gradient);
    ``none`` (reference code): s = cos.
    """
    zn, rn = normalized(z), normalized(reps)
    cosine = (zn[:, None, :] * rn).sum(-1)  # [B, K]: sample i against its own candidates only
    if normalizer == "mean_distance":
        every = torch.einsum("bd,ikd->bik", zn.detach(), rn.detach())  # [B, B, K]: z_b vs F_ik
        distance = (2 - 2 * every).clamp(min=0).sqrt().mean(dim=0)  # [B, K] = U_ik
        cosine = cosine / distance.clamp(min=1e-6)
    logits = cosine / temperature  # float32 whatever z's dtype: s / tau can exceed fp16's range
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_prob.gather(1, target[:, None]).mean().to(z.dtype)


def candidate_classes(
    labels: torch.Tensor, num_classes: int, negatives: int | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, 1 + k] class indices per sample: its label first, then k distinct other classes
    (all C - 1 when `negatives` is None or >= C - 1, in class order)."""
    count = len(labels)
    others = torch.arange(num_classes).expand(count, num_classes)
    others = others[others != labels[:, None]].view(count, num_classes - 1)  # [B, C-1], label removed
    if negatives is not None and negatives < num_classes - 1:
        scores = torch.rand(count, num_classes - 1, generator=generator)
        others = others.gather(1, scores.argsort(dim=1)[:, :negatives])
    return torch.cat([labels[:, None], others], dim=1)


def consistency_loss(z: torch.Tensor, target: torch.Tensor, distance: str) -> torch.Tensor:
    """NDCR distance between local embeddings [B, D] and teacher targets [B, D]."""
    if distance == "cosine":
        return (1 - (normalized(z) * normalized(target)).sum(-1)).mean()
    return F.mse_loss(z.float(), target.float(), reduction="none").sum(-1).mean()


class _TeacherTerm(LossTerm):
    """Shared plumbing: which modalities, the teacher view, the client's class names."""

    def __init__(
        self,
        weight: float,
        modalities: list[str],
        teacher: Any,
        data: str,
    ) -> None:
        super().__init__(weight)
        for modality in modalities:
            check_choice("modalities", modality, MODALITIES)
        if not modalities:
            raise ValueError("modalities must name at least one of image, text")
        self.modalities = tuple(modalities)
        self.teacher_cfg, self.data_cfg = teacher, data
        self.view: TeacherView | None = None

    def applies_to(self, kind: str, model: MultimodalModel) -> bool:
        uses = {"image": ("image", "paired"), "text": ("text", "paired")}
        return self.weight > 0 and any(kind in uses[m] for m in self.modalities)

    def begin(self, round_: ClientRound) -> None:
        self.view = TeacherView(round_, self.teacher_cfg, self.data_cfg)
        self.kind = round_.kind

    def _sides(self, batch: Batch, out: Outputs) -> list[str]:
        present = {"image": "image_emb" in out, "text": "text_emb" in out}
        return [m for m in self.modalities if present[m]]


@register("loss_term", "tdcl")
class TextDrivenContrastive(_TeacherTerm):
    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.04,  # tau (reference code; the paper gives none)
        normalizer: str = "mean_distance",  # U of the paper; "none": plain cosine (reference code)
        negatives: int | None = None,  # negative classes per sample (None: all C - 1)
        mode: str = "conditioned",  # paper; every preset sets cached (CPU cost, see the docstring)
        condition_scale: float = 1.0,  # conditioned mode: weight of the local feature added to the prompt
        center_classes: bool = False,  # contrast only the prompt-specific part of the representations
        modalities: list[str] = ("image", "text"),
        teacher: Any = None,
        data: str = "",
    ) -> None:
        super().__init__(weight, list(modalities), teacher, data)
        check_positive("temperature", temperature)
        self.center_classes = center_classes
        check_choice("mode", mode, MODES)
        check_choice("normalizer", normalizer, NORMALIZERS)
        self.normalizer = normalizer
        if negatives is not None:
            check_positive("negatives", negatives)
        self.temperature, self.negatives, self.mode, self.condition_scale = (
            temperature,
            negatives,
            mode,
            condition_scale,
        )
        self._prompt_tokens: torch.Tensor | None = None
        self._text_prompts: torch.Tensor | None = None  # [C, D] mapped class-prompt embeddings

    def begin(self, round_: ClientRound) -> None:
        super().begin(round_)
        self._generator = torch_generator(round_.seed, "tdcl-negatives", round_.round, round_.cid)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        assert self.view is not None
        losses: dict[str, torch.Tensor] = {}
        for side in self._sides(batch, out):
            labels = batch.get(f"{side}_labels")
            classes = self.view.image_classes if side == "image" else self.view.text_classes
            if labels is None or len(classes) < 2:
                continue  # unlabelled data (e.g. paired captions without text labels): nothing to contrast
            z = out[f"{side}_emb"]
            candidates = candidate_classes(
                labels.cpu(), len(classes), self.negatives, self._generator
            )  # [B, K]
            if side == "text":
                if self._text_prompts is None:  # the same every step of this client round: map once
                    self._text_prompts = self._centered(
                        self.view.text(self.view.features.prompts(classes))[None]
                    )[0]
                reps = self._text_prompts[candidates]  # [B, K, D]
            elif self.mode == "cached":
                every = self.view.image(
                    self.view.features.images_per_class(batch["ids"], batch["images"].cpu(), classes)
                )  # [B, C, D]
                reps = self._centered(every).gather(1, candidates[..., None].expand(-1, -1, every.shape[-1]))
            else:
                reps = self._centered(self._conditioned(batch, z, candidates, classes))
            target = torch.zeros(len(z), dtype=torch.long, device=z.device)  # the positive is candidate 0
            losses[f"tdcl_{side}"] = self.weight * tdcl_loss(
                z, reps.to(z.device), target, self.temperature, self.normalizer
            )
        return losses

    def _centered(self, reps: torch.Tensor) -> torch.Tensor:
        """[B, K, D] -> the same minus each sample's mean over its K representations, if `center_classes`."""
        return reps - reps.mean(dim=1, keepdim=True) if self.center_classes else reps

    def _conditioned(
        self, batch: Batch, z: torch.Tensor, candidates: torch.Tensor, classes: list[str]
    ) -> torch.Tensor:
        """[B, K, D] U-Net representations under prompt tokens + the local feature (with gradients)."""
        assert self.view is not None
        features = self.view.features
        teacher = features.teacher
        prompts = [features.settings.prompt_template.format(c) for c in classes]
        if self._prompt_tokens is None:
            self._prompt_tokens = teacher.encode_text(prompts).tokens  # [C, L, Dt]
        shift = (
            self.condition_scale * self.view.text_to_teacher(z.float().cpu()) - self.view.text_mean
        )  # [B, Dt]
        reps = []
        for k in range(candidates.shape[1]):
            embeds = self._prompt_tokens[candidates[:, k]] + shift[:, None, :]  # [B, L, Dt]
            pooled = teacher.pool(
                teacher.unet_features(batch["images"].cpu(), batch["ids"], prompt_embeds=embeds)
            )
            reps.append(self.view.image(pooled.float()))
        return torch.stack(reps, dim=1)


@register("loss_term", "ndcr")
class NoiseDrivenConsistency(_TeacherTerm):
    def __init__(
        self,
        weight: float = 1.0,
        distance: str = "l2",  # paper: squared error; "cosine": 1 - cos (our option)
        modalities: list[str] = ("image", "text"),
        teacher: Any = None,
        data: str = "",
    ) -> None:
        super().__init__(weight, list(modalities), teacher, data)
        check_choice("distance", distance, DISTANCES)
        self.distance = distance

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        assert self.view is not None
        losses: dict[str, torch.Tensor] = {}
        for side in self._sides(batch, out):
            z = out[f"{side}_emb"]
            if side == "image":
                captions = batch.get("captions")
                labels = batch.get("image_labels")
                raw = self.view.features.images(
                    batch["ids"],
                    batch["images"].cpu(),
                    captions,
                    None if captions is None else batch["caption_index"].tolist(),
                    labels=None if labels is None else labels.tolist(),
                    classes=self.view.image_classes,
                )
                target = self.view.image(raw)
            else:
                keys = [
                    caption_key(i, int(c)) for i, c in zip(batch["ids"], batch["caption_index"], strict=True)
                ]
                target = self.view.text(self.view.features.texts(keys, batch["captions"]))
            losses[f"ndcr_{side}"] = self.weight * consistency_loss(z, target.to(z.device), self.distance)
        return losses
