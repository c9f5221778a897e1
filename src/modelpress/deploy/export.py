"""Export to ONNX through torch.export (the dynamo exporter), with dynamic batch and sequence dims.

The legacy TorchScript exporter silently produced wrong transformer outputs under transformers 5.x (see
MEASURING.md), so only the dynamo path is used, and every export is meant to be followed by a parity check.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from modelpress._files import check_output_path
from modelpress.deploy.qdq import (
    TARGETS,
    Target,
    channels_last_flatten,
    fuse_integer_matmuls,
    guard_reductions,
    hoist_quantizers,
    onnxruntime_plan,
    openvino_plan,
    pad_conv_channels,
    place_for_onnxruntime,
    place_for_openvino,
    place_for_tensorrt,
    quantizes_activations,
    space_to_depth_stems,
    tensorrt_plan,
    unfuse_residual_layernorm,
    write_target,
)
from modelpress.errors import ExportError
from modelpress.loading import Inputs, as_inputs
from modelpress.outputs import FlatOutputs, named_outputs, no_cache

log = logging.getLogger(__name__)


def _is_token_input(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.ndim >= 2


def dynamic_shapes_for(inputs: Inputs) -> tuple[dict[int, Any], ...]:
    """Dim 0 of every input is the batch; dim 1 of integer (token id / mask) inputs is the sequence.

    Dim.AUTO lets tracing fix a dim the model really specialises on (some LSTM decompositions fix the
    sequence length); `export_onnx` then warns, naming the input and dim, rather than failing.
    """
    dynamic = torch.export.Dim.AUTO
    shapes = []
    for t in inputs:
        dims: dict[int, Any] = {0: dynamic} if t.ndim >= 1 else {}
        if _is_token_input(t):
            dims[1] = dynamic
        shapes.append(dims)
    return tuple(shapes)


def _widen(inputs: Inputs) -> Inputs:
    # torch.export specialises a dimension of size 1 to a constant; trace with size >= 2 so it stays dynamic.
    out = []
    for t in inputs:
        if t.ndim >= 1 and t.shape[0] == 1:
            t = t.repeat(2, *([1] * (t.ndim - 1)))
        if _is_token_input(t) and t.shape[1] == 1:
            t = t.repeat(1, 2, *([1] * (t.ndim - 2)))
        out.append(t)
    return tuple(out)


def _contrib_schema(name: str, inputs: list[str], attributes: list[str]) -> Any:
    from onnx.defs import OpSchema

    def formal(i: int, n: str) -> OpSchema.FormalParameter:
        # The first three inputs are required, the zero points optional.
        option = OpSchema.FormalParameterOption.Optional if i >= 3 else OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(n, f"T{i}", param_option=option)

    return OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=[formal(i, n) for i, n in enumerate(inputs)],
        outputs=[OpSchema.FormalParameter("Y", "TY")],
        type_constraints=[
            *[
                (f"T{i}", ["tensor(float)", "tensor(uint8)", "tensor(int64)", "tensor(int32)"], "")
                for i in range(len(inputs))
            ],
            ("TY", ["tensor(float)"], ""),
        ],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attributes],
    )


@functools.cache
def _translations() -> dict[Any, Any]:
    """ONNX for modelpress's own torch ops: ONNX Runtime contrib ops that OpenVINO also executes (built once:
    the exporter only reads the table)."""
    import onnxscript
    from onnxscript import opset18 as op

    import modelpress.ops.dynamic
    import modelpress.ops.nbits  # noqa: F401  (registers torch.ops.modelpress.*)

    msft = onnxscript.values.Opset("com.microsoft", 1)
    # The onnx package has no schemas for ONNX Runtime's contrib ops; the exporter needs one to tell inputs
    # from attributes, so describe the parts we use.
    matmul_op = onnxscript.values.Op(
        msft,
        "MatMulNBits",
        _contrib_schema("MatMulNBits", ["A", "B", "scales", "zero_points"], ["K", "N", "bits", "block_size"]),
    )
    gather_op = onnxscript.values.Op(
        msft,
        "GatherBlockQuantized",
        _contrib_schema(
            "GatherBlockQuantized",
            ["data", "indices", "scales", "zero_points"],
            ["bits", "block_size", "gather_axis", "quantize_axis"],
        ),
    )

    def matmul_nbits(
        x: Any, packed: Any, scales: Any, zero_points: Any, bias: Any, k: int, bits: int, block_size: int
    ) -> Any:
        # accuracy_level 0: fp32 maths on dequantized blocks, what the torch op computes (level 4 would
        # quantize activations to int8 and change the numbers).
        y = matmul_op(
            x, packed, scales, zero_points, K=k, N=packed.shape[0], bits=bits, block_size=block_size
        )
        return y if bias is None else op.Add(y, bias)

    def gather_nbits(
        indices: Any, packed: Any, scales: Any, zero_points: Any, bits: int, block_size: int
    ) -> Any:
        return gather_op(
            packed,
            indices,
            scales,
            zero_points,
            bits=bits,
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        )

    def dynamic_quant_linear(x: Any, qweight: Any, weight_scale: Any, bias: Any) -> Any:
        # The pattern ONNX Runtime's quantize_dynamic writes and fuses into DynamicQuantizeMatMul.
        xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(xq, op.Transpose(qweight, perm=[1, 0]), x_zero_point)
        y = op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, weight_scale))
        return y if bias is None else op.Add(y, bias)

    return {
        torch.ops.modelpress.dynamic_quant_linear.default: dynamic_quant_linear,
        torch.ops.modelpress.matmul_nbits.default: matmul_nbits,
        torch.ops.modelpress.gather_nbits.default: gather_nbits,
    }


def _warn_static_dims(program: Any, inputs: Inputs) -> None:
    graph_inputs = list(program.model.graph.inputs)
    for value, wanted in zip(graph_inputs, dynamic_shapes_for(inputs), strict=False):
        shape = value.shape
        if shape is None:
            continue
        for dim in wanted:
            if dim < len(shape) and isinstance(shape[dim], int):
                role = "batch" if dim == 0 else "sequence"
                log.warning(
                    "input '%s': dim %d (%s) was fixed to %d by tracing because the model specialises on it; "
                    "the artifact accepts only that size there.",
                    value.name,
                    dim,
                    role,
                    shape[dim],
                )


CALIBRATION_BATCHES = 32  # items of `data` that calibrate the outputs an ONNX Runtime placement quantizes


def _calibration_samples(data: Iterable[Any] | None, example_inputs: Inputs) -> list[Inputs]:
    if data is not None:
        samples = [
            as_inputs(item, where="calibration item")
            for item in itertools.islice(iter(data), CALIBRATION_BATCHES)
        ]
        if samples:
            return samples
    from modelpress.deploy.parity import parity_inputs

    log.warning(
        "export for ONNX Runtime without calibration data: the ranges of the layer outputs it quantizes "
        "come from the example inputs and perturbations of them. Pass data (export_onnx(..., data=...), "
        "`modelpress export --data`) for ranges that cover real inputs."
    )
    return parity_inputs(example_inputs, count=8)


def _output_ranges(
    model: Any, path: Path, names: list[str], samples: list[Inputs]
) -> dict[str, tuple[float, float]]:
    """(min, max) of the float tensors `names` over `samples`, run in ONNX Runtime with those tensors as
    extra graph outputs (what ONNX Runtime's own calibrators do), on the graph as placed for OpenVINO."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names if n not in known
    )
    probe_path = path.with_name(f"{path.stem}.calibration.onnx")  # beside it: external data resolves
    onnx.save(probe, str(probe_path))
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
    finally:
        probe_path.unlink(missing_ok=True)
    inputs = session.get_inputs()
    lo = dict.fromkeys(names, np.inf)
    hi = dict.fromkeys(names, -np.inf)
    used = 0
    for sample in samples:
        if len(sample) != len(inputs) or any(
            len(i.shape) != t.ndim
            or any(isinstance(d, int) and d != n for d, n in zip(i.shape, t.shape, strict=True))
            for i, t in zip(inputs, sample, strict=False)
        ):
            continue  # a static artifact takes only its own shapes
        feed = {i.name: t.detach().cpu().numpy() for i, t in zip(inputs, sample, strict=True)}
        for name, value in zip(names, session.run(names, feed), strict=True):
            if value.size:
                lo[name] = min(lo[name], float(value.min()))
                hi[name] = max(hi[name], float(value.max()))
        used += 1
    if not used:
        raise ExportError(
            f"None of the {len(samples)} calibration items fits the exported model's inputs "
            f"{[(i.name, i.shape) for i in inputs]}; give data of those shapes."
        )
    missing = [n for n in names if not np.isfinite(lo[n])]
    if missing:
        raise ExportError(f"Calibration produced no values for {missing}; give non-empty calibration data.")
    return {n: (lo[n], hi[n]) for n in names}


def _postprocess(
    path: Path,
    *,
    integer_matmul: bool = True,
    target: Target = "openvino",
    calibration: Callable[[], list[Inputs]] | None = None,
    data_given: bool = False,
) -> None:
    """Drop the exporter's per-node stack traces and doc strings (they are not part of the model and can
    be a quarter of a small model's file), and move activation quantizers above the ops that commute with
    them (`deploy.qdq.hoist_quantizers`), so that runtimes fuse them into the layer that produces them.
    For `target="onnxruntime"`, quantize layer outputs too (`deploy.qdq.place_for_onnxruntime`), with the
    ranges it needs measured on `calibration()`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def clean(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    clean(attr.g)
                for g in attr.graphs:
                    clean(g)
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            del value.metadata_props[:]
        for init in graph.initializer:
            del init.metadata_props[:]

    clean(model.graph)
    for fn in model.functions:
        for node in fn.node:
            del node.metadata_props[:]
    model.doc_string = ""
    moves = hoist_quantizers(model)
    # Only a quantized graph is placed: an fp32 (or weight-only) file stays as it is.
    if target == "onnxruntime" and quantizes_activations(model):
        plan = onnxruntime_plan(model)
        needs = [name for name, reuse in plan.items() if reuse is None]
        ranges: dict[str, tuple[float, float]] = {}
        if needs:
            ranges = _output_ranges(model, path, needs, calibration() if calibration is not None else [])
        placed = place_for_onnxruntime(model, ranges)
        placed["space_to_depth"] = space_to_depth_stems(model)
        placed["padded_convs"] = pad_conv_channels(model)
        log.debug("placed quantizers for ONNX Runtime: %s", placed)
    # Without data the OpenVINO file keeps its quantizers at layer inputs (ranges from the example alone
    # could clip real inputs; ONNX Runtime's placement needs them, OpenVINO's is a speed-up).
    if target == "openvino" and data_given and calibration is not None and quantizes_activations(model):
        plan = openvino_plan(model)
        needs = [name for name, reuse in plan.items() if reuse is None]
        ranges = {}
        if needs:
            ranges = _output_ranges(model, path, needs, calibration())
        placed = place_for_openvino(model, ranges)
        moves += hoist_quantizers(model)  # a pool whose only reader is now a quantizer runs on its codes
        log.debug("placed quantizers for OpenVINO: %s", placed)
    if target == "onnxruntime":
        unfused = unfuse_residual_layernorm(model)
        if unfused:
            log.debug("wrote %d residual Add(s) before LayerNormalization as Sum for ONNX Runtime", unfused)
    if target == "tensorrt":  # symmetric int8 Q/DQ only (deploy.qdq.place_for_tensorrt)
        needs = tensorrt_plan(model)  # attention's activation x activation MatMul inputs
        ranges = _output_ranges(model, path, needs, calibration() if calibration else []) if needs else {}
        log.debug("placed quantizers for TensorRT: %s", place_for_tensorrt(model, ranges))
    write_target(model, target)
    guarded = guard_reductions(model)
    if guarded:
        log.debug("guarded %d reduction(s) after int8 products against OpenVINO's LP rewrite", guarded)
    if moves:
        log.debug("moved %d activation quantizer(s) above MaxPool/reshape-like ops", moves)
    if integer_matmul and target != "tensorrt":  # TensorRT has no MatMulIntegerToFloat
        fused = fuse_integer_matmuls(model)
        if fused:
            log.debug("wrote %d int8 MatMul/Gemm layer(s) as MatMulIntegerToFloat with their bias", fused)
            flattened = channels_last_flatten(model)
            if flattened:
                log.debug("flattened %d int8 feature map(s) channels-last into their MatMul", flattened)
    onnx.save(model, str(path))


# Layers whose weight is rebuilt in the graph from a compact form: the exporter's constant folding would
# store the dense weight in the file (it folds inputs up to 8,192 elements, whole small layers).
_UNFOLDED_SCOPES = ("modelpress.techniques.quantized.SparseLayer",)
_SHAPE_SIZED = 64  # inputs this small are shapes and scalars: folding them is fine
_CODES = ("INT8", "UINT8", "INT4", "UINT4")  # quantized weights' storage types


def _should_fold(node: Any) -> bool | None:
    source = node.inputs[0].const_value if node.op_type == "Cast" and node.inputs else None
    if source is not None and source.dtype.name in _CODES and source.size > 1:
        return False  # int8 weight codes, zero points -> float (weight-only layers): the file keeps the codes
    hierarchy = node.metadata_props.get("pkg.torch.onnx.class_hierarchy", "")
    if not any(scope in hierarchy for scope in _UNFOLDED_SCOPES):
        return None  # the optimizer's own rules
    for value in node.inputs:
        if value is None:
            continue
        shape = value.shape
        if shape is None or not shape.is_static() or math.prod(int(d) for d in shape) > _SHAPE_SIZED:
            return False
    return None


def _optimize(model: Any) -> None:
    """The exporter's `optimize=True` (onnxscript's optimize_ir, then its ONNX fusions), with the weights
    of `_UNFOLDED_SCOPES` left as the graph that rebuilds them."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(model, should_fold=_should_fold)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _input_names(model: nn.Module, count: int) -> list[str] | None:
    """The forward's parameter names for `count` positional inputs (input_ids, attention_mask, ...), which
    the exporter would otherwise lose behind a wrapper; None when the forward takes *args."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < count:
        return None
    return [p.name for p in positional[:count]]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _cause(exc: BaseException) -> str:
    """The deepest cause of an export failure, first line, without the exporter's terminal colours: the
    exporter's own message only says which of its steps failed."""
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    text = _ANSI.sub("", str(inner)).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def _dynamic_plans(inputs: Inputs) -> list[tuple[str, tuple[dict[int, Any], ...] | None]]:
    """Shapes to try, most dynamic first: batch and sequence, batch only, all static."""
    full = dynamic_shapes_for(inputs)
    batch_only = tuple({d: v for d, v in dims.items() if d == 0} for dims in full)
    plans: list[tuple[str, tuple[dict[int, Any], ...] | None]] = [("batch and sequence", full)]
    if batch_only != full:
        plans.append(("batch", batch_only))
    if any(full):
        plans.append(("static", None))
    return plans


def traceable(model: nn.Module, example_inputs: Inputs) -> tuple[nn.Module, list[str]]:
    """The module to trace (`model`, or `FlatOutputs(model)` when it returns a tuple, dict or ModelOutput)
    and its output names; a clear error when the model fails on the example inputs or returns no tensor."""
    try:
        sample = model(*example_inputs)
    except Exception as exc:
        described = ", ".join(
            f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in example_inputs
        )
        raise ExportError(
            f"{type(model).__name__} fails on the example inputs [{described}] before export "
            f"({_cause(exc)}). Give example inputs of the shapes and dtypes its forward expects."
        ) from exc
    names = [name for name, _ in named_outputs(sample)]
    if not names:
        raise ExportError(
            f"{type(model).__name__} returned {type(sample).__name__}, which holds no tensor to export. "
            "Return a tensor, a tuple/dict of tensors or a ModelOutput."
        )
    return (model if isinstance(sample, torch.Tensor) else FlatOutputs(model)), names


def trace_plans(
    model: nn.Module,
    traced: nn.Module,
    example_inputs: Inputs,
    plans: Sequence[tuple[str, Any]],
    trace: Callable[[Inputs, Any], Any],
    *,
    what: str,
) -> tuple[Any, str, list[str]]:
    """`trace(inputs, dynamic_shapes)` with each plan of dynamic shapes in turn, most dynamic first, until
    one works: (program, the plan's label, the failures before it). A fallback is logged; when every plan
    fails, the error names the first and last causes."""
    failures: list[str] = []
    for label, shapes in plans:
        inputs = _widen(example_inputs) if shapes is not None else example_inputs
        if shapes is not None and traced is not model:
            shapes = (shapes,)  # FlatOutputs.forward(*args): the inputs are one tuple argument
        try:
            program = trace(inputs, shapes)
        except Exception as exc:
            failures.append(f"{label}: {_cause(exc)}")
            log.debug("export with dynamic %s failed", label, exc_info=True)
            continue
        if failures:
            log.warning(
                "%s: export with dynamic %s failed (%s); exported with %s dims instead.",
                type(model).__name__,
                plans[0][0],
                failures[0],
                "a dynamic batch" if label == "batch" else "static",
            )
        return program, label, failures
    raise ExportError(
        f"{what} of {type(model).__name__} failed: {failures[-1]}"
        + (f" (with dynamic shapes: {failures[0]})" if len(failures) > 1 else "")
        + ". torch.export must be able to trace the model: avoid data-dependent Python control flow on "
        "tensor values in forward and return tensors, tuples, dicts or ModelOutputs."
    )


def dynamic_axes(path: str | os.PathLike[str]) -> dict[str, dict[int, str]]:
    """Which axes of each graph input of an ONNX file are dynamic: {input: {axis: symbol}}.

    >>> dynamic_axes("model.onnx")  # doctest: +SKIP
    {'input_ids': {0: 'batch', 1: 'sequence'}}
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    out: dict[str, dict[int, str]] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        out[value.name] = {
            i: d.dim_param for i, d in enumerate(dims) if d.dim_param or not d.HasField("dim_value")
        }
    return out


@contextlib.contextmanager
def _exportable_experts(model: nn.Module) -> Iterator[None]:
    """Hugging Face mixture-of-experts layers default to a grouped-matmul kernel (a custom op with no ONNX
    form); within this context they run as batched matmuls over each token's selected experts, which
    export as Gather + MatMul with the same result."""
    configs: list[Any] = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) == "grouped_mm" and config not in configs:
            configs.append(config)
    for config in configs:
        config._experts_implementation = "batched_mm"
    try:
        yield
    finally:
        for config in configs:
            config._experts_implementation = "grouped_mm"


def export_onnx(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    overwrite: bool = False,
    opset: int | None = None,
    integer_matmul: bool = True,
    target: Target = "openvino",
    data: Iterable[Any] | None = None,
) -> Path:
    """Export `model` to an ONNX file at `path`, written atomically (with external data if > 2 GB).

    Any model that torch.export can trace: outputs may be tensors, tuples, dicts or Hugging Face
    `ModelOutput`s (the graph's outputs take their names, `logits`, `last_hidden_state`, ...; caches are
    turned off and left out), inputs take the forward's parameter names. With `dynamic`, the batch dim of
    every input (and the sequence dim of token inputs) is dynamic where the model allows it: if tracing
    fails that way, the export falls back to a dynamic batch only, then to static shapes, and says so;
    `dynamic_axes(path)` tells which axes stayed dynamic.

    Statically quantized Linear layers (int8 weights, quantized input) are written as ONNX Runtime's
    `com.microsoft.MatMulIntegerToFloat` with the bias fused (`deploy.qdq.fuse_integer_matmuls`), which
    ONNX Runtime and OpenVINO execute; `integer_matmul=False` keeps them as standard-ONNX QDQ
    (QuantizeLinear / DequantizeLinear around MatMul) for other runtimes.

    `target` is the runtime the quantizers are placed for, recorded in the file's metadata
    (`modelpress.target`). "openvino": on layer inputs only, as NNCF places them. "onnxruntime": layer
    outputs, residual adds, concats and global pools too, as ONNX Runtime needs them to run integer kernels
    (QLinearConv, QLinearAdd, ...; see `deploy.qdq.place_for_onnxruntime`); the ranges of outputs no
    quantizer covers yet are measured in ONNX Runtime on up to 32 items of `data` (the calibration data:
    tensors or tuples of tensors as the forward takes), else on the example inputs with a warning.

    >>> export_onnx(model, (torch.randn(1, 3, 32, 32),), "model.onnx")  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise ExportError(f"target={target!r} is unknown; choose from {', '.join(TARGETS)}.")
    out = check_output_path(path, overwrite=overwrite)
    program = _program(model, example_inputs, dynamic=dynamic, opset=opset)
    return _save(program, out, example_inputs, integer_matmul=integer_matmul, target=target, data=data)


def _program(model: nn.Module, example_inputs: Inputs, *, dynamic: bool, opset: int | None) -> Any:
    """The traced, optimised ONNX program (not yet placed for a runtime), with the dynamic-shape fallbacks
    `export_onnx` describes."""
    model = model.eval()
    with no_cache(model), _exportable_experts(model), torch.no_grad():
        traced, names = traceable(model, example_inputs)
        kwargs: dict[str, Any] = {
            "dynamo": True,
            "verbose": False,
            "optimize": False,  # done below, as the exporter would, except for sparse weights
            "custom_translation_table": _translations(),
            "output_names": names if len(set(names)) == len(names) else None,
            "input_names": _input_names(model, len(example_inputs)),
        }
        if opset is not None:
            kwargs["opset_version"] = opset
        plans: list[tuple[str, Any]] = _dynamic_plans(example_inputs) if dynamic else [("static", None)]
        program, _, failures = trace_plans(
            model,
            traced,
            example_inputs,
            plans,
            lambda inputs, shapes: _trace(traced, inputs, {**kwargs, "dynamic_shapes": shapes}),
            what="ONNX export",
        )
    _optimize(program.model)
    if dynamic and not failures:
        _warn_static_dims(program, example_inputs)
    return program


def _save(
    program: Any,
    out: Path,
    example_inputs: Inputs,
    *,
    integer_matmul: bool,
    target: Target,
    data: Iterable[Any] | None,
) -> Path:
    """Write `program` to `out` placed for `target`, atomically (the program itself is left as it is, so
    one trace can be saved for several runtimes)."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        program.save(str(tmp_dir / out.name))
        _postprocess(
            tmp_dir / out.name,
            integer_matmul=integer_matmul,
            target=target,
            calibration=lambda: _calibration_samples(data, example_inputs),
            data_given=data is not None,
        )
        for produced in sorted(tmp_dir.iterdir()):
            # The main file goes last, so an interrupted save never leaves a .onnx without its data.
            if produced.name != out.name:
                os.replace(produced, out.parent / produced.name)
        os.replace(tmp_dir / out.name, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("exported %s", out)
    return out


def has_activation_quantizers(path: str | os.PathLike[str]) -> bool:
    """Whether an ONNX file quantizes activations with QuantizeLinear (static int8): the files whose
    quantizer placement differs by target runtime."""
    import onnx

    return quantizes_activations(onnx.load(str(path), load_external_data=False))


def export_for_runtimes(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    runtimes: Sequence[str],
    *,
    target: Target | Literal["auto"] = "auto",
    data: Iterable[Any] | None = None,
) -> dict[str, Path]:
    """Export `model` for each runtime in `runtimes`: {runtime: its file}.

    With `target="auto"` the file at `path` is placed for ONNX Runtime when it is one of the runtimes (else
    for OpenVINO), and where the other runtime would run it differently (a file with activation quantizers)
    a second file `<stem>.openvino.onnx` is placed for OpenVINO: ONNX Runtime's placement quantizes layer
    outputs and attention's Q and K, which OpenVINO runs 4% slower (MiniLM b16, measured). A named target
    gives one file for every runtime.

    >>> export_for_runtimes(model, inputs, "out/model.onnx", ["onnxruntime", "openvino"])  # doctest: +SKIP
    {'onnxruntime': PosixPath('out/model.onnx'), 'openvino': PosixPath('out/model.openvino.onnx')}
    """
    from modelpress.data import as_dataset

    data = as_dataset(data)  # iterated once per export
    if target != "auto":
        one = export_onnx(model, example_inputs, path, target=target, data=data)
        return dict.fromkeys(runtimes, one)
    first: Target = "onnxruntime" if "onnxruntime" in runtimes or not runtimes else "openvino"
    out = check_output_path(path)
    program = _program(model, example_inputs, dynamic=True, opset=None)  # traced once for both placements
    main = _save(program, out, example_inputs, integer_matmul=True, target=first, data=data)
    paths = dict.fromkeys(runtimes, main)
    if first == "onnxruntime" and "openvino" in runtimes and has_activation_quantizers(main):
        other = check_output_path(main.with_name(f"{main.stem}.openvino.onnx"))
        paths["openvino"] = _save(
            program, other, example_inputs, integer_matmul=True, target="openvino", data=data
        )
    return paths


_TORCHLIB: dict[int, Any] = {}  # opset -> the exporter's registry of torchlib translations, built once


@contextlib.contextmanager
def _torchlib_once() -> Iterator[None]:
    """Every `torch.onnx.export` call rebuilds its registry of ATen -> ONNX translations from torchlib (~2 s
    here, a quarter of a small model's export). Within this context it is built once per opset and each
    export gets a copy (the custom translations are then registered into the copy, as usual)."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_type = _registration.ONNXRegistry
        build = registry_type.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):  # another torch: export as it comes
        yield
        return

    def from_torchlib(cls: type, opset_version: int = registry_type().opset_version) -> Any:
        if opset_version not in _TORCHLIB:
            _TORCHLIB[opset_version] = build.__func__(cls, opset_version=opset_version)
        base = _TORCHLIB[opset_version]
        registry = cls()
        registry.__dict__.update(base.__dict__)
        registry.functions = {target: list(metas) for target, metas in base.functions.items()}
        return registry

    registry_type.from_torchlib = classmethod(from_torchlib)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        registry_type.from_torchlib = build  # type: ignore[method-assign]


def _trace(model: nn.Module, inputs: Inputs, kwargs: dict[str, Any]) -> Any:
    captured = io.StringIO()
    # The exporter logs a warning per torchvision op it cannot register when torchvision is absent.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # The exporter prints progress and warns about optional packages; keep the user's terminal clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(captured), _torchlib_once():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, **kwargs)
    if program is None:
        raise ExportError("torch.onnx.export returned no program; update torch/onnxscript.")
    return program
