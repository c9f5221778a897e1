"""A recipe is a list of technique configs, written in YAML as `- {type: weight_only, bits: 8}`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from modelpress.analyse.coverage import check_coverage, coverage, weight_layers
from modelpress.data import Dataset, as_dataset, pair_inputs
from modelpress.errors import RecipeError
from modelpress.outputs import no_cache
from modelpress.techniques import REGISTRY, config_from_dict, config_to_dict
from modelpress.techniques.distill import distill_step
from modelpress.techniques.select import conv1d_as_linear, expand_roles

log = logging.getLogger(__name__)

Recipe = list[Any]


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with modelpress (usable wherever a recipe path is)."""
    folder = resources.files("modelpress") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_recipe_text(source: str | Path) -> tuple[str, str]:
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    name = str(source).removesuffix(".yaml")
    if name in builtin_recipes():
        text = (resources.files("modelpress") / "recipes" / f"{name}.yaml").read_text(encoding="utf-8")
        return text, f"built-in recipe '{name}'"
    raise RecipeError(
        f"Recipe '{source}' is neither a file nor a built-in recipe. Built-in recipes: "
        f"{', '.join(builtin_recipes())}."
    )


def load_recipe(source: str | Path | Sequence[Any]) -> Recipe:
    """Load a recipe from a YAML file, a built-in name, or a list of dicts/configs.

    >>> load_recipe([{"type": "weight_only", "bits": 8}])
    [WeightOnlyConfig(bits=8, layers=('linear', 'conv', 'embedding'), targets=None, ignore=())]
    """
    if isinstance(source, (str, Path)):
        text, where = _read_recipe_text(source)
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"{where} is not valid YAML: {exc}. Fix the syntax.") from exc
        if isinstance(raw, dict) and "recipe" in raw:
            raw = raw["recipe"]
    else:
        raw, where = list(source), "recipe"
    if not isinstance(raw, list) or not raw:
        raise RecipeError(
            f"{where} must be a non-empty list of steps, for example:\n- {{type: weight_only, bits: 8}}"
        )
    steps = []
    for i, step in enumerate(raw):
        if type(step).__name__.endswith("Config") and getattr(step, "type", None) in REGISTRY:
            steps.append(step)
        else:
            steps.append(config_from_dict(step, where=f"{where}, step {i + 1}"))
    return steps


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML text that `load_recipe` reads back to equal configs."""
    return yaml.safe_dump([config_to_dict(c) for c in recipe], sort_keys=False)


def _with_roles(model: nn.Module, config: Any) -> Any:
    """`config` with its `role:` patterns (targets, ignore, smooth_targets) replaced by the layer names they
    select in `model`, so that every technique and the coverage report read plain names."""
    changes = {}
    for field in ("targets", "ignore", "smooth_targets"):
        patterns = getattr(config, field, None)
        if patterns and any(str(p).startswith("role:") for p in patterns):
            changes[field] = tuple(expand_roles(model, patterns) or ())
    return dataclasses.replace(config, **changes) if changes else config


def compress(
    model: nn.Module,
    recipe: str | Path | Sequence[Any],
    data: Dataset | Iterable[Any] | None = None,
    *,
    inplace: bool = False,
    allow_partial: bool = False,
) -> nn.Module:
    """Apply each step of `recipe` in order; the user's model is left untouched unless `inplace`.

    Every weight-bearing layer ends up compressed, removed, or listed in the log as left alone with the
    reason (`analyse.coverage`). A recipe that changes nothing is refused with a RecipeError, and so is one
    whose quantization or sparsity steps leave most weight bytes untouched, unless `allow_partial`.

    >>> from modelpress import WeightOnlyConfig
    >>> small = compress(nn.Sequential(nn.Linear(16, 4)), [WeightOnlyConfig()])
    """
    steps = load_recipe(recipe)
    dataset = as_dataset(data)
    before = weight_layers(model)
    # A distill step's teacher is the model before the recipe: the user's own (left untouched), or a copy.
    teacher = (
        (copy.deepcopy(model) if inplace else model) if any(c.type == "distill" for c in steps) else None
    )
    out = model if inplace else copy.deepcopy(model)
    out.eval()
    _drop_inference_mode(out)
    converted = conv1d_as_linear(out)
    if converted:
        log.info("GPT-2 Conv1D layers taken as the Linear layers they are: %d", len(converted))
    steps = [_with_roles(out, config) for config in steps]
    # Calibration and tracing want results, not a Hugging Face key/value cache; the setting comes back after.
    # A recipe that trains on labels reads (inputs, labels) items; its other steps (calibration) get the inputs.
    inputs = (
        Dataset(dataset, transform_fn=pair_inputs)
        if dataset is not None and any(trains_on_labels(c) for c in steps)
        else dataset
    )
    with no_cache(out):
        for index, config in enumerate(steps):
            _, fn = REGISTRY[config.type]
            start = time.perf_counter()
            step_data = dataset if trains_on_labels(config) else inputs
            if config.type == "distill":
                out = distill_step(out, config, step_data, teacher=teacher, tag=f"step{index + 1}-distill")
            else:
                out = fn(out, config, step_data)
            log.info("%s done in %.1f s", config.type, time.perf_counter() - start)
    cov = coverage(before, out, steps)
    for row in cov.left_alone:
        log.info("left alone: %s (%s, %d bytes): %s", row.name, row.type, row.bytes, row.reason)
    check_coverage(cov, steps, allow_partial=allow_partial)
    return out


def trains_on_labels(config: Any) -> bool:
    """Whether a step reads (inputs, labels) items: it, or its recovery, trains on hard labels (`loss: task`,
    `alpha` > 0)."""
    for part in (config, getattr(config, "recover", None)):
        if part is not None and (
            getattr(part, "labeled", False) is True or getattr(part, "loss", None) == "task"
        ):
            return True
    return False


def _drop_inference_mode(model: nn.Module) -> None:
    """Make tensors created under `torch.inference_mode()` ordinary ones: techniques that save tensors for
    backward (equalization, bias correction, QAT, reconstruction) cannot use inference tensors."""
    with torch.no_grad():
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None and param.is_inference():
                    module._parameters[key] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
            for key, buf in module._buffers.items():
                if buf is not None and buf.is_inference():
                    module._buffers[key] = buf.clone()
