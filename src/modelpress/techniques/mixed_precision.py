"""Accuracy-aware mixed precision, the registered technique: its config, and the step that runs the search.

The search itself (`search_mixed_precision`, per-layer sensitivity) lives in `modelpress.optimize`, which
sits above the techniques it combines; this module imports it only when the step runs, so the technique
registry never imports the optimize layer. The old names (`search_mixed_precision`, `FloorNotMetError`,
`MixedPrecisionResult`, `KeptLayer`) are still importable from here.

>>> small = compress(model, [MixedPrecisionConfig(min_cosine=0.998)], batches)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import nn

from modelpress.data import Dataset
from modelpress.errors import RecipeError

log = logging.getLogger(__name__)

# How layers are ranked ("all_but", "only": the model's quality; "sqnr": each layer's output SQNR), and the
# precision a kept layer falls back to. `optimize.sensitivity` uses the same two.
SensitivityMode = Literal["all_but", "only", "sqnr"]
Fallback = Literal["weight_only", "fp32"]


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """Quantize with `scheme`, keeping the fewest layers at `fallback` that meet one quality floor.

    `min_cosine`: mean cosine of the first output to the fp32 model's on the held-out items. `max_drop`:
    relative drop of `metric` against fp32 (0.005 is at most 0.5% worse); accuracy takes (inputs, labels)
    items. The first `holdout` items of the data measure, the rest calibrate.

    >>> MixedPrecisionConfig(scheme={"type": "static_int8", "observer": "minmax"}, min_cosine=0.998).scheme
    {'type': 'static_int8'}
    """

    type: ClassVar[str] = "mixed_precision"
    # The low-precision step: a technique name or mapping ({type: static_int8, smooth_alpha: 0.75}), or a
    # config object; stored as a plain mapping of the fields that differ from their defaults.
    scheme: str | dict[str, Any] = "static_int8"
    fallback: Fallback = "weight_only"
    min_cosine: float | None = None
    max_drop: float | None = None
    metric: Literal["accuracy", "perplexity"] = "accuracy"  # what max_drop measures
    holdout: int = 4
    ranking: SensitivityMode = "all_but"
    max_layers: int | None = None
    on_fail: Literal["error", "best"] = "error"
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scheme", _canonical_scheme(self.scheme))
        if (self.min_cosine is None) == (self.max_drop is None):
            raise RecipeError(
                "mixed_precision: give exactly one quality floor: min_cosine (e.g. 0.998, mean cosine to the "
                "fp32 output) or max_drop (e.g. 0.005, at most 0.5% relative drop of the metric)."
            )
        if self.min_cosine is not None and not 0 < self.min_cosine <= 1:
            raise RecipeError(f"mixed_precision: min_cosine={self.min_cosine} must be in (0, 1].")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise RecipeError(
                f"mixed_precision: max_drop={self.max_drop} is a relative drop and must be in [0, 1) "
                "(0.005 is 0.5%)."
            )
        choices: dict[str, tuple[Any, tuple[str, ...]]] = {
            "fallback": (self.fallback, ("weight_only", "fp32")),
            "metric": (self.metric, ("accuracy", "perplexity")),
            "ranking": (self.ranking, ("all_but", "only", "sqnr")),
            "on_fail": (self.on_fail, ("error", "best")),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise RecipeError(
                    f"mixed_precision: {name}={value!r} is invalid; choose from {list(allowed)}."
                )
        if self.holdout < 1:
            raise RecipeError(f"mixed_precision: holdout={self.holdout} must be at least 1.")
        if self.max_layers is not None and self.max_layers < 1:
            raise RecipeError(f"mixed_precision: max_layers={self.max_layers} must be at least 1, or null.")
        if self.targets is not None and "targets" in self.scheme:
            raise RecipeError(
                "mixed_precision: targets are set both here and in the scheme; set them in one place."
            )
        scheme = self.scheme_config()
        if scheme.type == "weight_only" and self.fallback == "weight_only":
            raise RecipeError(
                "mixed_precision: the scheme is already int8 weight-only, so fallback weight_only keeps "
                "nothing; use fallback: fp32."
            )

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def scheme_config(self) -> Any:
        """The scheme as its technique config, with this config's targets and ignore merged in."""
        from modelpress.techniques import config_from_dict

        assert isinstance(self.scheme, dict)
        config = config_from_dict(self.scheme, where="mixed_precision scheme")
        if self.targets is not None:
            config = dataclasses.replace(config, targets=self.targets)
        return dataclasses.replace(config, ignore=(*config.ignore, *self.ignore))


def _canonical_scheme(scheme: Any) -> dict[str, Any]:
    # One spelling per scheme, so that a config equals itself after a YAML round trip.
    from modelpress.techniques import config_from_dict, config_to_dict

    if isinstance(scheme, str):
        raw: Mapping[str, Any] = {"type": scheme}
    elif isinstance(scheme, Mapping):
        raw = scheme
    elif dataclasses.is_dataclass(scheme) and hasattr(scheme, "type"):
        raw = config_to_dict(scheme)
    else:
        raise RecipeError(
            f"mixed_precision: scheme must be a technique name or mapping such as {{type: static_int8}}, "
            f"got {scheme!r}."
        )
    if raw.get("type") == MixedPrecisionConfig.type:
        raise RecipeError("mixed_precision: the scheme cannot itself be mixed_precision.")
    config = config_from_dict(raw, where="mixed_precision scheme")
    names = {f.name for f in dataclasses.fields(config)}
    if not {"targets", "ignore"} <= names:
        raise RecipeError(
            f"mixed_precision: scheme '{config.type}' has no targets/ignore fields, so layers cannot be kept."
        )
    out: dict[str, Any] = {"type": config.type}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def mixed_precision(model: nn.Module, config: MixedPrecisionConfig, data: Dataset | None = None) -> nn.Module:
    """The registered technique: `search_mixed_precision`, logged, with a summary on the model.

    The summary is `model._modelpress_mixed_precision` (a dict: floor, quality, kept layers and why).

    >>> small = mixed_precision(model, MixedPrecisionConfig(min_cosine=0.998), Dataset(batches))  # doctest: +SKIP
    """
    from modelpress.optimize.mixed_precision import search_mixed_precision

    small, result = search_mixed_precision(model, config, data)
    for line in result.format().splitlines():
        log.info("%s", line.strip())
    vars(small)["_modelpress_mixed_precision"] = result.summary()  # a plain attribute, not a submodule
    return small


# Names that moved to modelpress.optimize.mixed_precision, still importable from here (loaded on first use:
# importing them eagerly would make the technique registry import the optimize layer above it).
_MOVED = ("FloorNotMetError", "KeptLayer", "MixedPrecisionResult", "search_mixed_precision")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from modelpress.optimize import mixed_precision as moved

        return getattr(moved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Fallback", "MixedPrecisionConfig", "SensitivityMode", "mixed_precision"]
