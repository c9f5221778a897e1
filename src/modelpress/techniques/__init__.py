"""The technique registry: a plain dict from the `type` name to (config class, function)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from modelpress.errors import RecipeError
from modelpress.techniques.awq import AWQConfig, awq
from modelpress.techniques.cluster import ClusterConfig, cluster
from modelpress.techniques.depth import DepthPruningConfig, depth
from modelpress.techniques.distill import DistillConfig, distill, distill_step, old_recover_error
from modelpress.techniques.dynamic_int8 import DynamicInt8Config, dynamic_int8
from modelpress.techniques.gptq import GPTQConfig, gptq
from modelpress.techniques.lowrank import LowRankConfig, lowrank
from modelpress.techniques.mixed_precision import MixedPrecisionConfig, mixed_precision
from modelpress.techniques.progressive import ProgressiveConfig, progressive_step
from modelpress.techniques.qat import QATConfig, qat
from modelpress.techniques.sparsity import SparsityConfig, sparsity
from modelpress.techniques.static_int8 import StaticInt8Config, prepare, static_int8
from modelpress.techniques.structured import StructuredPruningConfig, structured
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only

TechniqueFn = Callable[[nn.Module, Any, Any], nn.Module]

REGISTRY: dict[str, tuple[type[Any], TechniqueFn]] = {
    WeightOnlyConfig.type: (WeightOnlyConfig, weight_only),
    StaticInt8Config.type: (StaticInt8Config, static_int8),
    DynamicInt8Config.type: (DynamicInt8Config, dynamic_int8),
    QATConfig.type: (QATConfig, qat),
    MixedPrecisionConfig.type: (MixedPrecisionConfig, mixed_precision),
    GPTQConfig.type: (GPTQConfig, gptq),
    AWQConfig.type: (AWQConfig, awq),
    SparsityConfig.type: (SparsityConfig, sparsity),
    StructuredPruningConfig.type: (StructuredPruningConfig, structured),
    DepthPruningConfig.type: (DepthPruningConfig, depth),
    LowRankConfig.type: (LowRankConfig, lowrank),
    ClusterConfig.type: (ClusterConfig, cluster),
    DistillConfig.type: (DistillConfig, distill_step),
    ProgressiveConfig.type: (ProgressiveConfig, progressive_step),
}

# Float rewrites a technique makes before quantizing (model, config, data) -> model: a search that swaps layers
# between the technique's output and higher precision takes the higher-precision layers from this model.
PREPARE: dict[str, Callable[[nn.Module, Any, Any], nn.Module]] = {StaticInt8Config.type: prepare}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (YAML/JSON ready) with `type` first."""
    out: dict[str, Any] = {"type": config.type}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # a nested config (recover:)
            value = {k: v for k, v in config_to_dict(value).items() if k != "type"}
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _coerce(value: Any, hint: Any) -> Any:
    # YAML gives lists where configs hold tuples (frozen dataclasses must stay hashable).
    origin = typing.get_origin(hint)
    if isinstance(value, list) and (
        origin is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
    ):
        return tuple(value)
    if isinstance(value, str) and (
        origin is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))
    ):
        return (value,)
    return value


def config_from_dict(raw: Mapping[str, Any], *, where: str = "recipe") -> Any:
    """Build a config from a dict whose `type` names a registered technique; only our own classes load."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: each step must be a mapping like {{type: weight_only}}, got {raw!r}.")
    kind = raw.get("type")
    if kind not in REGISTRY:
        raise RecipeError(
            f"{where}: unknown technique type {kind!r}. Known types: {', '.join(sorted(REGISTRY))}."
        )
    cls, _ = REGISTRY[kind]
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    old = old_recover_error(kind, raw) if "recover" in fields else None
    if old is not None:  # the flat recover_* fields of before issue 27
        raise RecipeError(f"{where}: {old}")
    unknown = sorted(set(raw) - fields - {"type"})
    if unknown:
        raise RecipeError(
            f"{where}: technique '{kind}' has no field(s) {unknown}. Valid fields: {', '.join(sorted(fields))}."
        )
    kwargs = {k: _coerce(v, hints[k]) for k, v in raw.items() if k != "type"}
    try:
        return cls(**kwargs)
    except RecipeError as exc:
        raise RecipeError(f"{where}: {exc}") from exc
    except TypeError as exc:
        raise RecipeError(f"{where}: invalid fields for '{kind}': {exc}.") from exc


__all__ = [
    "PREPARE",
    "REGISTRY",
    "AWQConfig",
    "ClusterConfig",
    "DepthPruningConfig",
    "DistillConfig",
    "DynamicInt8Config",
    "GPTQConfig",
    "LowRankConfig",
    "MixedPrecisionConfig",
    "ProgressiveConfig",
    "QATConfig",
    "SparsityConfig",
    "StaticInt8Config",
    "StructuredPruningConfig",
    "WeightOnlyConfig",
    "awq",
    "cluster",
    "config_from_dict",
    "config_to_dict",
    "depth",
    "distill",
    "dynamic_int8",
    "gptq",
    "lowrank",
    "mixed_precision",
    "qat",
    "sparsity",
    "static_int8",
    "structured",
    "weight_only",
]
