"""The constrained search across techniques: the smallest, fastest exported model that keeps the quality asked.

Each trial is a recipe built from one point of a space across families (structured ratio, low-rank ratio,
sparsity, shared values, int8/int4 weight-only or static int8, and how many of the most quantization-
sensitive layers stay out of it). The trial compresses the model with `pipeline.recipe.compress`, exports
it for the target runtime, and measures on that artifact: quality with the user's evaluation, file size
against the fp32 export, and latency interleaved with the fp32 artifact (`deploy.bench`). Optuna's
multi-objective TPE proposes the points; the constraints (quality drop, size and latency factors) steer it.

The study lives in SQLite in the output folder by default, so a search that is killed resumes where it
stopped (only the trial in flight is lost, recorded as interrupted); each trial's artifact and recipe are in
`trials/NNNN/`. With a Ray address the trials run as Ray tasks; the driver alone writes the study.

>>> result = search(model, calibration, metric_evaluator(eval_items, "accuracy"),
...                 Constraints(max_drop=0.01, size=8, latency=3), config=SearchConfig(trials=40))  # doctest: +SKIP
>>> print(result.message); result.recipe  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import html
import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.data import pair_inputs
from modelpress.errors import ModelpressError, RecipeError

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
Evaluate = Callable[[Any], float]  # a runtime session (or a torch model) -> quality

STUDY_DB = "study.db"
RESULT_JSON = "search.json"
CHART_SVG = "front.svg"
RECIPE_YAML = "recipe.yaml"
CLOSEST_YAML = "closest-recipe.yaml"
RAY_POLL_S = 2.0  # how often the driver checks that its Ray cluster is still there while trials run
RAY_GONE_S = 10.0  # a cluster that does not answer this long is gone (a restarting GCS answers sooner)
INTERRUPTED = "interrupted: the search stopped during this trial (killed, or its worker went away)"


class SearchError(ModelpressError):
    """The search cannot start or go on: a missing extra, an unreachable study database or Ray cluster."""


def _require(module: str, extra: str) -> Any:
    """Import an optional dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SearchError(
            f"The search needs '{module}', which is not installed. Install it with "
            f"pip install 'modelpress[{extra}]'."
        ) from exc


# ------------------------------------------------------------------------------------------------ constraints


@dataclass(frozen=True)
class Constraints:
    """What the user needs. `max_drop`: quality lost at most (metric units, or a fraction of the fp32 quality
    with `relative`); `floor`: the quality itself at least this (at most, for a metric where lower is
    better); `size`: the artifact at least this many times smaller than the fp32 export; `latency`: at least
    this many times faster than the fp32 artifact; `mcu`: a microcontroller budget "FLASH/RAM" (e.g.
    "256KB/64KB"): each trial is also written as a full-integer TFLite Micro model, whose bytes and arena
    (measured in the TFLM interpreter) must fit. None: no constraint on it.

    >>> Constraints.parse("1%", ["size=8x", "latency=3x"])
    Constraints(max_drop=0.01, relative=True, size=8.0, latency=3.0, floor=None, mcu=None)
    """

    max_drop: float | None = None
    relative: bool = False
    size: float | None = None
    latency: float | None = None
    floor: float | None = None
    mcu: str | None = None

    def __post_init__(self) -> None:
        if self.mcu is not None:
            self.budget()
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise RecipeError(
                f"search: max_drop={self.max_drop} must be a quality loss of 0 or more (0.01, or '1%')."
            )
        if self.floor is not None and not math.isfinite(self.floor):
            raise RecipeError(f"search: floor={self.floor} must be a finite quality value.")
        for name in ("size", "latency"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise RecipeError(
                    f"search: the {name} target {value} must be a positive factor over fp32, such as {name}=4x."
                )

    @classmethod
    def parse(
        cls, max_drop: str | None, targets: Sequence[str] = (), floor: float | None = None
    ) -> Constraints:
        """From the command line's `--max-drop 1%` (or `0.01`, in metric units), `--target size=8x` and
        `--floor`."""
        drop, relative = None, False
        if max_drop is not None:
            text = max_drop.strip()
            relative = text.endswith("%")
            try:
                drop = float(text.rstrip("%")) / (100 if relative else 1)
            except ValueError:
                raise RecipeError(
                    f"search: --max-drop '{max_drop}' is not a number: give 1% (of the fp32 quality) or 0.01 "
                    "(in the metric's units)."
                ) from None
        factors: dict[str, float] = {}
        mcu = None
        for target in targets:
            budget = re.fullmatch(r"\s*mcu\s*=\s*(\S+)\s*", target)
            if budget:
                mcu = budget.group(1)
                continue
            match = re.fullmatch(r"\s*(size|latency)\s*=\s*([0-9.]+)\s*x?\s*", target)
            if not match:
                raise RecipeError(
                    f"search: --target '{target}' is not understood; write size=8x (8 times smaller than the "
                    "fp32 file), latency=3x (3 times faster than the fp32 artifact) or mcu=256KB/64KB (a "
                    "microcontroller's flash/RAM)."
                )
            try:
                factors[match.group(1)] = float(match.group(2))
            except ValueError:
                raise RecipeError(
                    f"search: --target '{target}': '{match.group(2)}' is not a number."
                ) from None
        return cls(drop, relative, factors.get("size"), factors.get("latency"), floor, mcu)

    def budget(self) -> Any:
        """The MCU budget (`deploy.tflm.McuBudget`), or None."""
        if self.mcu is None:
            return None
        from modelpress.deploy.tflm import McuBudget
        from modelpress.errors import ExportError

        try:
            return McuBudget.parse(self.mcu)
        except ExportError as exc:
            raise RecipeError(f"search: --target mcu={self.mcu}: {exc}") from None

    def allowed_drop(self, baseline: float, higher_is_better: bool = True) -> float | None:
        """The quality loss allowed, in metric units: the tighter of `max_drop` and the floor (a floor
        better than the fp32 quality allows a negative loss: the search must improve on fp32)."""
        allowed = []
        if self.max_drop is not None:
            allowed.append(self.max_drop * abs(baseline) if self.relative else self.max_drop)
        if self.floor is not None:
            allowed.append(baseline - self.floor if higher_is_better else self.floor - baseline)
        return min(allowed) if allowed else None

    def describe(self) -> str:
        parts = []
        if self.max_drop is not None:
            drop = f"{self.max_drop * 100:.4g}% of fp32" if self.relative else f"{self.max_drop:.4g}"
            parts.append(f"quality drop <= {drop}")
        if self.floor is not None:
            parts.append(f"quality floor {self.floor:.5g}")
        if self.size is not None:
            parts.append(f"size >= {self.size:g}x smaller")
        if self.latency is not None:
            parts.append(f"latency >= {self.latency:g}x faster")
        if self.mcu is not None:
            parts.append(f"fits a {self.budget()} microcontroller")
        return ", ".join(parts) or "no constraints"


# ------------------------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class SearchSpace:
    """The choices each trial draws from; 0 (or "none", or 1.0 for `depth`) turns a family off.

    `depth`: the share of the model's repeated blocks (transformer layers) kept, 1.0: all (the depth
    technique, `DepthPruningConfig`); `embeddings`: shared values of the embedding tables (a cluster step on
    `layers: [embedding]` with an int8 codebook; MiniLM's word embeddings are half of its bytes). `keep`: how
    many of the layers most hurt by int8 (lowest output SQNR, one calibration pass) stay out of sparsity,
    clusters and quantization. `recover`: training after the structured, low-rank, sparsity and cluster steps
    (a DistillConfig as a dict, e.g. `{loss: task, epochs: 1}`), or None; `depth_recover`: the depth step's
    own (e.g. `{loss: mse, features: mse, steps: 400, lr: 3e-4}`: hidden states matched block by block),
    None: `recover`. `options`: fields added to (or replacing) a family's step, keyed by family (`depth`,
    `structured`, `lowrank`, `sparsity`, `cluster`, `embeddings`, `int8`, `int4`, `static_int8`), e.g.
    `{"static_int8": {"smooth_alpha": 0.75}}`.

    A trial whose recipe starts with the same depth step as an earlier trial's starts from that trial's
    pruned and recovered model (kept in memory, the two most recent), so the distillation is paid once.
    """

    structured: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    lowrank: tuple[float, ...] = (0.0, 0.5, 0.25)  # share of each layer's weights kept
    sparsity: tuple[float, ...] = (0.0, 0.5, 0.75, 0.9)
    cluster: tuple[int, ...] = (0, 16, 4)  # shared values per layer
    quantize: tuple[str, ...] = ("none", "int8", "int4", "static_int8")
    keep: tuple[int, ...] = (0, 1, 2)
    sparsity_method: str = "magnitude"
    round_to: int = 1  # structured: channels kept per group, a multiple of this (8 suits int8 kernels)
    recover: dict[str, Any] | None = None
    depth: tuple[float, ...] = (1.0,)  # share of the repeated blocks kept
    embeddings: tuple[int, ...] = (0,)  # shared values of the embedding tables
    depth_recover: dict[str, Any] | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        families = ("structured", "lowrank", "sparsity", "cluster", "quantize", "keep", "depth", "embeddings")
        for name in families:  # lists (from YAML or JSON) as tuples, so that the defaults compare equal
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        known = {"none", "int8", "int4", "static_int8"}
        bad = [q for q in self.quantize if q not in known]
        if bad or not self.quantize:
            raise RecipeError(f"search: quantize choices {bad} unknown; choose from {sorted(known)}.")
        for name in families:
            if not getattr(self, name):
                raise RecipeError(
                    f"search: the space's {name} needs at least one choice (0 or 'none' for off; 1.0 for depth)."
                )
        bad_depth = [d for d in self.depth if not (isinstance(d, int | float) and 0 < d <= 1)]
        if bad_depth:
            raise RecipeError(
                f"search: depth choices {bad_depth} must be shares of the blocks kept, in (0, 1] (1.0: off, "
                "0.5: half the blocks)."
            )
        bad_values = [v for v in self.embeddings if not (isinstance(v, int) and (v == 0 or 2 <= v <= 256))]
        if bad_values:
            raise RecipeError(
                f"search: embeddings choices {bad_values} must be 0 (off) or shared values from 2 to 256 (16 "
                "packs each index into 4 bits)."
            )
        named = {"depth", "structured", "lowrank", "sparsity", "cluster", "embeddings", *known} - {"none"}
        unknown = sorted(set(self.options) - named)
        if unknown or not all(isinstance(v, dict) for v in self.options.values()):
            raise RecipeError(
                f"search: options must map a family to the fields of its step; {unknown or 'a value'} is not "
                f"one (families: {sorted(named)})."
            )

    def choices(self) -> dict[str, tuple[Any, ...]]:
        """Each family's choices; `depth` and `embeddings` only where they offer more than off, so a space
        without them draws (and resumes) exactly as before they existed."""
        out: dict[str, tuple[Any, ...]] = {}
        if self.depth != (1.0,):
            out["depth"] = self.depth
        out.update(
            {
                "structured": self.structured,
                "lowrank": self.lowrank,
                "sparsity": self.sparsity,
                "cluster": self.cluster,
            }
        )
        if self.embeddings != (0,):
            out["embeddings"] = self.embeddings
        out.update({"quantize": self.quantize, "keep": self.keep})
        return out

    def key(self) -> dict[str, Any]:
        """The space as plain data for the study's fingerprint: the fields added for depth and embeddings
        left out at their defaults, so a study started before they existed still resumes."""
        data = dataclasses.asdict(self)
        for name, value in (
            ("depth", (1.0,)),
            ("embeddings", (0,)),
            ("depth_recover", None),
            ("options", {}),
        ):
            if data[name] == value:
                del data[name]
        return data


def build_recipe(
    params: dict[str, Any], space: SearchSpace, sensitive: Sequence[str]
) -> list[dict[str, Any]]:
    """The recipe (a list of plain steps, in the order they compose: depth, structured, low rank, sparsity,
    clusters, clustered embeddings, quantization) of one point of the space.

    >>> build_recipe({"structured": 0.5, "lowrank": 0.0, "sparsity": 0.0, "cluster": 0, "quantize": "int8",
    ...               "keep": 0}, SearchSpace(), [])
    [{'type': 'structured', 'ratio': 0.5}, {'type': 'weight_only', 'bits': 8}]
    """
    ignore = list(sensitive[: int(params.get("keep", 0))])
    keep = {"ignore": ignore} if ignore else {}
    recover = {"recover": dict(space.recover)} if space.recover else {}
    options = {name: dict(fields) for name, fields in space.options.items()}
    steps: list[dict[str, Any]] = []
    kept = float(params.get("depth", 1.0))
    if kept < 1.0:
        depth_recover = space.depth_recover if space.depth_recover is not None else space.recover
        step = {"type": "depth", "ratio": round(1.0 - kept, 6)}
        if depth_recover:
            step["recover"] = dict(depth_recover)
        steps.append({**step, **options.get("depth", {})})
    if params["structured"]:
        rounding = {"round_to": space.round_to} if space.round_to > 1 else {}
        steps.append(
            {
                "type": "structured",
                "ratio": params["structured"],
                **rounding,
                **recover,
                **options.get("structured", {}),
            }
        )
    if params["lowrank"]:
        steps.append(
            {"type": "lowrank", "ratio": params["lowrank"], **keep, **recover, **options.get("lowrank", {})}
        )
    if params["sparsity"]:
        steps.append(
            {
                "type": "sparsity",
                "method": space.sparsity_method,
                "ratio": params["sparsity"],
                "layers": ["linear", "conv"],
                **keep,
                **recover,
                **options.get("sparsity", {}),
            }
        )
    if params["cluster"]:
        steps.append(
            {"type": "cluster", "values": params["cluster"], **keep, **recover, **options.get("cluster", {})}
        )
    if params.get("embeddings", 0):
        steps.append(
            {
                "type": "cluster",
                "values": params["embeddings"],
                "codebook_bits": 8,
                "layers": ["embedding"],
                **options.get("embeddings", {}),
            }
        )
    quantize = params["quantize"]
    if quantize == "int8":
        steps.append({"type": "weight_only", "bits": 8, **keep, **options.get("int8", {})})
    elif quantize == "int4":
        steps.append({"type": "weight_only", "bits": 4, "group_size": 32, **keep, **options.get("int4", {})})
    elif quantize == "static_int8":
        steps.append({"type": "static_int8", **keep, **options.get("static_int8", {})})
    return steps


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class SearchConfig:
    """How the search runs. `trials`: finished trials the study should hold (earlier runs' count: a resumed
    search goes on to this number); `budget_s`: no new trial starts after this many seconds of this run.
    Latency is timed at batch `batch` against the fp32 artifact in `baseline_runtime` (None: `runtime`)."""

    out_dir: str = "modelpress-search"
    runtime: str = "openvino"
    baseline_runtime: str | None = "onnxruntime"
    trials: int | None = 20
    budget_s: float | None = None
    space: SearchSpace = field(default_factory=SearchSpace)
    higher_is_better: bool = True
    seed: int = 0
    batch: int = 1
    rounds: int = 10
    threads: int = 2
    storage: str | None = None  # an Optuna storage URL; None: sqlite in out_dir
    study_name: str = "modelpress-search"
    ray_address: str | None = None
    parallel: int | None = None  # trials at once on Ray (None: the cluster's CPUs / threads)
    seed_trials: bool = True  # start with points chosen from the sensitivity analysis

    def __post_init__(self) -> None:
        if self.trials is None and self.budget_s is None:
            raise RecipeError("search: set trials, a time budget, or both, or the search never ends.")
        if self.trials is not None and self.trials < 1:
            raise RecipeError(f"search: trials={self.trials} must be at least 1.")
        if self.budget_s is not None and not self.budget_s > 0:
            raise RecipeError(f"search: budget={self.budget_s} s must be positive (such as 60m).")
        if self.batch < 1 or self.rounds < 1 or self.threads < 1:
            raise RecipeError("search: batch, rounds and threads must be at least 1.")


def parse_budget(text: str) -> float:
    """Seconds from '90s', '60m', '2h' or a plain number of seconds.

    >>> parse_budget("60m")
    3600.0
    """
    match = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", text)
    try:
        value = float(match.group(1)) if match else float("nan")
    except ValueError:
        value = float("nan")
    if not match or not value > 0:
        raise RecipeError(f"search: budget '{text}' is not a duration; write 90s, 60m or 2h.")
    return value * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


# ------------------------------------------------------------------------------------------------ trials


@dataclass
class TrialRecord:
    """One trial: its point, recipe, and what was measured on its artifact (or why it failed)."""

    number: int
    params: dict[str, Any]
    recipe: list[dict[str, Any]]
    state: str  # "complete" or "fail"
    quality: float | None = None
    size_factor: float | None = None  # fp32 file bytes / this file's bytes
    speedup: float | None = None  # fp32 latency / this artifact's (median of interleaved rounds)
    size_bytes: int | None = None
    seconds: float | None = None
    # seconds of an earlier trial's depth step (its distillation) this trial started from: not spent again
    # here, but part of what the recipe costs to run (`seconds` + `reused_s`)
    reused_s: float | None = None
    artifact: str | None = None
    error: str | None = None
    drop: float | None = None  # quality lost against fp32 (> 0 is worse), set by the driver
    feasible: bool = False
    duplicate_of: int | None = None  # the same point measured before: its figures, nothing rerun
    flash_bytes: int | None = None  # with an MCU budget: the TFLite Micro model's bytes
    arena_bytes: int | None = None  # and its arena, measured in the TFLM interpreter
    mcu_error: str | None = None  # why the trial cannot run on the microcontroller (float ops, ...)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrialContext:
    """Everything a trial needs, shipped once to every Ray worker."""

    model: nn.Module
    example: tuple[torch.Tensor, ...]
    data: list[Any] | None  # what compress reads: (inputs, labels) items when the recovery trains on labels
    evaluate: Evaluate
    runtime: str
    baseline_path: str
    baseline_runtime: str
    batch: int
    rounds: int
    threads: int
    mcu: bool = False  # also write a TFLite Micro model and measure its flash and arena
    inputs: list[Any] | None = None  # the data's model inputs (calibration at export); None: `data`
    # models after a depth step (its recovery included), by that step: later trials with the same step start
    # there; per process (each Ray worker has its own), the two most recent
    students: dict[str, tuple[nn.Module, float]] = field(default_factory=dict)  # (model, seconds to build)


STUDENTS = 2  # depth-pruned models kept in memory for later trials


def _compress(ctx: TrialContext, steps: list[Any]) -> tuple[nn.Module, float]:
    """`compress(ctx.model, steps)`, starting from a kept model when the recipe opens with a depth step an
    earlier trial ran (depth pruning with distillation costs minutes; every other step is cheap beside it),
    and the seconds that kept model took to build (0 when none was reused): part of the recipe's cost."""
    from modelpress.pipeline.recipe import compress, trains_on_labels

    def data(part: list[Any]) -> list[Any] | None:
        """(inputs, labels) items for steps that train on labels, the inputs alone for the others."""
        return ctx.data if any(trains_on_labels(step) for step in part) else _inputs(ctx)

    if not steps or steps[0].type != "depth":
        return compress(ctx.model, steps, data(steps), allow_partial=True), 0.0
    key = repr(steps[0])
    kept = ctx.students.pop(key, None)
    reused = 0.0
    if kept is None:
        start = time.perf_counter()
        try:
            student = compress(ctx.model, steps[:1], data(steps[:1]), allow_partial=True)
        except RecipeError:  # a cut that removes no block changes nothing alone: the whole recipe decides
            return compress(ctx.model, steps, data(steps), allow_partial=True), 0.0
        kept = (student, time.perf_counter() - start)
    else:
        log.info("reusing the model of an earlier trial's %s", key)
        reused = kept[1]
    ctx.students[key] = kept  # most recent last
    while len(ctx.students) > STUDENTS:
        del ctx.students[next(iter(ctx.students))]
    if len(steps) == 1:
        return copy.deepcopy(kept[0]), reused
    return compress(kept[0], steps[1:], data(steps[1:]), allow_partial=True), reused


def _inputs(ctx: TrialContext) -> list[Any] | None:
    return ctx.data if ctx.inputs is None else ctx.inputs


def _mcu_figures(model: nn.Module, ctx: TrialContext, out: Path) -> dict[str, Any]:
    """The trial's TFLite Micro bytes and arena, or why it cannot run there (not full-integer, ...): a model
    that does not fit is infeasible, not a failed trial."""
    from modelpress.deploy.tflm import export_tflm
    from modelpress.errors import ModelpressError

    try:
        art = export_tflm(model, tuple(t[:1] for t in ctx.example), out / "model.tflite", data=_inputs(ctx))
    except ModelpressError as exc:
        return {"mcu_error": str(exc).splitlines()[0]}
    return {"flash_bytes": art.flash_bytes, "arena_bytes": art.arena_bytes}


def run_trial(ctx: TrialContext, recipe: list[dict[str, Any]], folder: str) -> dict[str, Any]:
    """Compress with `recipe`, export for the runtime into `folder`, measure quality, size and latency.

    Never raises for a trial's own failure (a recipe a layer refuses, an export error, an evaluation that
    raises or returns NaN): the error comes back as `{"error": ...}` and the search goes on.
    """
    from modelpress._files import file_size
    from modelpress.deploy.bench import compare_artifacts
    from modelpress.deploy.export import export_for_runtimes
    from modelpress.deploy.runtime import open_session
    from modelpress.pipeline.recipe import dump_recipe, load_recipe
    from modelpress.pipeline.run import benchmark_batches

    start = time.perf_counter()
    torch.set_num_threads(ctx.threads)
    try:
        steps = load_recipe(recipe)
        small, reused_s = _compress(ctx, steps)
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_YAML).write_text(dump_recipe(steps), encoding="utf-8")
        path = export_for_runtimes(
            small,
            ctx.example,
            out / "model.onnx",
            [ctx.runtime],
            target=_target(ctx.runtime),
            data=_inputs(ctx),
        )[ctx.runtime]
        quality = float(ctx.evaluate(open_session(path, ctx.runtime, threads=ctx.threads)))
        if not math.isfinite(quality):
            raise ValueError(f"the evaluation returned {quality}")
        key = f"b{ctx.batch}"
        bench = compare_artifacts(
            {"fp32": (ctx.baseline_path, ctx.baseline_runtime), "trial": (path, ctx.runtime)},
            benchmark_batches(ctx.example, [ctx.batch]),
            baseline="fp32",
            threads=ctx.threads,
            rounds=ctx.rounds,
            memory=False,
        )
        size = file_size(path)
        mcu = _mcu_figures(small, ctx, out) if ctx.mcu else {}
        return {
            **mcu,
            "quality": quality,
            "size_bytes": size,
            "size_factor": file_size(ctx.baseline_path) / size,
            "speedup": 1.0 / bench["trial"].latency[key].ratio,
            "artifact": str(path),
            "seconds": time.perf_counter() - start,
            **({"reused_s": reused_s} if reused_s else {}),
        }
    except Exception as exc:  # the trial fails; the search goes on
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log.info("trial in %s failed: %s", folder, message)
        return {"error": message, "seconds": time.perf_counter() - start}


def _target(runtime: str) -> Any:
    return "onnxruntime" if runtime == "onnxruntime" else "openvino"


class MetricEvaluator:
    """An evaluation (picklable, so it travels to Ray workers): `metric` ('accuracy', 'perplexity' or a
    callable (predictor, items) -> float) on `items`."""

    def __init__(self, items: Iterable[Any], metric: Any = "accuracy") -> None:
        self.items = list(items)
        self.metric = metric

    def __call__(self, target: Any) -> float:
        from modelpress.evaluate.metrics import evaluate

        return evaluate(target, self.items, self.metric)


def metric_evaluator(items: Iterable[Any], metric: Any = "accuracy") -> MetricEvaluator:
    """The evaluation `search` takes, from held-out items and a metric."""
    return MetricEvaluator(items, metric)


# ------------------------------------------------------------------------------------------------ result


@dataclass
class SearchResult:
    """The trials, the Pareto front (quality, size factor, speedup), the chosen trial and what to say."""

    baseline_quality: float
    constraints: Constraints
    higher_is_better: bool
    trials: list[TrialRecord]
    front: list[TrialRecord]
    chosen: TrialRecord | None
    met: bool  # the chosen trial meets every constraint
    message: str
    closest: list[TrialRecord] = field(default_factory=list)  # when nothing meets them: nearest front points
    out_dir: str = ""
    stopped: str = ""  # why the search stopped early (storage or cluster gone), or ""

    @property
    def recipe(self) -> list[Any] | None:
        """The chosen trial's recipe as configs (the closest point's when the constraints were not met)."""
        from modelpress.pipeline.recipe import load_recipe

        return load_recipe(self.chosen.recipe) if self.chosen else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline_quality": self.baseline_quality,
            "constraints": dataclasses.asdict(self.constraints),
            "higher_is_better": self.higher_is_better,
            "met": self.met,
            "message": self.message,
            "stopped": self.stopped,
            "chosen": self.chosen.number if self.chosen else None,
            "front": [t.number for t in self.front],
            "closest": [t.number for t in self.closest],
            "trials": [t.to_dict() for t in self.trials],
        }


def _drop(quality: float, baseline: float, higher_is_better: bool) -> float:
    return (baseline - quality) if higher_is_better else (quality - baseline)


def _shortfalls(t: TrialRecord, c: Constraints, baseline: float, hib: bool = True) -> dict[str, float]:
    """How far a completed trial misses each constraint, as a fraction (0: met); `hib`: higher quality
    is better."""
    out = {}
    allowed = c.allowed_drop(baseline, hib)
    if allowed is not None and t.drop is not None:
        scale = abs(baseline) or 1.0
        out["quality"] = max(0.0, t.drop - allowed) / scale
    if c.size is not None and t.size_factor is not None:
        out["size"] = max(0.0, 1.0 - t.size_factor / c.size)
    if c.latency is not None and t.speedup is not None:
        out["latency"] = max(0.0, 1.0 - t.speedup / c.latency)
    budget = c.budget()
    if budget is not None:
        if t.flash_bytes is None or t.arena_bytes is None:
            out["mcu"] = 1.0  # cannot run on the microcontroller at all
        else:
            over = max(t.flash_bytes / budget.flash_bytes, t.arena_bytes / budget.ram_bytes)
            out["mcu"] = max(0.0, over - 1.0)
    return out


def _kinds(c: Constraints) -> tuple[str, ...]:
    return ("quality", "size", "latency", "mcu") if c.mcu is not None else ("quality", "size", "latency")


def violations(t: TrialRecord, c: Constraints, baseline: float, hib: bool = True) -> list[float]:
    """Optuna's constraint values for a trial (<= 0 is met): quality, size, latency (and the MCU budget)."""
    s = _shortfalls(t, c, baseline, hib)
    return [s.get(k, 0.0) if s.get(k, 0.0) > 0 else -1e-9 for k in _kinds(c)]


def pareto_front(trials: Sequence[TrialRecord], higher_is_better: bool) -> list[TrialRecord]:
    """Completed trials no other beats on quality, size factor and speedup at once (ties kept once)."""
    done = [t for t in trials if t.state == "complete"]

    def key(t: TrialRecord) -> tuple[float, float, float]:
        q = t.quality if t.quality is not None else -math.inf
        return (q if higher_is_better else -q, t.size_factor or 0.0, t.speedup or 0.0)

    front: list[TrialRecord] = []
    seen: set[tuple[float, float, float]] = set()
    for t in done:
        a = key(t)
        dominated = any(
            all(x >= y for x, y in zip(key(o), a, strict=True)) and key(o) != a for o in done if o is not t
        )
        if not dominated and a not in seen:
            seen.add(a)
            front.append(t)
    return sorted(front, key=lambda t: -(t.size_factor or 0.0))


def summarize(
    trials: list[TrialRecord], constraints: Constraints, baseline: float, higher_is_better: bool
) -> SearchResult:
    """Mark feasibility, take the front, choose: among trials meeting every constraint the one smallest
    and fastest together (largest size factor x speedup, then quality); when none does, say which
    constraint no trial met and return the front points nearest to meeting them."""
    for t in trials:
        if t.state == "complete" and t.quality is not None:
            t.drop = _drop(t.quality, baseline, higher_is_better)
            t.feasible = not any(_shortfalls(t, constraints, baseline, higher_is_better).values())
    front = pareto_front(trials, higher_is_better)
    done = [t for t in trials if t.state == "complete"]
    failed = len(trials) - len(done)

    def goodness(t: TrialRecord) -> tuple[float, float]:
        q = -(t.drop or 0.0)
        return (math.log(t.size_factor or 1e-9) + math.log(t.speedup or 1e-9), q)

    feasible = [t for t in done if t.feasible and t.duplicate_of is None]  # a point seen again counts once
    counts = f"{len(done)} trial(s) measured, {failed} failed"
    if feasible:
        chosen = max(feasible, key=goodness)
        message = (
            f"{counts}; {len(feasible)} distinct point(s) meet {constraints.describe()}. Chosen: trial {chosen.number}, "
            f"{chosen.size_factor:.2f}x smaller, {chosen.speedup:.2f}x faster, quality {chosen.quality:.5g} "
            f"(fp32 {baseline:.5g})."
        )
        return SearchResult(baseline, constraints, higher_is_better, trials, front, chosen, True, message)
    if not done:
        message = (
            f"{counts}: no trial completed, so there is no front. The errors are in the trials' records."
        )
        return SearchResult(baseline, constraints, higher_is_better, trials, front, None, False, message)
    closest = sorted(
        front,
        key=lambda t: (sum(_shortfalls(t, constraints, baseline, higher_is_better).values()), goodness(t)),
    )
    missed = []
    for name in ("quality", "size", "latency"):
        if all(_shortfalls(t, constraints, baseline, higher_is_better).get(name, 0.0) > 0 for t in done):
            best = {
                "quality": lambda: f"least drop {min(t.drop or 0.0 for t in done):.4g}",
                "size": lambda: f"best {max(t.size_factor or 0.0 for t in done):.2f}x",
                "latency": lambda: f"best {max(t.speedup or 0.0 for t in done):.2f}x",
            }[name]()
            missed.append(f"{name} ({best})")
    why = (
        f"no trial met {', '.join(missed)}"
        if missed
        else "each constraint was met by some trial, but no trial met them all together"
    )
    message = (
        f"The constraints ({constraints.describe()}) were not reached: {why}. {counts}. The closest points "
        f"of the front are returned (trial {closest[0].number} first); loosen a constraint, widen the space, "
        "or give the search more trials."
    )
    return SearchResult(
        baseline, constraints, higher_is_better, trials, front, closest[0], False, message, closest[:3]
    )


# ------------------------------------------------------------------------------------------------ the study


def _open_study(optuna: Any, storage: str, config: SearchConfig, constraints_func: Any) -> Any:
    direction = "maximize" if config.higher_is_better else "minimize"
    sampler = optuna.samplers.TPESampler(
        seed=config.seed,
        n_startup_trials=8,
        multivariate=True,
        constraints_func=constraints_func,
        warn_independent_sampling=False,
    )
    try:
        return optuna.create_study(
            storage=storage,
            study_name=config.study_name,
            directions=[direction, "maximize", "maximize"],
            sampler=sampler,
            load_if_exists=True,
        )
    except Exception as exc:
        raise SearchError(
            f"Cannot open the study storage '{_hide_password(storage)}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Check the URL and that the database is up, or "
            "leave out --storage to keep the study in SQLite in the output folder."
        ) from exc


def _hide_password(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", url)


def _fingerprint(model: nn.Module, config: SearchConfig, example: Sequence[torch.Tensor]) -> str:
    """What a resumed study must share with the run that started it: the model, space and runtimes."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        if tensor.is_floating_point() and tensor.numel():
            h.update(f"{float(tensor.double().sum()):.6e}".encode())
    h.update(json.dumps(config.space.key(), sort_keys=True, default=str).encode())
    h.update(f"{config.runtime} {config.baseline_runtime} {config.batch} {config.higher_is_better}".encode())
    h.update(str([tuple(t.shape) for t in example]).encode())
    return h.hexdigest()[:16]


def _record(trial: Any) -> TrialRecord | None:
    """A finished Optuna trial as a record (None for one still running)."""
    state = trial.state.name
    attrs = trial.user_attrs
    if state not in ("COMPLETE", "FAIL"):
        return None
    rec = TrialRecord(
        number=trial.number,
        params=dict(trial.params),
        recipe=list(attrs.get("recipe", [])),
        state="complete" if state == "COMPLETE" else "fail",
        error=attrs.get("error", INTERRUPTED) if state == "FAIL" else None,
        seconds=attrs.get("seconds"),
        reused_s=attrs.get("reused_s"),
        artifact=attrs.get("artifact"),
        size_bytes=attrs.get("size_bytes"),
        duplicate_of=attrs.get("duplicate_of"),
        flash_bytes=attrs.get("flash_bytes"),
        arena_bytes=attrs.get("arena_bytes"),
        mcu_error=attrs.get("mcu_error"),
    )
    if state == "COMPLETE" and trial.values:
        rec.quality, rec.size_factor, rec.speedup = (float(v) for v in trial.values)
    return rec


def _sensitive_layers(model: nn.Module, data: list[Any] | None) -> tuple[list[str], int]:
    """Layers ranked by their int8 output SQNR (lowest first), and how many are below 20 dB: one
    calibration pass (`optimize.sensitivity`, mode "sqnr"). Empty when there is too little data."""
    from modelpress.optimize.sensitivity import scheme_sensitivity
    from modelpress.techniques import StaticInt8Config

    if not data or len(data) < 2:
        return [], 0
    try:
        table = scheme_sensitivity(model, StaticInt8Config(), data, holdout=1, mode="sqnr")
    except ModelpressError as exc:
        log.info("no sensitivity seeding: %s", exc)
        return [], 0
    layers = table.layers
    fragile = sum(1 for r in table.rows if r.sqnr_db < 20.0)
    return layers, fragile


def _seed_points(space: SearchSpace, fragile: int) -> list[dict[str, Any]]:
    """First trials. Where the space has depth: the strong depth point first (half the blocks, or the
    nearest share the space offers, clustered embeddings and the best quantization), then it with half and a
    quarter of the channels removed too (they start from its distilled model), since each such trial costs
    minutes where the depth step distills. Then quantization alone with the fragile layers kept out (as the
    SQNR ranking says), with half the channels removed, and a strong point of every other family. Points the
    space cannot express are left out."""
    choices = space.choices()
    keep = max((k for k in space.keep if k <= fragile), default=space.keep[0])
    base: dict[str, Any] = {name: values[0] for name, values in choices.items()}
    base.update({"structured": 0.0, "lowrank": 0.0, "sparsity": 0.0, "cluster": 0, "quantize": "none"})
    # off where the space offers it; else the space's first choice (a space may offer only clustered embeddings)
    if "depth" in choices:
        base["depth"] = 1.0 if 1.0 in space.depth else space.depth[0]
    if "embeddings" in choices:
        base["embeddings"] = 0 if 0 in space.embeddings else space.embeddings[0]
    quant = next((q for q in ("static_int8", "int8", "int4") if q in space.quantize), "none")
    wishes: list[dict[str, Any]] = []
    shallower = [d for d in space.depth if d < 1.0]
    if shallower:
        depth = min(shallower, key=lambda d: (abs(d - 0.5), d))
        shared = [v for v in space.embeddings if v]
        embeddings = {"embeddings": 16 if 16 in shared else max(shared)} if shared else {}
        strong = {"depth": depth, **embeddings, "quantize": quant, "keep": keep}
        wishes += [strong, {**strong, "structured": 0.5}, {**strong, "structured": 0.25}]
    wishes += [
        {"quantize": quant, "keep": keep},
        {"structured": 0.5, "quantize": quant, "keep": keep},
        {"structured": 0.75, "quantize": quant, "keep": keep},
        {"sparsity": 0.75, "cluster": 16, "keep": keep},
        {"lowrank": 0.5, "quantize": quant, "keep": keep},
    ]
    points = []
    for wish in wishes:
        point = {**base, "keep": space.keep[0], **wish}
        if all(point[k] in choices[k] for k in choices) and point not in points:
            points.append(point)
    return points


# ------------------------------------------------------------------------------------------------ search


def search(
    model: nn.Module,
    data: Iterable[Any] | None,
    evaluate: Evaluate,
    constraints: Constraints | None = None,
    *,
    example_inputs: Sequence[torch.Tensor] | None = None,
    config: SearchConfig | None = None,
    progress: Progress | None = None,
) -> SearchResult:
    """Search recipes across techniques for the smallest, fastest artifact within `constraints`.

    `data`: calibration items (model inputs; also the example inputs when `example_inputs` is not given),
    or (inputs, labels) pairs when the space's recovery trains on labels (`recover: {loss: kl, alpha: 0.5}`).
    `evaluate(session) -> float`: quality of an exported artifact, given its runtime session (use
    `metric_evaluator(items, "accuracy")`); higher is better unless `config.higher_is_better` is False.
    Writes into `config.out_dir`: the study (`study.db`), `fp32.onnx`, `trials/NNNN/` (artifact and recipe),
    `search.json`, `front.svg`, and `recipe.yaml` (the chosen recipe; `closest-recipe.yaml` when nothing met
    the constraints), which `modelpress compress --recipe` reproduces.

    >>> result = search(model, calib, metric_evaluator(items), Constraints(max_drop=0.01, size=4))  # doctest: +SKIP
    """
    from modelpress.deploy.export import export_onnx
    from modelpress.deploy.runtime import open_session
    from modelpress.loading import as_inputs
    from modelpress.techniques.distill import as_recover
    from modelpress.techniques.finetune import RECOVER_LABELS
    from modelpress.techniques.finetune import labeled as labeled_item

    optuna = _require("optuna", "search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = config or SearchConfig()
    constraints = constraints or Constraints()
    say = progress or (lambda msg: log.info(msg))
    # before any slow work: an absent extra or cluster is said at once
    if config.ray_address and not _require("ray", "distributed").is_initialized():
        _probe_ray(config.ray_address)
    items = list(data) if data is not None else None
    # a recovery on hard labels reads (inputs, labels) items; calibration and the example take their inputs
    space = config.space
    recovers = [as_recover("search", r) for r in (space.recover, space.depth_recover) if r]
    labeled = any(r is not None and r.labeled for r in recovers)
    if labeled and items:  # said once, before any trial, instead of by every trial that recovers
        labeled_item(items[0], "the first data item", owner="search", **RECOVER_LABELS)
    inputs = [pair_inputs(item) for item in items] if labeled and items else items
    if example_inputs is None:
        if not inputs:
            raise RecipeError("search: give example_inputs, or data whose first item is the model's inputs.")
        example = as_inputs(inputs[0], where="the first data item (the example inputs)")
    else:
        example = as_inputs(tuple(example_inputs))
    model = copy.deepcopy(model).eval()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = config.storage or f"sqlite:///{(out / STUDY_DB).resolve()}"
    state = _StudyState(constraints)
    study = _open_study(optuna, storage, config, state.constraints_func)

    fingerprint = _fingerprint(model, config, example)
    attrs = study.user_attrs
    if "fingerprint" in attrs and attrs["fingerprint"] != fingerprint:
        raise SearchError(
            f"The study '{config.study_name}' in {_hide_password(storage)} was made for another model, space or "
            "runtime. Give another --out folder (or --storage / study name) for this search."
        )
    baseline_runtime = config.baseline_runtime or config.runtime
    fp32 = out / "fp32.onnx"
    if not fp32.exists() or "baseline_quality" not in attrs:
        say("exporting the fp32 model")
        export_onnx(model, example, fp32, overwrite=True, target=_target(baseline_runtime))
    if "baseline_quality" in attrs:
        baseline = float(attrs["baseline_quality"])
        sensitive, fragile = list(attrs.get("sensitive", [])), int(attrs.get("fragile", 0))
    else:
        say(f"evaluating the fp32 artifact in {config.runtime}")
        baseline = float(evaluate(open_session(fp32, config.runtime, threads=config.threads)))
        if not math.isfinite(baseline):
            raise RecipeError(f"search: the evaluation of the fp32 model returned {baseline}; fix it first.")
        if max(config.space.keep) > 0:
            say("ranking layers by int8 sensitivity (one calibration pass)")
            sensitive, fragile = _sensitive_layers(model, inputs)
        else:  # no point keeps a layer out: the ranking would go unused
            sensitive, fragile = [], 0
        for key, value in (
            ("fingerprint", fingerprint),
            ("baseline_quality", baseline),
            ("sensitive", sensitive),
            ("fragile", fragile),
        ):
            study.set_user_attr(key, value)
    state.baseline = baseline

    # A killed run's trial in flight is lost: failed here, its record says interrupted (no error attribute).
    stale = [t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
    for number in stale:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    if stale:
        say(f"resuming: trial(s) {stale} were in flight when the last run stopped; recorded as interrupted")
    records = [r for r in (_record(t) for t in study.get_trials(deepcopy=False)) if r is not None]
    if not records and config.seed_trials:
        for point in _seed_points(config.space, fragile):
            study.enqueue_trial(point, skip_if_exists=True)

    ctx = TrialContext(
        model=model,
        example=tuple(example),
        data=items,
        inputs=inputs if labeled else None,
        evaluate=evaluate,
        runtime=config.runtime,
        baseline_path=str(fp32),
        baseline_runtime=baseline_runtime,
        batch=config.batch,
        rounds=config.rounds,
        threads=config.threads,
        mcu=constraints.mcu is not None,
    )
    runner = _Runner(optuna, study, config, sensitive, records, state, say)
    if config.ray_address:
        runner.run_on_ray(ctx)
    else:
        runner.run_here(ctx)
    result = summarize(records, constraints, baseline, config.higher_is_better)
    result.out_dir, result.stopped = str(out), runner.stopped
    if runner.stopped:
        result.message = f"{runner.stopped} {result.message}"
    write_outputs(result, out)
    say(result.message)
    return result


@dataclass
class _StudyState:
    constraints: Constraints
    baseline: float = 0.0

    def constraints_func(self, trial: Any) -> list[float]:
        return list(trial.user_attrs.get("violations", [0.0] * len(_kinds(self.constraints))))


class _Runner:
    """Asks the study for points, runs their trials (here, or as Ray tasks) and tells the results."""

    def __init__(
        self,
        optuna: Any,
        study: Any,
        config: SearchConfig,
        sensitive: list[str],
        records: list[TrialRecord],
        state: _StudyState,
        say: Progress,
    ) -> None:
        self.optuna, self.study, self.config = optuna, study, config
        self.sensitive, self.records, self.state, self.say = sensitive, records, state, say
        self.started = time.perf_counter()
        self.stopped = ""
        self.distributions = {
            name: optuna.distributions.CategoricalDistribution(list(values))
            for name, values in config.space.choices().items()
        }

    def may_start(self, in_flight: int = 0) -> bool:
        if self.stopped:
            return False
        if self.config.trials is not None and len(self.records) + in_flight >= self.config.trials:
            return False
        elapsed = time.perf_counter() - self.started
        return self.config.budget_s is None or elapsed < self.config.budget_s

    def ask(self) -> tuple[Any, list[dict[str, Any]], str] | None:
        """A new trial, its recipe and folder; None when the storage failed (then `stopped` says so)."""
        try:
            trial = self.study.ask(self.distributions)
            recipe = build_recipe(trial.params, self.config.space, self.sensitive)
            trial.set_user_attr("recipe", recipe)
        except Exception as exc:
            self._storage_gone(exc)
            return None
        folder = str(Path(self.config.out_dir) / "trials" / f"{trial.number:04d}")
        return trial, recipe, folder

    def tell(self, trial: Any, recipe: list[dict[str, Any]], outcome: dict[str, Any]) -> None:
        """Record a trial's outcome in the study and in this run's records (kept if the storage fails)."""
        rec = TrialRecord(
            number=trial.number,
            params=dict(trial.params),
            recipe=recipe,
            state="fail" if "error" in outcome else "complete",
            quality=outcome.get("quality"),
            size_factor=outcome.get("size_factor"),
            speedup=outcome.get("speedup"),
            size_bytes=outcome.get("size_bytes"),
            seconds=outcome.get("seconds"),
            reused_s=outcome.get("reused_s"),
            artifact=outcome.get("artifact"),
            error=outcome.get("error"),
            duplicate_of=outcome.get("duplicate_of"),
            flash_bytes=outcome.get("flash_bytes"),
            arena_bytes=outcome.get("arena_bytes"),
            mcu_error=outcome.get("mcu_error"),
        )
        self.records.append(rec)
        where = f"trial {trial.number} ({', '.join(s['type'] for s in recipe) or 'nothing'})"
        if rec.duplicate_of is not None:
            where += f", the point of trial {rec.duplicate_of} again"

        try:
            for key in (
                "seconds",
                "reused_s",
                "artifact",
                "size_bytes",
                "error",
                "duplicate_of",
                "flash_bytes",
                "arena_bytes",
                "mcu_error",
            ):
                if outcome.get(key) is not None:
                    trial.set_user_attr(key, outcome[key])
            if rec.state == "fail":
                self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)
                self.say(f"{where} failed: {rec.error}")
                return
            rec.drop = _drop(rec.quality or 0.0, self.state.baseline, self.config.higher_is_better)
            trial.set_user_attr(
                "violations",
                violations(rec, self.state.constraints, self.state.baseline, self.config.higher_is_better),
            )
            self.study.tell(trial, [rec.quality, rec.size_factor, rec.speedup])
        except Exception as exc:
            self._storage_gone(exc)
            return
        self.say(
            f"{where}: quality {rec.quality:.5g}, {rec.size_factor:.2f}x smaller, {rec.speedup:.2f}x faster"
        )

    def _storage_gone(self, exc: Exception) -> None:
        self.stopped = (
            f"The study storage failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"the search stopped and kept the {len(self.records)} trial(s) found."
        )
        log.warning(self.stopped)

    def run_here(self, ctx: TrialContext) -> None:
        while self.may_start():
            asked = self.ask()
            if asked is None:
                return
            trial, recipe, folder = asked
            outcome = self.known(trial.params, recipe) or run_trial(ctx, recipe, folder)
            self.tell(trial, recipe, outcome)

    def known(self, params: dict[str, Any], recipe: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The outcome of a point that needs no run: the fp32 model (every family off), or a point this
        study already measured (TPE proposes a categorical point again; its figures are told again, free)."""
        if not recipe:
            return {"error": "nothing to do: every family is off at this point (the fp32 model)"}
        for rec in self.records:
            if rec.params == params and rec.state == "complete" and rec.duplicate_of is None:
                keys = (
                    "quality",
                    "size_factor",
                    "speedup",
                    "size_bytes",
                    "artifact",
                    "flash_bytes",
                    "arena_bytes",
                    "mcu_error",
                )
                return {**{k: getattr(rec, k) for k in keys}, "seconds": 0.0, "duplicate_of": rec.number}
        return None

    def run_on_ray(self, ctx: TrialContext) -> None:
        """Trials as Ray tasks, `parallel` at a time; the driver alone asks and tells the study. A cluster
        that goes away stops the search: the trials in flight are recorded as interrupted."""
        ray = _require("ray", "distributed")
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=self.config.ray_address, logging_level=logging.WARNING, log_to_driver=False)
            except Exception as exc:
                chain: list[str] = []  # Ray says "Failed to connect" where the cluster wants a token
                cause: BaseException | None = exc
                while cause is not None and len(chain) < 10:
                    chain.append(type(cause).__name__)
                    cause = cause.__cause__ or cause.__context__
                fix = (
                    "The cluster asks for a token (Ray's token authentication, on by default for ray start "
                    "where ~/.ray/auth_token exists): run the search with RAY_AUTH_MODE=token."
                    if "AuthenticationError" in chain
                    else "Start it (ray start --head) or leave out --ray-address to run the trials here."
                )
                raise SearchError(
                    f"Cannot reach the Ray cluster at '{self.config.ray_address}' ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}). {fix}"
                ) from exc
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            parallel = self.config.parallel or max(1, cpus // self.config.threads)
            task = ray.remote(num_cpus=min(self.config.threads, cpus))(run_trial)
            shared = ray.put(ctx)
            gcs = _gcs_address(ray)
            lost: float | None = None  # since when the cluster has not answered
            pending: dict[Any, tuple[Any, list[dict[str, Any]]]] = {}
            while True:
                while len(pending) < parallel and self.may_start(len(pending)):
                    asked = self.ask()
                    if asked is None:
                        break
                    trial, recipe, folder = asked
                    outcome = self.known(trial.params, recipe)
                    if outcome is not None:
                        self.tell(trial, recipe, outcome)
                        continue
                    pending[task.remote(shared, recipe, folder)] = (trial, recipe)
                if not pending:
                    return
                # never an endless wait: a cluster that vanishes leaves its tasks pending, and Ray ends the
                # driver a minute later, before anything found is written
                done, _ = ray.wait(list(pending), num_returns=1, timeout=RAY_POLL_S)
                if not done:
                    if _cluster_alive(ray, gcs):
                        lost = None
                    elif lost is None:
                        lost = time.monotonic()
                    elif time.monotonic() - lost >= RAY_GONE_S:
                        self.stopped = self._ray_gone(len(pending))
                for ref in done:
                    trial, recipe = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # the task's worker died, or the cluster went away
                        outcome = {"error": f"{INTERRUPTED} ({type(exc).__name__})"}
                        if not _cluster_alive(ray, gcs):
                            self.stopped = self._ray_gone(len(pending) + 1)
                    self.tell(trial, recipe, outcome)
                if self.stopped:
                    for trial, recipe in pending.values():
                        self.tell(trial, recipe, {"error": INTERRUPTED})
                    return
        finally:
            if started_here:
                ray.shutdown()

    def _ray_gone(self, in_flight: int) -> str:
        done = sum(1 for r in self.records if r.state == "complete")
        return (
            f"The Ray cluster at '{self.config.ray_address}' went away; the search stopped, recorded the "
            f"{in_flight} trial(s) in flight as interrupted and kept the {done} trial(s) measured. Run it again "
            "(once the cluster is back, or without --ray-address) to resume from them."
        )


def _probe_ray(address: str) -> None:
    """Refuse at once a `host:port` (or `ray://host:port`) nobody answers on: `ray.init` retries such an
    address for minutes before giving up."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]]+?)\]?:(\d+)", address.strip())
    if not match:
        return  # "auto", "local", or a form Ray resolves itself
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=5):
            pass
    except OSError as exc:
        raise SearchError(
            f"Cannot reach the Ray cluster at '{address}' ({exc}). Start it (ray start --head) or leave out "
            "--ray-address to run the trials here."
        ) from exc


def _gcs_address(ray: Any) -> str | None:
    """The cluster's GCS `host:port` (None where Ray does not say, as through a ray:// client)."""
    try:
        return str(ray.get_runtime_context().gcs_address) or None
    except Exception:
        return None


def _cluster_alive(ray: Any, gcs: str | None) -> bool:
    """Whether the cluster still has a live node. Its GCS is tried first with a plain connection: with the
    GCS gone, `ray.nodes()` blocks until Ray gives up on it (a minute)."""
    if gcs:
        host, _, port = gcs.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_POLL_S):
                pass
        except (OSError, ValueError):
            return False
    try:
        return any(node.get("Alive") for node in ray.nodes())
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------ outputs


def write_outputs(result: SearchResult, out: Path) -> None:
    """`search.json`, `front.svg` and the chosen recipe's YAML into `out`."""
    from modelpress._files import write_text_atomic
    from modelpress.pipeline.recipe import dump_recipe

    write_text_atomic(out / RESULT_JSON, json.dumps(result.to_dict(), indent=2), overwrite=True)
    # a file of its own (not inline in HTML) needs the SVG namespace to be shown as a picture
    svg = front_chart(result).replace("<svg ", "<svg xmlns='http://www.w3.org/2000/svg' ", 1)
    write_text_atomic(out / CHART_SVG, svg, overwrite=True)
    stale = out / (CLOSEST_YAML if result.met else RECIPE_YAML)
    stale.unlink(missing_ok=True)  # a resumed search's earlier answer must not linger
    if result.chosen is not None and result.recipe:
        name = RECIPE_YAML if result.met else CLOSEST_YAML
        write_text_atomic(out / name, dump_recipe(result.recipe), overwrite=True)


def front_chart(result: SearchResult, *, width: int = 560, height: int = 360) -> str:
    """A scatter of the trials, size factor (x, log) against speedup (y, log): the front in colour, the
    chosen point ringed, the targets dashed. Inline SVG built with `report.svg`'s frame and axis helpers."""
    from modelpress.report.svg import COLOURS, _axis, _e, _frame, _svg

    done = [t for t in result.trials if t.state == "complete" and t.size_factor and t.speedup]
    c = result.constraints
    xs = [math.log2(t.size_factor or 1.0) for t in done] + [0.0]
    ys = [math.log2(t.speedup or 1.0) for t in done] + [0.0]
    if c.size:
        xs.append(math.log2(c.size))
    if c.latency:
        ys.append(math.log2(c.latency))

    def fmt(v: float) -> str:
        return f"{2**v:.3g}x"

    left, top, bottom = 56, 34, height - 30
    fx = _frame(xs, left=left, right=width - 16, reference=None, fmt=fmt)
    fy = _frame(ys, left=top, right=bottom, reference=None, fmt=fmt)

    def py(value: float) -> float:  # pixels grow downwards
        return top + bottom - fy.x(value)

    body = _axis(fx, top, bottom, fmt)
    for tick in fy.ticks:
        y = py(tick)
        body.append(f"<line x1='{left}' x2='{width - 16}' y1='{y:.1f}' y2='{y:.1f}' stroke='#e6e8ee'/>")
        body.append(
            f"<text x='{left - 6}' y='{y + 4:.1f}' text-anchor='end' fill='#667085'>{_e(fmt(tick))}</text>"
        )
    if c.size:
        x = fx.x(math.log2(c.size))
        body.append(
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{bottom}' stroke='#1d2330' stroke-dasharray='4 3'/>"
        )
    if c.latency:
        y = py(math.log2(c.latency))
        body.append(
            f"<line x1='{left}' x2='{width - 16}' y1='{y:.1f}' y2='{y:.1f}' stroke='#1d2330' stroke-dasharray='4 3'/>"
        )
    front = {t.number for t in result.front}
    for t in sorted(done, key=lambda t: t.number in front):
        role = "good" if t.feasible else ("subject" if t.number in front else "baseline")
        x, y = fx.x(math.log2(t.size_factor or 1.0)), py(math.log2(t.speedup or 1.0))
        tip = f"trial {t.number}: {t.size_factor:.2f}x smaller, {t.speedup:.2f}x faster, quality {t.quality:.5g}"
        body.append(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{4.5 if t.number in front else 3}' fill='{COLOURS[role]}' "
            f"fill-opacity='0.85'><title>{_e(tip)}</title></circle>"
        )
        if result.chosen is not None and t.number == result.chosen.number:
            body.append(
                f"<circle cx='{x:.1f}' cy='{y:.1f}' r='8' fill='none' stroke='#1d2330' stroke-width='1.5'/>"
            )
    body.append(
        f"<text x='{(left + width) / 2:.0f}' y='{height - 2}' text-anchor='middle' fill='#1d2330'>"
        "times smaller than fp32 (file)</text>"
    )
    body.append(f"<text x='4' y='{top - 8}' fill='#1d2330'>times faster than fp32</text>")
    title = "Trials by size and speed (front in colour; green: meets all)"
    return _svg(width, height, title, body, html.unescape(result.message))


def front_table(result: SearchResult) -> Any:
    """The front as a rich Table (the chosen trial marked)."""
    from rich.table import Table

    table = Table(
        title=f"Pareto front ({len(result.front)} of {len(result.trials)} trials); fp32 quality "
        f"{result.baseline_quality:.5g}"
    )
    for col in ("trial", "recipe", "quality", "drop", "smaller", "faster", "meets"):
        table.add_column(col, justify="left" if col == "recipe" else "right")
    for t in result.front:
        mark = " *" if result.chosen is not None and t.number == result.chosen.number else ""
        table.add_row(
            f"{t.number}{mark}",
            describe_recipe(t.recipe),
            f"{t.quality:.5g}",
            f"{t.drop:.4g}" if t.drop is not None else "-",
            f"{t.size_factor:.2f}x",
            f"{t.speedup:.2f}x",
            "yes" if t.feasible else "no",
        )
    return table


def describe_recipe(recipe: Sequence[dict[str, Any]]) -> str:
    """A short line for a recipe: `structured 0.5 + static_int8 (2 kept)`."""
    parts = []
    for step in recipe:
        kind = step["type"]
        if kind == "cluster" and list(step.get("layers", ())) == ["embedding"]:
            kind = "embeddings"
        value = {
            "depth": f"keep {round(1 - float(step.get('ratio', 0.25)), 6):g}"
            if step.get("blocks") is None
            else f"-{step['blocks']} blocks",
            "embeddings": step.get("values"),
            "structured": step.get("ratio"),
            "lowrank": step.get("ratio"),
            "sparsity": step.get("ratio"),
            "cluster": step.get("values"),
            "weight_only": f"int{step.get('bits')}",
        }.get(kind)
        kept = f" ({len(step['ignore'])} kept)" if step.get("ignore") else ""
        parts.append(f"{kind}{'' if value is None else f' {value}'}{kept}")
    return " + ".join(parts) or "fp32"
