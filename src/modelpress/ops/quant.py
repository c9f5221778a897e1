"""Affine quantization maths: scales, quantize, dequantize, group-wise int4, packing. Pure functions on
tensors, fp32 maths; nothing here walks a model or reads a config."""

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


def dequantize_per_channel(
    q: torch.Tensor,
    scale: torch.Tensor,
    *,
    axis: int,
    bits: int = 8,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(q - zero_point) * scale` along `axis` (zero point 0 when None), through the op that ONNX export
    turns into DequantizeLinear."""
    lo, hi = qrange(bits, symmetric=False)
    zp = torch.zeros_like(scale, dtype=torch.int32) if zero_point is None else zero_point.to(torch.int32)
    return torch.ops.quantized_decomposed.dequantize_per_channel(q, scale, zp, axis, lo, hi, torch.int8)


def decompress_per_channel(
    q: torch.Tensor, scale: torch.Tensor, *, axis: int, zero_point: torch.Tensor | None = None
) -> torch.Tensor:
    """`(q - zero_point) * scale` along `axis` in plain tensor ops, for weight-only layers: the ONNX export is
    `Cast(int8 -> float) -> Sub -> Mul` on the int8 initializer, not DequantizeLinear.

    Why not DequantizeLinear: ONNX Runtime deliberately leaves a DequantizeLinear on a constant unfolded
    (it waits for a QDQ fusion, which a weight-only graph never completes), so a default
    `InferenceSession` dequantized every weight on every call (2-3x slower than fp32 on a small CNN,
    9x on an LSTM whose weights are then sliced and concatenated per call). Cast, Sub and Mul on constants
    it folds once at session creation: the file stays int8 (~4x smaller) and the runtime computes with fp32
    weights at fp32 speed. OpenVINO reads the same chain as its own weight-decompression pattern (Convert
    -> Subtract -> Multiply on an int8 constant, what NNCF's `compress_weights` writes and what its ONNX
    reader makes of DequantizeLinear), so it keeps the weight int8 as before. The values are those of
    DequantizeLinear bit for bit: `q - zero_point` is exact in fp32, then one rounding in the product.
    Statically quantized layers keep `dequantize_per_channel` (DequantizeLinear), which runtimes fuse
    into integer kernels.

    >>> decompress_per_channel(torch.tensor([[2, -4]], dtype=torch.int8), torch.tensor([0.5]), axis=0)
    tensor([[ 1., -2.]])
    """
    w = q.float()  # (..., C, ...) codes as floats, C at `axis`
    if zero_point is not None:
        # Reshaped before the Cast: the file keeps int8 zero points, as OpenVINO's pattern has them.
        w = w - _broadcast(zero_point, q.ndim, axis).float()
    return w * _broadcast(scale.float(), q.ndim, axis)


def asymmetric_params(w: torch.Tensor, *, axis: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale fp32, zero_point int32) along `axis` mapping each channel's [min, max] (widened
    to contain 0) onto the signed codes [-2^(b-1), 2^(b-1)-1]: the grid NNCF's INT8_ASYM weights use,
    finer than the symmetric one wherever a channel's range is lopsided. Shapes (w.shape[axis],).

    >>> asymmetric_params(torch.tensor([[-1.0, 3.0]]), axis=0)
    (tensor([0.0157]), tensor([-64], dtype=torch.int32))
    """
    reduce_dims = [d for d in range(w.ndim) if d != axis]
    x = w.detach().float()
    lo = x.amin(dim=reduce_dims) if reduce_dims else x
    hi = x.amax(dim=reduce_dims) if reduce_dims else x
    return affine_params(lo, hi, bits=bits, symmetric=False, signed=True)


# ---------------------------------------------------------------------------------------------------------
# Affine (scale, zero-point) quantization: per tensor (axis=None) or per channel (axis=int).
# Codes are integers; a code q stands for (q - zero_point) * scale. Zero point integral => 0.0 is exact.


def code_range(bits: int, *, signed: bool) -> tuple[int, int]:
    """Storage range `quantize` clamps to: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned.

    This is the saturation range of ONNX QuantizeLinear for int8/uint8, so fake quantization here
    matches the runtime also for values outside the calibrated range.

    >>> code_range(8, signed=False)
    (0, 255)
    """
    _check_bits(bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 16:
        raise ValueError(
            f"bits={bits} is unsupported; use an integer width between 2 and 16 (usually 4 or 8)."
        )


def _storage_dtype(bits: int, *, signed: bool) -> torch.dtype:
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int32


def affine_params(
    lo: torch.Tensor | float,
    hi: torch.Tensor | float,
    *,
    bits: int = 8,
    symmetric: bool,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale fp32, zero_point int32) covering [lo, hi], widened to contain 0; elementwise over lo/hi.

    - signed symmetric:    codes [-(2^(b-1)-1), 2^(b-1)-1], zero_point 0, scale = max|range| / (2^(b-1)-1)
    - unsigned symmetric:  the same grid shifted up by 2^(b-1) (zero_point 2^(b-1), codes [1, 2^b-1])
    - signed asymmetric:   codes [-2^(b-1), 2^(b-1)-1], integer zero_point
    - unsigned asymmetric: codes [0, 2^b-1] (uint8 activations), integer zero_point

    lo/hi are 0-d (per tensor) or 1-d (per channel); any matching shapes work. Zero ranges get a tiny
    scale instead of dividing by zero.

    >>> affine_params(torch.tensor(-1.0), torch.tensor(3.0), symmetric=False, signed=False)
    (tensor(0.0157), tensor(64, dtype=torch.int32))
    """
    _check_bits(bits)
    lo_t = torch.as_tensor(lo).detach().float()
    hi_t = torch.as_tensor(hi).detach().float()
    if not (torch.isfinite(lo_t).all() and torch.isfinite(hi_t).all()):
        raise ValueError(f"affine_params: range must be finite, got lo={lo_t.tolist()}, hi={hi_t.tolist()}.")
    if (lo_t > hi_t).any():
        raise ValueError(f"affine_params: lo must be <= hi, got lo={lo_t.tolist()}, hi={hi_t.tolist()}.")
    lo_t, hi_t = lo_t.clamp(max=0), hi_t.clamp(min=0)  # 0 must be representable (padding, ReLU zeros)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = (torch.maximum(-lo_t, hi_t) / top).clamp(min=_EPS)
        zp = 0 if signed else 2 ** (bits - 1)
        return scale, torch.full_like(scale, zp, dtype=torch.int32)
    qmin, qmax = code_range(bits, signed=signed)
    scale = ((hi_t - lo_t) / (qmax - qmin)).clamp(min=_EPS)
    zero_point = (qmin - torch.round(lo_t / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _along(v: torch.Tensor, x: torch.Tensor, axis: int | None, name: str) -> torch.Tensor:
    """Reshape a per-tensor or per-channel parameter so it broadcasts against `x`."""
    if axis is None:
        if v.numel() != 1:
            raise ValueError(
                f"{name} has {v.numel()} elements but axis=None (per tensor) needs one; pass axis= for per-channel."
            )
        return v.reshape(())
    if not -x.ndim <= axis < max(x.ndim, 1):
        raise ValueError(f"axis={axis} is out of range for a tensor of shape {tuple(x.shape)}.")
    axis %= x.ndim
    if v.ndim != 1 or v.numel() != x.shape[axis]:
        raise ValueError(
            f"{name} of shape {tuple(v.shape)} does not match axis {axis} of shape {tuple(x.shape)}; "
            f"per-channel parameters need shape ({x.shape[axis]},)."
        )
    return _broadcast(v, x.ndim, axis)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    axis: int | None,
    bits: int = 8,
    signed: bool,
) -> torch.Tensor:
    """Codes `clamp(round(x / scale) + zero_point)` (half to even, clamped to `code_range`).

    Stored as int8/uint8 for bits <= 8, else int32. Divides rather than multiplying by 1/scale, as ONNX
    Runtime's QuantizeLinear does, so codes match the runtime bit for bit.

    >>> quantize(torch.tensor([0.0, 0.5, 1.0]), torch.tensor(0.5), torch.tensor(0), axis=None, signed=True)
    tensor([0, 1, 2], dtype=torch.int8)
    """
    qmin, qmax = code_range(bits, signed=signed)
    s = _along(torch.as_tensor(scale).float(), x, axis, "scale")
    zp = _along(torch.as_tensor(zero_point), x, axis, "zero_point").float()
    q = (torch.round(x.detach().float() / s) + zp).clamp(qmin, qmax)
    return q.to(_storage_dtype(bits, signed=signed))


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, axis: int | None
) -> torch.Tensor:
    """fp32 values `(q - zero_point) * scale` (the DequantizeLinear formula).

    >>> dequantize(torch.tensor([0, 1, 2], dtype=torch.uint8), torch.tensor(0.5), torch.tensor(1), axis=None)
    tensor([-0.5000,  0.0000,  0.5000])
    """
    s = _along(torch.as_tensor(scale).float(), q, axis, "scale")
    zp = _along(torch.as_tensor(zero_point), q, axis, "zero_point").to(torch.int32)
    return (q.to(torch.int32) - zp).float() * s


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    *,
    axis: int | None,
    bits: int = 8,
    signed: bool,
) -> torch.Tensor:
    """`dequantize(quantize(x))` in fp32: what the quantized model will see in place of `x`.

    >>> fake_quantize(torch.tensor([0.2, 0.3, 9.0]), torch.tensor(0.25), torch.tensor(0), axis=None, bits=4, signed=True)
    tensor([0.2500, 0.2500, 1.7500])
    """
    q = quantize(x, scale, zero_point, axis=axis, bits=bits, signed=signed)
    return dequantize(q, scale, zero_point, axis=axis)


# ---------------------------------------------------------------------------------------------------------
# Group-wise weight quantization: one (scale, zero_point) per `group_size` consecutive input features of a
# 2-D weight (out, in). Symmetric groups use signed codes (zero_point 0); asymmetric groups use unsigned
# codes [0, 2^b-1] with an integer zero_point, the layout of int4 kernels such as ORT MatMulNBits.


def _groups(w: torch.Tensor, n_groups: int) -> torch.Tensor:
    if w.ndim != 2:
        raise ValueError(f"group-wise quantization needs a 2-D weight (out, in), got shape {tuple(w.shape)}.")
    if n_groups <= 0 or w.shape[1] % n_groups:
        raise ValueError(
            f"weight of shape {tuple(w.shape)} cannot be split into {n_groups} groups along its input dimension."
        )
    return w.reshape(w.shape[0], n_groups, w.shape[1] // n_groups)  # (out, groups, group_size)


def group_params(
    w: torch.Tensor, *, group_size: int, bits: int = 4, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (out, in // group_size) fp32 and zero_point (same shape) int32 for a weight (out, in).

    >>> scale, zp = group_params(torch.randn(8, 64), group_size=32, symmetric=True)
    >>> scale.shape, zp.shape
    (torch.Size([8, 2]), torch.Size([8, 2]))
    """
    if w.ndim != 2:
        raise ValueError(f"group-wise quantization needs a 2-D weight (out, in), got shape {tuple(w.shape)}.")
    n_in = w.shape[1]
    if group_size <= 0 or n_in % group_size:
        divisors = [d for d in (16, 32, 64, 128, 256) if n_in % d == 0]
        hint = f"e.g. {divisors}" if divisors else "or per-channel quantization"
        raise ValueError(
            f"in_features={n_in} is not divisible by group_size={group_size}; choose a group_size that "
            f"divides {n_in} ({hint})."
        )
    g = _groups(w.detach().float(), n_in // group_size)
    return affine_params(g.amin(dim=-1), g.amax(dim=-1), bits=bits, symmetric=symmetric, signed=symmetric)


def quantize_grouped(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, *, bits: int = 4, symmetric: bool
) -> torch.Tensor:
    """Codes (out, in) for `group_params` output: int8 in [-2^(b-1), 2^(b-1)-1] if symmetric, else uint8.

    >>> w = torch.randn(8, 64)
    >>> q = quantize_grouped(w, *group_params(w, group_size=32, symmetric=True), symmetric=True)
    >>> q.dtype, int(q.abs().max())
    (torch.int8, 7)
    """
    qmin, qmax = code_range(bits, signed=symmetric)
    g = _groups(w.detach().float(), scale.shape[-1])
    q = (torch.round(g / scale.float()[..., None]) + zero_point.float()[..., None]).clamp(qmin, qmax)
    return q.reshape(w.shape).to(_storage_dtype(bits, signed=symmetric))


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """fp32 weight (out, in) from grouped codes; the group size is in // scale.shape[1].

    >>> w = torch.randn(8, 64)
    >>> s, zp = group_params(w, group_size=32, symmetric=False)
    >>> dequantize_grouped(quantize_grouped(w, s, zp, symmetric=False), s, zp).shape
    torch.Size([8, 64])
    """
    g = _groups(q.to(torch.int32), scale.shape[-1])
    return ((g - zero_point.to(torch.int32)[..., None]).float() * scale.float()[..., None]).reshape(q.shape)


# ---------------------------------------------------------------------------------------------------------
# int4 packing: two 4-bit codes per byte along the last dimension, low nibble first.


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] or uint8 codes in [0, 15] two per byte: (..., n) -> (..., ceil(n / 2)) uint8.

    Element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble. An odd last dimension is
    padded with a zero code, so pass `last_dim=n` to `unpack_int4` to drop it again.

    >>> pack_int4(torch.tensor([1, 2, 15], dtype=torch.uint8))
    tensor([33, 15], dtype=torch.uint8)
    """
    if q.dtype == torch.int8:
        lo, hi = -8, 7
    elif q.dtype == torch.uint8:
        lo, hi = 0, 15
    else:
        raise ValueError(
            f"pack_int4 takes int8 codes in [-8, 7] or uint8 codes in [0, 15], got dtype {q.dtype}."
        )
    if q.ndim == 0:
        raise ValueError("pack_int4 needs at least one dimension to pack along.")
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(
            f"pack_int4: {q.dtype} codes must lie in [{lo}, {hi}], got [{int(q.min())}, {int(q.max())}]."
        )
    nibbles = q.to(torch.int16) & 0xF  # two's complement low nibble: -8 -> 8, -1 -> 15
    if q.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    pairs = nibbles.reshape(*q.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, *, signed: bool, last_dim: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (..., ceil(last_dim / 2)) uint8 -> (..., last_dim) int8 (signed) or uint8.

    >>> unpack_int4(torch.tensor([33, 15], dtype=torch.uint8), signed=False, last_dim=3)
    tensor([ 1,  2, 15], dtype=torch.uint8)
    """
    if packed.dtype != torch.uint8 or packed.ndim == 0:
        raise ValueError(f"unpack_int4 takes packed uint8 bytes with at least one dim, got {packed.dtype}.")
    n = packed.shape[-1]
    if last_dim not in (2 * n - 1, 2 * n) or last_dim < 0:
        raise ValueError(
            f"unpack_int4: {n} bytes hold {2 * n - 1} or {2 * n} codes, not last_dim={last_dim}."
        )
    b = packed.to(torch.int16)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * n)[..., :last_dim]
    if signed:
        return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)
    return nibbles.to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# Export-facing per-tensor QDQ.


def quantize_dequantize_per_tensor(
    x: torch.Tensor,
    scale: float | torch.Tensor,
    zero_point: int | torch.Tensor,
    *,
    qmin: int,
    qmax: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-tensor fake quantization through `quantized_decomposed`, exported as QuantizeLinear ->
    DequantizeLinear (plus a Clip between them when [qmin, qmax] is narrower than `dtype`).

    Pass Python numbers for export: the exporter bakes them in as constants (tensor scales fail in
    torch.onnx, so tensors are converted with float()/int(), which only works in eager mode). The torch op
    multiplies by 1/scale where ONNX Runtime divides, so at exact rounding ties (about 2 in a million
    values for a generic scale) the two can differ by one code.

    >>> quantize_dequantize_per_tensor(torch.tensor([0.26, 9.0]), 0.5, 0, qmin=-128, qmax=127, dtype=torch.int8)
    tensor([0.5000, 9.0000])
    """
    if isinstance(scale, torch.Tensor) or isinstance(zero_point, torch.Tensor):
        if torch.compiler.is_exporting():
            raise ValueError(
                "quantize_dequantize_per_tensor: pass scale and zero_point as Python numbers when exporting; "
                "tensor arguments cannot be traced into QuantizeLinear constants."
            )
        scale, zero_point = float(scale), int(zero_point)
    if dtype not in (torch.int8, torch.uint8):
        raise ValueError(
            f"quantize_dequantize_per_tensor: dtype must be torch.int8 or torch.uint8, got {dtype}."
        )
    info = torch.iinfo(dtype)
    if not info.min <= qmin < qmax <= info.max:
        raise ValueError(
            f"qmin={qmin}, qmax={qmax} must satisfy {info.min} <= qmin < qmax <= {info.max} for {dtype}."
        )
    x = x.float() if x.dtype != torch.float32 else x
    q = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    if (qmin, qmax) != (info.min, info.max):
        # The exporter lowers the op to a bare QuantizeLinear, which saturates to the dtype's range and
        # ignores qmin/qmax; an explicit clamp (a Clip node) keeps torch and the runtime in agreement.
        q = q.clamp(qmin, qmax)
    return torch.ops.quantized_decomposed.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; int8 RTN is typically 35-45 dB)."""
    noise = (reference.double() - approx.double()).pow(2).sum()
    signal = reference.double().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise.clamp(min=_EPS)))


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, *, alpha: float, eps: float = 1e-5
) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s = max|X_j|^alpha / max|W_:,j|^(1 - alpha).

    Dividing the activation by s and multiplying the weight's input columns by s leaves X @ W.T unchanged
    while moving activation outliers into the (per-channel quantized) weights.
    `act_absmax`: (in,), `weight`: (out, in). Returns (in,) fp32.
    """
    w_absmax = weight.detach().abs().amax(dim=0).float().clamp(min=eps)
    a = act_absmax.float().clamp(min=eps)
    return (a.pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=eps)
