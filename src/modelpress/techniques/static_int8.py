"""Static W8A8: int8 per-channel weights and 8-bit per-tensor activations with ranges calibrated on data.

One calibration pass feeds an observer per quantized layer input (bounded memory: running ranges or
fixed-size histograms). The exported graph holds QuantizeLinear/DequantizeLinear on each layer input and
DequantizeLinear on int8 weights: the pattern ONNX Runtime and OpenVINO run with integer kernels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset
from modelpress.environment import cpu_has_vnni
from modelpress.errors import DataError, GraphError, RecipeError
from modelpress.graph.equalize import (
    INPUT_GAIN,
    OUTPUT_GAIN,
    equalize_pairs,
    find_pairs,
    fold_batchnorm,
    note_gain,
)
from modelpress.graph.heads import find_attention
from modelpress.loading import as_inputs
from modelpress.ops.gptq import HessianAccumulator
from modelpress.ops.observers import OBSERVERS, MinMaxObserver, make_observer
from modelpress.ops.quant import smoothing_factors
from modelpress.techniques.cluster import ClusteredLayer, clustered_int8, has_int8_form
from modelpress.techniques.gptq import input_rows, round_per_channel
from modelpress.techniques.quantized import QUANTIZABLE_TYPES, QuantizedLayer, call_with_weight
from modelpress.techniques.select import matches_any, select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

ObserverName = Literal["minmax", "moving_average", "percentile", "mse", "entropy"]


@dataclass(frozen=True)
class StaticInt8Config:
    """Calibrated static int8 quantization of Linear and Conv layers (inputs and weights).

    >>> StaticInt8Config(observer="mse", calibration_batches=16)  # doctest: +ELLIPSIS
    StaticInt8Config(observer='mse', ...)
    """

    type: ClassVar[str] = "static_int8"
    observer: ObserverName = "minmax"
    percentile: float = 99.99  # used by observer="percentile"
    # SmoothQuant strength for Linear layers (None: off). 0.75 suits transformer encoders whose activations
    # have outlier features; clipping observers (mse, percentile, entropy) hurt those models instead.
    smooth_alpha: float | None = None
    # Which Linear layers SmoothQuant covers (names, type names or `re:` regexes, as `targets`; None: all).
    # Each smoothed input costs the graph one per-feature Mul that no runtime fuses, unless it is folded
    # (attention output projections fold into V for free).
    smooth_targets: tuple[str, ...] | None = None
    calibration_batches: int = 32
    # 7-bit weights, as ONNX Runtime's `reduce_range`: needed where the deployment CPU has no VNNI (AVX2
    # only), whose int8 kernels saturate on full-range weights. None: decide by the CPU compressing now.
    reduce_range: bool | None = None
    # Merge eval-mode BatchNorm into the Conv/Linear before it (exact in fp32; the int8 weight then holds
    # the folded scale and the runtime runs one integer conv instead of conv + BatchNorm).
    fold_batchnorm: bool = True
    # Cross-layer equalization (DFQ): balance per-channel weight ranges of consecutive layers joined by
    # ReLU-like activations. Exact in fp32; helps per-tensor-sensitive layers such as depthwise convs.
    equalize: bool = False
    # Shift each quantized layer's bias by the mean output error it makes on the calibration data
    # (per output channel, from the fp32 layer on the same input). Layers without a bias are skipped.
    bias_correction: bool = False
    # How weights become codes: "nearest", or "gptq": codes chosen with the Hessian of each layer's
    # calibration inputs (smoothed, when SmoothQuant is on) so that one column's rounding error is
    # compensated by the others (the learned-rounding step, as AdaRound; Linear, Conv1d, Conv2d).
    rounding: Literal["nearest", "gptq"] = "nearest"
    # Inputs whose range goes below zero: "asymmetric" uint8 (the finest grid) or "symmetric" int8 with
    # zero point 0 (coarser when the range is lopsided; OpenVINO runs such convolutions faster, as NNCF's
    # performance preset does). Inputs that never go below zero are uint8 with zero point 0 either way.
    # "balanced": symmetric only where that coarsens the grid by at most 1.5x (LayerNorm outputs, not GELU's).
    activations: Literal["asymmetric", "symmetric", "balanced"] = "asymmetric"
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
        if self.smooth_alpha is not None and not 0 < self.smooth_alpha < 1:
            raise RecipeError(
                f"static_int8: smooth_alpha={self.smooth_alpha} must be in (0, 1), or null for off."
            )
        if self.calibration_batches < 1:
            raise RecipeError(
                f"static_int8: calibration_batches={self.calibration_batches} must be at least 1."
            )
        if self.activations not in _SYMMETRIC:
            raise RecipeError(
                f"static_int8: activations={self.activations!r} is unknown; choose from {sorted(_SYMMETRIC)}."
            )
        if self.rounding not in ("nearest", "gptq"):
            raise RecipeError(
                f"static_int8: rounding={self.rounding!r} is unknown; choose 'nearest' or 'gptq'."
            )
        bad = [k for k in self.layers if k not in ("linear", "conv")]
        if bad or not self.layers:
            raise RecipeError(
                f"static_int8: layers={list(self.layers)} is invalid; choose from ['conv', 'linear']."
            )


def _smoothed(name: str, module: nn.Module, config: StaticInt8Config) -> bool:
    return config.smooth_targets is None or matches_any(config.smooth_targets, name, module)


def _observer(config: StaticInt8Config) -> Any:
    if config.observer == "percentile":
        return make_observer("percentile", percentile=config.percentile)
    return make_observer(config.observer)


# How much coarser than the asymmetric grid a symmetric one may be for each `activations` choice (see
# QuantizedLayer.set_input_range): never, always, or at most 1.5x (balanced ranges: LayerNorm outputs).
_SYMMETRIC: dict[str, float] = {"asymmetric": 0.0, "symmetric": math.inf, "balanced": 1.5}


class _RangeAndHessian:
    """An input observer that also accumulates the layer's Hessian (x^T x of its input rows) for GPTQ
    rounding: ranges and Hessians come from the same calibration pass."""

    def __init__(self, observer: Any, module: nn.Module) -> None:
        self.observer, self.module = observer, module
        self.groups = module.groups if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
        self.hessian: HessianAccumulator | None = None

    def update(self, x: torch.Tensor) -> None:
        self.observer.update(x)
        for rows in input_rows(self.module, x):
            if self.hessian is None:
                self.hessian = HessianAccumulator(rows.shape[1], groups=self.groups)
            self.hessian.update(rows)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        result: tuple[torch.Tensor, torch.Tensor] = self.observer.range()
        return result


def _gptq_layer(
    name: str, module: nn.Module, obs: _RangeAndHessian, smoothing: torch.Tensor | None, bits: int
) -> QuantizedLayer:
    """GPTQ-rounded codes installed as the QuantizedLayer's weight: the layer is given the weight those
    codes dequantize to (divided by the smoothing it multiplies back), which it rounds to the same codes."""
    assert obs.hessian is not None
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    smoothed = weight.detach() * smoothing[None, :] if smoothing is not None else weight.detach()
    codes, scale = round_per_channel(name, smoothed, obs.hessian.hessian(), bits=bits, owner="static_int8")
    target = (codes.float() * scale[:, None]).reshape(weight.shape)
    if smoothing is not None:
        target = target / smoothing[None, :]
    module.weight = nn.Parameter(target.to(weight.dtype), requires_grad=False)
    layer = QuantizedLayer(module, bits=bits, weight_scale=scale, smoothing=smoothing)
    if not torch.equal(layer.qweight.reshape(codes.shape), codes.to(torch.int8)):
        raise AssertionError(f"static_int8: layer '{name}' did not reproduce its GPTQ codes")
    return layer


def calibrate_inputs(
    model: nn.Module,
    modules: dict[str, nn.Module],
    data: Dataset,
    *,
    batches: int,
    observer: Callable[[str], Any],
    transform: dict[str, torch.Tensor] | None = None,
    owner: str = "static_int8",
) -> dict[str, Any]:
    """Run `batches` items of `data` through `model`, feeding each module's first input to its observer.

    `transform` multiplies a module's input by a per-feature factor first (to calibrate smoothed inputs);
    `owner` starts every error message (the technique the user asked for).
    """
    observers = {name: observer(name) for name in modules}
    transform = transform or {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0]
            if not torch.isfinite(x).all():
                raise DataError(
                    f"{owner}: the input of layer '{name}' holds NaN or Inf during calibration; check the data "
                    "and the model, or add the layer to ignore."
                )
            x = x.detach().float()
            observers[name].update(x * transform[name] if name in transform else x)

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
                        f"{owner}: the model fails on a calibration item of shapes [{shapes}] with "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Calibration items "
                        "must be model inputs (use a transform_fn to drop labels)."
                    ) from exc
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise DataError(f"{owner}: the calibration data is empty; pass at least one batch of model inputs.")
    log.info("%s: calibrated %d layers on %d batches", owner, len(modules), seen)
    return observers


# Set on an attention output projection whose SmoothQuant factor lives in its value projection.
_IN_VALUES = "_modelpress_smoothed_in_values"


def fold_into_values(model: nn.Module, absmax: dict[str, Any], *, alpha: float) -> int:
    """SmoothQuant for attention output projections (named in `absmax`, with the statistics of their
    inputs) without a Mul: the output projection reads softmax(QK^T) V, linear in each feature of V, so
    dividing V's output features (weight rows and bias) by s divides its input by s; its weight columns are
    multiplied by s. In place, exact in fp32. Under grouped-query attention the query heads that share a
    key/value head share its factor (the largest statistics over the group). Returns the number folded.
    """
    names = {id(m): n for n, m in model.named_modules()}
    folded = 0
    for att in find_attention(model):
        o_name = names.get(id(att.o))
        if o_name not in absmax or getattr(att.o, _IN_VALUES, False):
            continue
        kv, g, d = att.v.out_features // att.head_dim, att.groups, att.head_dim
        if kv * g * d != att.o.in_features:
            continue
        lo, hi = absmax[o_name].range()
        act = torch.maximum(lo.abs(), hi.abs()).reshape(kv, g, d).amax(dim=1).reshape(-1)  # (kv * d,)
        weight = att.o.weight.detach()
        w_cols = weight.abs().reshape(weight.shape[0], kv, g, d).amax(dim=2).reshape(weight.shape[0], -1)
        per_value = smoothing_factors(act, w_cols, alpha=alpha)  # (kv * d,)
        per_input = per_value.reshape(kv, 1, d).expand(kv, g, d).reshape(-1)  # (heads * d,)
        with torch.no_grad():
            att.v.weight.div_(per_value[:, None].to(att.v.weight.dtype))
            if att.v.bias is not None:
                att.v.bias.div_(per_value.to(att.v.bias.dtype))
            att.o.weight.mul_(per_input[None, :].to(weight.dtype))
        note_gain(att.v, OUTPUT_GAIN, 1.0 / per_value)
        note_gain(att.o, INPUT_GAIN, 1.0 / per_input)
        setattr(att.o, _IN_VALUES, True)
        folded += 1
    return folded


def shared_inputs(model: nn.Module, modules: dict[str, nn.Module], data: Dataset) -> list[list[str]]:
    """`modules` grouped by the input tensor they read on the first item of `data` (q/k/v of an attention
    block read one tensor): each name once, groups in the order of `modules`."""
    seen: dict[str, Any] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, args[0]))
        for name, module in modules.items()
    ]
    try:
        with torch.no_grad():
            for item in data.take(1):
                model(*as_inputs(item, where="calibration item"))
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[str]] = {}
    for name in modules:
        # `seen` holds every input alive until here, so equal ids are the same tensor.
        key = id(seen[name]) if name in seen else id(modules[name])
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def _chosen(model: nn.Module, config: StaticInt8Config) -> dict[str, nn.Module]:
    """The layers the config quantizes, by name. A clustered Linear/Conv (an earlier `cluster` step) is
    the layer it wraps, its weight decoded: chosen when it or its wrapped layer is selected (by name, type
    name or regex) and neither is ignored, and quantized keeping its shared values (`clustered_int8`)."""
    types = tuple(t for kind in config.layers for t in QUANTIZABLE_TYPES[kind])
    selected = dict(
        select_modules(model, types=(*types, ClusteredLayer), targets=config.targets, ignore=config.ignore)
    )
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and isinstance(getattr(module, "weight", None), nn.Parameter):
            if name in selected:
                chosen[name] = module
        elif has_int8_form(module) and isinstance(module.inner, types):
            inner = f"{name}.inner" if name else "inner"
            ignored = matches_any(config.ignore, name, module) or matches_any(
                config.ignore, inner, module.inner
            )
            if (name in selected or inner in selected) and not ignored:
                chosen[name] = module
    return chosen


def _absmax_calibration(
    model: nn.Module, linears: dict[str, nn.Module], data: Dataset, config: StaticInt8Config
) -> dict[str, Any]:
    """Per-feature min/max of each Linear's input (SmoothQuant's statistics)."""
    return calibrate_inputs(
        model,
        linears,
        data,
        batches=config.calibration_batches,
        observer=lambda _n: MinMaxObserver(axis=-1),
    )


def prepare(model: nn.Module, config: StaticInt8Config, data: Dataset) -> nn.Module:
    """The float rewrites static_int8 makes before quantizing (BatchNorm folding, equalization), in place;
    the graph is exported on the first item of `data`.

    Folding is skipped with a log line when torch.export cannot trace the model; equalization, asked for
    by name, raises `GraphError` then. With SmoothQuant, the factors of attention output projections are
    folded into their value projections here (`fold_into_values`), so that a mixed-precision search that
    keeps one of them in float finds it consistent with the rest.
    """
    if config.smooth_alpha is not None:
        linears: dict[str, nn.Module] = {
            n: m
            for n, m in _chosen(model, config).items()
            if isinstance(m, nn.Linear) and _smoothed(n, m, config)
        }
        names = {id(m): n for n, m in model.named_modules()}
        outs = {n: linears[n] for a in find_attention(model) if (n := names.get(id(a.o), "")) in linears}
        if outs:  # those that read a tensor no other Linear reads (quantized or not)
            every: dict[str, nn.Module] = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            alone = {g[0] for g in shared_inputs(model, every, data) if len(g) == 1}
            outs = {n: m for n, m in outs.items() if n in alone}
        if outs:
            folded = fold_into_values(
                model, _absmax_calibration(model, outs, data, config), alpha=config.smooth_alpha
            )
            log.info("static_int8: folded the smoothing of %d attention output projection(s) into V", folded)
    if not (config.fold_batchnorm or config.equalize):
        return model
    first = next(iter(data.take(1)), None)
    if first is None:
        raise DataError(
            "static_int8: the calibration data is empty; pass at least one batch of model inputs."
        )
    example = as_inputs(first, where="calibration item")
    if config.fold_batchnorm:
        try:
            fold_batchnorm(model, example, owner="static_int8")
        except GraphError as exc:
            log.info("static_int8: BatchNorm layers are not folded: %s", exc)
    if config.equalize:
        pairs = find_pairs(model, example, ignore=config.ignore, owner="static_int8 (equalize)")
        sweeps = equalize_pairs(model, pairs)
        log.info("static_int8: equalized %d layer pair(s) in %d sweep(s)", len(pairs), sweeps)
        if not pairs:
            log.warning(
                "static_int8: equalize found no Conv->Conv or Linear->Linear pair joined only by ReLU-like "
                "activations; nothing was equalized."
            )
    return model


def correct_biases(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    weights: dict[str, torch.Tensor],
    data: Dataset,
    *,
    batches: int,
    owner: str = "static_int8",
) -> int:
    """Add to each layer's bias the mean, per output channel, of (fp32 output - quantized output) on the
    calibration data, both computed from the input the quantized model gives the layer. `weights` are the
    fp32 weights the layers replaced. Returns the number of layers corrected."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with_bias = {n: m for n, m in layers.items() if getattr(m.inner, "bias", None) is not None}
    skipped = len(layers) - len(with_bias)
    if skipped:
        log.info("%s: bias correction skips %d layer(s) without a bias", owner, skipped)
    handles = []
    for name, layer in with_bias.items():

        def hook(m: QuantizedLayer, args: tuple[Any, ...], output: Any, name: str = name) -> None:
            x = args[0]
            reference = call_with_weight(m.inner, weights[name], (x,), {})
            error = (reference - output).double()
            axis = -1 if isinstance(m.inner, nn.Linear) else 1
            dims = [d for d in range(error.dim()) if d != axis % error.dim()]
            sums[name] = sums.get(name, 0) + error.sum(dim=dims)
            counts[name] = counts.get(name, 0) + error.numel() // error.shape[axis]

        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for item in data.take(batches):
                model(*as_inputs(item, where="calibration item"))
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for name, total in sums.items():
            bias = with_bias[name].inner.bias
            assert isinstance(bias, torch.Tensor)
            bias.add_((total / counts[name]).to(bias.dtype))
    log.info("%s: corrected the bias of %d layer(s)", owner, len(sums))
    return len(sums)


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
    missing = unmatched_patterns(model, config.smooth_targets)
    if missing:
        raise RecipeError(f"static_int8: smooth_targets {missing} match no module of the model.")
    chosen = _chosen(model, config)
    # ConvTranspose has no fused integer kernel in either runtime: keep it weight-only rather than pay Q/DQ.
    transposed = [n for n, m in chosen.items() if isinstance(m, nn.modules.conv._ConvTransposeNd)]
    for name, module in chosen.items():
        weight = module.weight
        if isinstance(weight, torch.Tensor) and not torch.isfinite(weight).all():
            raise RecipeError(
                f"static_int8: layer '{name}' has NaN or Inf in its weight; fix it or add it to ignore."
            )
    if not chosen:
        log.warning("static_int8: no layer matched; this step changes nothing.")
        return model
    model = prepare(model, config, data)
    smoothing: dict[str, torch.Tensor] = {}
    if config.smooth_alpha is not None:
        linears: dict[str, nn.Module] = {
            n: m
            for n, m in chosen.items()
            if isinstance(m, nn.Linear) and not getattr(m, _IN_VALUES, False) and _smoothed(n, m, config)
        }
        absmax = _absmax_calibration(model, linears, data, config)
        for group in shared_inputs(model, linears, data):
            # Layers reading one tensor (q/k/v) share one factor, from all their weights, as SmoothQuant
            # does: the graph then divides that tensor once and quantizes it once for all of them.
            lo, hi = absmax[group[0]].range()
            readers = [linears[n].weight for n in group]
            factor = smoothing_factors(
                torch.maximum(lo.abs(), hi.abs()),
                torch.cat([w for w in readers if isinstance(w, torch.Tensor)]),
                alpha=config.smooth_alpha,
            )
            smoothing.update(dict.fromkeys(group, factor))
    clustered = [n for n, m in chosen.items() if isinstance(m, ClusteredLayer)]
    if clustered:
        log.info(
            "static_int8: %d clustered layer(s) keep their shared values, each on its int8 grid (no "
            "SmoothQuant or GPTQ rounding there: either would give each weight a value of its own): %s",
            len(clustered),
            clustered,
        )
    gptq_layers = (
        {n for n, m in chosen.items() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
        if config.rounding == "gptq"
        else set()
    )
    if config.rounding == "gptq" and len(gptq_layers) + len(clustered) < len(chosen):
        log.info(
            "static_int8: %s are rounded to nearest (GPTQ rounding covers Linear, Conv1d and Conv2d)",
            sorted(set(chosen) - gptq_layers - set(clustered)),
        )

    def observer(name: str) -> Any:
        obs = _observer(config)
        return _RangeAndHessian(obs, chosen[name]) if name in gptq_layers else obs

    observers = calibrate_inputs(
        model,
        chosen,
        data,
        batches=config.calibration_batches,
        observer=observer,
        transform={n: 1.0 / s for n, s in smoothing.items()},
    )
    reduce_range = config.reduce_range
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
        if reduce_range:
            log.info(
                "static_int8: this CPU has no VNNI, where ONNX Runtime's int8 kernels saturate on 8-bit weights; "
                "weights use 7 bits (set reduce_range: false for VNNI or OpenVINO-only deployments)."
            )
    bits = 7 if reduce_range else 8
    built: dict[str, QuantizedLayer] = {}
    weights: dict[str, torch.Tensor] = {}
    multipliers: dict[int, torch.Tensor | None] = {}
    for name, module in chosen.items():
        lo, hi = observers[name].range()
        input_range = None if name in transposed else (float(lo), float(hi))
        if config.bias_correction:  # the float weight (a clustered layer's: decoded, a new tensor)
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            weights[name] = weight.detach()
        obs = observers[name]
        if isinstance(module, ClusteredLayer):
            layer: QuantizedLayer = clustered_int8(module, bits=bits)
        elif isinstance(obs, _RangeAndHessian) and obs.hessian is not None:
            layer = _gptq_layer(name, module, obs, smoothing.get(name), bits)
        else:
            if name in gptq_layers:
                log.warning(
                    "static_int8: layer '%s' did not run during calibration; rounded to nearest.", name
                )
            layer = QuantizedLayer(module, bits=bits, smoothing=smoothing.get(name))
        if input_range is not None:
            layer.set_input_range(*input_range, symmetric_up_to=_SYMMETRIC[config.activations])
        if name in smoothing:
            # One multiplier tensor per smoothing group: the export writes one constant for all of them.
            layer.input_multiplier = multipliers.setdefault(id(smoothing[name]), layer.input_multiplier)
        built[name] = layer
        if name:
            set_submodule(model, name, layer)
        else:
            model = layer
    if transposed:
        log.info("static_int8: kept %s weight-only (no integer ConvTranspose kernel)", transposed)
    if config.bias_correction:
        correct_biases(model, built, weights, data, batches=config.calibration_batches)
    return model
