"""The mergeable (stateful) metrics, on torchmetrics: `RetrievalRecall` and `ClassificationAccuracy`.

Why a module apart: torchmetrics imports torchvision and transformers (seconds), and a run's
evaluation needs only the functions in `retrieval` and `classification`; this module, and with it
torchmetrics, loads only when a stateful metric is asked for (``from mmfed.metrics import ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.utilities.data import dim_zero_cat

from mmfed.metrics.classification import check_accuracy_inputs, check_num_classes
from mmfed.metrics.retrieval import (
    DEFAULT_KS,
    Backend,
    _check_inputs,
    _check_ks,
    _check_positive_int,
    _resolve_backend,
    retrieval_protocol,
)

__all__ = ["ClassificationAccuracy", "RetrievalRecall"]


class RetrievalRecall(Metric):
    """Stateful, mergeable `retrieval_protocol`, for federated evaluation.

    `update` only stores embeddings; `compute` ranks everything at once, because recall over a
    gallery cannot be accumulated from per-batch recalls. The states are "cat" lists, so metrics
    of different clients merge with `merge_state` (or sync across processes) by concatenation.

    text_to_image in each `update` indexes that update's own images (0 .. n_img-1). The indices
    are stored as given, with each update's (n_img, n_txt) in the `update_sizes` state, and are
    offset in `compute`: an offset applied in `update` would count only this metric's own
    images and go wrong once another client's state is concatenated in front of it. Captions must
    therefore arrive in the same update as their images. `merge_state` puts the incoming state
    first; the image order matters only to the 1K folds.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_emb: list[Tensor]
    text_emb: list[Tensor]
    text_to_image: list[Tensor]
    update_sizes: list[Tensor]

    def __init__(
        self,
        ks: Sequence[int] = DEFAULT_KS,
        fold_size: int = 1000,
        chunk_size: int = 256,
        backend: Backend = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks)
        self.fold_size = _check_positive_int("fold_size", fold_size)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        _resolve_backend(backend)
        self.backend: Backend = backend
        self.add_state("image_emb", default=[], dist_reduce_fx="cat")  # [n_img, D] per update
        self.add_state("text_emb", default=[], dist_reduce_fx="cat")  # [n_txt, D] per update
        self.add_state("text_to_image", default=[], dist_reduce_fx="cat")  # [n_txt], update-local
        self.add_state("update_sizes", default=[], dist_reduce_fx="cat")  # [1, 2] = (n_img, n_txt)

    def update(self, image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor) -> None:
        """Store one batch; text_to_image indexes this batch's images."""
        _check_inputs(image_emb, text_emb, text_to_image)
        self.image_emb.append(image_emb.detach())
        self.text_emb.append(text_emb.detach())
        self.text_to_image.append(text_to_image.detach().long())
        sizes = [[image_emb.shape[0], text_emb.shape[0]]]
        self.update_sizes.append(torch.tensor(sizes, dtype=torch.long, device=image_emb.device))

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' merge_state keeps a value cached by an earlier compute(); drop it."""
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> dict[str, float]:
        """`retrieval_protocol` over everything stored (and merged in)."""
        images = dim_zero_cat(self.image_emb)  # [N_img, D]
        texts = dim_zero_cat(self.text_emb).to(images.device)  # [N_txt, D]
        local_t2i = dim_zero_cat(self.text_to_image).to(images.device)  # [N_txt]
        sizes = dim_zero_cat(self.update_sizes).to(images.device).reshape(-1, 2)  # [U, 2]
        if int(sizes[:, 0].sum()) != images.shape[0] or int(sizes[:, 1].sum()) != texts.shape[0]:
            raise ValueError(
                f"update_sizes totals {sizes.sum(0).tolist()} do not match the stored "
                f"{images.shape[0]} images / {texts.shape[0]} captions; states were merged inconsistently"
            )
        image_offsets = torch.cumsum(sizes[:, 0], 0) - sizes[:, 0]  # [U]
        t2i = local_t2i + torch.repeat_interleave(image_offsets, sizes[:, 1])  # [N_txt]
        return retrieval_protocol(
            images,
            texts,
            t2i,
            ks=self.ks,
            fold_size=self.fold_size,
            chunk_size=self.chunk_size,
            backend=self.backend,
        )


class ClassificationAccuracy(MulticlassAccuracy):
    """Stateful top-1, micro-averaged accuracy in percent; mergeable like any torchmetrics sum state.

    `compute` returns a 0-d tensor (the torchmetrics convention, so it logs and collects like the
    other torchmetrics metrics) holding the percentage.
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        check_num_classes(num_classes)
        super().__init__(num_classes=num_classes, top_k=1, average="micro", **kwargs)

    def update(self, logits_or_preds: Tensor, target: Tensor) -> None:
        """Accumulate one batch: logits [N, C] or labels [N], with target [N]."""
        check_accuracy_inputs(logits_or_preds, target, self.num_classes)
        super().update(logits_or_preds, target)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' merge_state keeps a value cached by an earlier compute(); drop it."""
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> Tensor:
        """Accuracy in percent."""
        return super().compute() * 100.0
