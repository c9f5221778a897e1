"""modelpress: make trained PyTorch models smaller and faster, and prove it on the runtime they deploy to.

>>> import modelpress as mp
>>> small = mp.compress(model, [mp.WeightOnlyConfig(bits=8)])          # doctest: +SKIP
>>> mp.export_onnx(small, example_inputs, "small.onnx")                 # doctest: +SKIP
"""

from modelpress.analyse.profile import LayerProfile, Profile, profile
from modelpress.data import Dataset
from modelpress.deploy.bench import benchmark_interleaved, compare_artifacts, peak_memory_mb
from modelpress.deploy.export import export_onnx
from modelpress.deploy.parity import ParityReport, check_parity, parity_inputs
from modelpress.deploy.runtime import available_runtimes, open_session
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
from modelpress.pipeline.recipe import builtin_recipes, compress, dump_recipe, load_recipe
from modelpress.techniques import (
    REGISTRY,
    AWQConfig,
    DepthPruningConfig,
    DynamicInt8Config,
    GPTQConfig,
    MixedPrecisionConfig,
    QATConfig,
    SparsityConfig,
    StaticInt8Config,
    StructuredPruningConfig,
    WeightOnlyConfig,
)
from modelpress.techniques.mixed_precision import FloorNotMetError, search_mixed_precision
from modelpress.techniques.structured import prune_gradually

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "AWQConfig",
    "DataError",
    "Dataset",
    "DepthPruningConfig",
    "DynamicInt8Config",
    "ExportError",
    "FloorNotMetError",
    "GPTQConfig",
    "GraphError",
    "LayerProfile",
    "MixedPrecisionConfig",
    "ModelLoadError",
    "ModelpressError",
    "ParityError",
    "ParityReport",
    "Profile",
    "QATConfig",
    "RecipeError",
    "RuntimeUnavailableError",
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
    "compare_artifacts",
    "compress",
    "dump_recipe",
    "evaluate",
    "export_onnx",
    "load_model",
    "load_recipe",
    "open_session",
    "output_fidelity",
    "parity_inputs",
    "peak_memory_mb",
    "perplexity",
    "profile",
    "prune_gradually",
    "search_mixed_precision",
]
