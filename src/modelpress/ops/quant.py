"""Affine quantization maths: scales, quantize, dequantize. Pure functions on tensors."""

from __future__ import annotations

import torch

# Registers torch.ops.quantized_decomposed.*, which torch.onnx lowers to QuantizeLinear/DequantizeLinear.
import torch.ao.quantization.fx._decomposed

_EPS = 1e-12


def qrange(bits: int, *, symmetric: bool) -> tuple[int, int]:
    """Integer range of a signed `bits`-bit code; symmetric drops the lowest code (-128 for int8)."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (lo + 1, hi) if symmetric else (lo, hi)


def symmetric_scale(w: torch.Tensor, *, axis: int, bits: int = 8) -> torch.Tensor:
    """Per-channel scale along `axis` so that max|w| maps to the top code. Shape (w.shape[axis],)."""
    reduce_dims = [d for d in range(w.ndim) if d != axis]
    amax = w.detach().abs().amax(dim=reduce_dims) if reduce_dims else w.detach().abs()
    _, hi = qrange(bits, symmetric=True)
    return (amax.float() / hi).clamp(min=_EPS)


def _broadcast(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.view(shape)


def quantize_symmetric(w: torch.Tensor, scale: torch.Tensor, *, axis: int, bits: int = 8) -> torch.Tensor:
    """Round-to-nearest codes of `w` (int8 storage) for a per-channel `scale` along `axis`."""
    lo, hi = qrange(bits, symmetric=True)
    q = torch.round(w.detach().float() / _broadcast(scale, w.ndim, axis)).clamp(lo, hi)
    return q.to(torch.int8)


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor, *, axis: int, bits: int = 8) -> torch.Tensor:
    """`q * scale` along `axis`, through the op that ONNX export turns into DequantizeLinear."""
    lo, hi = qrange(bits, symmetric=False)
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return torch.ops.quantized_decomposed.dequantize_per_channel(
        q, scale, zero_point, axis, lo, hi, torch.int8
    )


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; int8 RTN is typically 35-45 dB)."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    signal = reference.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise.clamp(min=_EPS)))
