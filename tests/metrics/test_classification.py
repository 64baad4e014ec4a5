"""Classification accuracy in percent: hand-computed values, torchmetrics agreement, input validation."""

from __future__ import annotations

import pytest
import torch

import mmfed  # noqa: F401  (before torchmetrics: installs the torchvision import guard)
from mmfed.metrics import ClassificationAccuracy, classification_accuracy

LOGITS = torch.tensor(
    [
        [2.0, 1.0, 0.0],  # -> 0, target 0: correct
        [0.0, 1.0, 3.0],  # -> 2, target 2: correct
        [1.0, 0.0, 0.5],  # -> 0, target 1: wrong
        [0.0, 2.0, 1.0],  # -> 1, target 1: correct
    ]
)
TARGET = torch.tensor([0, 2, 1, 1])


def test_accuracy_from_logits() -> None:
    assert classification_accuracy(LOGITS, TARGET, num_classes=3) == pytest.approx(75.0)


def test_accuracy_from_probabilities_and_labels() -> None:
    assert classification_accuracy(LOGITS.softmax(dim=1), TARGET, 3) == pytest.approx(75.0)
    preds = torch.tensor([0, 1, 1, 3, 3])
    target = torch.tensor([0, 1, 2, 2, 3])
    assert classification_accuracy(preds, target, num_classes=4) == pytest.approx(60.0)


def test_accuracy_is_micro_averaged() -> None:
    # class 0: 3/3 correct, class 1: 0/1 -> micro 75 %, macro would be 50 %
    preds = torch.tensor([0, 0, 0, 0])
    target = torch.tensor([0, 0, 0, 1])
    assert classification_accuracy(preds, target, num_classes=2) == pytest.approx(75.0)


@pytest.mark.parametrize("shape", [(50, 7), (20, 4, 3)])
def test_plain_torch_accuracy_equals_torchmetrics(shape: tuple[int, ...]) -> None:
    """The few lines of torch give torchmetrics' micro top-1 accuracy, ties included (small integer
    logits tie often; both take the first maximal class)."""
    from torchmetrics.functional.classification import multiclass_accuracy

    generator = torch.Generator().manual_seed(0)
    classes = shape[1]
    target_shape = (shape[0], *shape[2:])
    for trial in range(20):
        logits = torch.randint(0, 3, shape, generator=generator).float()  # many ties
        if trial % 2:
            logits = torch.randn(shape, generator=generator).softmax(dim=1)
        target = torch.randint(0, classes, target_shape, generator=generator)
        labels = logits.argmax(dim=1)
        for preds in (logits, labels):
            expected = 100.0 * float(multiclass_accuracy(preds, target, classes, average="micro", top_k=1))
            ours = classification_accuracy(preds, target, classes)
            assert ours == pytest.approx(expected, abs=1e-4)  # theirs is fp32


def test_stateful_accuracy_accumulates_and_merges() -> None:
    metric = ClassificationAccuracy(num_classes=3)
    metric.update(LOGITS[:2], TARGET[:2])  # 2/2
    metric.update(LOGITS[2:], TARGET[2:])  # 1/2
    assert float(metric.compute()) == pytest.approx(75.0)

    other = ClassificationAccuracy(num_classes=3)
    other.update(torch.tensor([1, 1, 1, 1]), torch.tensor([0, 0, 0, 1]))  # 1/4
    metric.merge_state(other)
    assert float(metric.compute()) == pytest.approx(50.0)  # 4 / 8

    metric.reset()
    metric.update(torch.tensor([2]), torch.tensor([2]))
    assert float(metric.compute()) == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("preds", "target", "num_classes", "match"),
    [
        (LOGITS, TARGET[:3], 3, r"logits shape \(4, 3\) does not match target shape \(3,\)"),
        (LOGITS, TARGET, 4, r"num_classes=4"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 3, r"preds shape \(2,\) does not match"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3, r"preds.dtype"),
        (LOGITS[None], TARGET, 3, r"ndim=3 and target ndim=1"),
        (LOGITS, torch.tensor([0, 1, 3, 1]), 3, r"target values span \[0, 3\]"),
        (torch.tensor([0, 5]), torch.tensor([0, 1]), 3, r"preds values span \[0, 5\]"),
        (LOGITS, TARGET.float(), 3, r"target \(dtype=torch.float32"),
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 3, r"empty"),
        (LOGITS, TARGET, 1, r"num_classes=1 is invalid"),
    ],
)
def test_validation_errors(preds: torch.Tensor, target: torch.Tensor, num_classes: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_accuracy(preds, target, num_classes)


def test_stateful_validation_errors() -> None:
    with pytest.raises(ValueError, match="num_classes=0"):
        ClassificationAccuracy(num_classes=0)
    metric = ClassificationAccuracy(num_classes=3)
    with pytest.raises(ValueError, match="does not match"):
        metric.update(LOGITS, TARGET[:2])
