"""The named evaluation protocols: which dataset, which split, which metric.

Data only (no model code), so data sources can validate protocol names and `mmfed.eval_protocols`
can run them. Retrieval protocols report R@1/5/10 both ways, RSum and RSum@1; ``fold_size`` makes
it the 1K protocol: the split's images in contiguous folds of ``fold_size`` (each with its
captions), recall computed within each fold and averaged (COCO 5K test -> five folds of 1,000
images / 5,000 captions).
"""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("retrieval", "classification")


@dataclass(frozen=True)
class Protocol:
    name: str
    dataset: str  # the registered data source holding it (config name, e.g. "coco")
    split: str
    task: str  # one of TASKS
    fold_size: int | None = None  # retrieval averaged over folds of this many images (1K protocol)
    description: str = ""


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol("coco-1k", "coco", "test", "retrieval", 1000, "COCO 5K test in five folds of 1,000 images"),
        Protocol(
            "coco-5k", "coco", "test", "retrieval", None, "COCO 5K test: 5,000 images x 25,000 captions"
        ),
        Protocol(
            "flickr30k-1k", "flickr30k", "test", "retrieval", None, "Flickr30k test: 1,000 images x 5,000"
        ),
        Protocol("cifar10", "cifar10", "test", "classification", None, "CIFAR-10 test accuracy"),
        Protocol("cifar100", "cifar100", "test", "classification", None, "CIFAR-100 test accuracy"),
        Protocol(
            "tiny_imagenet", "tiny_imagenet", "test", "classification", None, "Tiny-ImageNet val accuracy"
        ),
        Protocol("agnews", "agnews", "test", "classification", None, "AG News test accuracy"),
    )
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"protocol={name!r} is not one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
