from __future__ import annotations

import math

import torch

from mmfed.algorithms.task import clip_loss


def test_clip_loss_by_hand() -> None:
    # Orthonormal pairs: logits = s * I (2x2). CE of [s, 0] against class 0 = log(1 + e^-s).
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # scale is removed by the normalisation
    s = torch.tensor(2.0)
    assert math.isclose(float(clip_loss(image, text, s)), math.log(1 + math.exp(-2.0)), rel_tol=1e-6)


def test_clip_loss_is_symmetric_and_penalises_swapped_pairs() -> None:
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    s = torch.tensor(10.0)
    assert torch.isclose(clip_loss(image, text, s), clip_loss(text, image, s))
    aligned = clip_loss(image, image.clone(), s)
    shuffled = clip_loss(image, image[torch.tensor([1, 0, 2, 3, 4, 5])], s)
    assert aligned < shuffled
