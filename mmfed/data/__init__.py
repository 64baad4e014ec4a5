"""Samples, data sources, partitions and the federation layout. Knows nothing of federation runtime."""

from mmfed.data.samples import MultimodalSplit
from mmfed.data.synthetic import SyntheticWorld

__all__ = ["MultimodalSplit", "SyntheticWorld"]
