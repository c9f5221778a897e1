"""How much a block changes what flows through it: the cosine similarity of its input and output."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def block_similarity(x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """Sum and count of the cosine similarities between a block's input `x` and output `y` (same shape):
    per position over the last dim for hidden states (B, T, D), per sample for feature maps (B, C, H, W).

    >>> block_similarity(torch.ones(2, 3, 4), torch.ones(2, 3, 4))
    (6.0, 6)
    """
    if x.dim() >= 4:
        a, b = x.flatten(1), y.flatten(1)  # (B, C*H*W)
    else:
        a, b = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])  # (B*T, D)
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (rows,)
    return float(cos.sum()), int(cos.numel())


__all__ = ["block_similarity"]
