"""Samples, data sources, partitions and the federation layout. Knows nothing of federation runtime.

Importing the package imports none of its modules: `partition` and `layout` import no torch, so the
composition (`mmfed config`) builds a config's partitioner and layout to check them without importing
torch, PIL or the sources. ``mmfed.data.sources`` registers the real-data sources when imported
(``data=cifar10 | ... | composite``); the names below are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LazyImages": "mmfed.data.samples",
    "MultimodalSplit": "mmfed.data.samples",
    "SyntheticWorld": "mmfed.data.synthetic",
}

__all__ = ["LazyImages", "MultimodalSplit", "SyntheticWorld", "sources"]


def __getattr__(name: str) -> Any:
    """``mmfed.data.MultimodalSplit`` and friends, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "sources":
        return importlib.import_module("mmfed.data.sources")
    raise AttributeError(f"module 'mmfed.data' has no attribute {name!r}")
