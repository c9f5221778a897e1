"""Dynamic int8: int8 weights stored, activations quantized per tensor at run time; no calibration data.

The artifact holds int8 weights feeding `MatMulInteger` behind `DynamicQuantizeLinear`, the graph ONNX
Runtime's own `quantize_dynamic` writes. Only Linear layers: dynamic convolutions are slower than fp32
in both runtimes (4-10x in ONNX Runtime on the MNIST CNN, MEASURING.md), so Conv layers are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from modelpress.environment import cpu_has_vnni
from modelpress.errors import RecipeError
from modelpress.techniques.quantized import DynamicQuantizedLinear, QuantizedRNN
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DynamicInt8Config:
    """Dynamic W8A8 of Linear layers; LSTM/GRU/RNN layers get int8 weights (the runtimes' recurrent ops
    compute in fp32 with them: ONNX Runtime's DynamicQuantizeLSTM has no OpenVINO counterpart).

    >>> DynamicInt8Config(ignore=("classifier",))
    DynamicInt8Config(reduce_range=None, targets=None, ignore=('classifier',))
    """

    type: ClassVar[str] = "dynamic_int8"
    # 7-bit weights for CPUs without VNNI (see StaticInt8Config.reduce_range); None: decide by this CPU.
    reduce_range: bool | None = None
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()


def dynamic_int8(model: nn.Module, config: DynamicInt8Config, data: Any = None) -> nn.Module:
    """Replace the selected Linear layers by `DynamicQuantizedLinear` in place and return the model.

    >>> m = dynamic_int8(nn.Sequential(nn.Linear(8, 4)), DynamicInt8Config())
    >>> m[0].qweight.dtype
    torch.int8
    """
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(
            f"dynamic_int8: targets {missing} match no module of the model. Check the names "
            "(see `modelpress profile` for the layer list), or use a type name such as 'Linear' or a 're:' regex."
        )
    selected = list(
        select_modules(model, types=(nn.Linear, nn.RNNBase), targets=config.targets, ignore=config.ignore)
    )
    chosen = [(name, module) for name, module in selected if type(module) is nn.Linear]
    recurrent = [(name, module) for name, module in selected if isinstance(module, nn.RNNBase)]
    for name, module in chosen:
        if not torch.isfinite(module.weight).all():
            raise RecipeError(
                f"dynamic_int8: layer '{name}' has NaN or Inf in its weight; fix the checkpoint, or add "
                f"'{name}' to ignore."
            )
    if not chosen and not recurrent:
        log.warning(
            "dynamic_int8: no Linear or recurrent layer matched (targets=%s, ignore=%s); the model is unchanged.",
            None if config.targets is None else list(config.targets),
            list(config.ignore),
        )
        return model
    reduce_range = not cpu_has_vnni() if config.reduce_range is None else config.reduce_range
    if reduce_range and config.reduce_range is None:
        log.info(
            "dynamic_int8: this CPU has no VNNI; weights use 7 bits so ONNX Runtime's int8 kernels do not saturate."
        )
    bits = 7 if reduce_range else 8
    for name, module in chosen:
        layer = DynamicQuantizedLinear(module, bits=bits)
        if name:
            set_submodule(model, name, layer)
        else:
            model = layer
    for name, rnn in recurrent:
        assert isinstance(rnn, nn.RNNBase)
        layer_rnn = QuantizedRNN(rnn, bits=8)  # fp32 maths in the runtimes: no saturation to avoid
        if name:
            set_submodule(model, name, layer_rnn)
        else:
            model = layer_rnn
    log.info("dynamic_int8: quantized %d Linear and %d recurrent layers", len(chosen), len(recurrent))
    return model
