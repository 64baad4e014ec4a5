"""What a run's numbers depend on besides its config: package versions, torch threads, CPU kernels.

Measured (README, "Reproducing the figures"): with the same code, config and package versions, the
number of torch threads and the CPU's vector instruction set (AVX-512 vs AVX2 kernels) each change
float results in the 7th digit, which twelve rounds of training turn into visibly different metrics.
A run's ``summary.json`` records them (its ``environment``) so two runs that differ can be told apart.
"""

from __future__ import annotations

import functools
import platform
from importlib import metadata
from typing import Any

import torch

# The packages whose versions can change a run's numbers (data rendering, kernels, partitions).
PACKAGES = (
    "torch", "numpy", "pillow", "torchvision", "transformers", "diffusers", "open_clip_torch",
    "peft", "faiss-cpu", "datasets", "flwr",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: on a CPU, oneDNN's check (AVX512-BF16 or AMX
    instructions); on CUDA, torch's. Emulated bfloat16 is slower than float32, so `auto` skips it.
    Asked once per device type (the trainer asks every step)."""
    return _native_bfloat16(device.type)


@functools.cache
def _native_bfloat16(device_type: str) -> bool:
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def describe_environment() -> dict[str, Any]:
    """A strict-JSON-ready description of the interpreter, CPU kernels, threads and package versions."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        # training.precision=auto trains in bfloat16 on the CPU exactly when this is true
        "cpu_native_bfloat16": native_bfloat16(torch.device("cpu")),
        "cuda": torch.version.cuda,
        "packages": {name: _version(name) for name in PACKAGES},
    }
