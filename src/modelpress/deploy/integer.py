"""What really runs as integer: each conv/matmul layer of an artifact, as the runtime executes it.

A QDQ file says which layers *may* run as int8; the runtime decides. ONNX Runtime forms an integer kernel
(`QLinearConv`, `QLinearMatMul`, ...) only around a whole `DQ -> op -> Q` pattern and runs the rest as fp32
behind `DequantizeLinear`; OpenVINO's low-precision transformations take a layer as int8 when its input
is quantized. So the answer is read from the runtime, not assumed from the file:

* ONNX Runtime: the graph a default `InferenceSession` saves (`SessionOptions.optimized_model_filepath`,
  default graph optimisations), which is the graph that runs;
* OpenVINO: the compiled model's runtime graph (`get_runtime_model()`), whose ops carry their layer type,
  their input precisions and the names of the original layers they came from (`originalLayersNames`).

Every conv/matmul-like layer of the original file (a Conv, ConvTranspose, MatMul, Gemm, LSTM/GRU ... whose
weight is a constant) is looked up in that graph and said to run as "integer" (integer maths), "int
weights" (the weights stay int8/int4 in memory but the maths is floating point: `MatMulNBits`, OpenVINO's
compressed FullyConnected, or a DequantizeLinear on the weight on every call) or "float", with the reason.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelpress.deploy.runtime import RUNTIMES, read_onnx
from modelpress.errors import ExportError, RuntimeUnavailableError

log = logging.getLogger(__name__)

Kind = Literal["integer", "int weights", "float"]

TARGET_KEY = "modelpress.target"  # ONNX metadata: the runtime the export placed the quantizers for
RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}

# ONNX ops that hold a layer's weight, with the input indices where a constant weight marks them as a
# layer (not an activation x activation product such as attention's Q @ K^T).
_WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "FusedConv": (1,),
    "ConvInteger": (1,),
    "QLinearConv": (3,),
    "MatMul": (1, 0),
    "FusedMatMul": (1, 0),
    "Gemm": (1, 0),
    "FusedGemm": (1, 0),
    "QGemm": (3,),
    "MatMulInteger": (1,),
    "MatMulIntegerToFloat": (1,),
    "QLinearMatMul": (3,),
    "DynamicQuantizeMatMul": (1,),
    "MatMulNBits": (1,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
    "DynamicQuantizeLSTM": (1, 2),
}
# What ONNX Runtime (CPU) runs with integer maths.
_ORT_INTEGER = {
    "QLinearConv",
    "ConvInteger",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLSTM",
}
# ONNX Runtime's integer element-wise and pooling kernels (residual adds, concats ...).
_ORT_INTEGER_ELEMENTWISE = {
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QLinearReduceMean",
    "QLinearWhere",
}
# ONNX tensor types of integer weight codes (INT8, UINT8, INT16, UINT16, INT4, UINT4).
_INTEGER_TYPES = {2, 3, 4, 5, 21, 22}
# MatMulNBits' accuracy_level 4: the input is quantized to int8 and the product is integer.
_NBITS_INT8_ACCURACY = 4
# The integer kernel ONNX Runtime would form for a layer type.
_ORT_INTEGER_FORM = {"conv": "QLinearConv", "matmul": "QLinearMatMul", "gemm": "QGemm"}

_OV_LAYERS = {
    "Convolution",
    "GroupConvolution",
    "Deconvolution",
    "FullyConnected",
    "MatMul",
    "RNNSeq",
    "RNNCell",
}
_OV_INTEGER_TYPES = {"u8", "i8", "u4", "i4", "nf4", "u2", "u1", "i16", "u16"}
_OV_PASS_THROUGH = {"Reorder", "Transpose", "Reshape", "Convert", "Subgraph", "Eltwise", "Multiply"}

# A name's runtime-made variants, removed to find the original: ORT's "_token_3", "_nchwc", "/duplicated",
# "_T" (transposed initializers); OpenVINO's "/WithoutBiases" and "/transpose_b".
_SUFFIX = re.compile(r"(_token_\d+|_nchwc|_T|/[^/]*)$")
# Trailing parts of an initializer name that are not the torch module's name.
_PARAM = re.compile(
    r"\.(inner\.)?(qweight|weight|bias|packed|scales?|zero_points?|zp)(_[a-z0-9]+)*$"
    r"|\.(weight|bias)_(ih|hh)_l\d+(_reverse)?(_q)?$"
)


@dataclass(frozen=True)
class LayerKernel:
    """One conv/matmul layer of the file and the kernel the runtime runs it with."""

    name: str  # the torch layer where the file keeps its name (from the weight's name), else the node name
    node: str  # the ONNX node in the file
    op_type: str  # its op in the file
    kernel: str  # what runs: "QLinearConv", "Conv (NCHWc)", "Convolution u8", "-" when not found
    kind: Kind
    reason: str = ""  # why it is not integer (empty when it is)


@dataclass
class IntegerReport:
    """What runs as integer in one runtime: every conv/matmul layer of the file, and the element-wise ops.

    >>> report = integer_kernels("model.onnx", "onnxruntime")  # doctest: +SKIP
    >>> report.summary()  # doctest: +SKIP
    '9 of 11 conv/matmul layers run as integer in ONNX Runtime; not: ...'
    """

    runtime: str
    path: str
    layers: list[LayerKernel] = field(default_factory=list)
    integer_elementwise: dict[str, int] = field(default_factory=dict)  # QLinearAdd: 2, ... (ONNX Runtime)
    conv_adds: int = 0  # Adds/Concats of conv outputs in the file (residuals, skip concats)
    added_transposes: int = 0  # Transposes the runtime added (ONNX Runtime's layout changes for int8)
    placed_for: str | None = None  # the runtime the file's quantizers were placed for (`modelpress.target`)

    @property
    def total(self) -> int:
        return len(self.layers)

    @property
    def integer(self) -> int:
        return sum(layer.kind == "integer" for layer in self.layers)

    @property
    def int_weights(self) -> int:
        return sum(layer.kind == "int weights" for layer in self.layers)

    @property
    def not_integer(self) -> list[LayerKernel]:
        return [layer for layer in self.layers if layer.kind != "integer"]

    def headline(self) -> str:
        """ "k of n conv/matmul layers run as integer in <runtime>", with the int-weight layers and the
        integer adds/concats (ONNX Runtime)."""
        label = RUNTIME_LABELS.get(self.runtime, self.runtime)
        line = f"{self.integer} of {self.total} conv/matmul layers run as integer in {label}"
        if self.int_weights:
            line += f" ({self.int_weights} with int weights, float maths)"
        if self.runtime == "onnxruntime" and self.conv_adds:
            adds = sum(self.integer_elementwise.get(op, 0) for op in ("QLinearAdd", "QLinearConcat"))
            line += f"; {adds} of {self.conv_adds} residual adds/concats as QLinearAdd/QLinearConcat"
        if self.placed_for and self.placed_for != self.runtime:
            line += f" (the file's quantizers are placed for {RUNTIME_LABELS.get(self.placed_for, self.placed_for)})"
        return line

    def summary(self, *, names: int = 5) -> str:
        """The headline, then the layers that do not run as integer, by name, with the reason."""
        others = self.not_integer
        if not others:
            return self.headline()
        shown = "; ".join(f"{layer.name}: {layer.reason}" for layer in others[:names])
        more = f"; and {len(others) - names} more" if len(others) > names else ""
        return f"{self.headline()}. Not integer: {shown}{more}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            total=self.total,
            integer=self.integer,
            int_weights=self.int_weights,
            headline=self.headline(),
            summary=self.summary(),
        )
        return out


def integer_kernels(path: str | os.PathLike[str], runtime: str, *, threads: int = 2) -> IntegerReport:
    """Load `path` in `runtime` as a user would and say which conv/matmul layers run as integer kernels.

    ONNX Runtime: a default `InferenceSession` (graph optimisations as default) saves the graph it runs;
    OpenVINO: the CPU plugin compiles the model with the settings `open_session` uses (f32 inference
    precision, no dynamic quantization) and its runtime graph gives each layer's input precision.

    >>> integer_kernels("model.compressed.onnx", "onnxruntime").summary()  # doctest: +SKIP
    '7 of 7 conv/matmul layers run as integer in ONNX Runtime'
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"Artifact '{p}' does not exist. Export it first (`modelpress export`).")
    if runtime not in RUNTIMES:
        raise RuntimeUnavailableError(f"Unknown runtime '{runtime}'. Choose from {', '.join(RUNTIMES)}.")
    model = read_onnx(p)
    graph = model.graph
    layers = _layers(graph)
    if runtime == "onnxruntime":
        report = _onnxruntime(p, graph, layers, threads=threads)
    else:
        report = _openvino(p, graph, layers, threads=threads)
    report.placed_for = _placed_for(model)
    log.debug("%s: %s", p, report.headline())
    return report


def _placed_for(model: Any) -> str | None:
    """The runtime whose fusion rules the file's activation quantizers follow: its `modelpress.target`
    metadata, or OpenVINO's for a file written before the key existed; None for a file without any."""
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return None  # no activation quantizers: nothing was placed
    return next((p.value for p in model.metadata_props if p.key == TARGET_KEY), "openvino")


# ---------------------------------------------------------------------------------------------------------
# The file's layers


@dataclass
class _Layer:
    """A conv/matmul node of a graph (the file's or ONNX Runtime's optimised one) and what identifies it."""

    node: Any  # onnx.NodeProto
    kind: str  # "conv", "matmul", "gemm" or "rnn"
    weight_inputs: tuple[int, ...]  # the inputs that are constant (weights)
    keys: dict[str, int] = field(default_factory=dict)  # identifying name -> how much a match on it counts
    weight_names: list[str] = field(default_factory=list)  # initializers behind its weights, weight first
    nearby_names: list[str] = field(default_factory=list)  # initializers of the ops fused after it (scales)


class _Graph:
    """The producer, consumers and constant tensors of an ONNX graph (top level)."""

    def __init__(self, graph: Any) -> None:
        self.initializers = {i.name: i for i in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        self.constant: set[str] = set(self.initializers)
        self.shape_like: set[str] = set()  # tensors computed from shapes (Shape -> Gather -> Concat ...)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            inputs = [i for i in node.input if i]
            if node.op_type == "Constant" or (inputs and all(i in self.constant for i in inputs)):
                self.constant.update(node.output)
            elif node.op_type in ("Shape", "Size") or (
                inputs and all(i in self.constant or i in self.shape_like for i in inputs)
            ):
                self.shape_like.update(node.output)

    def initializers_behind(self, name: str, *, depth: int = 8) -> list[str]:
        """The initializers a constant tensor is computed from (itself, or through DequantizeLinear,
        Transpose, Reshape, Cast ...), those with more than one element: scalars are shared by many layers."""
        out: list[str] = []
        stack = [(name, 0)]
        seen: set[str] = set()
        while stack:
            tensor, d = stack.pop()
            if tensor in seen or not tensor:
                continue
            seen.add(tensor)
            init = self.initializers.get(tensor)
            if init is not None:
                size = 1
                for dim in init.dims:
                    size *= dim
                if size > 1:
                    out.append(tensor)
                continue
            node = self.producer.get(tensor)
            if node is not None and d < depth and tensor in self.constant:
                stack.extend((i, d + 1) for i in reversed(node.input))
        return out

    def integer_behind(self, name: str) -> bool:
        """Whether a constant tensor is computed from integer codes (int8/uint8/int4 ... initializers), by a
        DequantizeLinear or by plain Cast/Sub/Mul ops; False for a float initializer itself."""
        if name in self.initializers or name not in self.constant:
            return False
        return any(self.initializers[i].data_type in _INTEGER_TYPES for i in self.initializers_behind(name))

    def dequantized(self, name: str, *, depth: int = 6) -> bool:
        """Whether a tensor comes out of a DequantizeLinear (through Transpose/Reshape/Slice/Concat ...)."""
        node = self.producer.get(name)
        for _ in range(depth):
            if node is None:
                return False
            if node.op_type == "DequantizeLinear":
                return True
            if node.op_type not in (
                "Transpose",
                "Reshape",
                "Slice",
                "Concat",
                "Squeeze",
                "Unsqueeze",
                "Cast",
            ):
                return False
            node = self.producer.get(node.input[0])
        return False

    def followers(self, node: Any, *, depth: int = 3) -> Iterator[Any]:
        """The nodes that take this node's output through a chain of single-consumer element-wise ops (the
        BatchNorm, ReLU, residual Add a runtime fuses into the layer)."""
        frontier = [node]
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for out in n.output:
                    users = self.consumers.get(out, [])
                    if len(users) == 1:
                        nxt.append(users[0])
                        yield users[0]
            frontier = nxt


def _kind(op_type: str) -> str:
    if "Conv" in op_type:
        return "conv"
    if op_type in ("LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"):
        return "rnn"
    if "Gemm" in op_type:
        return "gemm"
    return "matmul"


def _name_variants(name: str) -> Iterator[str]:
    while name:
        yield name
        shorter = _SUFFIX.sub("", name)
        if shorter == name:
            return
        name = shorter


def _layers(graph: Any) -> list[_Layer]:
    """The conv/matmul nodes of a graph whose weight is constant, with the names that identify them."""
    g = _Graph(graph)
    out = []
    for node in graph.node:
        candidates = _WEIGHT_INPUTS.get(node.op_type)
        if candidates is None:
            continue
        weights = tuple(i for i in candidates if i < len(node.input) and node.input[i] in g.constant)
        if node.op_type in ("MatMul", "FusedMatMul", "Gemm", "FusedGemm") and weights:
            weights = weights[:1]  # a constant times an activation: one of the two is the weight
        if not weights:
            continue
        layer = _Layer(node=node, kind=_kind(node.op_type), weight_inputs=weights)
        for i in weights:
            layer.weight_names += g.initializers_behind(node.input[i])
        for i, name in enumerate(node.input):  # bias, scales: more identifying initializers
            if i not in weights and name in g.constant:
                layer.weight_names += [n for n in g.initializers_behind(name) if n not in layer.weight_names]
        for name in _name_variants(node.name):
            layer.keys[name] = 3
        for name in layer.weight_names:
            for variant in _name_variants(name):
                layer.keys.setdefault(variant, 2)
        for name in node.output:
            layer.keys.setdefault(name, 2)
        for follower in g.followers(node):
            layer.keys.setdefault(follower.name, 1)
            for name in follower.output:
                layer.keys.setdefault(name, 1)
            for name in follower.input:  # a scale it multiplies by, or one behind it (a_scale * w_scale)
                producer = g.producer.get(name)
                if name in g.constant:
                    layer.nearby_names += g.initializers_behind(name)
                elif follower.op_type == "Mul" and producer is not None and producer.op_type == "Mul":
                    for source in producer.input:
                        if source in g.constant:
                            layer.nearby_names += g.initializers_behind(source)
        out.append(layer)
    return out


def _torch_names(layers: Sequence[_Layer]) -> dict[int, str]:
    """The torch module behind each layer where its weight's initializer (or its scale's, in an op fused
    after it) keeps the name ("layer1.conv1" from "layer1.conv1.qweight"), used only where that name is the
    layer's alone."""
    guess: dict[int, str] = {}
    for index, layer in enumerate(layers):
        for name in layer.weight_names + layer.nearby_names:
            module, n = _PARAM.subn("", name)
            if n and module and not module.startswith("val_"):
                guess[index] = module
                break
    counts = Counter(guess.values())
    return {i: name for i, name in guess.items() if counts[name] == 1}


def _display_names(layers: Sequence[_Layer]) -> list[str]:
    torch_names = _torch_names(layers)
    return [torch_names.get(i, layer.node.name or layer.node.output[0]) for i, layer in enumerate(layers)]


def _match(layers: Sequence[_Layer], targets: Sequence[tuple[str, dict[str, int]]]) -> dict[int, int]:
    """Pair the file's layers with the runtime's ops (index -> index): by the names they share (node names,
    weight initializers, outputs, the ops fused into them), counting only names that belong to one layer
    and one op; what is left is paired in order within each kind where the counts agree (or the runtime
    has the same number of ops for each layer left)."""

    def family(kind: str) -> str:  # runtimes turn a Gemm into a MatMul and the reverse
        return "matmul" if kind == "gemm" else kind

    owners: Counter[str] = Counter(k for layer in layers for k in layer.keys)
    target_owners: Counter[str] = Counter(k for _, keys in targets for k in keys)
    scores: list[tuple[int, int, int]] = []
    for li, layer in enumerate(layers):
        for ti, (_, keys) in enumerate(targets):
            score = sum(
                w * keys[k]
                for k, w in layer.keys.items()
                if k in keys and owners[k] == 1 and target_owners[k] == 1
            )
            if score:
                scores.append((score, li, ti))
    pairs: dict[int, int] = {}
    taken: set[int] = set()
    for _, li, ti in sorted(scores, key=lambda s: (-s[0], s[1], s[2])):
        if li not in pairs and ti not in taken:
            pairs[li] = ti
            taken.add(ti)
    for kind in {family(layer.kind) for layer in layers}:
        left = [i for i, layer in enumerate(layers) if family(layer.kind) == kind and i not in pairs]
        free = [i for i, (k, _) in enumerate(targets) if family(k) == kind and i not in taken]
        if left and free and len(free) % len(left) == 0:
            # As many ops as layers, or k ops per layer (OpenVINO runs a bidirectional LSTM as two RNNSeq).
            pairs.update(zip(left, free[:: len(free) // len(left)], strict=True))
    return pairs


def _output_uses(g: _Graph, node: Any) -> tuple[bool, list[str]]:
    """Whether a layer's output reaches a QuantizeLinear (directly or through ReLU/Clip/BatchNorm), and the
    other ops that take it in float (a residual Add beside the next layer's quantizer)."""
    quantized, floats = False, []
    frontier = [node]
    for _ in range(3):
        nxt = []
        for n in frontier:
            for out in n.output:
                for user in g.consumers.get(out, []):
                    if user.op_type == "QuantizeLinear":
                        quantized = True
                    elif user.op_type in ("Relu", "Clip", "BatchNormalization"):
                        nxt.append(user)
                    else:
                        floats.append(f"{user.op_type} '{user.name}'")
        frontier = nxt
    return quantized, floats


def _conv_adds(g: _Graph, graph: Any) -> int:
    """Adds and Concats that take a conv's output (residuals, skip concats): where a CNN placed for ONNX
    Runtime wants QLinearAdd/QLinearConcat. A transformer's residual adds (before LayerNorm) are not."""

    def from_conv(name: str) -> bool:
        node = g.producer.get(name)
        for _ in range(4):  # through the activation, BatchNorm and quantizer pairs after the conv
            if node is None:
                return False
            if "Conv" in node.op_type:
                return True
            if node.op_type not in (
                "Relu",
                "Clip",
                "BatchNormalization",
                "QuantizeLinear",
                "DequantizeLinear",
            ):
                return False
            node = g.producer.get(node.input[0])
        return False

    count = 0
    for node in graph.node:
        if node.op_type in ("Add", "Concat"):
            live = [i for i in node.input if i and i not in g.constant and i not in g.shape_like]
            count += len(live) >= 2 and any(from_conv(i) for i in live)
    return count


# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime


def _ort_optimized(path: Path, *, threads: int) -> Any:
    """The graph a default ONNX Runtime session runs, as it saves it (weights left out)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="modelpress-integer-") as tmp:
        saved = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.optimized_model_filepath = str(saved)
        # Weights go to a side file, so that a large model's optimised graph saves as it loads.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "w.data")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT's own errors: an invalid or unsupported graph
            raise ExportError(f"ONNX Runtime cannot load '{path}': {exc}") from exc
        return onnx.load(str(saved), load_external_data=False).graph


def _ort_kernel(node: Any) -> str:
    label = node.op_type
    if node.domain == "com.microsoft.nchwc":
        label += " (NCHWc)"
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        level = attrs.get("accuracy_level", 0)
        label += f" ({attrs.get('bits', 4)}-bit weights" + (
            ", int8 input: accuracy_level 4)"
            if level == _NBITS_INT8_ACCURACY
            else f", accuracy_level {level})"
        )
    return label


def _ort_kind(node: Any, g: _Graph, file_g: _Graph, file_node: Any) -> tuple[Kind, str]:
    op = node.op_type
    if op in _ORT_INTEGER:
        return "integer", ""
    if op == "MatMulNBits":
        level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
        if level == _NBITS_INT8_ACCURACY:
            return "integer", ""
        return "int weights", (
            f"MatMulNBits reads the int weights and computes in fp32 (accuracy_level {level}; "
            f"{_NBITS_INT8_ACCURACY} would quantize its input to int8)"
        )
    kind = _kind(file_node.op_type)
    # Weights still computed from integer codes in the graph that runs: dequantized on every call.
    weight_dq = any(g.integer_behind(name) for name in node.input[1:] if name)
    input_dq = bool(node.input) and g.dequantized(node.input[0])
    if kind == "rnn":
        if weight_dq:
            return "int weights", (
                f"runs as fp32 {op} with its integer weights dequantized on every call (ONNX Runtime's one "
                "integer recurrent kernel is DynamicQuantizeLSTM)"
            )
        return (
            "float",
            f"runs as fp32 {op} (ONNX Runtime's one integer recurrent kernel is DynamicQuantizeLSTM)",
        )
    integer_form = _ORT_INTEGER_FORM[kind]
    if input_dq:
        quantized, floats = _output_uses(file_g, file_node)
        if not quantized:
            return "float", (
                f"runs as fp32 {op} behind DequantizeLinear: its output is not quantized, and ONNX Runtime "
                f"forms {integer_form} only around DQ -> {file_node.op_type} -> Q"
            )
        if floats:
            return "float", (
                f"runs as fp32 {op} behind DequantizeLinear: its output also goes unquantized to "
                f"{', '.join(floats[:2])}, and ONNX Runtime forms {integer_form} only where DQ -> "
                f"{file_node.op_type} -> Q is the whole path"
            )
        return "float", (
            f"runs as fp32 {op} behind DequantizeLinear: ONNX Runtime did not fuse DQ -> {file_node.op_type} "
            f"-> Q into {integer_form}"
        )
    if weight_dq:
        return "int weights", f"runs as fp32 {op} with its integer weights dequantized on every call"
    if _file_int_weights(file_g, file_node):
        return (
            "float",
            f"runs as fp32 {op} with its integer weights dequantized once, at load (fp32 in memory)",
        )
    if file_g.dequantized(file_node.input[0]) or _fed_by(file_g, file_node, "DynamicQuantizeLinear"):
        return "float", f"runs as fp32 {op}: ONNX Runtime removed the activation quantization around it"
    return "float", f"runs as fp32 {op}: the file does not quantize its input"


def _file_int_weights(g: _Graph, node: Any) -> bool:
    """Whether the file stores this layer's weights as integer codes (MatMulNBits, or a weight computed
    from them by DequantizeLinear or Cast/Mul)."""
    if node.op_type == "MatMulNBits":
        return True
    return any(g.integer_behind(name) for name in node.input[1:] if name)


def _fed_by(g: _Graph, node: Any, op_type: str) -> bool:
    producer = g.producer.get(node.input[0]) if node.input else None
    return producer is not None and producer.op_type == op_type


def _onnxruntime(path: Path, graph: Any, layers: list[_Layer], *, threads: int) -> IntegerReport:
    optimized = _ort_optimized(path, threads=threads)
    file_g, opt_g = _Graph(graph), _Graph(optimized)
    ops = _layers(optimized)
    pairs = _match(layers, [(op.kind, op.keys) for op in ops])
    names = _display_names(layers)
    report = IntegerReport(runtime="onnxruntime", path=str(path))
    for i, layer in enumerate(layers):
        j = pairs.get(i)
        if j is None:
            report.layers.append(_missing(names[i], layer, "ONNX Runtime"))
            continue
        node = ops[j].node
        kind, reason = _ort_kind(node, opt_g, file_g, layer.node)
        report.layers.append(
            LayerKernel(names[i], layer.node.name, layer.node.op_type, _ort_kernel(node), kind, reason)
        )
    report.integer_elementwise = dict(
        Counter(n.op_type for n in optimized.node if n.op_type in _ORT_INTEGER_ELEMENTWISE)
    )
    report.conv_adds = _conv_adds(file_g, graph)
    report.added_transposes = max(
        0,
        sum(n.op_type == "Transpose" for n in optimized.node)
        - sum(n.op_type == "Transpose" for n in graph.node),
    )
    return report


def _missing(name: str, layer: _Layer, runtime: str) -> LayerKernel:
    return LayerKernel(
        name,
        layer.node.name,
        layer.node.op_type,
        "-",
        "float",
        f"not found in {runtime}'s graph (folded away or renamed beyond recognition)",
    )


# ---------------------------------------------------------------------------------------------------------
# OpenVINO


def _ov_info(op: Any, key: str) -> str:
    info = op.get_rt_info()
    return str(info[key].astype(str)) if key in info else ""


def _ov_precision(output: Any) -> str:
    """The precision of the value an input port reads, as the runtime graph names it (u8, i8, f32 ...)."""
    source = output.get_node()
    precisions = _ov_info(source, "outputPrecisions").split(",")
    index = output.get_index()
    return precisions[index] if index < len(precisions) else precisions[0]


def _ov_consts(output: Any, *, depth: int = 5) -> tuple[list[str], str]:
    """The names of the constants an input port reads (through Reorder/Transpose/Convert/...), and the
    precision of the constant it starts from ("i8" for int8 weights decompressed in the layer)."""
    names: list[str] = []
    precision = ""
    for _ in range(depth):
        node = output.get_node()
        layer_type = _ov_info(node, "layerType")
        if layer_type == "Const":
            names.append(node.get_friendly_name())
            names += [n for n in _ov_info(node, "originalLayersNames").split(",") if n]
            precision = _ov_info(node, "outputPrecisions")
            break
        if layer_type not in _OV_PASS_THROUGH or not node.inputs():
            break
        names += [n for n in _ov_info(node, "originalLayersNames").split(",") if n]
        output = node.input(0).get_source_output()
    return names, precision


def _ov_ops(path: Path, *, threads: int) -> list[tuple[str, dict[str, int], dict[str, str]]]:
    """The conv/matmul ops OpenVINO's CPU plugin runs, each as (kind, identifying names, facts)."""
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        # As `open_session` runs it: no bf16 on CPUs that have it, no activations of int8-weight layers
        # quantized on the fly (both would change what a benchmark beside this report measured).
        "INFERENCE_PRECISION_HINT": "f32",
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
    }
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:  # OpenVINO's own errors: an op it does not support
        raise ExportError(f"OpenVINO cannot compile '{path}': {exc}") from exc
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        layer_type = _ov_info(op, "layerType")
        if layer_type not in _OV_LAYERS or len(op.inputs()) < 2:
            continue
        weight_names, weight_precision = _ov_consts(op.input(1).get_source_output())
        if not weight_names and layer_type not in ("RNNSeq", "RNNCell"):
            continue  # activation x activation (attention): not a layer with weights
        keys: dict[str, int] = {}
        for name in _ov_info(op, "originalLayersNames").split(","):
            for variant in _name_variants(name):
                keys.setdefault(variant, 2)
        for name in weight_names:
            for variant in _name_variants(name):
                keys.setdefault(variant, 2)
        for variant in _name_variants(op.get_friendly_name()):
            keys.setdefault(variant, 2)
        kind = "rnn" if layer_type.startswith("RNN") else "conv" if "onvolution" in layer_type else "matmul"
        facts = {
            "layer_type": layer_type,
            "input": _ov_precision(op.input(0).get_source_output()),
            "weights": weight_precision,
            "runtime_precision": _ov_info(op, "runtimePrecision"),
        }
        out.append((kind, keys, facts))
    return out


def _ov_kind(facts: dict[str, str], file_node: Any, file_g: _Graph) -> tuple[Kind, str, str]:
    layer_type, activation = facts["layer_type"], facts["input"]
    weights = facts["weights"] if facts["weights"] in _OV_INTEGER_TYPES else ""
    if activation in _OV_INTEGER_TYPES:
        return "integer", f"{layer_type} {activation}", ""
    kernel = f"{layer_type} {activation}" + (f", {weights} weights" if weights else "")
    runs = f"runs as {activation} {layer_type}" + (f" on its {weights} weights" if weights else "")
    if file_node.op_type in ("MatMulInteger", "ConvInteger"):
        reason = f"OpenVINO runs {file_node.op_type} as {activation} {layer_type} (it converts the integer operands)"
    elif layer_type.startswith("RNN"):
        reason = (
            f"OpenVINO runs {file_node.op_type} as {activation} {layer_type}: it has no int8 recurrent kernel"
        )
    elif file_node.op_type in _ORT_INTEGER or file_g.dequantized(file_node.input[0]):
        reason = f"{runs}: OpenVINO's low-precision transformations did not take its quantized input"
    elif weights:
        reason = f"{runs}: weight-only, the file does not quantize its input"
    elif _file_int_weights(file_g, file_node):
        reason = f"{runs}: OpenVINO decompressed the int weights at load time"
    else:
        reason = f"{runs}: the file does not quantize its input"
    return ("int weights" if weights else "float"), kernel, reason


def _openvino(path: Path, graph: Any, layers: list[_Layer], *, threads: int) -> IntegerReport:
    ops = _ov_ops(path, threads=threads)
    pairs = _match(layers, [(kind, keys) for kind, keys, _ in ops])
    names = _display_names(layers)
    file_g = _Graph(graph)
    report = IntegerReport(runtime="openvino", path=str(path))
    for i, layer in enumerate(layers):
        j = pairs.get(i)
        if j is None:
            report.layers.append(_missing(names[i], layer, "OpenVINO"))
            continue
        kind, kernel, reason = _ov_kind(ops[j][2], layer.node, file_g)
        report.layers.append(LayerKernel(names[i], layer.node.name, layer.node.op_type, kernel, kind, reason))
    report.conv_adds = _conv_adds(file_g, graph)
    return report
