"""Low-rank factorization maths: truncated SVD (plain or whitened by input statistics), spatial SVD and
Tucker-2 of convolution kernels, and the output error a factorization adds on calibration data.

Pure tensor functions: no module walking, no configs. Shapes follow PyTorch: a Linear weight is
(out, in), a Conv2d weight (out, in, kh, kw).

>>> import torch
>>> w = torch.randn(6, 8, dtype=torch.float64)
>>> first, second = svd_factors(w, 6)  # full rank: exact
>>> torch.allclose(second @ first, w)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_DAMP = 1e-6  # added to the Gram's diagonal (times its mean) before the Cholesky factor


def whitening(gram: torch.Tensor, *, damp: float = _DAMP) -> torch.Tensor:
    """The lower Cholesky factor L of the input Gram matrix X^T X (in, in), damped until it is positive
    definite, so that ||W X^T||_F = ||W L||_F: the SVD of W L truncates by output error (SVD-LLM)."""
    gram = gram.double()
    scale = float(gram.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + damp * scale * eye)
        if int(info) == 0:
            return chol
        damp *= 10.0
    raise ValueError("the input Gram matrix is not positive definite even when damped")


def singular_values(weight: torch.Tensor, chol: torch.Tensor | None = None) -> torch.Tensor:
    """Singular values of `weight` (out, in), or of `weight @ chol` when whitened (float64)."""
    matrix = weight.double() if chol is None else weight.double() @ chol
    return torch.linalg.svdvals(matrix)


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """The smallest rank keeping `energy` of the squared singular values' sum (at least 1)."""
    squares = values.double().pow(2)
    total = float(squares.sum())
    if total <= 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return max(1, min(int((kept < energy - 1e-12).sum()) + 1, values.numel()))


Decomposition = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (U, S, V^T) in float64


def svd(weight: torch.Tensor, chol: torch.Tensor | None = None) -> Decomposition:
    """The thin SVD of `weight` (out, in), or of `weight @ chol` when whitened, in float64."""
    matrix = weight.double() if chol is None else weight.double() @ chol
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def svd_factors(
    weight: torch.Tensor,
    rank: int,
    chol: torch.Tensor | None = None,
    *,
    decomposition: Decomposition | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD W ~ second @ first with first (rank, in), second (out, rank), the singular values
    split evenly (sqrt on each side) so that both factors have similar ranges (kinder to later int8).

    With `chol` (the whitening factor of the layer's inputs) the SVD is of W L, and first = S^1/2 V^T L^-1:
    the factorization with the least output error on those inputs instead of the least weight error.
    `decomposition`: `svd(weight, chol)` computed once for several ranks."""
    u, s, vh = decomposition if decomposition is not None else svd(weight, chol)
    root = s[:rank].sqrt()
    second = u[:, :rank] * root  # (out, r)
    first = root[:, None] * vh[:rank]  # (r, in)
    if chol is not None:  # first @ L^-1, by a triangular solve: (L^T first^T)^T
        first = torch.linalg.solve_triangular(chol.T, first.T, upper=True, left=True).T
    return first.to(weight.dtype), second.to(weight.dtype)


def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The `rank` leading left singular vectors of `matrix` (rows, cols) as (rows, rank); zero columns past
    the matrix's rank bound (a Tucker-2 rank above what the other mode leaves adds nothing)."""
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return F.pad(u[:, :rank], (0, max(0, rank - u.shape[1])))


def mode_singular_values(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of a conv kernel's output-channel (mode 0) and input-channel (mode 1) unfoldings."""
    w = weight.double()
    out_ch, in_ch = w.shape[:2]
    return (
        torch.linalg.svdvals(w.reshape(out_ch, -1)),
        torch.linalg.svdvals(w.transpose(0, 1).reshape(in_ch, -1)),
    )


def tucker2(
    weight: torch.Tensor, rank_in: int, rank_out: int, *, iterations: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 of a conv kernel (out, in, kh, kw) over its channel modes: (reduce (r_in, in), core
    (r_out, r_in, kh, kw), expand (out, r_out)), W ~ core x_0 expand x_1 reduce^T.

    HOSVD start refined by a few HOOI sweeps (orthogonal factors, least squares core); exact when
    r_in = in and r_out = out."""
    w = weight.double()
    out_ch, in_ch = w.shape[:2]
    u_out = _leading(w.reshape(out_ch, -1), rank_out)  # (out, r_out)
    u_in = _leading(w.transpose(0, 1).reshape(in_ch, -1), rank_in)  # (in, r_in)
    for _ in range(iterations if rank_in < in_ch or rank_out < out_ch else 0):
        # (out, r_in, kh, kw): the kernel with its input mode projected, then the best output basis for it
        projected = torch.einsum("oikl,ir->orkl", w, u_in)
        u_out = _leading(projected.reshape(out_ch, -1), rank_out)
        projected = torch.einsum("oikl,os->sikl", w, u_out)  # (r_out, in, kh, kw)
        u_in = _leading(projected.transpose(0, 1).reshape(in_ch, -1), rank_in)
    core = torch.einsum("oikl,os,ir->srkl", w, u_out, u_in)  # (r_out, r_in, kh, kw)
    return u_in.T.contiguous().to(weight.dtype), core.to(weight.dtype), u_out.contiguous().to(weight.dtype)


def spatial_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The kernel (out, in, kh, kw) as the (in * kh, out * kw) matrix whose rank-r SVD is a (kh x 1) conv to
    r channels followed by a (1 x kw) conv (Jaderberg et al. 2014, scheme 2)."""
    out_ch, in_ch, kh, kw = weight.shape
    return weight.permute(1, 2, 0, 3).reshape(in_ch * kh, out_ch * kw)


def spatial_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical (r, in, kh, 1), horizontal (out, r, 1, kw)) with W[o, i, y, x] ~ sum_r V[r, i, y] H[o, r, x];
    exact at rank min(in * kh, out * kw)."""
    out_ch, in_ch, kh, kw = weight.shape
    first, second = svd_factors(spatial_matrix(weight).T, rank)  # (out*kw, in*kh) ~ second @ first
    vertical = first.reshape(rank, in_ch, kh, 1)
    horizontal = second.reshape(out_ch, kw, rank).permute(0, 2, 1).reshape(out_ch, rank, 1, kw)
    return vertical.contiguous(), horizontal.contiguous()


def tucker2_weight(reduce: torch.Tensor, core: torch.Tensor, expand: torch.Tensor) -> torch.Tensor:
    """The dense kernel (out, in, kh, kw) a Tucker-2 factorization stands for."""
    return torch.einsum("srkl,os,ri->oikl", core, expand, reduce)


def spatial_weight(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The dense kernel (out, in, kh, kw) a spatial SVD stands for."""
    return torch.einsum("riy,orx->oiyx", vertical[..., 0], horizontal[:, :, 0, :])


def conv_rows(
    x: torch.Tensor,
    kernel: tuple[int, int],
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """The patches a Conv2d multiplies its flattened kernel with: (B * L, in * kh * kw) for x (B, in, H, W)."""
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, in*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def output_error(delta: torch.Tensor, weight: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative squared output error ||dW X^T||^2 / ||W X^T||^2 on the inputs whose Gram matrix (in, in), or
    whose diagonal (in,) for one-hot inputs (embeddings: token counts), is `gram`; dW, W are (out, in).
    Bias and the rest of the model cancel out: it is exact for the layer's output on those inputs."""
    d, w, g = delta.double(), weight.double(), gram.double()
    if g.dim() == 1:
        num, den = (d.pow(2) * g).sum(), (w.pow(2) * g).sum()
    else:
        num, den = ((d @ g) * d).sum(), ((w @ g) * w).sum()
    return float(num / den) if float(den) > 0 else 0.0


WHOLE_MODE = 16  # a mode of at most this many channels (an image's colours in or out) is not cut


def tucker2_ranks(in_ch: int, out_ch: int, taps: int, ratio: float) -> tuple[int, int]:
    """Ranks (r_in, r_out), proportional to the channel counts, whose Tucker-2 form holds about `ratio` of
    the kernel's in * out * taps weights: solves a^2 in out taps + a (in^2 + out^2) = ratio in out taps.

    A side of at most WHOLE_MODE channels keeps its full rank and the other side takes the budget: cutting
    a generator's 3 output colours (or a first conv's 3 input ones) to rank 1 saves a few weights and loses
    the colour.

    >>> tucker2_ranks(64, 3, 16, 0.5)  # DCGAN's output layer: RGB kept, 64 input channels to 13
    (13, 3)
    """
    qa, qb, qc = in_ch * out_ch * taps, in_ch**2 + out_ch**2, -ratio * in_ch * out_ch * taps
    a = (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)
    r_in, r_out = min(in_ch, max(1, math.floor(a * in_ch))), min(out_ch, max(1, math.floor(a * out_ch)))
    budget = ratio * in_ch * out_ch * taps
    if out_ch <= WHOLE_MODE < in_ch and r_out < out_ch:  # in * r + r * out * taps + out^2 = budget
        r_out = out_ch
        r_in = min(in_ch, max(1, math.floor((budget - out_ch**2) / (in_ch + out_ch * taps))))
    elif in_ch <= WHOLE_MODE < out_ch and r_in < in_ch:
        r_in = in_ch
        r_out = min(out_ch, max(1, math.floor((budget - in_ch**2) / (out_ch + in_ch * taps))))
    return r_in, r_out


__all__ = [
    "Decomposition",
    "conv_rows",
    "energy_rank",
    "mode_singular_values",
    "output_error",
    "singular_values",
    "spatial_matrix",
    "spatial_svd",
    "spatial_weight",
    "svd",
    "svd_factors",
    "tucker2",
    "tucker2_ranks",
    "tucker2_weight",
    "whitening",
]
