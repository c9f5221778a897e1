"""Progressive compression: step one technique's strength up, measure after each step, stop at the floor.

Steps run weak to strong (sparsity ratio 0.3 -> 0.9, bits 8 -> 4, low-rank ratio 0.8 -> 0.2, shared values
256 -> 4). After each, the model is scored on the user's metric (or the mean cosine of its output to the
original model's); the first step that crosses the floor is rolled back and the step before it is returned
with the whole trajectory, which the job report draws as quality against strength.

Structured pruning steps cumulatively through `techniques.structured.prune_gradually` (each round prunes the
previous round's model to the next share of the original channels, recovering in between when its `recover`
is set); every other technique is applied afresh to the original model at each strength, so a step never
compounds the previous step's rounding.

>>> small, trajectory = progressive(model, ProgressiveConfig(technique="sparsity", max_drop="1%"), batches)  # doctest: +SKIP
>>> print(trajectory.format())  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.optimize.sensitivity import Quality, quality_on, split_holdout
from modelpress.techniques import REGISTRY
from modelpress.techniques.progressive import ProgressiveConfig, parse_drop
from modelpress.techniques.structured import prune_gradually

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressivePoint:
    strength: float  # the stepped field's value
    quality: float
    passed: bool  # at or past the floor on the good side
    seconds: float  # compressing and measuring this step


@dataclass
class Trajectory:
    """Every step measured, in order; `chosen` is the strength kept (None: even the first step failed)."""

    technique: str
    param: str
    metric: str
    higher_is_better: bool
    baseline: float  # quality of the original model
    floor: float
    points: list[ProgressivePoint] = field(default_factory=list)
    chosen: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        """A plain-text summary, one line per step."""
        lines = [
            f"progressive {self.technique}: {self.param} stepped, {self.metric} (original {self.baseline:.6g}, "
            f"floor {self.floor:.6g})"
        ]
        for p in self.points:
            mark = "kept" if p.strength == self.chosen else "ok" if p.passed else "below floor, rolled back"
            lines.append(f"  {self.param}={p.strength:g}: {p.quality:.6g} ({mark}, {p.seconds:.1f} s)")
        if self.chosen is None:
            lines.append("  no step met the floor: the original model is returned")
        return "\n".join(lines)


def _floor(config: ProgressiveConfig, baseline: float, higher: bool) -> float:
    if config.floor is not None:
        return float(config.floor)
    drop = parse_drop(config.max_drop, where="progressive")
    assert drop is not None
    # relative to the original's quality; a perplexity may rise by the same share
    return baseline * (1 - drop) if higher else baseline * (1 + drop)


def _passes(value: float, floor: float, higher: bool) -> bool:
    return math.isfinite(value) and (value >= floor if higher else value <= floor)


def _scoring(
    model: nn.Module,
    config: ProgressiveConfig,
    data: Dataset | Iterable[Any] | None,
    evaluate: Callable[[nn.Module], float] | None,
) -> tuple[Quality, Dataset | None]:
    """How steps are scored, and the data the technique calibrates on."""
    if evaluate is not None:  # the user's metric: every data item calibrates
        name = getattr(evaluate, "__name__", "metric")
        return Quality(evaluate, name if name != "<lambda>" else "metric", True), as_dataset(data)
    labeled = config.metric == "accuracy"
    held, calibration = split_holdout(data, config.holdout, labeled=labeled, where="progressive")
    return quality_on(model, held, None if config.metric == "cosine" else config.metric), calibration


def progressive(
    model: nn.Module,
    config: ProgressiveConfig | Mapping[str, Any],
    data: Dataset | Iterable[Any] | None = None,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> tuple[nn.Module, Trajectory]:
    """Step `config.technique` through `config.steps` and return the strongest model that meets the floor,
    with the trajectory of every step measured.

    Without `evaluate`, the first `config.holdout` data items score each step on `config.metric` (mean
    cosine to `model`'s output by default) and the rest calibrate; with `evaluate(model) -> float` (higher
    is better: accuracy, -perplexity) that scores it and every item calibrates. The floor is `config.floor`
    or the original's quality less `config.max_drop` (relative). When even the first step misses it the
    original model (a copy) comes back, with a warning. `model` is left untouched.

    >>> cfg = ProgressiveConfig(technique="weight_only", steps=(8, 4), max_drop=0.01)
    >>> small, trajectory = progressive(model, cfg, batches)  # doctest: +SKIP
    """
    if isinstance(config, Mapping):
        config = ProgressiveConfig(**config)
    if not isinstance(config, ProgressiveConfig):
        raise RecipeError(
            f"progressive: config must be a ProgressiveConfig or a mapping of its fields, got {config!r}."
        )
    quality, calibration = _scoring(model, config, data, evaluate)
    param, steps = config.strength()
    assert isinstance(config.technique, dict)
    kind = config.technique["type"]
    baseline = float(quality.measure(model))
    if not math.isfinite(baseline):
        raise DataError(
            f"progressive: the original model scores {baseline} on {quality.name}; fix the metric."
        )
    floor = _floor(config, baseline, quality.higher_is_better)
    trajectory = Trajectory(kind, param, quality.name, quality.higher_is_better, baseline, floor)
    if kind == "structured":
        small = _structured(model, config, calibration, quality, trajectory)
    else:
        small = _afresh(model, config, calibration, quality, trajectory)
    if trajectory.chosen is None:
        log.warning(
            "progressive: the weakest step (%s=%g) scores %.6g, past the floor %.6g; returning the original model.",
            param,
            steps[0],
            trajectory.points[0].quality,
            floor,
        )
    return small, trajectory


def _afresh(
    model: nn.Module,
    config: ProgressiveConfig,
    calibration: Dataset | None,
    quality: Quality,
    trajectory: Trajectory,
) -> nn.Module:
    """Apply the technique to a copy of the original at each strength; keep the last that passes."""
    _, fn = REGISTRY[trajectory.technique]
    kept: nn.Module | None = None
    for value in config.strength()[1]:
        start = time.perf_counter()
        candidate = fn(copy.deepcopy(model), config.step_config(value), calibration)
        score = float(quality.measure(candidate))
        passed = _passes(score, trajectory.floor, quality.higher_is_better)
        trajectory.points.append(ProgressivePoint(value, score, passed, time.perf_counter() - start))
        log.info(
            "progressive: %s=%g scores %.6g (floor %.6g)", trajectory.param, value, score, trajectory.floor
        )
        if not passed:
            break
        kept, trajectory.chosen = candidate, value
    return kept if kept is not None else copy.deepcopy(model)


def _structured(
    model: nn.Module,
    config: ProgressiveConfig,
    calibration: Dataset | None,
    quality: Quality,
    trajectory: Trajectory,
) -> nn.Module:
    """Prune round after round with `prune_gradually` (which rolls back the round that crosses the floor),
    recording each round's score."""
    ratios = config.strength()[1]
    sign = 1.0 if quality.higher_is_better else -1.0
    clock = [time.perf_counter()]

    def watch(pruned: nn.Module) -> float:
        value = ratios[len(trajectory.points)]
        score = float(quality.measure(pruned))
        passed = _passes(score, trajectory.floor, quality.higher_is_better)
        now = time.perf_counter()
        trajectory.points.append(ProgressivePoint(value, score, passed, now - clock[0]))
        clock[0] = now
        if passed:
            trajectory.chosen = value
        return sign * score if math.isfinite(score) else -math.inf

    pruning = dataclasses.replace(config.step_config(max(ratios)), schedule_steps=1)
    return prune_gradually(
        copy.deepcopy(model),
        pruning,
        calibration,
        evaluate=watch,
        floor=sign * trajectory.floor,
        ratios=ratios,
    )


__all__ = ["ProgressiveConfig", "ProgressivePoint", "Trajectory", "progressive"]
