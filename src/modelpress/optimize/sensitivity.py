"""Which layers a quantization scheme hurts most, measured on the whole model's output.

A `LayerMix` holds one working copy of the model whose candidate layers can each be switched between the
scheme's module (low precision) and a higher-precision one (the fp32 layer, or int8 weight-only), so a
probe is a handful of `setattr`s and one pass over held-out items, never a re-calibration. Sensitivity of a
layer is then the quality lost to quantizing it, with every other layer at high precision (mode "only")
or with every other layer quantized (mode "all_but", what a search that keeps a few layers needs). The
fast proxy needs no metric: each quantized layer's output SQNR against the fp32 layer on the same input.

>>> table = scheme_sensitivity(model, StaticInt8Config(), data, holdout=4)  # doctest: +SKIP
>>> print(table.format())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.evaluate.metrics import Predictor, as_predictor, evaluate
from modelpress.loading import Inputs, as_inputs
from modelpress.techniques import PREPARE, REGISTRY
from modelpress.techniques.mixed_precision import Fallback, SensitivityMode
from modelpress.techniques.select import set_submodule
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only

Measure = Callable[[nn.Module], float]
Metric = Callable[[Predictor, Iterable[Any]], float]


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    type: str  # class of the original layer, e.g. "Linear"
    params: int
    value: float  # the probe model's quality; output SQNR in dB in mode "sqnr"
    drop: float | None  # quality lost to quantizing this layer (metric units, > 0 is worse); None for "sqnr"
    sqnr_db: float  # the layer's own output SQNR (dB) on the held-out inputs, whatever the mode


@dataclass
class SensitivityTable:
    """Rows most sensitive first: largest `drop`, or lowest SQNR in mode "sqnr"."""

    metric: str  # what `value` measures, e.g. "mean cosine to fp32"
    mode: SensitivityMode
    reference: float | None  # quality with every layer high ("only") or every layer quantized ("all_but")
    rows: list[LayerSensitivity] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return [r.layer for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self, limit: int | None = None) -> str:
        """A plain-text table (the first `limit` rows)."""
        probe = {
            "all_but": "every other layer quantized",
            "only": "only this layer quantized",
            "sqnr": "output SQNR proxy",
        }[self.mode]
        head = f"Sensitivity ({probe}; {self.metric}"
        head += f", reference {self.reference:.5f})" if self.reference is not None else ")"
        width = max([5, *(len(r.layer) for r in self.rows[:limit])])
        lines = [
            head,
            f"{'layer':<{width}} {'type':<10} {'params':>9} {'value':>9} {'drop':>9} {'SQNR dB':>8}",
        ]
        for r in self.rows[:limit]:
            drop = f"{r.drop:9.5f}" if r.drop is not None else f"{'-':>9}"
            lines.append(
                f"{r.layer:<{width}} {r.type:<10} {r.params:>9} {r.value:9.5f} {drop} {r.sqnr_db:8.1f}"
            )
        return "\n".join(lines)


class LayerMix:
    """A working model whose `layers` each run either the scheme's module or the higher-precision one.

    `quality(high)` is the memoised `measure` of the model with exactly the layers in `high` at high
    precision: every configuration a search or a table visits is measured once.
    """

    def __init__(
        self,
        original: nn.Module,
        base: nn.Module,
        low: dict[str, nn.Module],
        high: dict[str, nn.Module],
        measure: Measure,
    ) -> None:
        self.original = original  # the uncompressed model, never modified
        self.base = base
        self.low = low
        self.high = high
        self.measure = measure
        self.layers = list(low)
        self.memo: dict[frozenset[str], float] = {}

    def model(self, high: Collection[str]) -> nn.Module:
        """The working model with `high` layers at high precision and every other candidate quantized."""
        for name in self.layers:
            set_submodule(self.base, name, self.high[name] if name in high else self.low[name])
        return self.base

    def quality(self, high: Collection[str]) -> float:
        key = frozenset(high)
        if key not in self.memo:
            self.memo[key] = float(self.measure(self.model(key)))
        return self.memo[key]


def build_mix(
    model: nn.Module,
    scheme: Any,
    calibration: Dataset,
    *,
    fallback: Fallback,
    measure: Measure,
) -> LayerMix:
    """Apply `scheme` (a technique config) once to a copy of `model` and collect its replaced layers.

    The scheme's module of each layer is reused for every probe: static int8 calibrates each layer on the
    fp32 model's activations, so a layer's quantizer does not depend on which other layers are quantized.
    Layers whose scheme module equals the fallback (ConvTranspose stays weight-only under static int8)
    are not candidates: keeping them would change nothing.
    """
    _, scheme_fn = REGISTRY[scheme.type]
    base = scheme_fn(copy.deepcopy(model), scheme, calibration)
    # The float model as the scheme sees it before quantizing (BatchNorm folded, say): the kept layers
    # and the per-layer SQNR come from it, so that they fit the rewritten model around them.
    if scheme.type in PREPARE:
        model = PREPARE[scheme.type](copy.deepcopy(model), scheme, calibration)
    originals = dict(model.named_modules())
    # The layers the scheme replaced (a QuantizedLayer or any other module type). Not the root: it
    # cannot be swapped; not a layer an earlier step already compressed: its type is unchanged.
    low: dict[str, nn.Module] = {
        name: module
        for name, module in base.named_modules()
        if name and name in originals and type(module) is not type(originals[name])
    }
    if fallback == "weight_only" and low:
        kept = weight_only(copy.deepcopy(model), WeightOnlyConfig(targets=tuple(low)))
        high = {name: kept.get_submodule(name) for name in low}
        low = {name: m for name, m in low.items() if not _same_quantization(m, high[name])}
        high = {name: high[name] for name in low}
    else:
        high = {name: copy.deepcopy(originals[name]) for name in low}
    return LayerMix(model, base, low, high, measure)


def _same_quantization(a: nn.Module, b: nn.Module) -> bool:
    def state(m: nn.Module) -> tuple[Any, ...]:
        return (getattr(m, "scheme", None), getattr(m, "qweight", None), getattr(m, "scale", None))

    sa, sb = state(a), state(b)
    return (
        sa[0] == sb[0]
        and isinstance(sa[1], torch.Tensor)
        and isinstance(sb[1], torch.Tensor)
        and torch.equal(sa[1], sb[1])
        and isinstance(sa[2], torch.Tensor)
        and isinstance(sb[2], torch.Tensor)
        and torch.equal(sa[2], sb[2])
    )


def cosine_to(reference: nn.Module, items: Sequence[Inputs]) -> Measure:
    """A measure: mean cosine of a model's first output to `reference`'s, one cosine per batch row.

    The reference outputs are computed once, here.
    """
    ref_predict = as_predictor(reference)
    refs = [ref_predict(x) for x in items]

    def mean_cosine(model: nn.Module) -> float:
        predict = as_predictor(model)
        cosines = []
        for x, ref in zip(items, refs, strict=True):
            out = predict(x)
            a, b = out.reshape(out.shape[0], -1).double(), ref.reshape(ref.shape[0], -1).double()
            cosines.append(F.cosine_similarity(a, b, dim=1))
        return float(torch.cat(cosines).mean())

    return mean_cosine


def metric_on(metric: str | Metric, items: Sequence[Any]) -> Measure:
    """A measure: `metric` ('accuracy', 'perplexity' or a callable (predictor, items) -> float) on `items`."""

    def measure(model: nn.Module) -> float:
        return evaluate(model, items, metric)

    return measure


def output_sqnr(
    model: nn.Module, quantized: dict[str, nn.Module], samples: Sequence[Inputs]
) -> dict[str, float]:
    """Output SQNR (dB) of each quantized layer against the fp32 layer of `model`, fed the same input.

    Streams: each layer's signal and noise energy are summed inside a forward hook, nothing is stored.
    """
    originals = dict(model.named_modules())
    energy = {name: [0.0, 0.0] for name in quantized if name in originals}
    handles = []
    for name in energy:

        def hook(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, name: str = name
        ) -> None:
            if not isinstance(out, torch.Tensor):
                return
            approx = quantized[name](*args, **kwargs)
            energy[name][0] += float(out.double().pow(2).sum())
            energy[name][1] += float((out.double() - approx.double()).pow(2).sum())

        handles.append(originals[name].register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for sample in samples:
                model(*sample)
    finally:
        for h in handles:
            h.remove()
    return {
        name: math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
        for name, (signal, noise) in energy.items()
    }


def layer_sensitivity(
    mix: LayerMix,
    samples: Sequence[Inputs],
    *,
    mode: SensitivityMode = "all_but",
    metric: str = "quality",
    higher_is_better: bool = True,
) -> SensitivityTable:
    """Rank `mix.layers`, most sensitive first; `samples` (model inputs) feed the SQNR column.

    "all_but": quality with every layer quantized except this one; drop = that - quality(all quantized).
    "only": quality with only this layer quantized; drop = quality(none quantized) - that.
    "sqnr": no metric, one pass: the layer's output SQNR (lowest first).
    """
    sqnr = output_sqnr(mix.original, mix.low, samples)
    originals = dict(mix.original.named_modules())
    sign = 1.0 if higher_is_better else -1.0
    rows = []
    reference: float | None = None
    if mode == "sqnr":
        for name in mix.layers:
            rows.append(_row(name, originals[name], sqnr[name], None, sqnr[name]))
        rows.sort(key=lambda r: r.value)
    else:
        everything = frozenset(mix.layers)
        reference = mix.quality(frozenset() if mode == "all_but" else everything)
        for name in mix.layers:
            if mode == "all_but":
                value = mix.quality({name})
                drop = sign * (value - reference)
            else:
                value = mix.quality(everything - {name})
                drop = sign * (reference - value)
            rows.append(_row(name, originals[name], value, drop, sqnr[name]))
        rows.sort(key=lambda r: -(r.drop or 0.0))
    return SensitivityTable(
        metric=metric if mode != "sqnr" else "output SQNR dB", mode=mode, reference=reference, rows=rows
    )


def _row(name: str, module: nn.Module, value: float, drop: float | None, sqnr: float) -> LayerSensitivity:
    params = sum(p.numel() for p in module.parameters())
    return LayerSensitivity(name, type(module).__name__, params, value, drop, sqnr)


class _After(Iterable[Any]):
    """A re-iterable view of `data` without its first `n` items."""

    def __init__(self, data: Dataset, n: int) -> None:
        self.data, self.n = data, n

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.n, None)


def split_holdout(
    data: Dataset | Iterable[Any] | None, holdout: int, *, labeled: bool, where: str
) -> tuple[list[Any], Dataset]:
    """The first `holdout` items (kept as they are, for measuring) and a calibration view of the rest.

    With `labeled`, items are `(inputs, labels)` and calibration sees only the inputs.
    """
    dataset = as_dataset(data)
    if dataset is None:
        raise DataError(
            f"{where} needs data: the first `holdout` items measure quality and the rest calibrate. Pass "
            "`data=` (or --data file.py:fn on the command line)."
        )
    held = list(dataset.take(holdout))
    calibration = Dataset(_After(dataset, holdout), transform_fn=(lambda item: item[0]) if labeled else None)
    if len(held) < holdout or next(iter(calibration), None) is None:
        raise DataError(
            f"{where}: the data has {len(held)} item(s) but holdout={holdout} needs more than {holdout}: the "
            f"first {holdout} measure quality and the rest calibrate. Pass more items or lower holdout."
        )
    if labeled:
        for item in held:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise DataError(
                    f"{where}: measuring accuracy needs items of the form (inputs, labels); got "
                    f"{type(item).__name__}. Use a transform_fn that returns (inputs, labels), or a min_cosine "
                    "floor with plain model inputs."
                )
    return held, calibration


def holdout_inputs(held: Sequence[Any], *, labeled: bool) -> list[Inputs]:
    """The model inputs of held-out items."""
    return [as_inputs(item[0] if labeled else item, where="held-out item") for item in held]


def scheme_sensitivity(
    model: nn.Module,
    scheme: Any,
    data: Dataset | Iterable[Any] | None,
    *,
    holdout: int = 4,
    mode: SensitivityMode = "all_but",
    metric: str | Metric | None = None,
) -> SensitivityTable:
    """Per-layer sensitivity of `scheme` (a technique config, e.g. `StaticInt8Config()`) on `model`.

    The first `holdout` items of `data` measure, the rest calibrate. Without `metric` quality is the mean
    cosine of the first output to the fp32 model's; with one ('accuracy' on (inputs, labels) items,
    'perplexity', or a callable (predictor, items) -> float where higher is better) that metric. Layers
    not quantized are at fp32. `model` is left untouched.

    >>> print(scheme_sensitivity(model, StaticInt8Config(), batches, mode="sqnr").format())  # doctest: +SKIP
    """
    if holdout < 1:
        raise RecipeError(f"sensitivity: holdout={holdout} must be at least 1.")
    labeled = metric == "accuracy"
    held, calibration = split_holdout(data, holdout, labeled=labeled, where="sensitivity")
    inputs = holdout_inputs(held, labeled=labeled)
    if metric is None:
        measure, name, higher = cosine_to(model, inputs), "mean cosine to fp32", True
    else:
        measure = metric_on(metric, held)
        name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        higher = metric != "perplexity"
    mix = build_mix(model, scheme, calibration, fallback="fp32", measure=measure)
    return layer_sensitivity(mix, inputs, mode=mode, metric=name, higher_is_better=higher)


__all__ = [
    "Fallback",
    "LayerMix",
    "LayerSensitivity",
    "Measure",
    "Metric",
    "SensitivityMode",
    "SensitivityTable",
    "build_mix",
    "cosine_to",
    "holdout_inputs",
    "layer_sensitivity",
    "metric_on",
    "output_sqnr",
    "scheme_sensitivity",
    "split_holdout",
]
