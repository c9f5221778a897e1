"""Learned Step Size Quantization (LSQ, Esser et al. 2020, arXiv:1902.08153): fake quantization that
rounding passes gradients straight through, and whose step size (the scale) is trained by gradient.

Pure functions on tensors; nothing here walks a model or reads a config.

    s = scale_log.exp()                                   # trained scale, (channels,) or 0-d
    w_hat = lsq_fake_quantize(w, s, qmin=-127, qmax=127, axis=0, grad_factor=lsq_grad_factor(w[0].numel(), 127))
    loss(w_hat).backward()                                # gradients reach both w and the scale

The forward value is exactly the runtime's grid, `(clamp(round(x / s) + z, qmin, qmax) - z) * s`, the
formula of `ops.quant.fake_quantize`; only the backward pass differs.
"""

from __future__ import annotations

import math

import torch

from modelpress.ops.quant import _along, affine_params, code_range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """`round(x)` (half to even) forward; identity gradient backward (the straight-through estimator).

    >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
    >>> y = round_ste(x); y.sum().backward()
    >>> y.tolist(), x.grad.tolist()
    ([0.0, 2.0], [1.0, 1.0])
    """
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """`x` forward; the gradient reaching `x` is multiplied by `factor` backward.

    >>> s = torch.tensor(2.0, requires_grad=True)
    >>> (scale_grad(s, 0.5) * 3).backward(); float(s.grad)
    1.5
    """
    scaled = x * factor
    return scaled + (x - scaled).detach()


def lsq_grad_factor(elements: int, qmax: int) -> float:
    """LSQ's step-size gradient scale g = 1 / sqrt(N * Q_P).

    `elements` is N, the number of values one scale quantizes (a weight channel's size, or an activation's
    features per sample); `qmax` is Q_P, the top code. It keeps the scale's update in proportion to the
    weights' update for SGD; Adam divides any constant factor out again, so there it only meets Adam's eps.

    >>> lsq_grad_factor(100, 127) == 1 / math.sqrt(12700)
    True
    """
    if elements < 1 or qmax < 1:
        raise ValueError(f"lsq_grad_factor: elements={elements} and qmax={qmax} must both be at least 1.")
    return 1.0 / math.sqrt(elements * qmax)


def lsq_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: int | torch.Tensor = 0,
    *,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """`(clamp(round(x / s) + z, qmin, qmax) - z) * s`, differentiable in `x` and `scale` as LSQ prescribes.

    Forward: the quantize-dequantize value on the integer grid (ONNX QuantizeLinear divides by the scale,
    as here). Backward, with v = x / s:
      d/dx = 1 where qmin - z <= v <= qmax - z, else 0 (straight-through inside the range, none when clipped)
      d/ds = round(v) - v inside, qmin - z below, qmax - z above, times `grad_factor`
    The zero point is an integer held fixed (no gradient): it only says where the clipping window sits.
    `scale` is 0-d for per-tensor (`axis=None`) or (x.shape[axis],) per channel; `zero_point` likewise, or
    one number for all channels.

    >>> s = torch.tensor(0.5, requires_grad=True)
    >>> lsq_fake_quantize(torch.tensor([0.3, 0.8, 9.0]), s, qmin=-7, qmax=7)
    tensor([0.5000, 1.0000, 3.5000], grad_fn=<MulBackward0>)
    """
    if qmin >= qmax:
        raise ValueError(f"lsq_fake_quantize: qmin={qmin} must be below qmax={qmax}.")
    s = _along(scale_grad(scale, grad_factor).float(), x, axis, "scale")
    z = torch.as_tensor(zero_point, device=x.device).detach().float()
    z = z.reshape(()) if z.numel() == 1 else _along(z, x, axis, "zero_point")  # one zero point: any axis
    v = torch.clamp(
        x / s, qmin - z, qmax - z
    )  # clamping before rounding equals rounding first: z is integral
    return round_ste(v) * s


def affine_range(
    scale: float, zero_point: int, *, bits: int = 8, signed: bool = False
) -> tuple[float, float]:
    """The (lo, hi) that `affine_params(lo, hi, symmetric=False)` maps back to this (scale, zero_point).

    lo = (qmin - z) * s and hi = (qmax - z) * s give it up to fp32 rounding of the range's width; the end
    furthest from 0 is then moved by a few ulps to make the round trip exact. The zero point always comes
    back exactly; the scale does, or (for about 6% of scales, when no fp32 width divides to it) lands one
    ulp away. Lets a quantizer trained as (scale, zero_point) be stored by a layer configured by a range.

    >>> lo, hi = affine_range(0.1, 20)
    >>> s, z = affine_params(lo, hi, symmetric=False, signed=False)
    >>> float(s) == float(torch.tensor(0.1)), int(z)
    (True, 20)
    """
    qmin, qmax = code_range(bits, signed=signed)
    if not qmin <= int(zero_point) <= qmax:
        raise ValueError(f"affine_range: zero_point={zero_point} is outside the codes [{qmin}, {qmax}].")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"affine_range: scale={scale} must be a positive finite number.")
    s32 = torch.tensor(scale, dtype=torch.float32)
    z = int(zero_point)
    lo = torch.tensor((qmin - z) * float(s32), dtype=torch.float32)
    hi = torch.tensor((qmax - z) * float(s32), dtype=torch.float32)
    # Candidates: the larger end moved by -8..8 ulps (adjacent fp32 values of one sign are adjacent ints).
    ulps = torch.arange(-8, 9, dtype=torch.int32)
    move_hi = bool(hi.abs() >= lo.abs())
    end = hi if move_hi else lo
    cands = (end.view(torch.int32) + ulps).view(torch.float32)
    los = lo.expand_as(cands) if move_hi else cands
    his = cands if move_hi else hi.expand_as(cands)
    got_s, got_z = affine_params(los, his, bits=bits, symmetric=False, signed=signed)
    error = torch.where(got_z == z, (got_s.double() - float(s32)).abs(), math.inf)
    error = error + ulps.abs().double() * 1e-30  # among equally close ones, the least moved
    best = int(torch.argmin(error))
    return float(los[best]), float(his[best])
