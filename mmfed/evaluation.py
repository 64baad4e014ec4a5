"""Evaluating a (global or client) model on a split: retrieval both ways and classification.

Keys are flat and stable, e.g. ``retrieval/i2t/R@1``, ``retrieval/rsum``, ``retrieval/1k/rsum`` (when
the split has >= 2 x fold_size images), ``classification/image/acc``, ``classification/text/acc``.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from mmfed.config import register
from mmfed.console import bar_disabled
from mmfed.data.samples import MultimodalSplit
from mmfed.data.sources.protocols import Protocol
from mmfed.models.multimodal import MultimodalModel
from mmfed.settings import BACKENDS, EvaluatorBase  # noqa: F401  (BACKENDS: this module's API too)


@register("evaluation", "default")
class Evaluator(EvaluatorBase):
    """Embeds a split with a model and scores it (`EvaluatorBase`: the signature, i.e. the
    ``evaluation`` config group, and its checks, torch-free so that `mmfed config` checks them)."""

    @torch.no_grad()
    def embed_images(self, model: MultimodalModel, split: MultimodalSplit) -> torch.Tensor:
        return torch.cat(
            [
                model.encode_images(split.images[i : i + self.batch_size]).float().cpu()
                for i in range(0, len(split), self.batch_size)
            ]
        )  # [N, D]

    @torch.no_grad()
    def embed_texts(self, model: MultimodalModel, texts: list[str]) -> torch.Tensor:
        return torch.cat(
            [
                model.encode_texts(texts[i : i + self.batch_size]).float().cpu()
                for i in range(0, len(texts), self.batch_size)
            ]
        )  # [N_captions, D]

    @torch.no_grad()
    def evaluate(self, model: MultimodalModel, split: MultimodalSplit) -> dict[str, float]:
        # imported here: `mmfed config` registers this class and needs no metric (plain torch, no
        # torchmetrics: see mmfed.metrics.classification)
        from mmfed.metrics import classification_accuracy, retrieval_protocol

        was_training = model.training
        model.eval()
        results: dict[str, float] = {}
        image_emb = (
            self.embed_images(model, split)
            if model.has("image_encoder") and split.images is not None
            else None
        )
        text_emb = texts = None
        if model.has("text_encoder") and split.captions is not None:
            texts, text_rows, text_labels = split.flat_captions()
            text_emb = self.embed_texts(model, texts)
        if image_emb is not None and text_emb is not None:
            scores = retrieval_protocol(
                image_emb,
                text_emb,
                text_rows,
                ks=self.ks,
                fold_size=self.fold_size,
                chunk_size=self.chunk_size,
                backend=self.backend,
            )
            results.update({f"retrieval/{k}": v for k, v in scores.items()})
        if image_emb is not None and model.has("image_head") and split.image_labels is not None:
            logits = model.image_head(image_emb.to(model.device)).cpu()
            results["classification/image/acc"] = classification_accuracy(
                logits, split.image_labels, len(split.image_classes)
            )
        if text_emb is not None and model.has("text_head") and split.text_labels is not None:
            logits = model.text_head(text_emb.to(model.device)).cpu()
            results["classification/text/acc"] = classification_accuracy(
                logits, text_labels, len(split.text_classes)
            )
        model.train(was_training)
        return results


# ---------------------------------------------------------------- named test protocols
# (here, below federation.run, which evaluates a composite world's protocols after training; the
# `mmfed eval` command in eval_protocols.py uses them on a finished run's checkpoint)
@torch.no_grad()
def encode(
    model: Any, split: MultimodalSplit, batch_size: int = 256, progress: bool = False
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(image embeddings [N, D] | None, caption embeddings [M, D] | None, caption -> row, caption label).

    Images are decoded a batch at a time (`split.images[i : i + batch_size]`), so a lazy column is
    never decoded whole; the bars show encoding progress.
    """
    image_emb = text_emb = None
    if split.images is not None and model.has("image_encoder"):
        starts = range(0, len(split), batch_size)
        bar = tqdm(starts, desc=f"encoding {split.name} images", unit="batch", disable=bar_disabled(progress))
        image_emb = torch.cat(
            [model.encode_images(split.images[i : i + batch_size]).float().cpu() for i in bar]
        )
    rows = labels = torch.zeros(0, dtype=torch.int64)
    if split.captions is not None and model.has("text_encoder"):
        texts, rows, labels = split.flat_captions()
        starts = range(0, len(texts), batch_size)
        bar = tqdm(
            starts, desc=f"encoding {split.name} captions", unit="batch", disable=bar_disabled(progress)
        )
        text_emb = torch.cat([model.encode_texts(texts[i : i + batch_size]).float().cpu() for i in bar])
    return image_emb, text_emb, rows, labels


def _accuracy(
    model: Any, head: str, emb: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str
) -> float:
    """Top-1 accuracy of `head` on `emb`; a head trained for another class count is an error."""
    layer = getattr(model, head)
    if layer.out_features != len(classes):
        raise ValueError(
            f"protocol {name}: the model's {head} predicts {layer.out_features} classes, the dataset has "
            f"{len(classes)}; evaluate a run trained on this dataset"
        )
    from mmfed.metrics import classification_accuracy

    return classification_accuracy(layer(emb.to(model.device)).cpu(), labels, len(classes))


def evaluate_protocol(
    model: Any,
    protocol: Protocol,
    split: MultimodalSplit,
    *,
    batch_size: int = 256,
    fold_size: int | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk_size: int = 256,
    backend: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of `model` on `split` under `protocol`, plus the sizes they were computed on.

    Keys are flat as in summary.json: ``retrieval/i2t/R@1`` ... ``retrieval/rsum``,
    ``retrieval/rsum@1``, ``classification/image/acc`` / ``classification/text/acc``. For a folded
    protocol (``fold_size``, 1,000 for coco-1k unless overridden) the retrieval keys are the means
    over the folds; images past the last whole fold are left out (and counted).
    """
    was_training = model.training
    model.eval()
    try:
        image_emb, text_emb, rows, labels = encode(model, split, batch_size, progress)
    finally:
        model.train(was_training)
    out: dict[str, Any] = {"images": len(split), "captions": int(rows.numel())}
    metrics: dict[str, float] = {}
    if protocol.task == "retrieval":
        if image_emb is None or text_emb is None:
            raise ValueError(
                f"protocol {protocol.name} needs images and captions and a model with both encoders; "
                f"split '{split.name}' / the model lack one"
            )
        folds = fold_size or protocol.fold_size
        n = image_emb.shape[0]
        if folds is not None and n < 2 * folds:
            raise ValueError(
                f"protocol {protocol.name}: split '{split.name}' has {n} images, fewer than two folds of "
                f"fold_size={folds}; use a smaller fold_size"
            )
        from mmfed.metrics import retrieval_protocol

        scores = retrieval_protocol(
            image_emb, text_emb, rows, ks=ks, fold_size=folds or n + 1, chunk_size=chunk_size, backend=backend
        )
        prefix = "1k/" if folds is not None else ""
        metrics.update(
            {f"retrieval/{k[len(prefix) :]}": v for k, v in scores.items() if k.startswith(prefix)}
        )
        if folds is not None:
            out.update(fold_size=folds, folds=n // folds, images_left_out=n - (n // folds) * folds)
    else:
        if image_emb is not None and split.image_labels is not None and model.has("image_head"):
            acc = _accuracy(
                model, "image_head", image_emb, split.image_labels, split.image_classes, protocol.name
            )
            metrics["classification/image/acc"] = acc
        if text_emb is not None and split.text_labels is not None and model.has("text_head"):
            metrics["classification/text/acc"] = _accuracy(
                model, "text_head", text_emb, labels, split.text_classes, protocol.name
            )
        if not metrics:
            raise ValueError(
                f"protocol {protocol.name}: the model has no head for split '{split.name}' "
                "(an image_head for image labels, a text_head for text labels)"
            )
    out["metrics"] = metrics
    return out
