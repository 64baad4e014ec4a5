"""Top-1 classification accuracy in percent, on top of torchmetrics.

Why wrap torchmetrics at all: every mmfed metric reports percent (0-100) so that retrieval and
classification numbers sit on one scale in logs, and inputs are checked up front with one
ValueError naming the bad argument instead of torchmetrics' mix of error types.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.functional.classification import multiclass_accuracy

__all__ = ["ClassificationAccuracy", "classification_accuracy"]


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is invalid; expected an int >= 2")
    return num_classes


def _check_inputs(preds: Tensor, target: Tensor, num_classes: int) -> None:
    """Accept logits/probabilities [N, C, ...] or labels [N, ...] with target [N, ...]."""
    if not isinstance(preds, Tensor) or not isinstance(target, Tensor):
        raise ValueError(
            f"logits_or_preds and target must be tensors; got {type(preds).__name__}, {type(target).__name__}"
        )
    if target.is_floating_point() or target.is_complex() or target.ndim == 0:
        raise ValueError(
            f"target (dtype={target.dtype}, ndim={target.ndim}) is invalid; expected integer labels [N]"
        )
    if preds.ndim == target.ndim + 1:
        expected = (target.shape[0], num_classes, *target.shape[1:])
        if tuple(preds.shape) != expected:
            raise ValueError(
                f"logits shape {tuple(preds.shape)} does not match target shape {tuple(target.shape)} "
                f"with num_classes={num_classes}; expected {expected}"
            )
    elif preds.ndim == target.ndim:
        if preds.shape != target.shape:
            raise ValueError(
                f"preds shape {tuple(preds.shape)} does not match target shape {tuple(target.shape)}; "
                "expected equal shapes for label predictions"
            )
        if preds.is_floating_point() or preds.is_complex():
            raise ValueError(f"preds.dtype={preds.dtype} is invalid for label predictions; expected integers")
        _check_label_range("preds", preds, num_classes)
    else:
        raise ValueError(
            f"logits_or_preds ndim={preds.ndim} and target ndim={target.ndim} are incompatible; "
            "expected preds ndim == target ndim (labels) or target ndim + 1 (logits)"
        )
    if target.numel() == 0:
        raise ValueError(f"target.shape={tuple(target.shape)} is empty; expected >= 1 sample")
    _check_label_range("target", target, num_classes)


def _check_label_range(name: str, labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name} values span [{int(labels.min())}, {int(labels.max())}]; "
            f"expected class indices in [0, {num_classes})"
        )


def classification_accuracy(logits_or_preds: Tensor, target: Tensor, num_classes: int) -> float:
    """Top-1 accuracy in percent (0-100), micro-averaged (fraction of correct samples).

    Args:
        logits_or_preds: logits or probabilities [N, C] (argmax is taken) or labels [N].
        target: integer labels [N].
        num_classes: C.
    """
    _check_num_classes(num_classes)
    _check_inputs(logits_or_preds, target, num_classes)
    acc = multiclass_accuracy(logits_or_preds, target, num_classes=num_classes, average="micro", top_k=1)
    return 100.0 * float(acc)


class ClassificationAccuracy(MulticlassAccuracy):
    """Stateful top-1, micro-averaged accuracy in percent; mergeable like any torchmetrics sum state.

    `compute` returns a 0-d tensor (the torchmetrics convention, so it logs and collects like the
    other torchmetrics metrics) holding the percentage.
    """

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        _check_num_classes(num_classes)
        super().__init__(num_classes=num_classes, top_k=1, average="micro", **kwargs)

    def update(self, logits_or_preds: Tensor, target: Tensor) -> None:
        """Accumulate one batch: logits [N, C] or labels [N], with target [N]."""
        _check_inputs(logits_or_preds, target, self.num_classes)
        super().update(logits_or_preds, target)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """torchmetrics' merge_state keeps a value cached by an earlier compute(); drop it."""
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> Tensor:
        """Accuracy in percent."""
        return super().compute() * 100.0
