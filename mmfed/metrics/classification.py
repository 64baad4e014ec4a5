"""Top-1 classification accuracy in percent, in plain torch.

Why not torchmetrics here: micro top-1 accuracy is an argmax and a mean, and importing torchmetrics
costs seconds (it imports torchvision and transformers), which every run paid at its first evaluation.
`tests/metrics/test_classification.py` checks this function against torchmetrics'
`multiclass_accuracy`; the mergeable `ClassificationAccuracy` stays on torchmetrics, in
`mmfed.metrics.stateful`. Every mmfed metric reports percent (0-100) so that retrieval and
classification numbers sit on one scale in logs; inputs are checked up front with one ValueError
naming the bad argument.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["check_accuracy_inputs", "check_num_classes", "classification_accuracy"]


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} is invalid; expected an int >= 2")
    return num_classes


def check_accuracy_inputs(preds: Tensor, target: Tensor, num_classes: int) -> None:
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
    check_num_classes(num_classes)
    check_accuracy_inputs(logits_or_preds, target, num_classes)
    preds = logits_or_preds.argmax(dim=1) if logits_or_preds.ndim == target.ndim + 1 else logits_or_preds
    return 100.0 * float((preds == target).sum()) / target.numel()
