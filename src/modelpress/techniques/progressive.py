"""Progressive compression, the registered recipe step: its config, and the step that runs it.

One technique's strength is stepped up (sparsity or structured ratio up, bits 8 -> 4, low-rank ratio down,
shared values down), the model is measured after each step, and the last step that stays above the quality
floor is kept. The loop lives in `modelpress.optimize.progressive`, which sits above the techniques; this
module imports it only when the step runs, so the registry never imports the optimize layer.

YAML: `- {type: progressive, technique: sparsity, param: ratio, steps: [0.3, 0.5, 0.7], max_drop: 1%}`

>>> ProgressiveConfig(technique={"type": "weight_only", "group_size": 32}, max_drop="1%").strength()
('bits', (8, 4))
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

# technique -> (the field that sets its strength, default steps from weak to strong)
STRENGTH: dict[str, tuple[str, tuple[float, ...]]] = {
    "sparsity": ("ratio", (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)),
    "structured": ("ratio", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)),
    "weight_only": ("bits", (8, 4)),
    "gptq": ("bits", (8, 4)),
    "lowrank": ("ratio", (0.8, 0.6, 0.5, 0.4, 0.3, 0.2)),
    "cluster": ("values", (256, 64, 16, 8, 4)),
}

ProgressiveMetric = Literal["cosine", "accuracy", "perplexity"]


def parse_drop(value: float | str | None, *, where: str) -> float | None:
    """A relative drop from a number (0.01) or a percentage string ('1%'); None stays None.

    >>> parse_drop("1%", where="x"), parse_drop(0.005, where="x")
    (0.01, 0.005)
    """
    if value is None:
        return None
    try:
        drop = float(value[:-1]) / 100 if isinstance(value, str) and value.endswith("%") else float(value)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: max_drop={value!r} is not a number or a percentage like '1%'.") from None
    if isinstance(value, bool) or not 0 <= drop < 1:
        raise RecipeError(f"{where}: max_drop={value!r} must be a relative drop in [0, 1) (0.01 or '1%').")
    return drop


@dataclass(frozen=True)
class ProgressiveConfig:
    """Step `technique`'s `param` through `steps` (weak to strong) and keep the strongest step that meets the
    floor: `max_drop`, the relative drop of `metric` against the original model ('1%' or 0.01), or `floor`,
    an absolute value of `metric`. `metric` "cosine" is the mean cosine of the first output to the original
    model's; "accuracy" takes (inputs, labels) items. The first `holdout` data items measure, the rest
    calibrate. Structured pruning steps cumulatively (`prune_gradually`, recovering between rounds when its
    `recover` is set); every other technique is applied afresh to the original model at each strength.
    """

    type: ClassVar[str] = "progressive"
    # The technique: a name or mapping ({type: sparsity, method: magnitude}), or a config object; stored as a
    # plain mapping of the fields that differ from their defaults (the stepped field left out).
    technique: str | dict[str, Any] = "sparsity"
    param: str | None = None  # default: STRENGTH[technique][0]
    steps: tuple[float, ...] | None = None  # default: STRENGTH[technique][1]
    max_drop: float | str | None = None
    floor: float | None = None
    metric: ProgressiveMetric = "cosine"
    holdout: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "technique", _canonical_technique(self.technique))
        where = "progressive"
        if (self.max_drop is None) == (self.floor is None):
            raise RecipeError(
                f"{where}: give exactly one quality floor: max_drop (e.g. '1%', the relative drop of the metric "
                "against the original model) or floor (an absolute value of the metric, e.g. 0.98)."
            )
        parse_drop(self.max_drop, where=where)
        if self.metric not in ("cosine", "accuracy", "perplexity"):
            raise RecipeError(
                f"{where}: metric={self.metric!r} is unknown; choose 'cosine', 'accuracy' or 'perplexity'."
            )
        if self.holdout < 1:
            raise RecipeError(f"{where}: holdout={self.holdout} must be at least 1.")
        _, steps = self.strength()
        if not steps:
            raise RecipeError(f"{where}: steps is empty; give the strengths to try, weak to strong.")
        for value in steps:  # each step must be a valid config of the technique
            self.step_config(value)
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(self.steps))

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def strength(self) -> tuple[str, tuple[float, ...]]:
        """The stepped field and the steps, the technique's defaults where not given."""
        assert isinstance(self.technique, dict)
        kind = self.technique["type"]
        default = STRENGTH.get(kind)
        if self.param is None and default is None:
            raise RecipeError(
                f"progressive: technique '{kind}' has no default strength; set param and steps (techniques "
                f"with defaults: {', '.join(sorted(STRENGTH))})."
            )
        param = self.param if self.param is not None else default[0]  # type: ignore[index]
        if self.steps is not None:
            return param, tuple(self.steps)
        if default is None or param != default[0]:
            raise RecipeError(f"progressive: param={param!r} of '{kind}' has no default steps; set steps.")
        return param, default[1]

    def step_config(self, value: float) -> Any:
        """The technique's config at strength `value`."""
        from modelpress.techniques import config_from_dict

        assert isinstance(self.technique, dict)
        param, _ = self.strength()
        kind = self.technique["type"]
        if param not in {f.name for f in dataclasses.fields(_config_class(kind))}:
            raise RecipeError(f"progressive: technique '{kind}' has no field {param!r} to step.")
        number = int(value) if float(value).is_integer() and param in ("bits", "values", "rank") else value
        return config_from_dict({**self.technique, param: number}, where=f"progressive step {param}={value}")


def _config_class(kind: str) -> type[Any]:
    from modelpress.techniques import REGISTRY

    return REGISTRY[kind][0]


def _canonical_technique(technique: Any) -> dict[str, Any]:
    # One spelling per technique, so that a config equals itself after a YAML round trip.
    from modelpress.techniques import config_from_dict, config_to_dict

    if isinstance(technique, str):
        raw: Mapping[str, Any] = {"type": technique}
    elif isinstance(technique, Mapping):
        raw = technique
    elif dataclasses.is_dataclass(technique) and hasattr(technique, "type"):
        raw = config_to_dict(technique)
    else:
        raise RecipeError(
            "progressive: technique must be a technique name or mapping such as {type: sparsity}, "
            f"got {technique!r}."
        )
    if raw.get("type") in ("progressive", "mixed_precision", "distill"):
        raise RecipeError(f"progressive: technique '{raw.get('type')}' has no strength to step.")
    config = config_from_dict(raw, where="progressive technique")
    out: dict[str, Any] = {"type": config.type}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != f.default:
            value = config_to_dict(value) if dataclasses.is_dataclass(value) else value
            if isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "type"}
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def progressive_step(model: nn.Module, config: ProgressiveConfig, data: Dataset | None = None) -> nn.Module:
    """The registered step: `optimize.progressive.progressive`, logged; the trajectory is kept on the model
    in the list `model._modelpress_progressive` (one dict per progressive step) for the job's report. A first step already below the floor is
    an error here (the recipe would change nothing); `mp.progressive` returns the original model instead.
    """
    from modelpress.optimize.progressive import progressive

    small, trajectory = progressive(model, config, data)
    for line in trajectory.format().splitlines():
        log.info("%s", line)
    if trajectory.chosen is None:
        first = trajectory.points[0]
        raise RecipeError(
            f"progressive: the weakest step ({trajectory.param}={first.strength:g}) already scores "
            f"{first.quality:.6g} on {trajectory.metric}, past the floor {trajectory.floor:.6g}; start from a "
            "weaker step, or loosen max_drop/floor."
        )
    # a plain attribute (not a submodule), one trajectory per progressive step of the recipe
    earlier = list(vars(model).get("_modelpress_progressive", []))
    vars(small)["_modelpress_progressive"] = [*earlier, trajectory.to_dict()]
    return small


__all__ = ["STRENGTH", "ProgressiveConfig", "parse_drop", "progressive_step"]
