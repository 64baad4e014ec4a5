"""Evaluation metrics: image<->text retrieval recall and classification accuracy.

Never imports mmfed.federation or mmfed.algorithms, so both can depend on it. Names load on first
use (PEP 562): `mmfed.metrics.chance` needs no torch, the functions need torch only, and the
stateful metrics (`mmfed.metrics.stateful`) need torchmetrics, which costs seconds to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DEFAULT_KS": "retrieval",
    "retrieval_protocol": "retrieval",
    "retrieval_recall": "retrieval",
    "classification_accuracy": "classification",
    "ClassificationAccuracy": "stateful",
    "RetrievalRecall": "stateful",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'mmfed.metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"mmfed.metrics.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
