"""Weight-only quantization: int8 codes and per-output-channel scales are what is stored.

In torch the layer dequantizes its weight on the fly (through `quantized_decomposed`), so the ONNX export
holds int8 initializers feeding `DequantizeLinear` and the file really shrinks about 4x.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.errors import RecipeError
from modelpress.techniques.quantized import QUANTIZABLE_TYPES, QuantizedLayer
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

LayerKind = Literal["linear", "conv", "embedding"]

_KIND_TYPES = QUANTIZABLE_TYPES


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
    # Tied weights (an LM's embedding and head share one Parameter) are quantized once and the codes
    # shared, so the artifact stores them once, as the fp32 model did.
    first_user: dict[int, QuantizedLayer] = {}
    for name, module in chosen:
        weight = module.weight
        source = first_user.get(id(weight))
        wrapped = QuantizedLayer(module, bits=config.bits)
        if (
            source is not None
            and source.axis == wrapped.axis
            and source.qweight.shape == wrapped.qweight.shape
        ):
            wrapped.qweight, wrapped.scale = source.qweight, source.scale
        else:
            first_user[id(weight)] = wrapped
        if name:
            set_submodule(model, name, wrapped)
        else:
            model = wrapped
    log.info("weight_only: quantized %d layers to int%d", len(chosen), config.bits)
    return model
