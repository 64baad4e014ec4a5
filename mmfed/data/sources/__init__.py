"""Real datasets, each registered as a ``data=<name>`` config: see ``data_recipes/`` for what to put where.

| name | dataset | splits |
| --- | --- | --- |
| ``cifar10`` / ``cifar100`` | CIFAR (pickle batches or hub) | train / val (held out) / test |
| ``tiny_imagenet`` | Tiny-ImageNet (folders or hub) | train / val (held out) / test (official val) |
| ``agnews`` | AG News (CSV or hub) | train / val (held out) / test |
| ``flickr30k`` / ``coco`` | Karpathy splits (JSON + images, or hub) | train / val / test |
| ``coco_public`` | a seeded subset of COCO training pairs | public |
| ``composite`` | one source per client kind, public data, evaluation sets | see composite.py |
"""

from mmfed.data.sources.agnews import AgNews
from mmfed.data.sources.base import DataNotFoundError, DataSource
from mmfed.data.sources.cifar import Cifar10, Cifar100
from mmfed.data.sources.composite import CompositeSource
from mmfed.data.sources.karpathy import Coco, CocoPublic, Flickr30k, KarpathySource
from mmfed.data.sources.protocols import PROTOCOLS, Protocol, get_protocol
from mmfed.data.sources.tiny_imagenet import TinyImageNet

__all__ = [
    "PROTOCOLS",
    "AgNews",
    "Cifar10",
    "Cifar100",
    "Coco",
    "CocoPublic",
    "CompositeSource",
    "DataNotFoundError",
    "DataSource",
    "Flickr30k",
    "KarpathySource",
    "Protocol",
    "TinyImageNet",
    "get_protocol",
]
