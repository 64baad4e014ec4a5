"""`mmfed.validation`'s own checks that stand in for torch's (composition imports no torch)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from mmfed.config import ConfigError
from mmfed.validation import DEVICE_TYPES, _device

CANDIDATES = [
    *DEVICE_TYPES,
    *(f"{kind}:0" for kind in DEVICE_TYPES),
    "cuda:1", "cuda:10", "cpu:3", "mps:1", "cuda:2147483647",  # accepted
    "cuda:01", "cuda:00", "cuda:-1", "cuda:+1", "cuda: 0", "cuda:", "cuda:a", "cuda:0:0", "cuda:1e1",
    "cuda:2147483648", "cuda:99999999999999999999", "cuda:\u0661", " cuda", "cuda ", "CUDA", "Cuda",
    "gpu", "ort", "tpu", "", "None", "0", "1", "auto:0", "cuda\n",
]  # fmt: skip


def _torch_accepts(name: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'mkldnn' is deprecated as a device type
            torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


@pytest.mark.parametrize("name", CANDIDATES)
def test_device_is_accepted_exactly_when_torch_accepts_it(name: str) -> None:
    if _torch_accepts(name):
        _device(name)
    else:
        with pytest.raises(ConfigError, match=re.escape(f"config key 'device': {name!r} is not a device")):
            _device(name)


def test_auto_and_non_strings() -> None:
    _device("auto")
    for value in (None, 0, 1.0, True):
        with pytest.raises(ConfigError, match="is not a device \\(cpu, cuda, cuda:N, auto\\)"):
            _device(value)


def test_the_device_types_are_torchs() -> None:
    """torch names its device types when it refuses one; a torch that adds one fails here."""
    with pytest.raises(RuntimeError) as error:
        torch.device("bogus")
    listed = re.search(r"Expected one of (.*) device type", str(error.value))
    assert listed is not None, str(error.value)
    assert set(listed.group(1).split(", ")) == set(DEVICE_TYPES)


def test_the_optimizer_names_checked_are_those_built() -> None:
    from mmfed.federation.client import OPTIMIZERS
    from mmfed.settings import OPTIMIZER_NAMES

    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES


def test_the_precisions_checked_are_those_built() -> None:
    from mmfed.federation.client import PRECISIONS
    from mmfed.settings import PRECISION_NAMES

    assert (*PRECISIONS, "auto") == PRECISION_NAMES  # auto resolves to one of the others


def test_the_teacher_dtypes_checked_are_those_built() -> None:
    from mmfed.settings import TEACHER_DTYPES
    from mmfed.teacher.model import DTYPES

    assert tuple(DTYPES) == TEACHER_DTYPES and all(isinstance(d, torch.dtype) for d in DTYPES.values())
