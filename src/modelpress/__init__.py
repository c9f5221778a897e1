"""modelpress: make trained PyTorch models smaller and faster, and prove it on the runtime they deploy to.

>>> import modelpress as mp
>>> small = mp.compress(model, [mp.WeightOnlyConfig(bits=8)])          # doctest: +SKIP
>>> mp.export_onnx(small, example_inputs, "small.onnx")                 # doctest: +SKIP

The public names are imported on first use (PEP 562), so `import modelpress` and the command line's
`--help` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpress.analyse.profile import LayerProfile, Profile, profile
    from modelpress.data import Dataset
    from modelpress.deploy.bench import benchmark_interleaved, compare_artifacts, peak_memory_mb
    from modelpress.deploy.export import export_onnx
    from modelpress.deploy.formats import deploy, open_artifact
    from modelpress.deploy.parity import ParityReport, check_parity, parity_inputs
    from modelpress.deploy.runtime import available_runtimes, open_session
    from modelpress.deploy.tensorrt import check_tensorrt
    from modelpress.errors import (
        DataError,
        ExportError,
        GraphError,
        ModelLoadError,
        ModelpressError,
        ParityError,
        RecipeError,
        RuntimeUnavailableError,
    )
    from modelpress.evaluate.metrics import accuracy, as_predictor, evaluate, output_fidelity, perplexity
    from modelpress.loading import load_model
    from modelpress.optimize.mixed_precision import FloorNotMetError, search_mixed_precision
    from modelpress.optimize.progressive import progressive
    from modelpress.optimize.search import Constraints, SearchConfig, SearchSpace, metric_evaluator, search
    from modelpress.optimize.sensitivity import family_sensitivity
    from modelpress.pipeline.recipe import builtin_recipes, compress, dump_recipe, load_recipe
    from modelpress.techniques import (
        REGISTRY,
        AWQConfig,
        ClusterConfig,
        DepthPruningConfig,
        DistillConfig,
        DynamicInt8Config,
        GPTQConfig,
        LowRankConfig,
        MixedPrecisionConfig,
        ProgressiveConfig,
        QATConfig,
        SparsityConfig,
        StaticInt8Config,
        StructuredPruningConfig,
        WeightOnlyConfig,
    )
    from modelpress.techniques.distill import distill
    from modelpress.techniques.structured import prune_gradually

__version__ = "0.1.0"

# public name -> the module that defines it
_SOURCES: dict[str, str] = {
    **dict.fromkeys(["LayerProfile", "Profile", "profile"], "modelpress.analyse.profile"),
    "Dataset": "modelpress.data",
    **dict.fromkeys(
        ["benchmark_interleaved", "compare_artifacts", "peak_memory_mb"], "modelpress.deploy.bench"
    ),
    "export_onnx": "modelpress.deploy.export",
    **dict.fromkeys(["deploy", "open_artifact"], "modelpress.deploy.formats"),
    "check_tensorrt": "modelpress.deploy.tensorrt",
    **dict.fromkeys(["ParityReport", "check_parity", "parity_inputs"], "modelpress.deploy.parity"),
    **dict.fromkeys(["available_runtimes", "open_session"], "modelpress.deploy.runtime"),
    **dict.fromkeys(
        [
            "DataError",
            "ExportError",
            "GraphError",
            "ModelLoadError",
            "ModelpressError",
            "ParityError",
            "RecipeError",
            "RuntimeUnavailableError",
        ],
        "modelpress.errors",
    ),
    **dict.fromkeys(
        ["accuracy", "as_predictor", "evaluate", "output_fidelity", "perplexity"],
        "modelpress.evaluate.metrics",
    ),
    "load_model": "modelpress.loading",
    **dict.fromkeys(
        ["builtin_recipes", "compress", "dump_recipe", "load_recipe"], "modelpress.pipeline.recipe"
    ),
    **dict.fromkeys(
        [
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
        ],
        "modelpress.techniques",
    ),
    **dict.fromkeys(["FloorNotMetError", "search_mixed_precision"], "modelpress.optimize.mixed_precision"),
    **dict.fromkeys(
        ["Constraints", "SearchConfig", "SearchSpace", "metric_evaluator", "search"],
        "modelpress.optimize.search",
    ),
    "progressive": "modelpress.optimize.progressive",
    "family_sensitivity": "modelpress.optimize.sensitivity",
    "distill": "modelpress.techniques.distill",
    "prune_gradually": "modelpress.techniques.structured",
}


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'modelpress' has no attribute '{name}'")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`evaluate` names both a public function and the subpackage that defines it: importing the subpackage
    sets the package attribute, which would hide the function (`mp.evaluate(...)`); the function wins."""

    @property
    def evaluate(self) -> Any:
        from modelpress.evaluate.metrics import evaluate

        return evaluate

    @evaluate.setter
    def evaluate(self, value: Any) -> None:
        pass  # the import system recording the subpackage: it stays reachable through sys.modules


sys.modules[__name__].__class__ = _Package


__all__ = [
    "REGISTRY",
    "AWQConfig",
    "ClusterConfig",
    "Constraints",
    "DataError",
    "Dataset",
    "DepthPruningConfig",
    "DistillConfig",
    "DynamicInt8Config",
    "ExportError",
    "FloorNotMetError",
    "GPTQConfig",
    "GraphError",
    "LayerProfile",
    "LowRankConfig",
    "MixedPrecisionConfig",
    "ModelLoadError",
    "ModelpressError",
    "ParityError",
    "ParityReport",
    "Profile",
    "ProgressiveConfig",
    "QATConfig",
    "RecipeError",
    "RuntimeUnavailableError",
    "SearchConfig",
    "SearchSpace",
    "SparsityConfig",
    "StaticInt8Config",
    "StructuredPruningConfig",
    "WeightOnlyConfig",
    "accuracy",
    "as_predictor",
    "available_runtimes",
    "benchmark_interleaved",
    "builtin_recipes",
    "check_parity",
    "check_tensorrt",
    "compare_artifacts",
    "compress",
    "deploy",
    "distill",
    "dump_recipe",
    "evaluate",
    "export_onnx",
    "family_sensitivity",
    "load_model",
    "load_recipe",
    "metric_evaluator",
    "open_artifact",
    "open_session",
    "output_fidelity",
    "parity_inputs",
    "peak_memory_mb",
    "perplexity",
    "profile",
    "progressive",
    "prune_gradually",
    "search",
    "search_mixed_precision",
]
