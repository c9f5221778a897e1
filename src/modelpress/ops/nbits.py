"""Block-quantized n-bit weights (int4 packed two per byte, or int8) as torch custom ops.

The ops compute in torch exactly what the exported graph computes: `torch.onnx` translates them (see
`deploy/export.py`) into ONNX Runtime's contrib ops `com.microsoft.MatMulNBits` (Linear) and
`GatherBlockQuantized` (Embedding), which both ONNX Runtime and OpenVINO execute, so the artifact stores
the packed codes and a scale (and zero point) per block of `block_size` input features.

Storage layout (the contrib ops' own):
- codes are unsigned: `u = q + 2^(bits-1)` for symmetric signed codes q, so the implicit zero point is
  2^(bits-1) (8 for int4) and a weight is `(u - zero_point) * scale`;
- `packed` is (N, n_blocks, block_size * bits // 8) uint8, low nibble first; K is padded up to a whole
  number of blocks with the zero point's code (the padded columns never meet an input);
- `scales` is (N * n_blocks,) fp32; `zero_points` is None (symmetric) or (N * ceil(n_blocks * bits / 8),)
  uint8 packed like the codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modelpress.ops.quant import pack_int4, unpack_int4


def n_blocks(k: int, block_size: int) -> int:
    """Blocks along K: the last one is partial when `block_size` does not divide `k`."""
    return -(-k // block_size)


def check_block_size(block_size: int, bits: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits} is unsupported for block quantization; use 4 or 8.")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"block_size={block_size} is unsupported: the runtimes' kernels need a power of two >= 16 "
            "(16, 32, 64, 128, 256)."
        )


def _pack(u: Tensor, bits: int) -> Tensor:
    return pack_int4(u) if bits == 4 else u


def _unpack(packed: Tensor, bits: int, last_dim: int) -> Tensor:
    return unpack_int4(packed, signed=False, last_dim=last_dim) if bits == 4 else packed


def pack_blocks(
    codes: Tensor, zero_point: Tensor | None, *, bits: int, block_size: int
) -> tuple[Tensor, Tensor | None]:
    """Codes (N, K) -> packed (N, n_blocks, block_size * bits // 8) uint8 and packed zero points.

    `codes` are unsigned in [0, 2^bits - 1]; `zero_point` is (N, n_blocks) in the same range, or None
    for the implicit 2^(bits-1). Padded columns get the zero point's code.
    """
    n, k = codes.shape
    blocks = n_blocks(k, block_size)
    pad = blocks * block_size - k
    mid = 2 ** (bits - 1)
    u = codes.to(torch.uint8)
    if pad:
        fill = torch.full((n, pad), mid, dtype=torch.uint8)
        if zero_point is not None:
            fill = zero_point[:, -1:].to(torch.uint8).expand(n, pad).contiguous()
        u = torch.cat([u, fill], dim=1)
    packed = _pack(u.reshape(n, blocks, block_size), bits).contiguous()
    zp = None
    if zero_point is not None:
        zp = _pack(zero_point.to(torch.uint8).reshape(n, blocks), bits).reshape(-1).contiguous()
    return packed, zp


def unpack_blocks(
    packed: Tensor, zero_points: Tensor | None, *, k: int, bits: int, block_size: int
) -> tuple[Tensor, Tensor]:
    """Inverse of `pack_blocks`: unsigned codes (N, K) int32 and zero points (N, n_blocks) int32."""
    n, blocks = packed.shape[0], packed.shape[1]
    u = _unpack(packed, bits, block_size).reshape(n, blocks * block_size)[:, :k].to(torch.int32)
    if zero_points is None:
        zp = torch.full((n, blocks), 2 ** (bits - 1), dtype=torch.int32)
    else:
        per_row = math.ceil(blocks * bits / 8)
        zp = _unpack(zero_points.reshape(n, per_row), bits, blocks).to(torch.int32)
    return u, zp


def dequantize_blocks(
    packed: Tensor, scales: Tensor, zero_points: Tensor | None, *, k: int, bits: int, block_size: int
) -> Tensor:
    """fp32 weight (N, K) from the packed storage: `(u - zero_point) * scale` per block."""
    n, blocks = packed.shape[0], packed.shape[1]
    u, zp = unpack_blocks(packed, zero_points, k=k, bits=bits, block_size=block_size)
    expand = torch.arange(k, device=packed.device) // block_size  # block index of each column
    s = scales.reshape(n, blocks).float()
    return (u - zp[:, expand]).float() * s[:, expand]


def decompress_blocks(
    packed: Tensor, scales: Tensor, zero_points: Tensor | None, *, k: int, block_size: int
) -> Tensor:
    """fp32 weight (N, K) from 8-bit block storage in plain tensor ops: in ONNX `Cast(uint8 -> float) ->
    Sub -> Mul -> Reshape`, which ONNX Runtime folds once at session creation (fp32 speed, the file stays
    int8) and OpenVINO reads as its grouped weight-decompression pattern (NNCF's). The values are
    `dequantize_blocks`' bit for bit.

    Why not MatMulNBits at 8 bits: ONNX Runtime 1.32's CPU kernel at accuracy_level 0 (fp32 maths, what
    the layer computes) dequantizes the whole weight on every call; measured on MiniLM's shapes (one
    thread): 15-19x slower than an fp32 MatMul for one row, 2.5-3.5x for 64 rows, 1.0-1.25x for 1024.
    Its accuracy_level 4 is faster but quantizes the input to int8, which changes the numbers.

    >>> packed, _ = pack_blocks(torch.full((2, 20), 130, dtype=torch.uint8), None, bits=8, block_size=16)
    >>> decompress_blocks(packed, torch.ones(4), None, k=20, block_size=16)[0, :3]
    tensor([2., 2., 2.])
    """
    n, blocks, size = packed.shape  # (N, n_blocks, block_size) codes
    if size != block_size:
        raise ValueError(f"decompress_blocks takes 8-bit codes: {size} bytes per block of {block_size}.")
    zp = 128.0 if zero_points is None else zero_points.reshape(n, blocks, 1).float()
    w = (packed.float() - zp) * scales.reshape(n, blocks, 1).float()  # (N, n_blocks, block_size)
    w = w.reshape(n, blocks * block_size)
    return w if blocks * block_size == k else w[:, :k]


@torch.library.custom_op("modelpress::matmul_nbits", mutates_args=())
def matmul_nbits(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    bias: Tensor | None,
    k: int,
    bits: int,
    block_size: int,
) -> Tensor:
    """`x @ W.T + bias` with W stored block-quantized (ONNX: com.microsoft.MatMulNBits, then Add)."""
    w = dequantize_blocks(packed, scales, zero_points, k=k, bits=bits, block_size=block_size)
    return F.linear(x, w.to(x.dtype), bias)


@matmul_nbits.register_fake
def _(
    x: Tensor,
    packed: Tensor,
    scales: Tensor,
    zero_points: Tensor | None,
    bias: Tensor | None,
    k: int,
    bits: int,
    block_size: int,
) -> Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("modelpress::gather_nbits", mutates_args=())
def gather_nbits(
    indices: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor | None, bits: int, block_size: int
) -> Tensor:
    """Rows `indices` of a (V, D) table stored block-quantized along D (ONNX: GatherBlockQuantized).

    Here `packed` is (V, D * bits // 8), `scales` (V, D // block_size), `zero_points` None or
    (V, D // block_size * bits // 8): the layout GatherBlockQuantized takes.
    """
    v = packed.shape[0]
    d = packed.shape[1] * 8 // bits
    blocks = d // block_size
    rows = packed[indices.reshape(-1)]  # (L, D * bits / 8)
    u = _unpack(rows, bits, d).to(torch.int32).reshape(-1, blocks, block_size)
    if zero_points is None:
        zp = torch.full((1, blocks, 1), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zp = _unpack(zero_points.reshape(v, -1)[indices.reshape(-1)], bits, blocks).to(torch.int32)[..., None]
    s = scales.reshape(v, blocks)[indices.reshape(-1)].float()[..., None]
    return ((u - zp).float() * s).reshape(*indices.shape, d)


@gather_nbits.register_fake
def _(
    indices: Tensor, packed: Tensor, scales: Tensor, zero_points: Tensor | None, bits: int, block_size: int
) -> Tensor:
    d = packed.shape[1] * 8 // bits
    return scales.new_empty((*indices.shape, d))


def block_quantize(
    w: Tensor,
    *,
    bits: int,
    block_size: int,
    symmetric: bool = True,
    clip_search: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest block quantization of a (N, K) weight: unsigned codes (N, K) uint8 in
    [0, 2^bits - 1], scale (N, n_blocks) fp32 and zero point (N, n_blocks) uint8 (None if symmetric).

    Symmetric blocks use all 2^bits codes: the block's largest-magnitude value maps exactly to the lowest
    code (the sign goes into the scale), as llama.cpp's Q4_0 does, instead of wasting code -8.
    `clip_search` shrinks each block's range over a small grid and keeps the one with the least squared
    weight error. Off by default: the weight error is not the model's. Measured on SmolLM2 (int4 g128,
    perplexity 31.8 with it, 29.7 without) and MiniLM (Lee Pearson 0.647/0.661 with it at g32/g128,
    0.654/0.672 without), it clips the large weights that matter most.

    >>> u, s, zp = block_quantize(torch.randn(4, 40), bits=4, block_size=16)
    >>> u.shape, s.shape, zp is None
    (torch.Size([4, 40]), torch.Size([4, 3]), True)
    """
    check_block_size(block_size, bits)
    if w.ndim != 2:
        raise ValueError(f"block quantization needs a 2-D weight (out, in), got shape {tuple(w.shape)}.")
    n, k = w.shape
    blocks = n_blocks(k, block_size)
    wf = F.pad(w.detach().float(), (0, blocks * block_size - k)).reshape(n, blocks, block_size)
    mid, top = 2 ** (bits - 1), 2**bits - 1
    ratios = torch.linspace(1.0, 0.6, 9) if clip_search else torch.ones(1)
    best_err = torch.full((n, blocks), float("inf"))
    best_scale = torch.zeros(n, blocks)
    best_zp = torch.zeros(n, blocks)
    if symmetric:
        idx = wf.abs().argmax(dim=-1, keepdim=True)
        extreme = wf.gather(-1, idx).squeeze(-1)  # signed value of largest magnitude, (N, blocks)
    else:
        lo, hi = wf.amin(dim=-1).clamp(max=0), wf.amax(dim=-1).clamp(min=0)
    for r in ratios.tolist():
        if symmetric:
            scale = extreme * r / -mid
            scale = torch.where(scale == 0, torch.full_like(scale, 1e-12), scale)
            zp = torch.full_like(scale, float(mid))
        else:
            scale = ((hi - lo) * r / top).clamp(min=1e-12)
            zp = (-torch.round(lo * r / scale)).clamp(0, top)
        q = (torch.round(wf / scale[..., None]) + zp[..., None]).clamp(0, top)
        err = ((q - zp[..., None]) * scale[..., None] - wf).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    q = (torch.round(wf / best_scale[..., None]) + best_zp[..., None]).clamp(0, top)
    codes = q.reshape(n, blocks * block_size)[:, :k].to(torch.uint8)
    return codes, best_scale, None if symmetric else best_zp.to(torch.uint8)
