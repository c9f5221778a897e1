"""The quantized layer every quantization technique produces: int8 weight codes plus, for static schemes,
a fixed input quantizer.

In torch the layer computes exactly what the exported graph computes, and the artifact stores int8 weights.
A static layer runs `quantized_decomposed` ops that `torch.onnx` turns into QuantizeLinear /
DequantizeLinear: the QDQ pattern runtimes fuse into integer kernels. A weight-only layer decompresses its
weight with plain ops (`Cast -> Sub -> Mul`), which the runtimes fold once at load
(`ops.quant.decompress_per_channel` says why not DequantizeLinear).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.ops.dynamic import dynamic_quant_linear
from modelpress.ops.nbits import (
    block_quantize,
    check_block_size,
    decompress_blocks,
    dequantize_blocks,
    gather_nbits,
    pack_blocks,
)
from modelpress.ops.quant import (
    affine_params,
    asymmetric_params,
    decompress_per_channel,
    dequantize_per_channel,
    quantize,
    quantize_dequantize_per_tensor,
    quantize_symmetric,
    symmetric_scale,
)
from modelpress.ops.sparse import pack_mask, scatter_kept, unpack_mask

QUANTIZABLE_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "embedding": (nn.Embedding,),
    "rnn": (nn.LSTM, nn.GRU, nn.RNN),
}


def output_axis(module: nn.Module) -> int:
    """The weight axis of output channels: ConvTranspose stores (in, out / groups, *k)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups == 1:
        return 1
    return 0


def _linear(m: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w, m.bias)


def _conv(m: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return m._conv_forward(x, w, m.bias)


def _embedding(m: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.embedding(x, w, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


# How each layer type runs with a given weight. Plain functional calls trace more cleanly under
# torch.export than swapping module attributes.
FORWARD_WITH_WEIGHT: dict[type[nn.Module], Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Embedding: _embedding,
}


def call_with_weight(
    inner: nn.Module, weight: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Run `inner` with `weight` in place of its own: the layer's plain maths where known (these trace
    cleanly under torch.export), else any layer whose forward reads `self.weight`, with the tensor swapped
    in for this call."""
    call = FORWARD_WITH_WEIGHT.get(type(inner))
    if call is not None and not kwargs and len(args) == 1:
        return call(inner, args[0], weight)
    return torch.func.functional_call(inner, {"weight": weight}, args, kwargs)


# Set inside `reuse_weights()`: layer -> (its stored tensors' identity and versions, its float weight).
_reused: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], torch.Tensor]] | None = None


@contextlib.contextmanager
def reuse_weights() -> Iterator[None]:
    """Within this context a compressed layer rebuilds its float weight once and reuses it while its stored
    tensors are unchanged: calibration runs the same layers over many inputs (decoding a SparseLayer's
    bitmask took 60% of the time of SmolLM2's pruned-chain passes). Outside it (inference, export) layers
    rebuild on every call and nothing extra is kept. Nested uses share the outer cache.

    >>> with reuse_weights():  # doctest: +SKIP
    ...     outputs = [block(x) for x in inputs]
    """
    global _reused
    outer = _reused
    if outer is None:
        _reused = weakref.WeakKeyDictionary()
    try:
        yield
    finally:
        _reused = outer


class _Wrapper(nn.Module):
    """A module standing in for the layer it wraps (`inner`): model code reads the layer's settings
    (Whisper's `conv1.stride`, `in_features`, an LSTM's `batch_first`), which are answered from the wrapped
    layer, as the layer the user gave would."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


class WeightView(_Wrapper):
    """`.weight` of a compressed layer: the float weight it computes with, rebuilt on each read. Model code
    reads `layer.weight.dtype` / `.device` (Hugging Face ViT's patch embedding, tied-weight checks); the
    stored form stays what the layer keeps. Subclasses define `dequantized_weight`."""

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def reusing(self) -> bool:
        """Whether this forward reuses a built weight: inside `reuse_weights()`, in eager mode on real
        tensors (never while torch.export / jit trace the layer: the artifact keeps its stored form)."""
        if _reused is None or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return False
        return all(type(t) is torch.Tensor for t in self._buffers.values() if t is not None)

    def forward_weight(self) -> torch.Tensor:
        """The float weight for a forward: rebuilt, or inside `reuse_weights()` the one built before."""
        cache = _reused
        if cache is None or not self.reusing():
            return self.dequantized_weight()
        stored = tuple(self._buffers.values())
        stamp = tuple((t.data_ptr(), t._version, t.dtype) if t is not None else None for t in stored)
        hit = cache.get(self)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        weight = self.dequantized_weight()
        cache[self] = (stamp, weight)
        return weight

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized_weight()


class QuantizedLayer(WeightView):
    """A layer whose fp32 weight was replaced by int8 codes `qweight` and fp32 per-channel `scale`, and
    for an asymmetric weight (`symmetric=False`, weight-only) an int8 per-channel `zero_point`: the weight is
    `(qweight - zero_point) * scale`.

    With `input_scale` set, the input is quantized to uint8 (asymmetric, per tensor) first: the static
    W8A8 scheme. Forward dequantizes and calls the wrapped layer's own maths with that weight, so any layer
    whose forward reads `self.weight` works.
    """

    _modelpress_atomic = True  # profiled and reported as one layer
    qweight: torch.Tensor  # int8 codes, the layer's weight shape
    scale: torch.Tensor  # fp32, one per output channel
    zero_point: torch.Tensor | None  # int8, one per output channel, or None (symmetric: 0)
    input_multiplier: torch.Tensor | None  # SmoothQuant's 1 / s per input feature, or None

    def __init__(
        self,
        inner: nn.Module,
        *,
        bits: int = 8,
        weight_scale: torch.Tensor | None = None,
        input_range: tuple[float, float] | None = None,
        smoothing: torch.Tensor | None = None,
        symmetric: bool = True,
        weight_zero_point: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        assert isinstance(inner.weight, torch.Tensor)
        weight = inner.weight.detach()
        # SmoothQuant: the input is divided by `smoothing` (one factor per input feature, last dim) and the
        # weight's input columns multiplied by it, so the product is unchanged but outliers move to weights.
        if smoothing is not None:
            weight = weight * smoothing[None, :]
        self.register_buffer("input_multiplier", None if smoothing is None else (1.0 / smoothing).float())
        self.axis = output_axis(inner)
        self.bits = bits
        if symmetric and weight_zero_point is not None:
            raise ValueError(
                "QuantizedLayer: weight_zero_point needs symmetric=False (symmetric codes have 0)."
            )
        if symmetric:
            scale = (
                weight_scale
                if weight_scale is not None
                else symmetric_scale(weight, axis=self.axis, bits=bits)
            )
            self.register_buffer("qweight", quantize_symmetric(weight, scale, axis=self.axis, bits=bits))
            self.register_buffer("zero_point", None)
        else:
            if bits != 8 or input_range is not None or smoothing is not None:
                raise ValueError(
                    "QuantizedLayer: symmetric=False is for int8 weight-only layers (bits=8, no input "
                    "quantizer or smoothing)."
                )
            if (weight_scale is None) != (weight_zero_point is None):
                raise ValueError("QuantizedLayer: give weight_scale and weight_zero_point together.")
            if weight_scale is not None and weight_zero_point is not None:
                scale, zp = weight_scale, weight_zero_point
            else:
                scale, zp = asymmetric_params(weight, axis=self.axis, bits=bits)
            codes = quantize(weight, scale, zp, axis=self.axis, bits=bits, signed=True)
            self.register_buffer("qweight", codes)
            self.register_buffer("zero_point", zp.to(torch.int8))
        self.register_buffer("scale", scale.float())
        del inner.weight  # the fp32 weight is gone: only codes and scales are kept
        self.inner = inner
        self.input_scale: float | None = None
        self.input_zero_point = 0
        self.input_signed = False
        if input_range is not None:
            self.set_input_range(*input_range)

    def set_input_range(self, lo: float, hi: float, *, symmetric_up_to: float = 0.0) -> None:
        """Input quantization covering [lo, hi] (always including 0): uint8 asymmetric, or int8 symmetric
        (zero point 0, which OpenVINO's integer kernels run without the zero-point compensation an
        asymmetric input costs) when the range goes below zero and the symmetric grid's step,
        2 max(|lo|, hi) / (hi - lo) times the asymmetric one, is at most `symmetric_up_to` (0: never,
        inf: always; lopsided ranges such as a GELU's output stay asymmetric at 1.5)."""
        signed = lo < 0 and 2 * max(-lo, hi) <= symmetric_up_to * (hi - lo)
        scale, zero_point = affine_params(float(lo), float(hi), bits=8, symmetric=signed, signed=signed)
        # Python numbers: the exporter writes them as QuantizeLinear constants.
        self.input_scale = float(scale)
        self.input_zero_point = int(zero_point)
        self.input_signed = signed

    @property
    def input_code_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the input codes: int8 [-128, 127] (the scale maps the calibrated range to
        +-127; the full int8 range keeps the graph free of a Clip between Q and DQ) or uint8 [0, 255]."""
        return (-128, 127) if self.input_signed else (0, 255)

    @property
    def scheme(self) -> str:
        # 7-bit weights (reduce_range) are stored and executed as int8: "w8"; extra_repr tells them apart.
        bits = 8 if self.bits == 7 else self.bits
        name = f"w{bits}a8" if self.input_scale is not None else f"w{bits}"
        if self.zero_point is not None:
            name += "-asym"
        return name + "+smooth" if self.input_multiplier is not None else name

    def dequantized_weight(self) -> torch.Tensor:
        if self.input_scale is None:
            # Weight-only: plain ops that runtimes fold once at load (see `ops.quant.decompress_per_channel`).
            return decompress_per_channel(
                self.qweight, self.scale, axis=self.axis, zero_point=self.zero_point
            )
        # Static W8A8: DequantizeLinear on the weight, half of the QDQ pattern of an integer kernel.
        return dequantize_per_channel(
            self.qweight, self.scale, axis=self.axis, bits=self.bits, zero_point=self.zero_point
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.inner
        if isinstance(inner, nn.Embedding) and inner.max_norm is None and not kwargs and len(args) == 1:
            # Gather the int8 rows first, then scale them: the artifact reads only the rows it needs
            # (Gather -> Cast -> Mul) instead of dequantizing the whole table on every call, which ONNX
            # Runtime does in a graph with activation quantizers (MiniLM: 4% of its int8 latency).
            ids = args[0]
            rows = F.embedding(ids, self.qweight).float()  # (..., dim) codes
            if self.zero_point is not None:
                rows = rows - F.embedding(ids, self.zero_point[:, None]).float()  # (..., 1) per row
            return rows * F.embedding(ids, self.scale[:, None])  # (..., 1) scale per row
        if self.input_multiplier is not None:
            args = (args[0] * self.input_multiplier, *args[1:])
        if self.input_scale is not None:
            qmin, qmax = self.input_code_range
            x = quantize_dequantize_per_tensor(
                args[0],
                self.input_scale,
                self.input_zero_point,
                qmin=qmin,
                qmax=qmax,
                dtype=torch.int8 if self.input_signed else torch.uint8,
            )
            args = (x, *args[1:])
        return call_with_weight(self.inner, self.forward_weight(), args, kwargs)

    def extra_repr(self) -> str:
        rng = ", 7-bit weight range" if self.bits == 7 else ""
        return f"{self.scheme}{rng}, per-channel axis={self.axis}, shape={tuple(self.qweight.shape)}"


class GroupQuantizedLinear(WeightView):
    """A Linear whose weight is stored as packed int4 (or int8) codes with a scale per block of
    `group_size` input features. The ONNX artifact runs int4 as `com.microsoft.MatMulNBits` (fp32 maths on
    the packed weight, memory stays 4-bit); int8 blocks are decompressed by plain ops that the runtimes
    fold at load (`ops.nbits.decompress_blocks`: ONNX Runtime's 8-bit MatMulNBits dequantizes the whole
    weight on every call and is several times slower than fp32).

    Build it with `from_linear` (round to nearest) or `from_codes` (codes chosen by GPTQ, AWQ, ...).
    """

    _modelpress_atomic = True
    packed: torch.Tensor  # (N, n_blocks, group_size * bits / 8) uint8
    scales: torch.Tensor  # (N * n_blocks,) fp32
    zero_points: torch.Tensor | None  # packed uint8, or None for the implicit 2^(bits-1)

    def __init__(
        self,
        inner: nn.Linear,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        *,
        bits: int,
        group_size: int,
    ) -> None:
        super().__init__()
        check_block_size(group_size, bits)
        packed, zp = pack_blocks(codes, zero_point, bits=bits, block_size=group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scale.float().reshape(-1).contiguous())
        self.register_buffer("zero_points", zp)
        self.bits, self.group_size = bits, group_size
        self.in_features, self.out_features = inner.in_features, inner.out_features
        del inner.weight
        self.inner = inner  # keeps the bias, and the layer type for reports

    @classmethod
    def from_linear(
        cls,
        inner: nn.Linear,
        *,
        bits: int,
        group_size: int,
        symmetric: bool = True,
        clip_search: bool = False,
    ) -> GroupQuantizedLinear:
        codes, scale, zp = block_quantize(
            inner.weight, bits=bits, block_size=group_size, symmetric=symmetric, clip_search=clip_search
        )
        return cls(inner, codes, scale, zp, bits=bits, group_size=group_size)

    @classmethod
    def from_codes(
        cls,
        inner: nn.Linear,
        *,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        bits: int,
        group_size: int,
    ) -> GroupQuantizedLinear:
        """From codes whose weight is `(codes - zero_point) * scale` per group: signed codes in
        [-2^(b-1), 2^(b-1)-1] with `zero_point=None`, or unsigned codes [0, 2^b-1] with (N, n_groups) zero
        points. `scale` is (N, n_groups)."""
        mid = 2 ** (bits - 1)
        if zero_point is None:
            unsigned = (codes.to(torch.int32) + mid).clamp(0, 2 * mid - 1)
        else:
            unsigned = codes.to(torch.int32)
        return cls(inner, unsigned, scale, zero_point, bits=bits, group_size=group_size)

    @property
    def scheme(self) -> str:
        return f"w{self.bits}g{self.group_size}" + ("" if self.zero_points is None else "-asym")

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return decompress_blocks(
                self.packed, self.scales, self.zero_points, k=self.in_features, block_size=self.group_size
            )
        return dequantize_blocks(
            self.packed,
            self.scales,
            self.zero_points,
            k=self.in_features,
            bits=self.bits,
            block_size=self.group_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8 or self.reusing():
            return F.linear(x, self.forward_weight().to(x.dtype), self.inner.bias)  # matmul_nbits' maths
        return torch.ops.modelpress.matmul_nbits(
            x,
            self.packed,
            self.scales,
            self.zero_points,
            self.inner.bias,
            self.in_features,
            self.bits,
            self.group_size,
        )

    def extra_repr(self) -> str:
        return f"{self.scheme}, in={self.in_features}, out={self.out_features}"


class GroupQuantizedEmbedding(WeightView):
    """An Embedding table stored as packed int4 (or int8) codes with a scale per block of `group_size`
    features: the ONNX artifact runs it as `com.microsoft.GatherBlockQuantized`."""

    _modelpress_atomic = True
    packed: torch.Tensor  # (V, D * bits / 8) uint8
    scales: torch.Tensor  # (V, D / group_size) fp32
    zero_points: torch.Tensor | None

    def __init__(
        self,
        inner: nn.Embedding,
        *,
        bits: int,
        group_size: int,
        symmetric: bool = True,
        clip_search: bool = False,
    ) -> None:
        super().__init__()
        if inner.max_norm is not None:
            raise ValueError(
                "GroupQuantizedEmbedding: embeddings with max_norm renormalise their weight; not supported."
            )
        v, d = inner.weight.shape
        if d % group_size:
            raise ValueError(f"embedding dim {d} is not divisible by group_size={group_size}.")
        check_block_size(group_size, bits)
        codes, scale, zp = block_quantize(
            inner.weight, bits=bits, block_size=group_size, symmetric=symmetric, clip_search=clip_search
        )
        packed, zp_packed = pack_blocks(codes, zp, bits=bits, block_size=group_size)
        self.register_buffer("packed", packed.reshape(v, -1).contiguous())
        self.register_buffer("scales", scale.float().contiguous())
        self.register_buffer(
            "zero_points", None if zp_packed is None else zp_packed.reshape(v, -1).contiguous()
        )
        self.bits, self.group_size = bits, group_size
        del inner.weight
        self.inner = inner

    @property
    def scheme(self) -> str:
        return f"w{self.bits}g{self.group_size}" + ("" if self.zero_points is None else "-asym")

    def dequantized_weight(self) -> torch.Tensor:
        v = self.packed.shape[0]
        return gather_nbits(
            torch.arange(v), self.packed, self.scales, self.zero_points, self.bits, self.group_size
        )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.ops.modelpress.gather_nbits(
            indices, self.packed, self.scales, self.zero_points, self.bits, self.group_size
        )

    def extra_repr(self) -> str:
        return f"{self.scheme}, table={tuple(self.packed.shape[:1])}x{self.scales.shape[1] * self.group_size}"


class DynamicQuantizedLinear(WeightView):
    """A Linear with int8 per-output-channel weights whose input is quantized to uint8 at run time (one
    scale per call): ONNX `DynamicQuantizeLinear` + `MatMulInteger`, fused by ONNX Runtime."""

    _modelpress_atomic = True
    qweight: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N,) fp32

    def __init__(self, inner: nn.Linear, *, bits: int = 8) -> None:
        super().__init__()
        weight = inner.weight.detach()
        scale = symmetric_scale(weight, axis=0, bits=bits)
        self.register_buffer("qweight", quantize_symmetric(weight, scale, axis=0, bits=bits))
        self.register_buffer("scale", scale.float())
        self.bits = bits
        del inner.weight
        self.inner = inner

    @property
    def scheme(self) -> str:
        return "w8a8-dynamic"

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dynamic_quant_linear(x, self.qweight, self.scale, self.inner.bias)

    def extra_repr(self) -> str:
        rng = ", 7-bit weight range" if self.bits == 7 else ""
        return f"{self.scheme}{rng}, shape={tuple(self.qweight.shape)}"


class SparseLayer(WeightView):
    """A layer whose weight is stored as a bitmask of kept positions plus the kept values, in order.

    The values are fp32, or int8 codes with one fp32 scale per output channel (`bits=8`). Forward
    rebuilds the dense weight (unpack bits, cumulative sum, gather, where); in ONNX those are constant
    subgraphs that ONNX Runtime and OpenVINO fold at load time, so the file is small and the runtime
    computes with the dense weight (no sparse kernel: sparsity buys size here, not speed).
    """

    _modelpress_atomic = True
    bitmask: torch.Tensor  # uint8, one bit per weight element, little-endian within each byte
    values: torch.Tensor  # the kept weights (fp32) or their int8 codes, row-major order
    scale: torch.Tensor | None  # fp32 per output channel for int8 codes

    def __init__(self, inner: nn.Module, mask: torch.Tensor, *, bits: int | None = None) -> None:
        super().__init__()
        weight = inner.weight
        assert isinstance(weight, torch.Tensor)
        if mask.shape != weight.shape:
            raise ValueError(
                f"SparseLayer: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}."
            )
        self.axis = output_axis(inner)
        self.weight_shape = tuple(weight.shape)
        self.numel = weight.numel()
        self.bits = bits
        kept = weight.detach() * mask
        if bits is None:
            self.register_buffer("scale", None)
            codes = kept.float()
        else:
            scale = symmetric_scale(kept, axis=self.axis, bits=bits)
            self.register_buffer("scale", scale.float())
            codes = quantize_symmetric(kept, scale, axis=self.axis, bits=bits)
        self.register_buffer("bitmask", pack_mask(mask))
        self.register_buffer("values", codes.reshape(-1)[mask.reshape(-1)].contiguous())
        self.density = float(mask.float().mean())
        del inner.weight
        self.inner = inner

    @property
    def scheme(self) -> str:
        name = f"sparse{round(100 * (1 - self.density))}%"
        return name + (f"+w{self.bits}" if self.bits else "")

    def dequantized_weight(self) -> torch.Tensor:
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        mask = unpack_mask(self.bitmask, self.numel)
        if self.scale is None:
            return scatter_kept(self.values, mask).reshape(self.weight_shape)
        codes = scatter_kept(self.values.float(), mask).reshape(self.weight_shape)
        shape = [1] * codes.dim()
        shape[self.axis] = -1
        return codes * self.scale.reshape(shape)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return call_with_weight(self.inner, self.forward_weight(), args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.scheme}, shape={self.weight_shape}, kept={self.values.numel()}"


_LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(t for types in QUANTIZABLE_TYPES.values() for t in types)


def own_matrices(module: nn.Module) -> list[str]:
    """The >= 2-D parameters a module of no known layer type holds itself (a mixture of experts' stacked
    weights, a router), where it can be wrapped without renaming anything: none of its children has
    parameters. Empty for Linear/conv/embedding/RNN layers, wrappers and parameter-free modules."""
    if isinstance(module, (_LAYER_TYPES, _Wrapper)) or any(
        True for child in module.children() for _ in child.parameters()
    ):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]


class QuantizedMatrices(_Wrapper):
    """A module whose own matrices are stored as int8 codes with one fp32 scale per row (over the last
    dim), the rest of its parameters (biases, norms) left fp32: an LSTM/GRU/RNN's `weight_ih_l{k}` /
    `weight_hh_l{k}`, or the raw parameters of any other layer, such as a mixture-of-experts layer's stacked
    expert weights (E, out, in). Forward runs the wrapped module's own maths with the dequantized matrices,
    so the ONNX export is the same graph (an `LSTM` / `GRU` op, Gather + MatMul over experts) reading int8
    initializers through `Cast -> Mul` (and the layer's own Slice/Concat of gates), which ONNX Runtime and
    OpenVINO fold once at load: ~4x smaller, fp32 speed in a default session (through DequantizeLinear, ONNX
    Runtime redid the whole chain on every call: a small biLSTM ran 2.5x slower than fp32)."""

    _modelpress_atomic = True

    def __init__(self, inner: nn.Module, names: list[str] | None = None, *, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        if names is None:
            names = [n for n, p in inner.named_parameters(recurse=False) if p.dim() >= 2]
        self.names = names
        for name in names:
            weight = getattr(inner, name).detach()
            rows = weight.reshape(-1, weight.shape[-1])  # (rows, in): one scale per row
            scale = symmetric_scale(rows, axis=0, bits=bits)
            codes = quantize_symmetric(rows, scale, axis=0, bits=bits).reshape(weight.shape)
            self.register_buffer(f"{name}_q", codes)
            self.register_buffer(f"{name}_scale", scale.float())
        for name in names:
            delattr(inner, name)  # the fp32 matrices are gone: only codes and scales are kept
        self.inner = inner

    @property
    def scheme(self) -> str:
        return "w8"

    def dequantized_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.names:
            codes: torch.Tensor = getattr(self, f"{name}_q")
            rows = codes.reshape(-1, codes.shape[-1])
            out[name] = decompress_per_channel(rows, getattr(self, f"{name}_scale"), axis=0).reshape(
                codes.shape
            )
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.inner, self.dequantized_weights(), args, kwargs)

    def extra_repr(self) -> str:
        rng = ", 7-bit weight range" if self.bits == 7 else ""
        return f"{self.scheme}{rng}, per-row, {', '.join(self.names)}"


class QuantizedRNN(QuantizedMatrices):
    """An LSTM, GRU or RNN with its weight matrices (`weight_ih_l{k}`, `weight_hh_l{k}`, `_reverse` for a
    bidirectional layer) int8 per row (per gate unit), biases fp32 (see `QuantizedMatrices`)."""

    def __init__(self, inner: nn.RNNBase, *, bits: int = 8) -> None:
        super().__init__(inner, [n for n in inner._flat_weights_names if n.startswith("weight_")], bits=bits)
