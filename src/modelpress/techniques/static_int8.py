"""Static W8A8: int8 per-channel weights and uint8 per-tensor activations with ranges calibrated on data.

One calibration pass feeds an observer per quantized layer input (bounded memory: running ranges or
fixed-size histograms). The exported graph holds QuantizeLinear/DequantizeLinear on each layer input and
DequantizeLinear on int8 weights: the pattern ONNX Runtime and OpenVINO run with integer kernels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset
from modelpress.errors import DataError, RecipeError
from modelpress.loading import as_inputs
from modelpress.ops.observers import OBSERVERS, make_observer
from modelpress.techniques.quantized import QUANTIZABLE_TYPES, QuantizedLayer
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

ObserverName = Literal["minmax", "moving_average", "percentile", "mse", "entropy"]


@dataclass(frozen=True)
class StaticInt8Config:
    """Calibrated static int8 quantization of Linear and Conv layers (inputs and weights).

    >>> StaticInt8Config(observer="mse", calibration_batches=16)  # doctest: +ELLIPSIS
    StaticInt8Config(observer='mse', ...)
    """

    type: ClassVar[str] = "static_int8"
    observer: ObserverName = "mse"
    percentile: float = 99.99  # used by observer="percentile"
    calibration_batches: int = 32
    layers: tuple[Literal["linear", "conv"], ...] = ("linear", "conv")
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise RecipeError(
                f"static_int8: observer={self.observer!r} is unknown; choose from {sorted(OBSERVERS)}."
            )
        if not 0 < self.percentile <= 100:
            raise RecipeError(f"static_int8: percentile={self.percentile} must be in (0, 100].")
        if self.calibration_batches < 1:
            raise RecipeError(
                f"static_int8: calibration_batches={self.calibration_batches} must be at least 1."
            )
        bad = [k for k in self.layers if k not in ("linear", "conv")]
        if bad or not self.layers:
            raise RecipeError(
                f"static_int8: layers={list(self.layers)} is invalid; choose from ['conv', 'linear']."
            )


def _observer(config: StaticInt8Config) -> Any:
    if config.observer == "percentile":
        return make_observer("percentile", percentile=config.percentile)
    return make_observer(config.observer)


def calibrate_inputs(
    model: nn.Module, modules: dict[str, nn.Module], data: Dataset, *, batches: int, observer: Any
) -> dict[str, Any]:
    """Run `batches` items of `data` through `model`, feeding each module's first input to its observer."""
    observers = {name: observer() for name in modules}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0]
            if not torch.isfinite(x).all():
                raise DataError(
                    f"static_int8: the input of layer '{name}' holds NaN or Inf during calibration; check the data "
                    "and the model, or add the layer to ignore."
                )
            observers[name].update(x.detach().float())

        handles.append(module.register_forward_pre_hook(hook))
    seen = 0
    try:
        with torch.no_grad():
            for item in data.take(batches):
                inputs = as_inputs(item, where="calibration item")
                try:
                    model(*inputs)
                except DataError:
                    raise
                except Exception as exc:
                    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
                    raise DataError(
                        f"static_int8: the model fails on a calibration item of shapes [{shapes}] with "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Calibration items "
                        "must be model inputs (use a transform_fn to drop labels)."
                    ) from exc
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise DataError(
            "static_int8: the calibration data is empty; pass at least one batch of model inputs."
        )
    log.info("static_int8: calibrated %d layers on %d batches", len(modules), seen)
    return observers


def static_int8(model: nn.Module, config: StaticInt8Config, data: Dataset | None = None) -> nn.Module:
    """Calibrate on `data` and replace the selected layers by W8A8 `QuantizedLayer`s.

    >>> small = static_int8(model, StaticInt8Config(), Dataset(batches))  # doctest: +SKIP
    """
    if data is None:
        raise DataError(
            "static_int8 needs calibration data: pass `data=` to compress (a few hundred representative "
            "samples), or --data file.py:fn on the command line. Without data use weight_only."
        )
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(f"static_int8: targets {missing} match no module of the model.")
    types = tuple(t for kind in config.layers for t in QUANTIZABLE_TYPES[kind])
    chosen = {
        name: module
        for name, module in select_modules(model, types=types, targets=config.targets, ignore=config.ignore)
        if isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    # ConvTranspose has no fused integer kernel in either runtime: keep it weight-only rather than pay Q/DQ.
    transposed = [n for n, m in chosen.items() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    for name, module in chosen.items():
        weight = module.weight
        if isinstance(weight, torch.Tensor) and not torch.isfinite(weight).all():
            raise RecipeError(
                f"static_int8: layer '{name}' has NaN or Inf in its weight; fix it or add it to ignore."
            )
    if not chosen:
        log.warning("static_int8: no layer matched; the model is unchanged.")
        return model
    observers = calibrate_inputs(
        model, chosen, data, batches=config.calibration_batches, observer=lambda: _observer(config)
    )
    for name, module in chosen.items():
        lo, hi = observers[name].range()
        input_range = None if name in transposed else (float(lo), float(hi))
        layer = QuantizedLayer(module, bits=8, input_range=input_range)
        if name:
            set_submodule(model, name, layer)
        else:
            model = layer
    if transposed:
        log.info("static_int8: kept %s weight-only (no integer ConvTranspose kernel)", transposed)
    return model
