"""Quantization-aware training: fine-tune the model through the quantizers it will be deployed with, then
convert it to the same int8 artifact as static post-training quantization.

Each selected Linear/Conv is wrapped in a `FakeQuantLayer` whose weight (per-channel symmetric, `bits`)
and input (uint8 asymmetric, per tensor) pass through LSQ fake quantizers (`ops.lsq`): rounding is
straight-through and the scales are trained with the weights. Scales start where static_int8 would put
them (max|w| per channel, min/max calibration of inputs), so step 0 is the PTQ model. At the end each
wrapper becomes a `QuantizedLayer` with the trained weight, the trained weight scales and an input range
that reproduces the trained input grid: the exported artifact computes what training saw.

Choices: scales are trained as logarithms (Adam then changes them by a fraction per step, whatever their
magnitude); the input zero point stays the calibrated integer (its true gradient is zero inside the range,
and a continuous LSQ+ offset could not be stored by QuantizeLinear without re-rounding the grid); the model
trains in eval mode; nothing is random, so two runs on the same data give the same model.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset
from modelpress.environment import cpu_has_vnni
from modelpress.errors import DataError, RecipeError
from modelpress.ops.lsq import affine_range, lsq_fake_quantize, lsq_grad_factor
from modelpress.ops.observers import MinMaxObserver
from modelpress.ops.quant import affine_params, qrange, symmetric_scale
from modelpress.techniques.finetune import LossFn, finetune, labeled
from modelpress.techniques.quantized import (
    QUANTIZABLE_TYPES,
    QuantizedLayer,
    WeightView,
    call_with_weight,
    output_axis,
)
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns
from modelpress.techniques.static_int8 import calibrate_inputs

log = logging.getLogger(__name__)

_ACT_QMIN, _ACT_QMAX = 0, 255  # uint8 inputs, as static_int8 and QuantizedLayer


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware fine-tuning to W8A8 (or W4A8) Linear and Conv layers, with learned (LSQ) scales.

    `loss="distill"` matches the fp32 model's outputs and needs only unlabeled inputs; `loss="task"` is
    cross-entropy on `(inputs, labels)` items. Training makes `epochs` passes over the data, stopping
    early after `steps` optimizer steps when given.

    >>> QATConfig(bits=4, epochs=3, lr=1e-3)  # doctest: +ELLIPSIS
    QATConfig(bits=4, loss='distill', epochs=3, steps=None, lr=0.001, ...)
    """

    type: ClassVar[str] = "qat"
    bits: Literal[4, 8] = 8  # weight codes; inputs are always uint8
    loss: Literal["distill", "task"] = "distill"
    epochs: int = 1
    steps: int | None = None
    # Adam, for the model's weights. Adam moves every weight by about lr per step whatever its gradient, so
    # pretrained transformers (weights ~0.02) want ~1e-5; measured on the zoo at 8 bits, 1e-4 ended further
    # from the fp32 outputs than static_int8, 1e-5 closer. Small models trained from scratch take 1e-4.
    lr: float = 1e-5
    # Adam, for the quantizers' log-scales: a step changes a scale by about this fraction.
    scale_lr: float = 1e-3
    calibration_batches: int = 32  # items that set the initial input ranges
    # bits=8 only: train and store 7-bit weights, as static_int8's reduce_range, for CPUs without VNNI
    # (AVX2 only), whose int8 kernels saturate on full-range weights. None: decide by the CPU running this.
    reduce_range: bool | None = None
    layers: tuple[Literal["linear", "conv"], ...] = ("linear", "conv")
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RecipeError(f"qat: bits={self.bits} is not supported; use 8, or 4 for 4-bit weights.")
        if self.loss not in ("distill", "task"):
            raise RecipeError(
                f"qat: loss={self.loss!r} is unknown; use 'distill' (match the fp32 model, no labels needed) "
                "or 'task' (cross-entropy on (inputs, labels) items)."
            )
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(
                    f"qat: {name}={value!r} must be a number (YAML reads 1e-5 as text: write 1.0e-5)."
                )
            if not (math.isfinite(value) and 0 < value < 1):
                raise RecipeError(
                    f"qat: {name}={value} must be in (0, 1); fine-tuning uses small rates such as 1.0e-5."
                )
        if self.reduce_range not in (None, True, False):
            raise RecipeError(f"qat: reduce_range={self.reduce_range!r} must be true, false or null (auto).")
        for name, low in (("epochs", 1), ("calibration_batches", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecipeError(f"qat: {name}={value!r} must be an integer of at least {low}.")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise RecipeError(
                f"qat: steps={self.steps!r} must be an integer of at least 1, or null for no cap."
            )
        bad = [k for k in self.layers if k not in ("linear", "conv")]
        if bad or not self.layers:
            raise RecipeError(f"qat: layers={list(self.layers)} is invalid; choose from ['conv', 'linear'].")


class FakeQuantLayer(WeightView):
    """A Linear/Conv trained under quantization: weight and input go through LSQ fake quantizers.

    Scales are stored as logs, so Adam's steps change them by a fraction rather than an absolute amount
    (weight scales are ~1e-3, input scales ~1e-2: no single absolute rate suits both). The input zero point
    stays the calibrated integer. `to_quantized()` gives the `QuantizedLayer` computing the same thing.
    """

    def __init__(self, inner: nn.Module, *, bits: int, input_range: tuple[float, float] | None) -> None:
        super().__init__()
        assert isinstance(inner.weight, torch.Tensor)
        self.inner = inner
        self.axis = output_axis(inner)
        self.bits = bits
        weight = inner.weight.detach()
        # (out channels,): the PTQ scale max|w| / qmax, where QuantizedLayer's default would put it.
        self.weight_log_scale = nn.Parameter(symmetric_scale(weight, axis=self.axis, bits=bits).log())
        self.input_log_scale: nn.Parameter | None = None
        self.input_zero_point = 0
        if input_range is not None:
            scale, zero_point = affine_params(*input_range, bits=8, symmetric=False, signed=False)
            self.input_log_scale = nn.Parameter(scale.log().to(weight.device))  # 0-d
            self.input_zero_point = int(zero_point)

    def dequantized_weight(self) -> torch.Tensor:
        return self.quantized_weight()

    def quantized_weight(self) -> torch.Tensor:
        w = self.inner.weight
        assert isinstance(w, torch.Tensor)
        lo, hi = qrange(self.bits, symmetric=True)
        per_channel = w.numel() // w.shape[self.axis]
        factor = lsq_grad_factor(per_channel, hi)
        return lsq_fake_quantize(
            w, self.weight_log_scale.exp(), qmin=lo, qmax=hi, axis=self.axis, grad_factor=factor
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_log_scale is not None:
            x = args[0]
            features = x.numel() // x.shape[0] if x.ndim > 1 else x.numel()
            factor = lsq_grad_factor(max(features, 1), _ACT_QMAX)
            x = lsq_fake_quantize(
                x,
                self.input_log_scale.exp(),
                self.input_zero_point,
                qmin=_ACT_QMIN,
                qmax=_ACT_QMAX,
                grad_factor=factor,
            )
            args = (x, *args[1:])
        return call_with_weight(self.inner, self.quantized_weight(), args, kwargs)

    def to_quantized(self) -> QuantizedLayer:
        """The deployable layer: trained weight, trained per-channel scales, the trained input grid."""
        input_range = None
        if self.input_log_scale is not None:
            input_range = affine_range(float(self.input_log_scale.detach().exp()), self.input_zero_point)
        scale = self.weight_log_scale.detach().exp().float()
        return QuantizedLayer(self.inner, bits=self.bits, weight_scale=scale, input_range=input_range)

    def extra_repr(self) -> str:
        inputs = "uint8 inputs" if self.input_log_scale is not None else "fp32 inputs"
        return f"LSQ fake quantization: {self.bits}-bit weights (axis={self.axis}), {inputs}"


def _train(
    model: nn.Module,
    wrappers: dict[str, FakeQuantLayer],
    data: Dataset,
    config: QATConfig,
    *,
    teacher: nn.Module | None,
    loss_fn: LossFn | None,
) -> None:
    quantizer_params = [
        p for w in wrappers.values() for p in (w.weight_log_scale, w.input_log_scale) if p is not None
    ]
    ids = {id(p) for p in quantizer_params}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    log.info(
        "qat: training %d layers (%d-bit weights, uint8 inputs) with loss=%s (%d weight tensors, %d scales; "
        "eval mode)",
        len(wrappers),
        next(iter(wrappers.values())).bits,
        "loss_fn" if loss_fn is not None else config.loss,
        len(weights),
        len(quantizer_params),
    )
    finetune(
        model,
        data,
        [{"params": weights, "lr": config.lr}, {"params": quantizer_params, "lr": config.scale_lr}],
        loss=config.loss,
        epochs=config.epochs,
        steps=config.steps,
        teacher=teacher,
        loss_fn=loss_fn,
        owner="qat",
        hint=f"Lower lr (now {config.lr}) or scale_lr (now {config.scale_lr}).",
        logger=log,
    )


def qat(
    model: nn.Module, config: QATConfig, data: Dataset | None = None, *, loss_fn: LossFn | None = None
) -> nn.Module:
    """Fine-tune the selected layers under fake quantization on `data`, then convert them to `QuantizedLayer`s.

    Modifies `model` in place (`mp.compress` works on a copy). Items are model inputs for loss="distill",
    `(inputs, labels)` for loss="task". `loss_fn(outputs, target)` replaces the built-in loss from Python
    (target: the fp32 model's outputs for "distill", the labels for "task"). The model stays in eval mode:
    BatchNorm keeps its running statistics and dropout is off, as in deployment. "distill" holds a frozen
    fp32 copy of the model (twice the memory). Set `steps` when `data` never ends.

    >>> small = qat(model, QATConfig(bits=4, loss="task", epochs=5, lr=1e-3), Dataset(pairs))  # doctest: +SKIP
    """
    if data is None:
        raise DataError(
            "qat needs training data: pass `data=` to compress (model inputs for loss='distill', "
            "(inputs, labels) pairs for loss='task'), or --data file.py:fn on the command line. Without data "
            "use weight_only; with only a few calibration batches use static_int8."
        )
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(f"qat: targets {missing} match no module of the model.")
    types = tuple(t for kind in config.layers for t in QUANTIZABLE_TYPES[kind])
    chosen = {
        name: module
        for name, module in select_modules(model, types=types, targets=config.targets, ignore=config.ignore)
        if isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    for name, module in chosen.items():
        weight = module.weight
        if isinstance(weight, torch.Tensor) and not torch.isfinite(weight).all():
            raise RecipeError(
                f"qat: layer '{name}' has NaN or Inf in its weight; fix it or add it to ignore."
            )
    if not chosen:
        log.warning("qat: no layer matched; this step changes nothing.")
        return model
    # ConvTranspose has no integer kernel in the runtimes: its input stays fp32, as in static_int8.
    transposed = {n for n, m in chosen.items() if isinstance(m, nn.modules.conv._ConvTransposeNd)}
    model.eval()
    inputs_only = data
    if config.loss == "task":
        inputs_only = Dataset(
            data, transform_fn=lambda item: labeled(item, "a calibration item", owner="qat")[0]
        )
    observers = calibrate_inputs(
        model,
        {n: m for n, m in chosen.items() if n not in transposed},
        inputs_only,
        batches=config.calibration_batches,
        observer=lambda _n: MinMaxObserver(),
        owner="qat",
    )
    teacher = None
    if config.loss == "distill":
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    wrappers: dict[str, FakeQuantLayer] = {}
    bits = _weight_bits(config)
    for name, module in chosen.items():
        input_range = None
        if name in observers:
            lo, hi = observers[name].range()
            input_range = (float(lo), float(hi))
        wrappers[name] = FakeQuantLayer(module, bits=bits, input_range=input_range)
    root = _swap(model, dict(wrappers))
    try:
        with torch.enable_grad():
            _train(root, wrappers, data, config, teacher=teacher, loss_fn=loss_fn)
    except BaseException:
        _swap(root, {n: w.inner for n, w in wrappers.items()})  # leave no training wrappers behind
        raise
    return _swap(root, {n: w.to_quantized() for n, w in wrappers.items()}).eval()


def _weight_bits(config: QATConfig) -> int:
    """The weight grid trained and stored: 7 bits for bits=8 with reduce_range (given, or no VNNI here)."""
    if config.bits != 8:
        return config.bits
    reduce_range = config.reduce_range
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
        if reduce_range:
            log.info(
                "qat: this CPU has no VNNI, where ONNX Runtime's int8 kernels saturate on 8-bit weights; "
                "weights train and are stored in 7 bits (set reduce_range: false for VNNI or OpenVINO targets)."
            )
    return 7 if reduce_range else 8


def _swap(model: nn.Module, new: dict[str, nn.Module]) -> nn.Module:
    """Replace the modules at the given names; the model itself when the name is ''."""
    for name, module in new.items():
        if name:
            set_submodule(model, name, module)
        else:
            model = module
    return model
