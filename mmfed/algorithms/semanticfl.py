"""SemanticFL ("Diffusion-Guided Semantic Consistency for Multimodal Heterogeneity", Liu et al.,
arXiv 2603.19337; no public code): the heavy teacher work happens once, on the server; clients run no
diffusion model.

Paper -> code:
- "multi-layer SD representations including VAE-encoded latents and U-Net hierarchical features"
  -> ``image_source=both`` (default): the pooled U-Net decoder blocks (``teacher.up_blocks``) and the
  flattened VAE posterior-mean latents of each public image, concatenated, each source scaled to unit
  mean centred squared norm (so neither dominates by magnitude; `teacher_space._source_scales`) and
  mapped by one map into the shared latent space. ``unet`` / ``latents``: one source only (options).
- "a shared semantic space that aligns heterogeneous clients" -> the teacher-space maps (text PCA of
  the public captions and class prompts; image features ridge-mapped into it), fitted once
  (teacher_space.py), and the anchors below, all in that space.
- "offloads heavy computation to the server" -> `SemanticAnchors` runs the teacher on the public split
  and the class prompts (through the persistent cache: each row and prompt once per run family) and
  sends each client every round:
  * class anchors: the mapped text-encoder embeddings of the class prompts of both label sets, with
    the class names they belong to (``anchors/*_class_names``): a client matches its own labels to
    them **by class name** (its split's class list need not be the public split's, nor in its order);
    a client class without an anchor is one error naming the client and the classes;
  * public anchors for this round's public sample: the mapped teacher image features of each row and
    the mapped text features of its chosen caption.
- "a unified consistency mechanism, employing cross-modal contrastive learning" ->
  `SemanticConsistency`: a labelled embedding against the class anchors (InfoNCE over classes, the
  positive its own class prompt), and on the public batch each image embedding against the text
  anchors of the batch and each text embedding against the image anchors (InfoNCE, the positive the
  same row), so both modalities are pulled into the teacher's one space.

The paper gives no equations or hyper-parameters for these; ours (options): ``temperature`` 0.1,
``class_weight`` 1, ``public_weight`` 1, ``public_per_round`` 500, ``image_reduction`` ridge (pca),
``anchor_dtype`` float16.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F

from mmfed.algorithms.base import (
    PUBLIC_CAPTIONS,
    PUBLIC_INDICES,
    Batch,
    ClientRound,
    LossTerm,
    Outputs,
    ServerRound,
    draw_public_sample,
)
from mmfed.algorithms.teacher_space import TeacherSpace, image_features, normalized
from mmfed.config import check_positive, register
from mmfed.data.layout import ClientSpec
from mmfed.models.multimodal import MultimodalModel
from mmfed.protocol import Payload, encode_tensors
from mmfed.teacher.features import caption_key

IMAGE_CLASS_ANCHORS = "anchors/image_classes"  # [C_img, D]
TEXT_CLASS_ANCHORS = "anchors/text_classes"  # [C_txt, D]
PUBLIC_IMAGE_ANCHORS = "anchors/public_image"  # [N, D]: teacher image features of the public sample
PUBLIC_TEXT_ANCHORS = "anchors/public_text"  # [N, D]: teacher text features of its chosen captions
CLASS_NAMES = {
    IMAGE_CLASS_ANCHORS: "anchors/image_class_names",
    TEXT_CLASS_ANCHORS: "anchors/text_class_names",
}


@register("server_step", "semantic_anchors")
class SemanticAnchors(TeacherSpace):
    def __init__(
        self,
        teacher: Any = None,
        data: str = "",
        public_per_round: int = 500,
        image_reduction: str = "ridge",
        image_source: str = "both",  # paper: VAE latents and U-Net features | unet | latents
        fit_rows: int | None = 2000,
        ridge: float = 1e-2,
        image_classes: list[str] | None = None,
        text_classes: list[str] | None = None,
        anchor_dtype: str = "float16",
    ) -> None:
        super().__init__(
            teacher, data, image_reduction, image_source, fit_rows, ridge, image_classes, text_classes
        )
        check_positive("public_per_round", public_per_round)
        self.public_per_round, self.anchor_dtype = public_per_round, anchor_dtype
        self._round: tuple[int, dict[str, torch.Tensor]] | None = None

    def _anchors(self, round_: ServerRound) -> dict[str, torch.Tensor]:
        """This round's anchors, computed once per round (the teacher features come from the cache)."""
        if self._round is not None and self._round[0] == round_.round:
            return self._round[1]
        self.fit(round_)
        assert self.text_map is not None and self.image_map is not None and round_.public is not None
        public, feats = round_.public, self.features
        indices, choice, texts = draw_public_sample(round_, self.public_per_round, "semantic_anchors")
        rows = indices.tolist()
        anchors: dict[str, torch.Tensor] = {PUBLIC_INDICES: indices, PUBLIC_CAPTIONS: choice}
        image_cls, text_cls = self.classes(public)
        if image_cls:
            anchors[IMAGE_CLASS_ANCHORS] = self.text_map.apply(feats.prompts(image_cls))
        if text_cls:
            anchors[TEXT_CLASS_ANCHORS] = self.text_map.apply(feats.prompts(text_cls))
        anchors[PUBLIC_IMAGE_ANCHORS] = self.image_map.apply(
            image_features(feats, self.image_source, public, rows)
        )
        keys = [
            caption_key(public.ids[r], c % len(public.captions[r]))  # type: ignore[index]
            for r, c in zip(rows, choice.tolist(), strict=True)
        ]
        anchors[PUBLIC_TEXT_ANCHORS] = self.text_map.apply(feats.texts(keys, texts))
        self._round = (round_.round, anchors)
        return anchors

    def broadcast(self, round_: ServerRound, client: ClientSpec) -> Payload:
        payload = super().broadcast(round_, client)
        if round_.stage != "fit":
            return payload
        anchors = self._anchors(round_)
        payload.tensors.update(
            encode_tensors({k: v for k, v in anchors.items() if k.startswith("anchors/")}, self.anchor_dtype)
        )
        payload.tensors.update(
            {PUBLIC_INDICES: anchors[PUBLIC_INDICES], PUBLIC_CAPTIONS: anchors[PUBLIC_CAPTIONS]}
        )
        image_cls, text_cls = self.classes(round_.public)
        for key, names in ((IMAGE_CLASS_ANCHORS, image_cls), (TEXT_CLASS_ANCHORS, text_cls)):
            if names:  # which class each anchor row is: clients match their labels by name, not index
                payload.config[CLASS_NAMES[key]] = json.dumps(list(names))
        return payload


def anchor_nce(
    z: torch.Tensor, anchors: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE of embeddings [B, D] against anchors [A, D]; target [B] indexes each one's positive anchor."""
    logits = normalized(z) @ normalized(anchors).T / temperature  # [B, A]
    return F.cross_entropy(logits, target)


def anchor_rows(cid: str, key: str, classes: list[str], config: dict) -> torch.Tensor:
    """[C_client] int64: the anchor row of each of the client's classes, matched by class name.

    A client's label indexes its own split's class list, which need not be the public split's (another
    dataset, another order); a class with no anchor is an error naming the client and the classes.
    """
    names = json.loads(config.get(CLASS_NAMES[key], "[]"))
    where = {name: row for row, name in enumerate(names)}
    missing = [c for c in classes if c not in where]
    if missing:
        side = key.rsplit("_", 1)[0].split("/")[-1]
        raise ValueError(
            f"client {cid}: {side} classes {missing} have no class anchor (the server's anchors name "
            f"{names or 'no classes'}; set algorithm.server_steps.anchors.{side}_classes or "
            "algorithm.loss_terms.semantic.class_weight=0)"
        )
    return torch.tensor([where[c] for c in classes], dtype=torch.long)


@register("loss_term", "semantic_consistency")
class SemanticConsistency(LossTerm):
    uses_public = True

    def __init__(
        self,
        weight: float = 1.0,
        temperature: float = 0.1,
        class_weight: float = 1.0,  # labelled embeddings vs the class-prompt anchors
        public_weight: float = 1.0,  # public embeddings vs the other modality's public anchors
    ) -> None:
        super().__init__(weight)
        check_positive("temperature", temperature)
        self.temperature, self.class_weight, self.public_weight = temperature, class_weight, public_weight

    def begin(self, round_: ClientRound) -> None:
        tensors = round_.payload.tensors
        if PUBLIC_IMAGE_ANCHORS not in tensors:
            raise ValueError(
                "semantic_consistency needs the server step semantic_anchors in algorithm.server_steps"
            )
        self.anchors = {k: v.float() for k, v in tensors.items() if k.startswith("anchors/")}
        self.rows: dict[str, torch.Tensor] = {}  # the client's label -> its class's anchor row
        if self.class_weight > 0:
            own = {IMAGE_CLASS_ANCHORS: round_.image_classes, TEXT_CLASS_ANCHORS: round_.text_classes}
            sides = {IMAGE_CLASS_ANCHORS: ("image", "paired"), TEXT_CLASS_ANCHORS: ("text", "paired")}
            for key, classes in own.items():
                if classes and round_.kind in sides[key]:  # the modalities this client embeds
                    self.rows[key] = anchor_rows(round_.cid, key, classes, round_.payload.config)

    def forward(self, batch: Batch, out: Outputs, model: MultimodalModel) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        device = next(iter(out.values())).device
        if self.class_weight > 0:
            for side, key in (("image", IMAGE_CLASS_ANCHORS), ("text", TEXT_CLASS_ANCHORS)):
                labels = batch.get(f"{side}_labels")
                if f"{side}_emb" in out and labels is not None and key in self.rows:
                    target = self.rows[key].to(labels.device)[labels]
                    loss = anchor_nce(
                        out[f"{side}_emb"], self.anchors[key].to(device), target.to(device), self.temperature
                    )
                    losses[f"semantic_class_{side}"] = self.weight * self.class_weight * loss
        positions = batch.get("public_positions")
        if self.public_weight > 0 and positions is not None:
            target = torch.arange(len(positions), device=device)
            for side, other in (("image", PUBLIC_TEXT_ANCHORS), ("text", PUBLIC_IMAGE_ANCHORS)):
                if f"public_{side}_emb" in out:
                    anchors = self.anchors[other][positions].to(device)
                    loss = anchor_nce(out[f"public_{side}_emb"], anchors, target, self.temperature)
                    losses[f"semantic_public_{side}"] = self.weight * self.public_weight * loss
        return losses
