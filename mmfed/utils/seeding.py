"""Explicit, derived seeds: every random stream is named, so a resumed run replays it exactly.

Why not one global seed at start: a run resumed at round r must draw the same client sample,
the same shuffles and the same dropout masks as the uninterrupted run did at round r. Deriving a
seed from (run seed, purpose, round, client) makes each stream independent of what ran before.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and a path of names/numbers (stable across processes)."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def numpy_rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))


def torch_generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def seed_torch(seed: int, *parts: object) -> None:
    """Seed torch's global RNG (dropout, in-place init) for one named stage of the run."""
    torch.manual_seed(derive_seed(seed, *parts))
