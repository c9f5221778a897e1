"""Sparsity masks and solvers: magnitude, Wanda and SparseGPT, unstructured or N:M; bitmask packing.

Masks are boolean tensors shaped like the weight (N, K), True where a weight is kept. N:M keeps `n` of
every `m` consecutive input features of each output row (2:4 keeps half), the pattern sparse tensor
cores and some CPU kernels run.

- Wanda (Sun et al. 2023): score |W_ij| * ||x_j||, pruned per output row, no weight update.
- SparseGPT (Frantar & Alistarh 2023): the GPTQ solve with pruning as the "quantizer": columns are
  visited in order, each pruned weight's error is spread over the not-yet-visited columns through the
  inverse Hessian; the mask of each block of columns is chosen by w^2 / [H^-1]_jj^2.

>>> w = torch.tensor([[1.0, -4.0, 2.0, 0.5]])
>>> nm_mask(w.abs(), 2, 4)
tensor([[False,  True,  True, False]])
"""

from __future__ import annotations

import torch

from modelpress.ops.gptq import upper_cholesky_of_inverse


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (n, m) with 0 < n < m; anything else raises ValueError."""
    if pattern == "unstructured":
        return None
    parts = pattern.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return n, m
    raise ValueError(
        f"pattern {pattern!r} is not 'unstructured' or 'N:M' with 0 < N < M (for example '2:4': keep 2 of "
        "every 4 weights)."
    )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores of every `m` consecutive columns of each row; K must divide by m."""
    rows, k = scores.shape
    if k % m:
        raise ValueError(f"nm_mask: {k} input features do not split into groups of {m}.")
    groups = scores.reshape(rows, k // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, k)


def lowest_mask(scores: torch.Tensor, ratio: float, *, per_row: bool) -> torch.Tensor:
    """Prune the `ratio` lowest scores (of each row, or of the whole tensor); ties broken by position."""
    flat = scores.reshape(scores.shape[0], -1) if per_row else scores.reshape(1, -1)
    prune = int(flat.shape[1] * ratio)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if prune:
        keep.scatter_(1, flat.argsort(dim=1, stable=True)[:, :prune], False)
    return keep.reshape(scores.shape)


def wanda_scores(weight: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """|W| * ||x_j|| per input feature; `hessian_diag` is mean(x_j^2), so its root is ||x_j|| / sqrt(n)."""
    return weight.abs() * hessian_diag.clamp_min(0).sqrt()[None, :]


def damped_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """A float64 copy of `hessian` as SparseGPT solves with it: dead inputs (zero diagonal) get 1, so no
    error spreads to or from them, and `damp` times the mean diagonal is added to the diagonal."""
    h = hessian.detach().double().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag.add_(damp * diag.mean())
    return h


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    ratio: float = 0.5,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """The pruned weight (N, K) minimising ||X W^T - X W'^T||^2 with `ratio` of each block of columns
    (or N:M) set to zero; `hessian` is X^T X / n (K, K).

    >>> x = torch.randn(256, 8); w = torch.randn(4, 8)
    >>> (sparsegpt_prune(w, x.T @ x / 256, ratio=0.5) == 0).float().mean().item()
    0.5
    """
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"sparsegpt_prune: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match."
        )
    if nm is not None and block_size % nm[1]:
        block_size -= block_size % nm[1]
    k = weight.shape[1]
    w = weight.detach().float().clone()
    h = damped_hessian(hessian, damp)
    try:
        hinv = upper_cholesky_of_inverse(h[None])[0].float()
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"sparsegpt_prune: the Hessian is not positive definite with damp={damp}; increase damp."
        ) from exc
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2]  # view, updated in place
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(hinv1)
        err1 = torch.zeros_like(w1)
        keep = torch.ones_like(w1, dtype=torch.bool)
        if nm is None:
            keep = lowest_mask(w1.pow(2) / d.pow(2)[None, :], ratio, per_row=False)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                part = w1[:, i : i + nm[1]].pow(2) / d[i : i + nm[1]].pow(2)[None, :]
                keep[:, i : i + nm[1]] = nm_mask(part, *nm)
            col = w1[:, i]
            q = torch.where(keep[:, i], col, torch.zeros_like(col))
            e = (col - q) / d[i]
            w1[:, i:].sub_(e[:, None] * hinv1[i, i:][None, :])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    return w


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as uint8 bits, little-endian within each byte, padded to whole bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8)
    return (flat.reshape(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The boolean mask of `numel` elements packed by `pack_mask` (ONNX-exportable ops only)."""
    powers = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return ((bits[:, None] & powers) != 0).reshape(-1)[:numel]


def scatter_kept(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The dense flat tensor with `values` (the kept entries, in order) where `mask` is True, else 0."""
    index = (torch.cumsum(mask.to(torch.int64), dim=0) - 1).clamp_min(0)
    padded = values if values.numel() else values.new_zeros(1)
    return torch.where(mask, padded[index], torch.zeros((), dtype=values.dtype, device=values.device))


__all__ = [
    "damped_hessian",
    "lowest_mask",
    "nm_mask",
    "pack_mask",
    "parse_pattern",
    "scatter_kept",
    "sparsegpt_prune",
    "unpack_mask",
    "wanda_scores",
]
