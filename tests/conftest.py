"""Session-wide test settings.

One torch thread per test process (and per process a test starts: the variables are inherited),
unless the caller set OMP_NUM_THREADS. Why: the test models are tiny, so a second thread buys little,
while on a shared 2-core machine OpenMP threads that wait by spinning make a loaded run several
times slower (tests/federation/test_distillation_family.py's resume test: 221 s with torch's default
of 2 threads, 49 s with one, at load 8). Comparisons between an in-process run and a subprocess
run stay exact because both use the same thread count.
"""

from __future__ import annotations

import os

THREADS = os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", THREADS)


def pytest_configure(config: object) -> None:
    """torch may already be imported (a plugin, an earlier conftest): set its pool size explicitly."""
    import torch

    torch.set_num_threads(int(THREADS))
