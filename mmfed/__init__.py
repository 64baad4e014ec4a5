"""mmfed: multimodal federated learning with image-only, text-only and paired clients.

The block below must run before anything imports torchvision: it runs when torchvision is first
looked for (an import hook installed when mmfed is imported), so importing mmfed costs no torch import.

Why: the torchvision wheel on PyPI is a CUDA build. Beside a CPU-only torch its C extension
(`torchvision/_C.so`) cannot load, and `import torchvision` then fails inside
`torchvision/_meta_registrations.py`, which registers fake kernels for the operators
`torchvision::nms` and `torchvision::qnms` and raises "operator torchvision::nms does not exist".
transformers, diffusers, peft and open_clip all import torchvision (even
`from diffusers import UNet2DConditionModel` does), so without this guard none of them import.

What: when, and only when, the extension cannot be loaded, we define the two operator schemas
with `torch.library`, so torchvision's pure-Python parts (transforms, model definitions) import.
Calling the operators still fails (there is no kernel), which is what we want: mmfed never calls
them. When the extension loads (a matching CPU or CUDA build), nothing is defined.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_torchvision_library = None  # keeps the torch.library.Library alive: the schemas die with it


def _load_torchvision_extension() -> bool:
    """Try to load torchvision's compiled extension the way torchvision itself does."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C.*")):
        try:
            torch.ops.load_library(path)
            return True
        except (OSError, ImportError):
            continue
    return False


def _schema_exists(qualified_name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(qualified_name, "")
        return True
    except RuntimeError:
        return False


def install_torchvision_guard(load_extension: Callable[[], bool] = _load_torchvision_extension) -> bool:
    """Define torchvision's nms/qnms schemas when its C extension is missing.

    Returns True when the schemas were defined by this call, False when nothing was needed
    (torchvision absent, already imported, its extension loads, or the schemas already exist).
    """
    global _torchvision_library
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return False
    if _schema_exists("torchvision::nms") or load_extension():
        return False
    import torch

    _torchvision_library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _torchvision_library.define(schema)
    return True


class _GuardOnFirstImport(importlib.abc.MetaPathFinder):
    """Runs the guard when torchvision is first looked for, not when mmfed is imported: the guard
    imports torch (seconds), which `mmfed --help` and plain Python uses of mmfed should not pay."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        global TORCHVISION_GUARD_ACTIVE
        if name == "torchvision":
            sys.meta_path.remove(self)  # once; the guard's own find_spec then passes through
            TORCHVISION_GUARD_ACTIVE = install_torchvision_guard()
        return None  # the regular finders import it


TORCHVISION_GUARD_ACTIVE: bool = False  # True once the guard has defined the schemas
if "torchvision" not in sys.modules and not any(isinstance(f, _GuardOnFirstImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _GuardOnFirstImport())
