"""Accuracy-aware mixed precision: quantize every layer with a scheme, except the fewest that a quality
floor needs kept at higher precision (int8 weight-only by default, or fp32).

The search measures the whole model on held-out items: every layer quantized first; if that misses the
floor, layers are ranked by sensitivity, the smallest prefix of the ranking that meets the floor is found
by binary search, and kept layers the floor does not need are dropped again. The returned model is built
by the scheme's own function with `ignore` extended by the kept layers, then `weight_only` on those
layers: the artifact is exactly what that plain two-step recipe gives. The registered technique
(`techniques.mixed_precision`) holds the config and calls `search_mixed_precision`.

>>> small, result = search_mixed_precision(model, MixedPrecisionConfig(min_cosine=0.998), batches)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from modelpress.data import Dataset
from modelpress.errors import RecipeError
from modelpress.optimize.sensitivity import (
    LayerMix,
    Metric,
    SensitivityTable,
    build_mix,
    cosine_to,
    holdout_inputs,
    layer_sensitivity,
    metric_on,
    split_holdout,
)
from modelpress.techniques import REGISTRY, config_to_dict
from modelpress.techniques.mixed_precision import Fallback, MixedPrecisionConfig
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only

log = logging.getLogger(__name__)

_PRECISION = {"weight_only": "int8 weight-only", "fp32": "fp32"}


@dataclass(frozen=True)
class KeptLayer:
    layer: str
    precision: str  # "int8 weight-only" or "fp32"
    quality_without: float  # the final mix with this layer quantized by the scheme too
    quality_with: float
    reason: str


@dataclass
class MixedPrecisionResult:
    floor: str  # e.g. "mean cosine to fp32 >= 0.998"
    metric: str
    met: bool
    quality: float  # of the returned model (the best found when the floor is not met)
    reference: float  # of the fp32 model
    all_quantized: float  # every candidate layer quantized by the scheme
    candidates: int
    kept: list[KeptLayer]
    sensitivity: SensitivityTable
    trials: int  # model configurations measured
    recipe: list[dict[str, Any]]  # the plain recipe that builds the same model

    @property
    def kept_layers(self) -> list[str]:
        return [k.layer for k in self.kept]

    def summary(self) -> dict[str, Any]:
        """A small JSON-ready dict (what the technique attaches to the model for the report)."""
        return {
            "floor": self.floor,
            "metric": self.metric,
            "met": self.met,
            "quality": self.quality,
            "reference": self.reference,
            "all_quantized": self.all_quantized,
            "candidates": self.candidates,
            "kept": [dataclasses.asdict(k) for k in self.kept],
            "trials": self.trials,
            "recipe": self.recipe,
            "sensitivity": self.sensitivity.to_dict(),
        }

    def format(self) -> str:
        state = "met" if self.met else "NOT met"
        lines = [
            f"Mixed precision: floor {self.floor} {state}: {self.metric} {self.quality:.5f} with "
            f"{len(self.kept)} of {self.candidates} layers kept (every layer quantized: "
            f"{self.all_quantized:.5f}; {self.trials} configurations measured)"
        ]
        lines += [f"  {k.reason}" for k in self.kept]
        return "\n".join(lines)


class FloorNotMetError(RecipeError):
    """No configuration within the limits meets the quality floor; `result` holds the best found."""

    def __init__(self, message: str, result: MixedPrecisionResult) -> None:
        super().__init__(message)
        self.result = result


def search_mixed_precision(
    model: nn.Module,
    config: MixedPrecisionConfig,
    data: Dataset | Iterable[Any] | None,
    *,
    metric: str | Metric | None = None,
    labeled: bool | None = None,
) -> tuple[nn.Module, MixedPrecisionResult]:
    """Search the fewest layers to keep at `config.fallback`; return the model and what was found.

    `metric` (for a `max_drop` floor) overrides `config.metric` with any callable (predictor, items) ->
    float where higher is better, given the held-out items as they come; `labeled` says whether items are
    (inputs, labels) pairs whose inputs calibrate (default: only for accuracy). `model` is left untouched.
    With `on_fail: error` a `FloorNotMetError` carries the result.

    >>> small, result = search_mixed_precision(model, MixedPrecisionConfig(min_cosine=0.998), batches)  # doctest: +SKIP
    >>> print(result.format())  # doctest: +SKIP
    """
    if metric is not None and config.min_cosine is not None:
        raise RecipeError(
            "mixed_precision: a metric applies to a max_drop floor; min_cosine always measures the cosine "
            "to the fp32 output."
        )
    chosen: str | Metric = metric if metric is not None else config.metric
    if labeled is None:
        labeled = config.max_drop is not None and chosen == "accuracy"
    scheme = config.scheme_config()
    held, calibration = split_holdout(data, config.holdout, labeled=labeled, where="mixed_precision")
    inputs = holdout_inputs(held, labeled=labeled)
    if config.min_cosine is not None:
        name, higher, measure = "mean cosine to fp32", True, cosine_to(model, inputs)
        reference = 1.0
    else:
        name = chosen if isinstance(chosen, str) else getattr(chosen, "__name__", "metric")
        higher, measure = chosen != "perplexity", metric_on(chosen, held)
        reference = measure(model)
    floor, meets = _floor(config, name, reference, higher=higher)
    mix = build_mix(model, scheme, calibration, fallback=config.fallback, measure=measure)
    all_quantized = mix.quality(())
    log.info(
        "mixed_precision: %d candidate layers; every one quantized: %s %.5f (floor %s)",
        len(mix.layers),
        name,
        all_quantized,
        floor,
    )
    cap = min(len(mix.layers), config.max_layers or len(mix.layers))
    kept: list[str] | None = []
    if meets(all_quantized):
        table = layer_sensitivity(mix, inputs, mode="sqnr", metric=name, higher_is_better=higher)
    else:
        table = layer_sensitivity(mix, inputs, mode=config.ranking, metric=name, higher_is_better=higher)
        kept = _search(mix, table.layers[:cap], meets)
    met = kept is not None
    if kept is None:
        sign = 1.0 if higher else -1.0
        best = max(
            (s for s in mix.memo if len(s) <= cap),
            key=lambda s: (sign * mix.memo[s], -len(s)),
        )
        kept = [n for n in table.layers if n in best]
    rank = {n: i for i, n in enumerate(table.layers)}
    kept.sort(key=rank.__getitem__)
    result = MixedPrecisionResult(
        floor=floor,
        metric=name,
        met=met,
        quality=mix.quality(kept),
        reference=reference,
        all_quantized=all_quantized,
        candidates=len(mix.layers),
        kept=_reasons(mix, kept, meets, name=name, precision=_PRECISION[config.fallback]),
        sensitivity=table,
        trials=len(mix.memo),
        recipe=_recipe(scheme, kept, config.fallback),
    )
    if not met:
        message = _failure(config, result, cap)
        if config.on_fail == "error":
            raise FloorNotMetError(message, result)
        log.warning("%s Returning the best found (on_fail: best).", message)
    small = _build(model, scheme, kept, config.fallback, calibration)
    quality = measure(small)
    if abs(quality - result.quality) > 1e-6:
        # A scheme whose layers depend on each other (not static_int8 or weight_only): the build is the truth.
        log.warning(
            "mixed_precision: the built model measures %s %.6f, the search's mix %.6f; reporting the build.",
            name,
            quality,
            result.quality,
        )
        result = dataclasses.replace(result, quality=quality, met=meets(quality))
        if met and not result.met:
            message = _failure(config, result, cap) + " (The search's mix met the floor; the build does not.)"
            if config.on_fail == "error":
                raise FloorNotMetError(message, result)
            log.warning("%s Returning the build (on_fail: best).", message)
    return small, result


def _floor(
    config: MixedPrecisionConfig, name: str, reference: float, *, higher: bool
) -> tuple[str, Callable[[float], bool]]:
    if config.min_cosine is not None:
        floor_cos = config.min_cosine
        return f"{name} >= {floor_cos}", lambda q: q >= floor_cos
    assert config.max_drop is not None
    max_drop, sign = config.max_drop, 1.0 if higher else -1.0
    scale = abs(reference) or 1.0  # a zero reference: the drop is absolute

    def meets(q: float) -> bool:
        return sign * (reference - q) / scale <= max_drop + 1e-12

    bound = reference - sign * max_drop * scale
    sign_text = ">=" if higher else "<="
    return f"{name} {sign_text} {bound:.5f} (at most {max_drop:.2%} worse than fp32 {reference:.5f})", meets


def _search(mix: LayerMix, ranking: Sequence[str], meets: Callable[[float], bool]) -> list[str] | None:
    """The fewest layers of `ranking` (most sensitive first) to keep; None when even all of them fail."""
    if not ranking or not meets(mix.quality(ranking)):
        return None
    # Quality grows (nearly) monotonically with the prefix of the ranking kept: binary search its length.
    lo, hi = 0, len(ranking)  # the prefix of length lo fails, of length hi meets the floor
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mix.quality(ranking[:mid])):
            hi = mid
        else:
            lo = mid
    kept = list(ranking[:hi])
    # The ranking measured layers one at a time; together some are not needed. Least sensitive first.
    changed = True
    while changed and len(kept) > 1:
        changed = False
        for name in reversed(list(kept)):
            trial = [n for n in kept if n != name]
            if trial and meets(mix.quality(trial)):
                kept, changed = trial, True
    return kept


def _reasons(
    mix: LayerMix, kept: list[str], meets: Callable[[float], bool], *, name: str, precision: str
) -> list[KeptLayer]:
    out = []
    with_all = mix.quality(kept)
    for layer in kept:
        without = mix.quality([n for n in kept if n != layer])
        reason = f"{layer}: {name} {without:.5f} -> {with_all:.5f} when kept at {precision}"
        if not meets(without):
            reason += " (below the floor without it)"
        out.append(KeptLayer(layer, precision, without, with_all, reason))
    return out


def _recipe(scheme: Any, kept: list[str], fallback: Fallback) -> list[dict[str, Any]]:
    steps = [config_to_dict(dataclasses.replace(scheme, ignore=(*scheme.ignore, *kept)))]
    if kept and fallback == "weight_only":
        steps.append(config_to_dict(WeightOnlyConfig(targets=tuple(kept))))
    return steps


def _build(
    model: nn.Module, scheme: Any, kept: list[str], fallback: Fallback, calibration: Dataset
) -> nn.Module:
    """The scheme's own function with the kept layers ignored, then weight_only on them."""
    _, scheme_fn = REGISTRY[scheme.type]
    out = scheme_fn(
        copy.deepcopy(model), dataclasses.replace(scheme, ignore=(*scheme.ignore, *kept)), calibration
    )
    if kept and fallback == "weight_only":
        out = weight_only(out, WeightOnlyConfig(targets=tuple(kept)))
    return out


def _failure(config: MixedPrecisionConfig, result: MixedPrecisionResult, cap: int) -> str:
    kept = result.kept_layers
    names = ", ".join(kept[:8]) + (f" and {len(kept) - 8} more" if len(kept) > 8 else "")
    best = (
        f"keeps {len(kept)} layer(s) at {_PRECISION[config.fallback]} ({names})" if kept else "keeps no layer"
    )
    hints = ["lower the floor"]
    if cap < result.candidates:
        hints.append(f"raise max_layers (now {cap} of {result.candidates} layers)")
    if config.fallback == "weight_only":
        hints.append("use fallback: fp32")
    assert isinstance(config.scheme, dict)
    if config.scheme["type"] == "static_int8" and config.scheme.get("smooth_alpha") is None:
        hints.append("or a more accurate scheme (static_int8 with smooth_alpha: 0.75)")
    else:
        hints.append("or a more accurate scheme")
    return (
        f"mixed_precision: no configuration meets the floor {result.floor}. The best found {best} and "
        f"reaches {result.metric} {result.quality:.5f} (every layer quantized: {result.all_quantized:.5f}). "
        f"To fix: {', '.join(hints)}."
    )


__all__ = [
    "FloorNotMetError",
    "KeptLayer",
    "MixedPrecisionConfig",
    "MixedPrecisionResult",
    "search_mixed_precision",
]
