"""GPTQ: weight quantization that rounds one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(Frantar et al., 2022). Pure tensor maths; the caller collects the Hessian and installs the codes.

    acc = HessianAccumulator(k)
    for x in layer_inputs:          # (..., K)
        acc.update(x)
    codes, scale, zp = gptq_quantize(w, acc.hessian(), bits=4, group_size=128, symmetric=True)
    w_hat = dequantize_weight(codes, scale, zp, group_size=128)  # (codes - zp) * scale per group

The code grid (`WeightGrid`), shared with AWQ and round to nearest:
- group-wise symmetric (`group_size` set): all 2^b codes [-2^(b-1), 2^(b-1)-1], zero point None; the
  group's largest-magnitude value maps exactly onto the lowest code and the scale carries its sign
  (llama.cpp's Q4_0 layout, the one `GroupQuantizedLinear` and ONNX MatMulNBits store);
- per-channel symmetric (`group_size=None`): codes [-(2^(b-1)-1), 2^(b-1)-1] and a positive scale
  max|w| / (2^(b-1)-1), the grid of `ops.quant.symmetric_scale` that `QuantizedLayer` (DequantizeLinear)
  stores;
- asymmetric: unsigned codes [0, 2^b-1] and an integer zero point per group (uint8 storage).
Groups are `group_size` consecutive input columns in the weight's own order; a last partial group is
allowed (G = ceil(K / group_size)), as MatMulNBits pads K to whole blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from modelpress.ops.quant import affine_params

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------------
# The code grid


@dataclass(frozen=True)
class WeightGrid:
    """How a (N, K) weight maps to integer codes: width, grouping along K, and symmetry.

    >>> grid = WeightGrid(bits=4, group_size=32, symmetric=True)
    >>> w = torch.randn(8, 64)
    >>> scale, zp = grid.params(w)
    >>> grid.dequantize(grid.quantize(w, scale, zp), scale, zp).shape
    torch.Size([8, 64])
    """

    bits: int
    group_size: int | None  # None: one group spanning all K (per output channel)
    symmetric: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"WeightGrid: bits={self.bits} is unsupported; use 2 to 8 (usually 4 or 8).")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"WeightGrid: group_size={self.group_size} must be positive or None.")

    @property
    def code_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the codes."""
        half = 2 ** (self.bits - 1)
        if not self.symmetric:
            return 0, 2 * half - 1
        return (-half, half - 1) if self.group_size is not None else (-(half - 1), half - 1)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.symmetric else torch.uint8

    def n_groups(self, k: int) -> int:
        return 1 if self.group_size is None else math.ceil(k / self.group_size)

    def width(self, k: int) -> int:
        return k if self.group_size is None else self.group_size

    def grouped(self, w: torch.Tensor) -> torch.Tensor:
        """(N, K) -> (N, G, width), zero-padded: padding changes neither the extreme nor the range."""
        if w.ndim != 2:
            raise ValueError(f"WeightGrid: the weight must be 2-D (out, in), got shape {tuple(w.shape)}.")
        n, k = w.shape
        g, width = self.n_groups(k), self.width(k)
        return F.pad(w.float(), (0, g * width - k)).reshape(n, g, width)

    def params(
        self, w: torch.Tensor, ratio: torch.Tensor | float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (N, G) fp32 and zero point (N, G) int32 (None if symmetric) covering each group's range
        shrunk by `ratio` (a float or (N, G); values beyond the shrunk range clip)."""
        g = self.grouped(w.detach())
        if not torch.isfinite(g).all():
            raise ValueError("WeightGrid.params: the weight holds NaN or Inf.")
        half = 2 ** (self.bits - 1)
        if self.symmetric and self.group_size is not None:
            idx = g.abs().argmax(dim=-1, keepdim=True)
            extreme = g.gather(-1, idx).squeeze(-1) * ratio  # signed value of largest magnitude, (N, G)
            scale = extreme / -half
            return torch.where(scale.abs() < _EPS, torch.full_like(scale, _EPS), scale), None
        if self.symmetric:
            amax = g.abs().amax(dim=-1) * ratio
            return (amax / (half - 1)).clamp(min=_EPS), None
        lo = g.amin(dim=-1) * ratio
        hi = g.amax(dim=-1) * ratio
        scale, zp = affine_params(lo, hi, bits=self.bits, symmetric=False, signed=False)
        return scale, zp

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
        """Round-to-nearest codes (N, K) of `w` on this grid."""
        n, k = w.shape
        qmin, qmax = self.code_range
        zp = torch.zeros_like(scale) if zero_point is None else zero_point.float()
        q = (torch.round(self.grouped(w.detach()) / scale[..., None]) + zp[..., None]).clamp(qmin, qmax)
        return q.reshape(n, -1)[:, :k].to(self.code_dtype)

    def dequantize(
        self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
    ) -> torch.Tensor:
        """(codes - zero_point) * scale per group."""
        return dequantize_weight(codes, scale, zero_point, group_size=self.group_size)

    def fake_quantize(self, w: torch.Tensor, ratio: torch.Tensor | float = 1.0) -> torch.Tensor:
        """`w` as the quantized layer will see it (fp32), with the range shrunk by `ratio`."""
        scale, zp = self.params(w, ratio)
        return self.dequantize(self.quantize(w, scale, zp), scale, zp)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, *, group_size: int | None
) -> torch.Tensor:
    """fp32 weight (N, K) = (codes - zero_point) * scale, one (scale, zero point) (N, G) per group of
    `group_size` consecutive input columns (the last group may be partial; None: per output channel).

    >>> dequantize_weight(torch.tensor([[1, -2]], dtype=torch.int8), torch.tensor([[0.5]]), None, group_size=None)
    tensor([[ 0.5000, -1.0000]])
    """
    n, k = codes.shape
    width = k if group_size is None else group_size
    if scale.shape != (n, math.ceil(k / width)):
        raise ValueError(
            f"dequantize_weight: scale of shape {tuple(scale.shape)} does not fit codes {tuple(codes.shape)} "
            f"with group_size={group_size}."
        )
    group = torch.arange(k, device=codes.device) // width  # group of each column, (K,)
    q = codes.to(torch.int32)
    if zero_point is not None:
        q = q - zero_point.to(torch.int32)[:, group]
    return q.float() * scale.float()[:, group]


def refit_scales(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    hessian: torch.Tensor,
    *,
    group_size: int | None,
) -> torch.Tensor:
    """Scales (N, G) that, for fixed integer codes, minimise the layer's output error
    (w - w_hat) H (w - w_hat)^T of each output row, with w_hat = (codes - zero_point) * scale per group.

    w_hat is linear in the row's G scales, so the optimum solves one G x G system per row:
    (U^T H U) s = U^T H w, U holding the row's centred codes one group per column. A row whose system is
    singular, whose refitted scales change sign or vanish, or whose refitted error is not smaller, keeps its scales (the old ones are a feasible point,
    so the output error never grows). This is NNCF's "scale estimation" done in closed form.

    >>> x = torch.randn(256, 8); w = torch.randn(4, 8); h = x.T @ x / 256
    >>> grid = WeightGrid(bits=4, group_size=4, symmetric=True)
    >>> s, _ = grid.params(w); q = grid.quantize(w, s, None)
    >>> s2 = refit_scales(w, q, s, None, h, group_size=4)
    >>> err = lambda sc: float(((w - dequantize_weight(q, sc, None, group_size=4)) @ h * (w - dequantize_weight(q, sc, None, group_size=4))).sum())
    >>> err(s2) <= err(s)
    True
    """
    n, k = codes.shape
    width = k if group_size is None else group_size
    g = math.ceil(k / width)
    h = hessian.double()
    group = torch.arange(k, device=codes.device) // width
    u = codes.to(torch.float64)
    if zero_point is not None:
        u = u - zero_point.to(torch.float64)[:, group]
    w = weight.detach().double()
    wh = w @ h  # (N, K)
    a = torch.empty(n, g, g, dtype=torch.float64, device=codes.device)
    b = torch.empty(n, g, dtype=torch.float64, device=codes.device)
    pad = g * width - k
    for i in range(g):
        cols = slice(i * width, min((i + 1) * width, k))
        p = u[:, cols] @ h[cols]  # (N, K): row n is u_{n,i}^T H[group i, :]
        a[:, i] = F.pad(p * u, (0, pad)).reshape(n, g, width).sum(-1)
        b[:, i] = (u[:, cols] * wh[:, cols]).sum(-1)
    a = (a + a.transpose(1, 2)) / 2
    ridge = 1e-9 * a.diagonal(dim1=1, dim2=2).abs().mean(dim=1).clamp(min=1e-30)
    a.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
    new, info = torch.linalg.solve_ex(a, b)
    old = scale.double()

    def error(sc: torch.Tensor) -> torch.Tensor:  # (N,) output error per row, up to the constant w H w^T
        return (sc[:, None, :] @ a @ sc[:, :, None]).reshape(n) - 2 * (sc * b).sum(-1)

    same_sign = (torch.sign(new) == torch.sign(old)).all(dim=1) & (new.abs() > _EPS * 1e-3).all(dim=1)
    ok = (info == 0) & torch.isfinite(new).all(dim=1) & same_sign & (error(new) < error(old))
    return torch.where(ok[:, None], new, old).to(scale.dtype)


# ---------------------------------------------------------------------------------------------------------
# Hessian of the layer's inputs


class HessianAccumulator:
    """Running sum of x^T x over the rows of every input batch; `hessian()` is X^T X / n_rows.

    `groups` > 1 keeps one (K/groups, K/groups) block per channel group (grouped convolutions, whose
    output channels each see only their group's inputs). Accumulates in `dtype` (fp64 for very long
    calibration runs; fp32 is accurate enough for ~10^5 rows).

    >>> acc = HessianAccumulator(4)
    >>> acc.update(torch.ones(3, 4))
    >>> acc.hessian()[0]
    tensor([1., 1., 1., 1.])
    """

    def __init__(self, n_features: int, *, groups: int = 1, dtype: torch.dtype = torch.float32) -> None:
        if n_features % groups:
            raise ValueError(f"HessianAccumulator: {n_features} features do not split into {groups} groups.")
        self.n_features, self.groups, self.dtype = n_features, groups, dtype
        self._sum: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of `x` (..., K); for groups > 1, K is ordered group-major."""
        rows = x.detach().reshape(-1, self.n_features).to(self.dtype)
        self.add_gram(gram(rows, groups=self.groups), rows.shape[0])

    def add_gram(self, xtx: torch.Tensor, n_rows: int) -> None:
        """Add a precomputed `gram(rows)` (shared by layers that read the same input)."""
        self._sum = xtx.clone() if self._sum is None else self._sum.add_(xtx)
        self.rows += n_rows

    def hessian(self) -> torch.Tensor:
        """(K, K), or (groups, K/groups, K/groups), fp32 or the accumulation dtype."""
        if self._sum is None or self.rows == 0:
            raise ValueError("HessianAccumulator.hessian(): no input rows were seen.")
        h = self._sum / self.rows
        return h[0] if self.groups == 1 else h


def gram(rows: torch.Tensor, *, groups: int = 1) -> torch.Tensor:
    """x^T x of (n, K) rows as (groups, K/groups, K/groups) blocks."""
    n, k = rows.shape
    blocks = rows.reshape(n, groups, k // groups).transpose(0, 1)  # (groups, n, K/groups)
    return torch.bmm(blocks.transpose(1, 2), blocks)


def conv_input_rows(
    x: torch.Tensor,
    *,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...] | str,
    dilation: tuple[int, ...],
    explicit_pad: tuple[int, ...] | None = None,
    pad_mode: str = "constant",
) -> torch.Tensor:
    """The patches a Conv1d/Conv2d multiplies with its weight, as rows (B * L, C * prod(kernel_size)) in the
    order of `weight.flatten(1)`.

    `explicit_pad` (F.pad order, e.g. a conv's `_reversed_padding_repeated_twice`) with `pad_mode` handles
    padding="same" and non-zero padding modes; then `padding` is ignored.

    >>> conv_input_rows(torch.randn(2, 3, 5, 5), kernel_size=(3, 3), stride=(1, 1), padding=(1, 1),
    ...                 dilation=(1, 1)).shape
    torch.Size([50, 27])
    """
    if x.ndim == 3:  # Conv1d (B, C, L) as a (B, C, 1, L) image with a (1, k) kernel
        x = x.unsqueeze(2)
        kernel_size, stride, dilation = (1, *kernel_size), (1, *stride), (1, *dilation)
        if explicit_pad is None and not isinstance(padding, str):
            padding = (0, *padding)
    if x.ndim != 4:
        raise ValueError(
            f"conv_input_rows: expected a (B, C, H, W) or (B, C, L) input, got {tuple(x.shape)}."
        )
    if explicit_pad is not None:
        x = F.pad(x, explicit_pad, mode=pad_mode)
        padding = (0, 0)
    if isinstance(padding, str):
        raise ValueError(f"conv_input_rows: padding={padding!r} needs explicit_pad.")
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# ---------------------------------------------------------------------------------------------------------
# The GPTQ solve


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    damp: float = 0.01,
    block_size: int = 32,
    act_order: bool = False,
    clip_search: bool = False,
    refit: bool = False,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize `weight` (N, K) to minimise ||X W^T - X Q^T||^2 for inputs with Hessian `hessian` (K, K).

    Returns codes (N, K) (int8 if symmetric, uint8 otherwise), scale (N, G) fp32 and zero point (N, G)
    uint8 or None; the weight is `dequantize_weight(codes, scale, zero_point, group_size=group_size)` (the
    grid is described in the module doc). A (C, K, K) `hessian` splits the N output rows into C equal
    groups with one Hessian each (a grouped convolution's weight, flattened to (N, K)).

    `damp` is added to the Hessian's diagonal as a fraction of its mean. `act_order` solves the columns in
    order of decreasing Hessian diagonal (the most active inputs first) while groups keep the original
    column order with scales from the original weight (GPTQ's static groups), so the artifact needs no
    permutation. Without it, each group's scale comes from the partly updated weight when the solve
    reaches the group, as in the reference implementation.

    `clip_search` (with static scales: `act_order` or per channel) shrinks each group's range to the ratio
    that minimises the group's rounding error weighted by the Hessian (`search_clip`), before the solve.
    `refit` then refits the scales to the codes found (`refit_scales`), with the undamped Hessian.

    Columns whose input is always zero (Hessian diagonal 0) are rounded to nearest and kept, not zeroed
    (the reference zeroes them), so inputs unseen in calibration still meet the original weight.

    `residual_out`, an (N, K) fp32 tensor, receives where each code's (updated) weight lay between grid
    points when it was rounded: position - code, in [-0.5, 0.5] (clamped codes: the bound). A learned
    rounding can start there, with GPTQ's choice and how close it was.

    >>> x = torch.randn(64, 6); w = torch.randn(8, 6)
    >>> codes, scale, zp = gptq_quantize(w, x.T @ x / 64, bits=4, group_size=None, symmetric=True)
    >>> codes.shape, scale.shape, zp
    (torch.Size([8, 6]), torch.Size([8, 1]), None)
    """
    if weight.ndim != 2:
        raise ValueError(f"gptq_quantize: the weight must be 2-D (out, in), got shape {tuple(weight.shape)}.")
    n, k = weight.shape
    h = hessian.detach().double()  # fp64 for the factorisations
    h = h[None] if h.ndim == 2 else h
    c = h.shape[0]
    if h.ndim != 3 or h.shape[1:] != (k, k) or n % c:
        raise ValueError(
            f"gptq_quantize: the Hessian has shape {tuple(hessian.shape)}; a weight of shape {(n, k)} needs "
            f"({k}, {k}), or (C, {k}, {k}) with C dividing {n}."
        )
    if not torch.isfinite(h).all():
        raise ValueError("gptq_quantize: the Hessian holds NaN or Inf (the layer's inputs were not finite).")
    if not torch.isfinite(weight).all():
        raise ValueError("gptq_quantize: the weight holds NaN or Inf.")
    if damp < 0 or block_size < 1:
        raise ValueError(f"gptq_quantize: damp={damp} must be >= 0 and block_size={block_size} >= 1.")
    grid = WeightGrid(bits=bits, group_size=group_size, symmetric=symmetric)
    w = weight.detach().float().reshape(c, n // c, k)  # (C, R, K): R output rows per Hessian
    if residual_out is not None and residual_out.shape != (n, k):
        raise ValueError(
            f"gptq_quantize: residual_out must have shape {(n, k)}, not {tuple(residual_out.shape)}."
        )
    codes, scale, zero = _solve(
        w,
        h,
        grid,
        damp=damp,
        block_size=block_size,
        act_order=act_order,
        clip_search=clip_search,
        residual_out=None if residual_out is None else residual_out.view(c, n // c, k),
    )
    if refit:
        scale = torch.stack(
            [
                refit_scales(
                    w[i], codes[i], scale[i], None if symmetric else zero[i], h[i], group_size=group_size
                )
                for i in range(c)
            ]
        )
    zp = zero.reshape(n, -1).to(torch.uint8) if not symmetric else None
    return codes.reshape(n, k).to(grid.code_dtype), scale.reshape(n, -1), zp


def search_clip(
    hessian: torch.Tensor,
    weight: torch.Tensor,
    grid: WeightGrid,
    *,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> torch.Tensor:
    """Per (output row, group) range shrink factor (N, G) in (1 - max_shrink, 1] that minimises the error of
    the group's contribution to the output (sum over the group's columns of x_j w_nj), for inputs with Gram
    matrix `hessian` (K, K).

    >>> x = torch.randn(64, 32)
    >>> ratio = search_clip(x.T @ x / 64, torch.randn(4, 32), WeightGrid(4, 16, True))
    >>> ratio.shape, bool((ratio <= 1).all())
    (torch.Size([4, 2]), True)
    """
    if not 0 <= max_shrink < 1:
        raise ValueError(f"search_clip: max_shrink={max_shrink} must be in [0, 1).")
    n, k = weight.shape
    g, width = grid.n_groups(k), grid.width(k)
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid) + 1) if 1 - i / n_grid > 1 - max_shrink]
    pad = g * width - k
    h = torch.nn.functional.pad(hessian.float(), (0, pad, 0, pad))
    blocks = h.reshape(g, width, g, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (G, width, width)
    w = weight.detach().float()
    out = torch.ones(n, g, device=weight.device)
    best_err = torch.full((n, g), float("inf"), device=weight.device)
    for ratio in ratios:
        delta = grid.grouped(grid.fake_quantize(w, ratio) - w)  # (N, G, width)
        err = (torch.einsum("ngw,gwv->ngv", delta, blocks) * delta).sum(dim=-1)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        out[better] = ratio
    return out


def upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper triangular U with U^T U = h^-1, for (C, K, K) positive definite h.

    With J the order reversal, J h J = L L^T gives h^-1 = (J L^-T J)(J L^-1 J), and J L^-1 J is upper
    triangular with a positive diagonal. One Cholesky and one triangular inverse, instead of the
    reference's Cholesky, cholesky_inverse and second Cholesky (cholesky_inverse is slow on CPUs).
    """
    flipped = h.flip(1, 2)
    chol = torch.linalg.cholesky(flipped)
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    return torch.linalg.solve_triangular(chol, eye, upper=False).flip(1, 2)


def _solve(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: WeightGrid,
    *,
    damp: float,
    block_size: int,
    act_order: bool,
    clip_search: bool = False,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ solve on C independent problems: w (C, R, K) fp32, h (C, K, K) fp64. Returns codes
    (C, R, K) fp32, scale and zero point (C, R, G) fp32."""
    c, r, k = w.shape
    device = w.device
    qmin, qmax = grid.code_range
    width, n_groups = grid.width(k), grid.n_groups(k)
    if grid.group_size is not None:
        # A group's scale is taken when the solve reaches its first column, from the weight as updated so
        # far; that is up to date when the group lies within one block or starts one.
        if block_size >= grid.group_size:
            block_size -= block_size % grid.group_size
        else:
            block_size = math.gcd(block_size, grid.group_size)

    h = h.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)  # (C, K) view
    diag[diag == 0] = 1.0  # dead inputs: no error spreads to or from them

    static = grid.group_size is None or act_order
    scale = torch.empty(c, r, n_groups, device=device)
    zero = torch.zeros(c, r, n_groups, device=device)
    if static:
        ratio: torch.Tensor | float = 1.0
        if clip_search:
            ratio = torch.cat([search_clip(h[i].float(), w[i], grid) for i in range(c)])
        s0, z0 = grid.params(w.reshape(c * r, k), ratio)
        scale.copy_(s0.reshape(c, r, n_groups))
        if z0 is not None:
            zero.copy_(z0.float().reshape(c, r, n_groups))

    perm = torch.arange(k, device=device).expand(c, k)
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True, stable=True)  # (C, K)
        w = w.gather(2, perm[:, None, :].expand(c, r, k))
        h = h.gather(1, perm[:, :, None].expand(c, k, k)).gather(2, perm[:, None, :].expand(c, k, k))
    group_of = (perm // width).contiguous()  # (C, K): group (in the original order) of each solved column

    h.diagonal(dim1=1, dim2=2).add_(damp * torch.diagonal(h, dim1=1, dim2=2).mean(dim=1, keepdim=True))
    try:
        hinv = upper_cholesky_of_inverse(h).float()  # (C, K, K)
    except torch.linalg.LinAlgError as exc:
        raise ValueError(
            f"gptq_quantize: the Hessian is not positive definite with damp={damp}; increase damp "
            "(e.g. 0.1) or calibrate on more samples."
        ) from exc

    # The solve runs on W^T (C, K, R): each column of W is then a contiguous row, and a rank-1 update of
    # the remaining columns is one `addr_` (several times faster on a CPU than slices of W's columns).
    # Blocks of 32 columns keep those updates small; the rest of the weight is updated once per block by
    # a matrix product, which costs the same whatever the block size.
    wt = w.transpose(1, 2).contiguous()
    codes_t = torch.empty(c, k, r, device=device)
    positions_t = torch.empty(c, k, r, device=device) if residual_out is not None else None
    # The scale (and zero point) of each solved column's group, as rows (C, K, R) like `wt`.
    s_cols = scale.gather(2, group_of[:, None, :].expand(c, r, k)).transpose(1, 2).contiguous()
    z_cols = zero.gather(2, group_of[:, None, :].expand(c, r, k)).transpose(1, 2).contiguous()
    asymmetric = not grid.symmetric
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[:, i1:i2]  # (C, B, R) view, updated in place
        err1 = torch.empty_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % width == 0:  # a new group: its scale from the weight as updated so far
                s, z = grid.params(wt[:, col : col + width].transpose(1, 2).reshape(c * r, -1))
                scale[:, :, col // width] = s.reshape(c, r)
                s_cols[:, col : col + width] = s.reshape(c, 1, r)
                if z is not None:
                    zero[:, :, col // width] = z.float().reshape(c, r)
                    z_cols[:, col : col + width] = z.float().reshape(c, 1, r)
            x, s_g, z_g = w1[:, i], s_cols[:, col], z_cols[:, col]  # (C, R) views
            q = torch.div(x, s_g, out=codes_t[:, col])
            if asymmetric:
                q.add_(z_g)
            if positions_t is not None:
                positions_t[:, col] = q
            q.round_().clamp_(qmin, qmax)
            e = err1[:, i]
            torch.mul(q - z_g if asymmetric else q, s_g, out=e)  # the dequantized column
            torch.sub(x, e, out=e).div_(hinv1[:, i, i, None])
            if c == 1:
                w1[0, i:].addr_(hinv1[0, i, i:], e[0], alpha=-1.0)
            else:
                w1[:, i:].sub_(hinv1[:, i, i:, None] * e[:, None, :])
        if c == 1:
            wt[0, i2:].addmm_(hinv[0, i1:i2, i2:].T, err1[0], alpha=-1.0)
        else:
            wt[:, i2:].baddbmm_(hinv[:, i1:i2, i2:].transpose(1, 2), err1, alpha=-1.0)

    codes = codes_t.transpose(1, 2)
    if positions_t is not None:
        assert residual_out is not None
        residual_out.copy_((positions_t - codes_t).clamp_(-0.5, 0.5).transpose(1, 2))
    if act_order:
        back = torch.argsort(perm, dim=1)[:, None, :].expand(c, r, k)
        codes = codes.gather(2, back)
        if residual_out is not None:
            residual_out.copy_(residual_out.gather(2, back))
    return codes, scale, zero
