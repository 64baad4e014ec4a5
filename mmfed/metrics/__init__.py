"""Evaluation metrics: image<->text retrieval recall and classification accuracy.

Never imports mmfed.federation or mmfed.algorithms, so both can depend on it.
"""

from mmfed.metrics.classification import ClassificationAccuracy, classification_accuracy
from mmfed.metrics.retrieval import DEFAULT_KS, RetrievalRecall, retrieval_protocol, retrieval_recall

__all__ = [
    "DEFAULT_KS",
    "ClassificationAccuracy",
    "RetrievalRecall",
    "classification_accuracy",
    "retrieval_protocol",
    "retrieval_recall",
]
