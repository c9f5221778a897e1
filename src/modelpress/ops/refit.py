"""Least-squares refit of a linear layer after some of its inputs are removed.

When structured pruning drops input columns of `y = W x + b`, the kept columns can absorb part of what the
dropped ones did: with G = E[x~ x~^T] the second moment of the layer's original input x~ = [x; 1],

    W~' = W~ G[:, k] G[k, k]^-1 = W~_k + W~_r G[r, k] G[k, k]^-1

(W~ = [W, b]; k = kept columns plus the constant, r = removed ones) minimises E ||W~ x~ - W~' x~_k||^2. The constant column carries the removed channels' mean into the bias
(bias compensation); the rest uses their correlation with the kept channels.

>>> w, b = refit_columns(torch.eye(2), None, torch.eye(2), torch.tensor([True, False]))
>>> w.tolist(), b
([[1.0], [0.0]], None)
"""

from __future__ import annotations

import torch


def refit_columns(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    keep: torch.Tensor,
    *,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (out, kept) and bias minimising the output error on inputs with second moment `gram`.

    `gram` is (in + 1, in + 1) with the constant input last when `bias` is given, else (in, in); `keep` is a
    bool mask over the `in` columns. `damp` adds that fraction of the mean diagonal to the kept block.
    """
    w = weight.double()
    cols = keep.bool()
    if bias is not None:
        w = torch.cat([w, bias.double().unsqueeze(1)], dim=1)
        cols = torch.cat([cols, torch.ones(1, dtype=torch.bool)])
    g = gram.double()
    g_kk = g[cols][:, cols]
    g_kk = g_kk + damp * g_kk.diagonal().mean().clamp(min=1e-12) * torch.eye(len(g_kk), dtype=g.dtype)
    cross = w[:, ~cols] @ g[~cols][:, cols]  # (out, kept): what the removed columns did, seen by the kept
    fitted = w[:, cols] + torch.linalg.solve(g_kk, cross.T).T  # g_kk symmetric
    if bias is None:
        return fitted.to(weight.dtype), None
    return fitted[:, :-1].to(weight.dtype).contiguous(), fitted[:, -1].to(bias.dtype).contiguous()


__all__ = ["refit_columns"]
