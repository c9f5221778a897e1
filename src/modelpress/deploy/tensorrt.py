"""Is a QDQ ONNX file ready for TensorRT's explicit quantization? Checked structurally (TensorRT itself
installs only from NVIDIA's index, so it is not run here).

The rules, from NVIDIA's "Explicit Quantization" guide and the ONNX-TensorRT operator matrix:
- Q/DQ are int8 (or FP8/INT4) with zero point 0: TensorRT quantizes symmetrically only, and its parser
  refuses another zero point ("TRT only supports symmetric quantization") and uint8 Q/DQ. Scales are
  positive constants.
- Activations are quantized per tensor; weights per tensor or per channel on the output-channel axis
  (Conv: 0, ConvTranspose: 1, Gemm: 0 with transB else 1, MatMul: the last axis of a weight laid out
  (in, out)), as a DequantizeLinear on a constant that feeds the layer.
- Conv, ConvTranspose, MatMul and Gemm run in int8 only when all their inputs come from a DequantizeLinear
  (through ops that commute with it: MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze); otherwise
  they run in float.
- No operator TensorRT lacks: ONNX Runtime's contrib ops (com.microsoft MatMulIntegerToFloat,
  MatMulNBits, ...), the integer-arithmetic forms (QLinear*, ConvInteger, MatMulInteger) and
  DynamicQuantizeLinear, among the few standard ops its parser has no layer for.

`export_onnx(..., target="tensorrt")` writes files that pass (`deploy.qdq.place_for_tensorrt`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelpress.deploy.qdq import _COMMUTING, _attr, _Graph, weight_axis
from modelpress.errors import ExportError

Severity = Literal["error", "fallback"]  # error: the engine build fails; fallback: the layer runs in float

PRODUCTS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_CONVS = ("Conv", "ConvTranspose")
# Integer layers in forms TensorRT does not read: counted as layers that are not quantized for it.
_OTHER_PRODUCTS = frozenset(
    {"MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul", "QGemm"}
    | {"MatMulNBits", "DynamicQuantizeMatMul", "QAttention", "FusedMatMul", "FusedConv"}
)
# Standard ONNX ops with no TensorRT layer (ONNX-TensorRT's operator matrix), with the reason a user acts on.
_UNSUPPORTED = {
    "DynamicQuantizeLinear": "scales computed at run time (dynamic int8); TensorRT takes constant Q/DQ scales "
    "only: export a static int8 model instead",
    "ConvInteger": "integer-arithmetic convolution; TensorRT reads int8 only as QuantizeLinear/DequantizeLinear",
    "MatMulInteger": "integer-arithmetic matmul; TensorRT reads int8 only as QuantizeLinear/DequantizeLinear",
    "QLinearConv": "operator-oriented int8 (QOperator); TensorRT reads int8 only as QDQ",
    "QLinearMatMul": "operator-oriented int8 (QOperator); TensorRT reads int8 only as QDQ",
    "BitShift": "no TensorRT layer",
    "ConcatFromSequence": "sequence ops have no TensorRT layer",
    "SequenceAt": "sequence ops have no TensorRT layer",
    "SequenceConstruct": "sequence ops have no TensorRT layer",
    "SequenceEmpty": "sequence ops have no TensorRT layer",
    "SequenceErase": "sequence ops have no TensorRT layer",
    "SequenceInsert": "sequence ops have no TensorRT layer",
    "SequenceLength": "sequence ops have no TensorRT layer",
    "SplitToSequence": "sequence ops have no TensorRT layer",
    "StringNormalizer": "string ops have no TensorRT layer",
    "TfIdfVectorizer": "string ops have no TensorRT layer",
    "MaxRoiPool": "no TensorRT layer",
    "Multinomial": "no TensorRT layer",
}
_STANDARD_DOMAINS = ("", "ai.onnx")
# Q/DQ types TensorRT takes (numpy names as onnx reads them): int8 here; FP8 and INT4 on newer GPUs.
_QUANTIZED_TYPES = frozenset({"int8", "float8_e4m3fn", "int4"})


@dataclass(frozen=True)
class Finding:
    """One node TensorRT would refuse (`error`) or run in float (`fallback`), and why."""

    node: str
    op_type: str
    severity: Severity
    reason: str

    def line(self) -> str:
        return f"{self.severity}: {self.op_type} '{self.node}': {self.reason}"


@dataclass
class TensorRTReport:
    """What `check_tensorrt` found: per-node findings and how many int8-capable layers are quantized."""

    path: str
    quantized: int  # Conv/ConvTranspose/MatMul/Gemm whose inputs and weights are all int8 as TensorRT wants
    layers: int  # all Conv/ConvTranspose/MatMul/Gemm
    findings: list[Finding] = field(default_factory=list)
    quantized_graph: bool = True  # False: no Q/DQ at all (TensorRT builds it in float)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def summary(self) -> str:
        return f"{self.quantized} of {self.layers} Conv/MatMul/Gemm quantized"

    def lines(self) -> list[str]:
        head = f"{Path(self.path).name}: {self.summary}"
        if not self.quantized_graph:
            head += " (no Q/DQ: TensorRT builds it in fp32/fp16; export a static int8 model for int8)"
        errors = len(self.errors)
        tail = (
            "TensorRT-ready: no findings"
            if self.ok
            else f"{errors} error(s), {len(self.findings) - errors} fallback(s)"
        )
        return [head, *(f.line() for f in self.findings), tail]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary, "ok": self.ok}


def _name(node: Any) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def check_tensorrt(path: str | os.PathLike[str] | Any) -> TensorRTReport:
    """Name every node of an ONNX file (or `onnx.ModelProto`) that TensorRT's explicit quantization would
    refuse or run in float, and count the int8 layers (see the module doc for the rules).

    >>> report = check_tensorrt("model.trt.onnx")  # doctest: +SKIP
    >>> report.summary, report.ok
    ('7 of 7 Conv/MatMul/Gemm quantized', True)
    """
    import onnx

    if isinstance(path, onnx.ModelProto):
        model, where = path, "<model>"
    else:
        where = str(path)
        if not Path(where).is_file():
            raise ExportError(
                f"'{where}' does not exist. Export it first: export_onnx(..., target='tensorrt')."
            )
        try:
            model = onnx.load(where, load_external_data=False)
        except Exception as exc:
            raise ExportError(f"'{where}' is not a readable ONNX file ({type(exc).__name__}).") from exc
    return _check(model, where)


def _check(model: Any, where: str) -> TensorRTReport:

    graph = model.graph
    g = _Graph(graph)
    inputs = {i.name for i in graph.input} - set(g.initializers)
    findings: list[Finding] = []
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
    quantized_graph = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)

    bad: set[str] = set()  # outputs of quantizers with an error: the layers they feed are not int8

    def add(node: Any, severity: Severity, reason: str) -> None:
        findings.append(Finding(_name(node), node.op_type, severity, reason))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            bad.add(node.output[0])

    def constant(name: str) -> bool:
        return name in g.initializers or name in g._constants

    # Unsupported operators.
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            add(
                node,
                "error",
                f"custom operator {node.domain}.{node.op_type} (ONNX Runtime's contrib ops are not ONNX): "
                "TensorRT has no layer for it without a plugin; export with target='tensorrt' "
                "(integer_matmul off) for standard QDQ",
            )
        elif node.op_type in _UNSUPPORTED or node.op_type.startswith("QLinear"):
            reason = _UNSUPPORTED.get(
                node.op_type, "operator-oriented int8 (QOperator); TensorRT reads QDQ only"
            )
            add(node, "error", f"TensorRT has no layer for {node.op_type}: {reason}")

    # Quantizers: int8, zero point 0, positive constant scales.
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in _STANDARD_DOMAINS:
            continue
        scale = g.value(node.input[1]) if len(node.input) > 1 else None
        zero = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            add(node, "error", f"scale '{node.input[1]}' is not a constant: TensorRT needs constant scales")
            continue
        if not (scale > 0).all():
            add(node, "error", f"scale '{node.input[1]}' has values <= 0: TensorRT needs positive scales")
        if len(node.input) > 2 and node.input[2] and zero is None:
            add(node, "error", f"zero point '{node.input[2]}' is not a constant")
            continue
        codes = g.value(node.input[0]) if node.op_type == "DequantizeLinear" else None
        dtype = zero.dtype if zero is not None else (codes.dtype if codes is not None else None)
        if dtype is not None and dtype.name not in _QUANTIZED_TYPES:
            add(
                node,
                "error",
                f"{dtype} quantization: TensorRT's Q/DQ take int8 (zero point 0), not {dtype}; "
                "re-export with target='tensorrt'",
            )
        elif zero is not None and zero.any():
            add(
                node,
                "error",
                f"zero point {_values(zero)} is not 0: TensorRT quantizes symmetrically only (its parser "
                "asserts 'zeroPt must be all zeros'); re-export with target='tensorrt'",
            )
        if scale.size > 1 and opset < 13:
            add(node, "error", f"per-channel scales need opset >= 13 (the file has opset {opset})")
        if node.op_type == "QuantizeLinear" and not constant(node.input[0]) and scale.size > 1:
            add(
                node,
                "error",
                "per-channel activation quantizer: TensorRT quantizes int8 activations per tensor",
            )

    # Layers: int8 only where every input comes from a DequantizeLinear.
    layers = quantized = 0
    for node in graph.node:
        if node.op_type in _OTHER_PRODUCTS:
            layers += 1  # named above as unsupported
            continue
        if node.op_type not in PRODUCTS or node.domain not in _STANDARD_DOMAINS:
            continue
        layers += 1
        before = len(findings)
        feeds: list[str] = []  # the DequantizeLinear outputs the layer reads
        for index, name in enumerate(node.input[:2]):
            dq = g.producer.get(name)
            weight_dq = dq is not None and dq.op_type == "DequantizeLinear" and constant(dq.input[0])
            if constant(name) or weight_dq or (index == 1 and node.op_type in _CONVS):
                if quantized_graph:
                    _check_weight(g, node, index, name, add)
                feeds.append(name)
            else:
                source = dq
                while (
                    source is not None
                    and source.op_type in _COMMUTING
                    and source.domain in _STANDARD_DOMAINS
                    and len(source.output) == 1
                ):
                    source = g.producer.get(source.input[0])
                if source is not None and source.op_type == "DequantizeLinear" and constant(source.input[0]):
                    add(
                        node,
                        "fallback",
                        f"weight '{source.input[0]}' reaches the layer through {dq.op_type if dq else '?'}: "
                        "TensorRT wants a weight's DequantizeLinear to feed the layer directly, or the layer "
                        "may run in float; store it (in, out) with per-channel axis 1 (target='tensorrt' does)",
                    )
                elif source is not None and source.op_type == "DequantizeLinear":
                    feeds.append(source.output[0])
                elif quantized_graph:
                    came = (
                        "a graph input"
                        if name in inputs
                        else f"a {source.op_type}"
                        if source
                        else "a constant"
                    )
                    add(
                        node,
                        "fallback",
                        f"input '{name}' is float (it comes from {came}, not a DequantizeLinear): "
                        "the layer runs in float",
                    )
        if quantized_graph and len(findings) == before and not bad.intersection(feeds):
            quantized += 1
    return TensorRTReport(where, quantized, layers, findings, quantized_graph)


def _computed_from_constants(g: _Graph, name: str, limit: int = 32) -> list[str]:
    """The op types of the subgraph computing `name` when all its leaves are constants (a constant
    expression), else []."""
    ops: list[str] = []
    stack, seen = [name], set()
    while stack:
        current = stack.pop()
        if current in seen or g.value(current) is not None or current in g.initializers:
            continue
        seen.add(current)
        node = g.producer.get(current)
        if node is None or len(seen) > limit:
            return []  # a graph input, or too deep to call it a constant
        if node.op_type != "Constant":
            ops.append(node.op_type)
        stack.extend(i for i in node.input if i)
    return sorted(set(ops))


def _check_weight(g: _Graph, node: Any, index: int, name: str, add: Any) -> None:
    dq = g.producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        came = "a float constant" if dq is None else f"computed by a {dq.op_type}"
        add(
            node,
            "fallback",
            f"weight '{name}' is {came}, not a DequantizeLinear of int8 codes: the layer runs in float",
        )
        return
    codes, scale = g.value(dq.input[0]), g.value(dq.input[1])
    if codes is None or scale is None:
        missing = dq.input[0] if codes is None else dq.input[1]
        ops = _computed_from_constants(g, missing)
        if ops:  # e.g. a clustered layer's codebook lookup: constant, but computed
            add(
                node,
                "error",
                f"weight '{missing}' is computed from constants ({', '.join(ops)}: a clustered layer's "
                "codebook lookup?); TensorRT takes a DequantizeLinear weight only as an initializer: fold "
                "the constants first (`polygraphy surgeon sanitize --fold-constants`), which stores the "
                "layer as plain int8 codes, or leave clustering out of a model for TensorRT",
            )
        else:
            add(node, "error", f"weight '{missing}' is not a constant: TensorRT needs constant weights")
        return
    axis = weight_axis(node, index, codes.ndim)
    if scale.size > 1 and axis is not None:
        got = _attr(dq, "axis", 1) % codes.ndim
        if got != axis:
            add(
                node,
                "error",
                f"weight '{dq.input[0]}' {tuple(codes.shape)} is quantized per channel on axis {got}; TensorRT "
                f"wants the output-channel axis {axis} for {node.op_type}",
            )
        elif scale.size != codes.shape[axis]:
            add(
                node,
                "error",
                f"weight '{dq.input[0]}' has {scale.size} scales for {codes.shape[axis]} channels",
            )


def _values(array: Any) -> str:
    flat = array.reshape(-1)
    shown = ", ".join(str(int(v)) for v in flat[:4])
    return f"[{shown}{', ...' if flat.size > 4 else ''}]" if array.ndim else shown
