"""Evaluating a (global or client) model on a split: retrieval both ways and classification.

Keys are flat and stable, e.g. ``retrieval/i2t/R@1``, ``retrieval/rsum``, ``retrieval/1k/rsum`` (when
the split has >= 2 x fold_size images), ``classification/image/acc``, ``classification/text/acc``.
"""

from __future__ import annotations

import torch

from mmfed.config import check_choice, register
from mmfed.data.samples import MultimodalSplit
from mmfed.models.multimodal import MultimodalModel

BACKENDS = ("auto", "torch", "faiss")


@register("evaluation", "default")
class Evaluator:
    def __init__(
        self,
        batch_size: int = 256,
        ks: tuple[int, ...] = (1, 5, 10),
        fold_size: int = 1000,
        chunk_size: int = 256,
        backend: str = "auto",
        selection_metric: str = "retrieval/rsum",
    ) -> None:
        check_choice("backend", backend, BACKENDS)
        self.batch_size, self.ks, self.fold_size = batch_size, tuple(ks), fold_size
        self.chunk_size, self.backend, self.selection_metric = chunk_size, backend, selection_metric

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
        # imported here: torchmetrics imports torchvision, transformers and matplotlib (seconds), which
        # `mmfed config` (it registers this class) should not pay
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
