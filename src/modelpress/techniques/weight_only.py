"""Weight-only quantization: int8 codes and per-output-channel scales are what is stored.

In torch the layer dequantizes its weight on the fly (through `quantized_decomposed`), so the ONNX export
holds int8 initializers feeding `DequantizeLinear` and the file really shrinks about 4x.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.errors import RecipeError
from modelpress.ops.quant import dequantize_per_channel, quantize_symmetric, symmetric_scale
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

LayerKind = Literal["linear", "conv", "embedding"]

_KIND_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "embedding": (nn.Embedding,),
}


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Round-to-nearest symmetric per-output-channel weight quantization.

    >>> WeightOnlyConfig(bits=8, ignore=("classifier",))
    WeightOnlyConfig(bits=8, layers=('linear', 'conv', 'embedding'), targets=None, ignore=('classifier',))
    """

    type: ClassVar[str] = "weight_only"
    bits: Literal[8] = 8
    layers: tuple[LayerKind, ...] = ("linear", "conv", "embedding")
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits != 8:
            raise RecipeError(
                f"weight_only: bits={self.bits} is not supported yet; use bits: 8 (int4 comes with group-wise "
                "quantization)."
            )
        bad = [k for k in self.layers if k not in _KIND_TYPES]
        if bad or not self.layers:
            raise RecipeError(
                f"weight_only: layers={list(self.layers)} is invalid; choose from {sorted(_KIND_TYPES)}."
            )


def _output_axis(module: nn.Module) -> int:
    # ConvTranspose stores (in, out / groups, *k): its output channels are axis 1 when not grouped.
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
# torch.export than swapping module attributes (which made a downstream LSTM's sequence dim static).
_FORWARD_WITH_WEIGHT: dict[type[nn.Module], Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Embedding: _embedding,
}


class WeightOnlyQuantized(nn.Module):
    """Wraps a layer whose fp32 weight was replaced by int8 codes `qweight` and fp32 `scale` (per channel).

    Forward dequantizes (q * scale) and calls the wrapped layer with that weight, so any layer type whose
    forward reads `self.weight` works unchanged.
    """

    _modelpress_atomic = True  # profiled and reported as one layer
    qweight: torch.Tensor  # int8 codes, the layer's weight shape
    scale: torch.Tensor  # fp32, one per output channel

    def __init__(self, inner: nn.Module, *, bits: int = 8) -> None:
        super().__init__()
        assert isinstance(inner.weight, torch.Tensor)
        weight = inner.weight.detach()
        self.axis = _output_axis(inner)
        self.bits = bits
        scale = symmetric_scale(weight, axis=self.axis, bits=bits)
        self.register_buffer("qweight", quantize_symmetric(weight, scale, axis=self.axis, bits=bits))
        self.register_buffer("scale", scale)
        del inner.weight  # the fp32 weight is gone: only codes and scales are kept
        self.inner = inner

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_per_channel(self.qweight, self.scale, axis=self.axis, bits=self.bits)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weight = self.dequantized_weight()
        call = _FORWARD_WITH_WEIGHT.get(type(self.inner))
        if call is not None and not kwargs and len(args) == 1:
            return call(self.inner, args[0], weight)
        # Any other layer whose forward reads self.weight: swap the tensor in for this call.
        return torch.func.functional_call(self.inner, {"weight": weight}, args, kwargs)

    def extra_repr(self) -> str:
        return f"int{self.bits}, per-channel axis={self.axis}, shape={tuple(self.qweight.shape)}"


def weight_only(model: nn.Module, config: WeightOnlyConfig, data: Any = None) -> nn.Module:
    """Quantize the weights of the selected layers in place and return the model.

    >>> m = weight_only(nn.Sequential(nn.Linear(8, 4)), WeightOnlyConfig())
    >>> m[0].qweight.dtype
    torch.int8
    """
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(
            f"weight_only: targets {missing} match no module of the model. Check the names "
            "(see `modelpress profile` for the layer list), or use a type name such as 'Linear' or a 're:' regex."
        )
    types = tuple(t for kind in config.layers for t in _KIND_TYPES[kind])
    chosen = [
        (name, module)
        for name, module in select_modules(model, types=types, targets=config.targets, ignore=config.ignore)
        if isinstance(getattr(module, "weight", None), nn.Parameter)
    ]
    for name, module in chosen:
        weight = module.weight
        if isinstance(weight, torch.Tensor) and not torch.isfinite(weight).all():
            raise RecipeError(
                f"weight_only: layer '{name}' has NaN or Inf in its weight; fix the checkpoint, or add "
                f"'{name}' to ignore."
            )
    if not chosen:
        log.warning("weight_only: no layer matched (layers=%s); the model is unchanged.", list(config.layers))
    for name, module in chosen:
        wrapped = WeightOnlyQuantized(module, bits=config.bits)
        if name:
            set_submodule(model, name, wrapped)
        else:
            model = wrapped
    log.info("weight_only: quantized %d layers to int%d", len(chosen), config.bits)
    return model
