"""Samples, data sources, partitions and the federation layout. Knows nothing of federation runtime.

Importing the package registers every data source (``data=synthetic | cifar10 | ... | composite``).
"""

from mmfed.data import sources  # registers the real-data sources
from mmfed.data.samples import LazyImages, MultimodalSplit
from mmfed.data.synthetic import SyntheticWorld

__all__ = ["LazyImages", "MultimodalSplit", "SyntheticWorld", "sources"]
