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

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress._files import write_text_atomic
from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, ModelpressError, RecipeError
from modelpress.evaluate.metrics import Predictor, as_predictor, evaluate
from modelpress.loading import Inputs, as_inputs
from modelpress.techniques import PREPARE, REGISTRY, config_from_dict
from modelpress.techniques.mixed_precision import Fallback, SensitivityMode
from modelpress.techniques.select import matches_any, set_submodule
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only

log = logging.getLogger(__name__)

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
    quality = quality_on(model, held, metric)
    mix = build_mix(model, scheme, calibration, fallback="fp32", measure=quality.measure)
    return layer_sensitivity(
        mix, inputs, mode=mode, metric=quality.name, higher_is_better=quality.higher_is_better
    )


@dataclass(frozen=True)
class Quality:
    """How a probe model is scored: `measure(model)`, what it measures, and which way is better."""

    measure: Measure
    name: str
    higher_is_better: bool


def quality_on(model: nn.Module, held: Sequence[Any], metric: str | Metric | None) -> Quality:
    """Score models on the held-out items: mean cosine of the first output to `model`'s without `metric`;
    else `metric` ('accuracy' on (inputs, labels) items, 'perplexity' (lower is better), or a callable
    (predictor, items) -> float, higher is better)."""
    if metric is None or metric == "cosine":
        inputs = holdout_inputs(held, labeled=False)
        return Quality(cosine_to(model, inputs), "mean cosine to fp32", True)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    return Quality(metric_on(metric, held), name, metric != "perplexity")


# ---------------------------------------------------------------------------------------------------------
# Sensitivity per layer and per family: the quality with only one layer compressed, for each family


@dataclass(frozen=True)
class Family:
    """A family of compression: a technique (a config mapping), the field that sets its strength, and the
    strengths probed. Each probe applies the technique with `targets: [layer]` to a copy of the model."""

    name: str
    technique: Mapping[str, Any]
    param: str
    strengths: tuple[float, ...]

    def config(self, layer: str, strength: float) -> Any:
        """The technique's config that compresses only `layer` at `strength`."""
        value = int(strength) if float(strength).is_integer() and self.param != "ratio" else strength
        raw = {**self.technique, self.param: value, "targets": [layer]}
        return config_from_dict(raw, where=f"sensitivity family '{self.name}'")


# The built-in families: the cheapest member of each (no calibration but structured's one traced batch).
FAMILIES: dict[str, Family] = {
    # int4 in groups of 32 on Linear and Embedding; a convolution has no int4 kernel and stays int8 per channel
    "bits": Family("bits", {"type": "weight_only", "group_size": 32}, "bits", (4,)),
    "sparsity": Family(
        "sparsity", {"type": "sparsity", "method": "magnitude", "layers": ["linear", "conv"]}, "ratio", (0.5,)
    ),
    "rank": Family("rank", {"type": "lowrank"}, "ratio", (0.5,)),
    "structured": Family("structured", {"type": "structured", "heads": False}, "ratio", (0.5,)),
    "clusters": Family("clusters", {"type": "cluster"}, "values", (16,)),
}


def as_family(spec: str | Family) -> Family:
    """A `Family` from itself, a built-in name ('sparsity') or a name with strengths ('sparsity:0.5,0.7').

    >>> as_family("bits:4,8").strengths
    (4.0, 8.0)
    """
    if isinstance(spec, Family):
        return spec
    name, _, values = str(spec).partition(":")
    family = FAMILIES.get(name.strip())
    if family is None:
        raise RecipeError(
            f"sensitivity: unknown family {name!r}; choose from {', '.join(FAMILIES)} (optionally with "
            "strengths, e.g. 'sparsity:0.5,0.7'), or pass a modelpress.optimize.sensitivity.Family."
        )
    if not values:
        return family
    try:
        strengths = tuple(float(v) for v in values.split(",") if v.strip())
    except ValueError:
        raise RecipeError(
            f"sensitivity: {spec!r}: strengths must be numbers, e.g. 'sparsity:0.5,0.7'."
        ) from None
    if not strengths:
        raise RecipeError(f"sensitivity: {spec!r} names no strength; e.g. 'sparsity:0.5,0.7'.")
    return dataclasses.replace(family, strengths=strengths)


def split_families(text: str) -> list[str]:
    """Family specs from one comma-separated string; a comma before a number continues the strengths.

    >>> split_families("bits, sparsity:0.5,0.7,rank")
    ['bits', 'sparsity:0.5,0.7', 'rank']
    """
    return [part.strip() for part in re.split(r",(?=\s*[A-Za-z])", text) if part.strip()]


@dataclass(frozen=True)
class FamilyProbe:
    layer: str
    type: str  # class of the original layer
    params: int
    family: str
    strength: float
    value: float | None  # quality with only this layer compressed; None when the family does not apply
    drop: float | None  # reference - value in the metric's units (> 0 is worse); None when not applicable
    note: str = ""  # why it does not apply


@dataclass
class FamilySensitivity:
    """Per layer and family: the quality with only that layer compressed at each strength.

    `drop(layer, family)` is what a search seeds from; `table()` is {layer: {"family@strength": drop}}.
    """

    metric: str
    higher_is_better: bool
    reference: float  # quality of the uncompressed model on the same items
    items: int  # held-out items measured
    rows: list[FamilyProbe] = field(default_factory=list)
    key: str = ""  # the cache key (weights, data, settings)
    cached: bool = False  # read from the cache, not measured in this call

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(r.layer for r in self.rows))

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(f"{r.family}@{r.strength:g}" for r in self.rows))

    def drop(self, layer: str, family: str, strength: float | None = None) -> float | None:
        """The drop of `layer` under `family` (at `strength`, or the strongest probed); None if not applicable."""
        rows = [r for r in self.rows if r.layer == layer and r.family == family]
        if strength is not None:
            rows = [r for r in rows if r.strength == strength]
        if not rows:
            raise KeyError(f"no probe of layer {layer!r} with family {family!r} at strength {strength}")
        return rows[-1].drop

    def table(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for r in self.rows:
            out.setdefault(r.layer, {})[f"{r.family}@{r.strength:g}"] = r.drop
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> FamilySensitivity:
        fields = {k: v for k, v in raw.items() if k != "rows"}
        return cls(**fields, rows=[FamilyProbe(**r) for r in raw.get("rows", [])])

    def format(self) -> str:
        """A plain-text table: one row per layer, one column per family and strength (drops)."""
        columns, table = self.columns, self.table()
        width = max([5, *(len(name) for name in table)])
        lines = [
            f"Sensitivity per layer and family (drop of {self.metric} with only that layer compressed; "
            f"reference {self.reference:.5f} on {self.items} item(s){', cached' if self.cached else ''})",
            f"{'layer':<{width}} " + " ".join(f"{c:>14}" for c in columns),
        ]
        for layer, cells in table.items():
            text = [f"{cells[c]:14.5f}" if cells.get(c) is not None else f"{'-':>14}" for c in columns]
            lines.append(f"{layer:<{width}} " + " ".join(text))
        return "\n".join(lines)


def candidate_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Modules that own a >= 2-D weight parameter themselves (Linear, convolutions, Embedding ...), selected
    by `layers` (names, type names or `re:` regexes; all when None)."""
    out = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if not name or weight is None or weight.ndim < 2:
            continue
        if layers is not None and not matches_any(layers, name, module):
            continue
        out.append((name, module))
    if layers is not None and not out:
        raise RecipeError(f"sensitivity: layers {list(layers)} match no layer with a weight matrix.")
    return out


def _changed(before: nn.Module, after: nn.Module, name: str) -> bool:
    """Whether the layer `name` of `after` differs from `before` (type, shapes or values)."""
    try:
        new = after.get_submodule(name)
    except AttributeError:
        return True  # removed
    if type(new) is not type(before):
        return True
    old_state, new_state = before.state_dict(), new.state_dict()
    if {k: v.shape for k, v in old_state.items()} != {k: v.shape for k, v in new_state.items()}:
        return True
    return any(not torch.equal(old_state[k], new_state[k]) for k in old_state)


def _not_applied(before: nn.Module, probe: nn.Module, name: str, family: Family, strength: float) -> str:
    """Why the probe does not measure `family` at `strength` on layer `name` ('' when it does)."""
    if not _changed(before, probe, name):
        return f"{family.technique['type']} left this layer as is"
    bits = getattr(probe.get_submodule(name), "bits", None) if family.param == "bits" else None
    if isinstance(bits, int) and bits != strength:  # e.g. a convolution has no int4 kernel: it stays int8
        return (
            f"{family.technique['type']} stores this {type(before).__name__} at {bits} bits, not {strength:g}"
        )
    return ""


def _hash_value(h: Any, value: Any) -> None:
    # Tensors by dtype, shape and bytes; containers recursively; anything else by its repr.
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_value(h, value[k])
        h.update(b"}")
    elif isinstance(value, (tuple, list)):
        h.update(b"[")
        for v in value:
            _hash_value(h, v)
        h.update(b"]")
    else:
        h.update(repr(value).encode())


def cache_key(model: nn.Module, data: Iterable[Any], settings: Mapping[str, Any]) -> str:
    """A hash of the model's class and weights, every data item and the settings: equal keys, equal tables."""
    h = hashlib.sha256()
    h.update(type(model).__qualname__.encode())
    _hash_value(h, dict(model.state_dict()))
    for item in data:
        _hash_value(h, item)
    _hash_value(h, dict(settings))
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    """Where sensitivity tables are kept between runs: ~/.cache/modelpress/sensitivity."""
    return Path.home() / ".cache" / "modelpress" / "sensitivity"


@contextlib.contextmanager
def _quiet_techniques() -> Iterator[None]:
    # Each probe runs a technique on one layer: their per-run log lines (and "nothing removed" warnings for
    # a layer a family does not apply to) would drown the log; the table records those as notes.
    logger = logging.getLogger("modelpress.techniques")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def family_sensitivity(
    model: nn.Module,
    data: Dataset | Iterable[Any] | None,
    families: Sequence[str | Family] = ("bits", "sparsity", "rank", "structured"),
    *,
    metric: str | Metric | None = None,
    max_items: int = 16,
    layers: Sequence[str] | None = None,
    cache: bool | str | Path = True,
) -> FamilySensitivity:
    """For each candidate layer and family, the quality with only that layer compressed at each strength.

    Quality is measured on the first `max_items` data items (a subset where the whole set is slow): the
    mean cosine of the first output to `model`'s without `metric`, else `metric` ('accuracy' on (inputs,
    labels) items, 'perplexity', or a callable (predictor, items) -> float, higher is better). Every item
    (inputs only) is the calibration data of the techniques that calibrate. The table is cached on disk,
    keyed by a hash of the weights, the data and these settings: `cache=True` under
    ~/.cache/modelpress/sensitivity, a path for another folder, False for none. A callable metric enters
    the key by its qualified name only. `model` is left untouched.

    >>> table = family_sensitivity(model, batches, ["bits", "sparsity:0.5,0.7"])  # doctest: +SKIP
    >>> table.drop("fc1", "sparsity", 0.7)  # doctest: +SKIP
    """
    if max_items < 1:
        raise RecipeError(f"sensitivity: max_items={max_items} must be at least 1.")
    dataset = as_dataset(data)
    if dataset is None:
        raise DataError(
            "sensitivity needs data: its first `max_items` items measure quality. Pass `data=` (or --data "
            "file.py:fn on the command line)."
        )
    specs = [as_family(f) for f in families]
    labeled = metric == "accuracy"
    held = list(dataset.take(max_items))
    if not held:
        raise DataError("sensitivity: the data is empty; pass at least one item.")
    calibration = Dataset(dataset, transform_fn=(lambda item: item[0]) if labeled else None)
    candidates = candidate_layers(model, layers)
    settings = {
        "version": 1,
        "families": [dataclasses.asdict(f) for f in specs],
        "metric": metric if metric is None or isinstance(metric, str) else _qualname(metric),
        "max_items": max_items,
        "layers": list(layers) if layers is not None else None,
    }
    folder = None if cache is False else default_cache_dir() if cache is True else Path(cache)
    key = cache_key(model, dataset, settings)
    path = folder / f"{key}.json" if folder is not None else None
    if path is not None and path.is_file():
        try:
            table = FamilySensitivity.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:  # a damaged file: measure again and replace it
            log.warning("sensitivity: cache file %s is unreadable (%s); measuring again", path, exc)
        else:
            table.cached = True
            return table
    quality = quality_on(model, held, "accuracy" if labeled else metric)
    if labeled:
        for item in held:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise DataError(
                    "sensitivity: accuracy needs items of the form (inputs, labels); got "
                    f"{type(item).__name__}. Leave metric unset to measure cosine to the original model."
                )
    reference = quality.measure(model)
    sign = 1.0 if quality.higher_is_better else -1.0
    rows = []
    with _quiet_techniques():
        for name, module in candidates:
            params = sum(p.numel() for p in module.parameters())
            for family in specs:
                _, fn = REGISTRY[family.technique["type"]]
                for strength in family.strengths:
                    start = time.perf_counter()
                    value: float | None = None
                    note = ""
                    try:
                        probe = fn(copy.deepcopy(model), family.config(name, strength), calibration)
                    except ModelpressError as exc:
                        note = str(exc).splitlines()[0]
                    else:
                        note = _not_applied(module, probe, name, family, strength)
                        if not note:
                            value = float(quality.measure(probe))
                    drop = sign * (reference - value) if value is not None else None
                    rows.append(
                        FamilyProbe(
                            name, type(module).__name__, params, family.name, strength, value, drop, note
                        )
                    )
                    log.debug(
                        "sensitivity: %s %s@%g %.2f s",
                        name,
                        family.name,
                        strength,
                        time.perf_counter() - start,
                    )
    table = FamilySensitivity(
        metric=quality.name,
        higher_is_better=quality.higher_is_better,
        reference=reference,
        items=len(held),
        rows=rows,
        key=key,
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(table.to_dict()), overwrite=True)
    return table


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


__all__ = [
    "FAMILIES",
    "Fallback",
    "Family",
    "FamilyProbe",
    "FamilySensitivity",
    "LayerMix",
    "LayerSensitivity",
    "Measure",
    "Metric",
    "Quality",
    "SensitivityMode",
    "SensitivityTable",
    "as_family",
    "build_mix",
    "cache_key",
    "candidate_layers",
    "cosine_to",
    "default_cache_dir",
    "family_sensitivity",
    "holdout_inputs",
    "layer_sensitivity",
    "metric_on",
    "output_sqnr",
    "quality_on",
    "scheme_sensitivity",
    "split_families",
    "split_holdout",
]
