"""Peer tools as rows of benchmarks/run.py: ONNX Runtime's quantizers, NNCF (OpenVINO and ONNX backends), torchao.

Each build function takes the run's `Asset` and returns a `Made`: the artifact the tool wrote (ONNX or
OpenVINO IR) or, for torch-only tools, the compressed torch model; plus the tool's compression wall time.
Every peer starts from the same fp32 ONNX that modelpress exported for the fp32 row (`fp32_onnx`), so its
export time is not counted in a peer's `wall_s`. The tools run with their defaults unless a setting is named
here; their versions go into the JSON (`versions()`).

These are benchmark dependencies only (installed by benchmarks/setup.sh), never modelpress dependencies.
"""

from __future__ import annotations

import os

# torchao's prebuilt extensions are CUDA kernels: skip loading them on this CPU torch (else it prints a
# "Failed to load ..." line per library). Its CPU weight-only paths are plain torch and do not need them.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import contextlib
import copy
import importlib.metadata
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import modelpress as mp

PEER_PACKAGES = ("onnxruntime", "openvino", "nncf", "torchao", "torch-pruning", "onnx", "coremltools")


@dataclass
class Made:
    """What a peer tool produced: an artifact `path`, or (torch-only tools) a compressed torch `model`."""

    path: Path | None = None
    model: nn.Module | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in PEER_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------
# Inputs shared by the tools
# ------------------------------------------------------------------------------------------------


def workdir(asset: Any) -> Path:
    if asset.workdir is None:
        asset.workdir = Path(tempfile.mkdtemp(prefix=f"modelpress-peers-{asset.name}-"))
    return Path(asset.workdir)


def fp32_onnx(asset: Any) -> Path:
    """The fp32 ONNX exported by modelpress (the fp32 row's artifact; exported here if that row did not run)."""
    if asset.fp32_onnx is None:
        asset.fp32_onnx = mp.export_onnx(asset.model, asset.example_inputs, workdir(asset) / "fp32.onnx")
    return Path(asset.fp32_onnx)


def onnx_input_names(path: Path) -> list[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    return [i.name for i in graph.input if i.name not in initializers]


def calibration_arrays(asset: Any) -> list[list[np.ndarray]]:
    return [[t.numpy() for t in item] for item in asset.calibration]


def _fresh(path: Path) -> Path:
    """Remove an old artifact (and its side files) first: ONNX appends to existing external data."""
    for p in (path, path.with_suffix(".bin"), path.with_suffix(".onnx.data"), Path(f"{path}.data")):
        p.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------
# ONNX Runtime quantization
# ------------------------------------------------------------------------------------------------


def ort_dynamic(asset: Any, *, reduce_range: bool = False, preprocess: bool = False) -> Made:
    """`quantize_dynamic`: int8 per-channel weights, activations quantized at run time (DynamicQuantizeLinear).

    `preprocess`: first ORT's `quant_pre_process` (shape inference, graph optimisation), as its warning advises.
    On the speaker LSTM it matters: the exported LSTM reads its W/R through Concat/Reshape of the per-direction
    initializers, which `quantize_dynamic` alone leaves fp32 (0.997x); pre-processing folds them into
    initializers and the LSTMs become DynamicQuantizeLSTM.

    Found on SmolLM2 (ORT 1.32, this CPU): with full-range int8 per-channel weights the quantized MatMuls give
    garbage (logit cosine -0.36 to fp32, ppl 1.8e7 on 300 tokens) while the weights themselves dequantize
    correctly; reduce_range=True (7-bit weights, ORT's advice against u8s8 overflow on x86) or uint8 weights
    give cosine 0.94. MiniLM and the MNIST CNN are fine either way.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = fp32_onnx(asset)
    tag = ("-rr" if reduce_range else "") + ("-pre" if preprocess else "")
    out = _fresh(workdir(asset) / f"ort-dynamic{tag}.onnx")
    start = time.perf_counter()
    if preprocess:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = _fresh(workdir(asset) / "ort-preprocessed.onnx")
        quant_pre_process(str(fp32_onnx(asset)), str(src))
    quantize_dynamic(src, out, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    return Made(
        path=out,
        wall_s=time.perf_counter() - start,
        extra={
            "settings": f"per_channel=True, QInt8, reduce_range={reduce_range}"
            + (", after quant_pre_process (defaults)" if preprocess else "")
        },
    )


def ort_dynamic_reduce_range(asset: Any) -> Made:
    return ort_dynamic(asset, reduce_range=True)


def ort_dynamic_preprocessed(asset: Any) -> Made:
    return ort_dynamic(asset, preprocess=True)


class _Reader:
    """ORT CalibrationDataReader over the asset's calibration batches."""

    def __init__(self, items: list[list[np.ndarray]], names: Sequence[str]) -> None:
        self._items = iter([dict(zip(names, arrays, strict=True)) for arrays in items])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:  # part of the reader interface; MinMax reads once
        pass


def ort_static(asset: Any) -> Made:
    """`quantize_static` with its defaults: QDQ format, MinMax calibration, per-tensor int8 weights/activations.

    MinMax takes batches of any shape (MiniLM's calibration batches differ in length); ORT's percentile and
    entropy calibrators need equal shapes, which is why this row keeps the default.
    """
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    src = fp32_onnx(asset)
    out = _fresh(workdir(asset) / "ort-static.onnx")
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(
        calibration_arrays(asset), onnx_input_names(src)
    )
    start = time.perf_counter()
    quantize_static(src, out, reader)
    return Made(
        path=out,
        wall_s=time.perf_counter() - start,
        extra={
            "settings": "defaults: QDQ, MinMax, per-tensor QInt8",
            "calibration_batches": len(asset.calibration),
        },
    )


def ort_int4(asset: Any) -> Made:
    """`MatMulNBitsQuantizer`: int4 weight-only MatMuls (MatMulNBits contrib op), block 128, symmetric.

    Symmetric, like NNCF's INT4_SYM and torchao's int4 rows (ORT's default is asymmetric; SmolLM2's fp32
    weights come from an asymmetric 4-bit file, ASSETS.md). MatMuls whose K is not a multiple of 128 get
    a padded last block. RTN, accuracy_level left unset (ORT picks the compute type).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    src = fp32_onnx(asset)
    out = _fresh(workdir(asset) / "ort-int4.onnx")
    start = time.perf_counter()
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=128, is_symmetric=True)
    quantizer.process()
    wall = time.perf_counter() - start
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    ops = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    return Made(
        path=out,
        wall_s=wall,
        extra={
            "settings": "MatMulNBitsQuantizer block_size=128, is_symmetric=True (RTN)",
            "matmulnbits": ops.count("MatMulNBits"),
            "matmul_left_fp32": ops.count("MatMul"),
        },
    )


# ------------------------------------------------------------------------------------------------
# NNCF
# ------------------------------------------------------------------------------------------------


def _nncf_model_type(asset: Any) -> Any:
    import nncf

    # NNCF's docs: pass model_type=TRANSFORMER for transformer models (keeps some ops out of int8).
    return nncf.ModelType.TRANSFORMER if asset.name in ("minilm", "smollm2") else None


def _ov_read(asset: Any) -> Any:
    import openvino as ov

    return ov.Core().read_model(str(fp32_onnx(asset)))


def _ov_save(model: Any, out: Path) -> Path:
    import openvino as ov

    _fresh(out)
    # compress_to_fp16=False: the only compression in the IR is the tool's (save_model's default would also
    # turn the remaining fp32 constants to fp16).
    ov.save_model(model, str(out), compress_to_fp16=False)
    return out


def ov_weight_precisions(path: Path) -> dict[str, int]:
    """Bytes of the IR's constants by element type (e.g. {'i8': ..., 'u4': ..., 'f32': ...})."""
    import openvino as ov

    counts: dict[str, int] = {}
    for op in ov.Core().read_model(str(path)).get_ops():
        if op.get_type_name() == "Constant":
            et = op.get_output_element_type(0)
            size = int(np.prod(list(op.get_output_shape(0)), dtype=np.int64)) * et.bitwidth // 8
            counts[et.get_type_name()] = counts.get(et.get_type_name(), 0) + size
    return counts


def nncf_int8(asset: Any) -> Made:
    """`nncf.quantize` (default preset; model_type=TRANSFORMER for transformers) on the OpenVINO model read
    from the fp32 ONNX, calibrated on the asset's calibration batches; saved as OpenVINO IR."""
    import nncf

    model = _ov_read(asset)
    dataset = nncf.Dataset(calibration_arrays(asset))
    start = time.perf_counter()
    quantized = nncf.quantize(
        model, dataset, model_type=_nncf_model_type(asset), subset_size=max(1, len(asset.calibration))
    )
    wall = time.perf_counter() - start
    out = _ov_save(quantized, workdir(asset) / "nncf-int8.xml")
    return Made(
        path=out,
        wall_s=wall,
        extra={
            "settings": f"nncf.quantize defaults, model_type={_nncf_model_type(asset)}",
            "calibration_batches": len(asset.calibration),
            "ir_bytes_by_type": ov_weight_precisions(out),
        },
    )


def nncf_int8_onnx(asset: Any) -> Made:
    """`nncf.quantize` with NNCF's ONNX backend on the fp32 ONNX ModelProto: a QDQ ONNX."""
    import nncf
    import onnx

    src = fp32_onnx(asset)
    model = onnx.load(str(src))
    names = onnx_input_names(src)
    dataset = nncf.Dataset(calibration_arrays(asset), lambda arrays: dict(zip(names, arrays, strict=True)))
    start = time.perf_counter()
    quantized = nncf.quantize(
        model, dataset, model_type=_nncf_model_type(asset), subset_size=max(1, len(asset.calibration))
    )
    wall = time.perf_counter() - start
    out = _fresh(workdir(asset) / "nncf-int8-onnx.onnx")
    onnx.save(quantized, str(out))
    return Made(
        path=out,
        wall_s=wall,
        extra={
            "settings": f"nncf.quantize (ONNX backend) defaults, model_type={_nncf_model_type(asset)}",
            "calibration_batches": len(asset.calibration),
        },
    )


def nncf_weights(mode: str, *, group_fallback: str | None = None, **kwargs: Any) -> Callable[[Any], Made]:
    """`nncf.compress_weights` (data-free) on the OpenVINO model: weight-only int8/int4, saved as IR.

    `group_fallback` ("ADJUST", "IGNORE") is NNCF's `group_size_fallback_mode` for weights whose input width is
    not a multiple of `group_size`: NNCF 3.4's default (ERROR) refuses SmolLM2 at group 128 (hidden 576);
    ADJUST compresses those with the largest power of two that divides the width (64 for 576).
    """

    def build(asset: Any) -> Made:
        import nncf

        options = dict(kwargs)
        if group_fallback is not None:
            options["advanced_parameters"] = nncf.AdvancedCompressionParameters(
                group_size_fallback_mode=getattr(nncf.GroupSizeFallbackMode, group_fallback)
            )
        model = _ov_read(asset)
        start = time.perf_counter()
        compressed = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), **options)
        wall = time.perf_counter() - start
        out = _ov_save(compressed, workdir(asset) / f"nncf-wo-{mode.lower()}.xml")
        settings = [f"mode={mode}", *(f"{k}={v}" for k, v in kwargs.items())]
        if group_fallback is not None:
            settings.append(f"group_size_fallback_mode={group_fallback}")
        return Made(
            path=out,
            wall_s=wall,
            extra={
                "settings": f"nncf.compress_weights {', '.join(settings)}",
                "ir_bytes_by_type": ov_weight_precisions(out),
            },
        )

    return build


# ------------------------------------------------------------------------------------------------
# torchao (torch only: no ONNX artifact)
# ------------------------------------------------------------------------------------------------


def state_dict_bytes(model: nn.Module, modules: type[nn.Module] | None = None) -> int:
    """Bytes of `torch.save` of the model's state dict (or only of the `modules`' state dicts): what a
    torch checkpoint of it takes on disk, tensor subclasses (torchao's quantized weights) included."""
    if modules is None:
        state: Any = model.state_dict()
    else:
        state = {n: m.state_dict() for n, m in model.named_modules() if isinstance(m, modules)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def torchao_weight_only(bits: int, group_size: int | None = None) -> Callable[[Any], Made]:
    """torchao `quantize_` weight-only on every nn.Linear, in torch (fp32 activations).

    int8: `Int8WeightOnlyConfig()` (symmetric, per output channel). int4: `IntxWeightOnlyConfig(int4,
    PerGroup(g))` (symmetric): torchao 0.18's `Int4WeightOnlyConfig` needs the `mslk` GPU kernels and
    has no CPU path any more; the Intx tensor stores the int4 values unpacked in int8 and dequantizes on
    each call. Linear layers whose input width is not a multiple of the group are left in fp32 (torchao
    would assert); the counts are in `extra`.
    """

    def build(asset: Any) -> Made:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        model = copy.deepcopy(asset.model).eval()
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if bits == 8:
            config: Any = Int8WeightOnlyConfig()
            eligible: Callable[[nn.Module, str], bool] = lambda m, _: isinstance(m, nn.Linear)  # noqa: E731
        else:
            assert group_size is not None
            config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
            eligible = lambda m, _: isinstance(m, nn.Linear) and m.in_features % group_size == 0  # noqa: E731
        quantized = sum(1 for m in linears if eligible(m, ""))
        start = time.perf_counter()
        quantize_(model, config, filter_fn=eligible)
        wall = time.perf_counter() - start
        base_linear = state_dict_bytes(asset.model, nn.Linear)
        return Made(
            model=model,
            wall_s=wall,
            extra={
                "settings": f"{type(config).__name__}"
                + (f"(int4, PerGroup({group_size}), symmetric)" if bits == 4 else "()"),
                "torch_only": "torchao has no ONNX artifact: quality/fidelity on the torch model (fp32 "
                "activations), size = torch.save(state_dict) bytes vs the fp32 model's; no timing",
                "linear_layers_quantized": quantized,
                "linear_layers": len(linears),
                "state_dict_bytes": state_dict_bytes(model),
                "fp32_state_dict_bytes": state_dict_bytes(asset.model),
                "linear_size_ratio": state_dict_bytes(model, nn.Linear) / base_linear,
            },
        )

    return build


def torch_pruning(ratio: float, *, round_to: int = 8) -> Callable[[Any], Made]:
    """Torch-Pruning's `MetaPruner` (DepGraph, group L2 magnitude importance, `pruning_ratio` per layer,
    the last Linear ignored: its outputs are the model's), then the same recovery as modelpress's row:
    one epoch of cross-entropy on the asset's training split, Adam lr 1e-3, eval mode (modelpress's
    loop, so that only the pruning differs)."""

    def build(asset: Any) -> Made:
        import torch_pruning as tp

        from modelpress.data import Dataset
        from modelpress.techniques.finetune import finetune

        model = copy.deepcopy(asset.model).eval()
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(
            model,
            asset.example_inputs[0] if len(asset.example_inputs) == 1 else asset.example_inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[last],
            round_to=round_to,
        )
        pruner.step()
        with torch.enable_grad():
            finetune(
                model,
                Dataset(asset.training),
                [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-3}],
                loss="task",
                epochs=1,
                steps=None,
                teacher=None,
                owner="torch-pruning",
            )
        return Made(
            model=model.eval(),
            wall_s=time.perf_counter() - start,
            extra={
                "settings": f"MetaPruner(GroupMagnitudeImportance(p=2), pruning_ratio={ratio}, "
                f"round_to={round_to}) + 1 epoch task recovery (lr 1e-3)",
            },
        )

    return build


# ------------------------------------------------------------------------------------------------
# coremltools: k-means palettization (weight sharing) of the PyTorch model
# ------------------------------------------------------------------------------------------------


def coreml_palettize(values: int) -> Callable[[Any], Made]:
    """coremltools' `PostTrainingPalettizer` (coremltools.optimize.torch, k-means, one lookup table per
    tensor, `n_bits` = log2(values)) on every Conv/Linear, with its defaults otherwise; no data, no training.

    coremltools 9.0 installs beside our torch with `pip install --no-deps coremltools==9.0 cattrs pyaml`
    (it warns that torch 2.13 is untested; its native `libcoremlpython` is macOS-only, and the palettizer
    does not need it). Its compressed form is a Core ML model (.mlpackage, for Apple devices): on ONNX the
    palettized model is an ordinary fp32 model whose weights take `values` distinct values per tensor, so
    the row's artifact is fp32-sized, and its accuracy is what the peer's clustering keeps."""

    def build(asset: Any) -> Made:
        from coremltools.optimize.torch.palettization import (
            PostTrainingPalettizer,
            PostTrainingPalettizerConfig,
        )

        bits = values.bit_length() - 1
        if 1 << bits != values:
            raise ValueError(f"coreml_palettize: values={values} is not a power of two.")
        config = PostTrainingPalettizerConfig.from_dict(
            {"global_config": {"n_bits": bits, "granularity": "per_tensor"}}
        )
        model = copy.deepcopy(asset.model).eval()
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            palettized = PostTrainingPalettizer(model, config).compress()
        wall_s = time.perf_counter() - start
        distinct = {
            name: int(module.weight.unique().numel())
            for name, module in palettized.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        }
        return Made(
            model=palettized.eval(),
            wall_s=wall_s,
            extra={
                "settings": f"PostTrainingPalettizer(n_bits={bits}, granularity=per_tensor), defaults otherwise",
                "distinct_weight_values": distinct,
                "artifact_note": "ONNX holds the palettized weights as dense fp32 (Core ML's .mlpackage would "
                "store the lookup table and indices; ONNX Runtime / OpenVINO cannot read it)",
            },
        )

    return build


# ------------------------------------------------------------------------------------------------
# Sessions modelpress's open_session does not give: OpenVINO IR, and ONNX Runtime as a user opens it
# ------------------------------------------------------------------------------------------------
# modelpress's `open_session` reads every artifact as ONNX first (to give a clear error for a corrupt file),
# so it refuses an OpenVINO IR .xml although its OpenVinoSession compiles one as is. Until open_session
# accepts .xml for runtime "openvino", the benchmark opens IR through these.
#
# "onnxruntime-default" is ONNX Runtime as a user opens a file: `InferenceSession(path, options,
# providers=["CPUExecutionProvider"])` with every option at ONNX Runtime's defaults but the thread counts
# and idle spinning. Spinning off changes no kernel: it only stops a session's idle threads from taking
# the cores while the next variant of an interleaved round runs (MEASURING.md: +-50% spread otherwise).
# Nothing else is set: no `session.disable_quant_qdq`, the graph optimisation level ORT's default (all).

ORT_DEFAULT = "onnxruntime-default"
ORT_DEFAULT_SETTINGS = (
    "onnxruntime.InferenceSession(path, SessionOptions(), providers=['CPUExecutionProvider']) with only "
    "intra_op_num_threads=2, inter_op_num_threads=1 and session.intra_op/inter_op.allow_spinning=0 (timing "
    "hygiene, MEASURING.md) set; graph optimisation level and every other option at ONNX Runtime's defaults"
)


class PlainOrtSession:
    """ONNX Runtime as a user opens a file (see ORT_DEFAULT_SETTINGS), behind modelpress's Session interface."""

    runtime = ORT_DEFAULT

    def __init__(self, path: str | os.PathLike[str], *, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.input_shapes = [
            tuple(d if isinstance(d, int) else None for d in i.shape) for i in self._session.get_inputs()
        ]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(None, dict(zip(self.input_names, inputs, strict=True))))


def open_session(path: str | os.PathLike[str], runtime: str, *, threads: int) -> Any:
    """`mp.open_session`, plus OpenVINO IR (.xml) for runtime 'openvino' and the plain ONNX Runtime session
    for runtime 'onnxruntime-default'."""
    if runtime == ORT_DEFAULT:
        return PlainOrtSession(path, threads=threads)
    if Path(path).suffix == ".xml":
        if runtime != "openvino":
            raise ValueError(f"{path} is OpenVINO IR: only runtime 'openvino' runs it, not {runtime!r}")
        from modelpress.deploy.runtime import OpenVinoSession

        return OpenVinoSession(path, threads=threads)
    return mp.open_session(path, runtime, threads=threads)


# The memory probe imports no torch (as modelpress's own probe): only the runtime and the session class.
_PROBE = """
import json, sys, numpy as np
from modelpress.deploy.bench import process_memory_mb
path, runtime, threads, data, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
arrays = np.load(data)
inputs = [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k.split("_")[1]))]
def hwm():
    value = process_memory_mb("VmHWM")
    return float("nan") if value is None else value
before = hwm()
if runtime == "openvino":
    from modelpress.deploy.runtime import OpenVinoSession
    s = OpenVinoSession(path, threads=threads)
    run = s.run
else:  # the plain ONNX Runtime session of PlainOrtSession
    import onnxruntime as ort
    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    o.add_session_config_entry("session.inter_op.allow_spinning", "0")
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    run = lambda xs: s.run(None, dict(zip(names, xs)))
for _ in range(runs):
    run(inputs)
print(json.dumps({"peak_rss_mb": hwm(), "before_load_mb": before}))
"""


def _peak_memory_mb(
    path: str | os.PathLike[str], runtime: str, inputs: Sequence[np.ndarray], *, threads: int, runs: int
) -> dict[str, float]:
    """The same probe as modelpress.deploy.bench.peak_memory_mb, for OpenVINO IR and 'onnxruntime-default'."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "inputs.npz"
        np.savez(data, **{f"input_{i}": a for i, a in enumerate(inputs)})  # type: ignore[arg-type]
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), runtime, str(threads), str(data), str(runs)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {path} in {runtime}: {proc.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def session_support() -> Iterator[None]:
    """Let `mp.compare_artifacts` time and probe OpenVINO IR artifacts and 'onnxruntime-default' rows
    (see `open_session` above)."""
    from modelpress.deploy import bench

    original_open, original_peak = bench.open_session, bench.peak_memory_mb

    def peak(
        path: Any, runtime: str, inputs: Sequence[np.ndarray], *, threads: int = 2, runs: int = 3
    ) -> Any:
        if Path(path).suffix == ".xml" or runtime == ORT_DEFAULT:
            return _peak_memory_mb(path, runtime, inputs, threads=threads, runs=runs)
        return original_peak(path, runtime, inputs, threads=threads, runs=runs)

    bench.open_session = open_session  # type: ignore[assignment]
    bench.peak_memory_mb = peak  # type: ignore[assignment]
    try:
        yield
    finally:
        bench.open_session = original_open  # type: ignore[assignment]
        bench.peak_memory_mb = original_peak  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------
# What runs as integer (issue 31): modelpress's own check, which reads the runtime's optimised graph
# ------------------------------------------------------------------------------------------------


def integer_kernels(path: str | os.PathLike[str], runtime: str, *, threads: int = 2) -> dict[str, Any]:
    """`modelpress.deploy.integer.integer_kernels` of an artifact as a JSON-ready dict: every conv/matmul
    layer with the kernel `runtime` runs it with ("QLinearConv", "Convolution u8", "FusedConv", ...) and why
    it is not integer, the integer element-wise ops (QLinearAdd, ...), `integer` of `total`, the headline.

    ONNX Runtime: the graph a default session saves (`optimized_model_filepath`); OpenVINO: the compiled
    model's runtime graph and its layer precisions. modelpress's check reads ONNX files: an OpenVINO IR
    (.xml, NNCF's rows) is counted by `ov_ir_integer_kernels` instead.
    """
    if Path(path).suffix == ".xml":
        return ov_ir_integer_kernels(path, threads=threads)
    from modelpress.deploy.integer import integer_kernels as check

    report = check(path, runtime, threads=threads).to_dict()
    report.pop("path", None)  # a temporary file of the run
    return report


OV_LAYERS = {
    "Convolution": "conv",
    "GroupConvolution": "conv",
    "FullyConnected": "matmul",
    "MatMul": "matmul",
}


def ov_ir_integer_kernels(path: str | os.PathLike[str], *, threads: int = 2) -> dict[str, Any]:
    """The conv / matmul layers of OpenVINO's compiled runtime graph of an IR (CPU, f32 inference precision,
    no dynamic quantization: modelpress's OpenVinoSession), integer where the runtime precision is u8 / i8;
    the fields of modelpress's check that apply (`integer`, `total`, `layers`, `headline`). MatMul layers
    are products of two activations (attention) unless OpenVINO made them FullyConnected."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        str(path),
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
        },
    )
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str) if "layerType" in info else ""
        if layer_type not in OV_LAYERS:
            continue
        precision = info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        integer = precision.lower() in ("u8", "i8")
        layers.append(
            {
                "name": names.split(",")[0] or op.get_friendly_name(),
                "kernel": f"{layer_type} {precision}",
                "kind": "integer" if integer else "float",
            }
        )
    integer_count = sum(layer["kind"] == "integer" for layer in layers)
    return {
        "runtime": "openvino",
        "layers": layers,
        "integer": integer_count,
        "total": len(layers),
        "headline": f"{integer_count} of {len(layers)} conv/matmul layers run as integer in OpenVINO",
        "counted_by": "benchmarks/peers.py (OpenVINO IR)",
    }


def quantizes_activations(path: str | os.PathLike[str]) -> bool:
    """True for a static or dynamic int8 artifact: an ONNX graph with QuantizeLinear / DynamicQuantizeLinear
    or an integer-input op, or an OpenVINO IR with FakeQuantize."""
    if Path(path).suffix == ".xml":
        import openvino as ov

        return any(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(str(path)).get_ops())
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return bool(ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulIntegerToFloat", "MatMulInteger"})
