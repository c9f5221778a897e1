"""Graph passes on QDQ ONNX models that change where quantizers sit, never what the model computes.

`hoist_quantizers` moves an activation's QuantizeLinear/DequantizeLinear pair above ops that commute with
quantization: MaxPool (quantization is monotone, so max(q(x)) == q(max(x))) and ops that only move values
(Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Identity). A quantizer written after `Relu -> MaxPool ->
Flatten` then sits right after the Relu, where OpenVINO fuses it into the producing Conv (int8 output,
int8 MaxPool) and ONNX Runtime propagates it back down to its QDQ kernels; a quantizer stranded after the
pool runs as a separate fp32 op in OpenVINO (measured: MNIST CNN 2.9 ms vs 2.1 ms for NNCF's placement at
batch 64). NNCF places its quantizers the same way ("quantizer propagation").
"""

from __future__ import annotations

import math
from typing import Any, Literal

# Ops whose output is a selection or rearrangement of their first input's values, so that a per-tensor
# quantizer commutes with them. MaxPool qualifies only with its single output (no indices).
_COMMUTING = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def _scalar_initializers(graph: Any) -> set[str]:
    """Names of the one-element initializers: per-tensor scales and zero points."""
    return {init.name for init in graph.initializer if math.prod(init.dims) == 1}


def hoist_quantizers(model: Any) -> int:
    """Move per-tensor activation Q/DQ pairs above commuting ops (see the module doc), in place, until
    none can move. Returns the number of moves.

    >>> moves = hoist_quantizers(onnx.load("int8.onnx"))  # doctest: +SKIP
    """
    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    initializers = {i.name for i in graph.initializer}
    scalars = _scalar_initializers(graph)
    moves = 0
    stale: set[str] = set()  # tensors whose shape changed: their value_info must go
    changed = True
    while changed:
        changed = False
        nodes = list(graph.node)
        producer = {out: node for node in nodes for out in node.output}
        consumers: dict[str, list[Any]] = {}
        for node in nodes:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for q in nodes:
            if q.op_type != "QuantizeLinear" or not all(n in scalars for n in q.input[1:]):
                continue
            op = producer.get(q.input[0])
            if op is None or op.op_type not in _COMMUTING or len(op.output) != 1 or not op.input:
                continue
            source = op.input[0]
            if source in initializers or q.input[0] in graph_outputs or len(consumers[q.input[0]]) != 1:
                continue
            dq_nodes = consumers.get(q.output[0], [])
            if len(dq_nodes) != 1 or dq_nodes[0].op_type != "DequantizeLinear":
                continue
            dq = dq_nodes[0]
            if list(dq.input[1:]) != list(q.input[1:]) or dq.output[0] in graph_outputs:
                continue
            # source -> op -> Q -> DQ -> (users)   becomes   source -> Q -> DQ -> op -> (users)
            hoisted = f"{q.output[0]}_dq{moves}"
            users_name = dq.output[0]
            stale.update((q.input[0], q.output[0]))
            q.input[0] = source
            dq.output[0] = hoisted
            op.input[0] = hoisted
            op.output[0] = users_name
            order = list(graph.node)
            order.remove(op)
            order.insert(order.index(dq) + 1, op)
            del graph.node[:]
            graph.node.extend(order)
            moves += 1
            changed = True
            break
    if stale:
        kept = [v for v in graph.value_info if v.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    return moves


class _Graph:
    """Lookups over a graph's nodes and constants for the rewrite below."""

    def __init__(self, graph: Any) -> None:
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.initializers = {i.name: i for i in graph.initializer}
        self._constants = {
            n.output[0]: n
            for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
        self._to_array = numpy_helper.to_array

    def value(self, name: str) -> Any:
        """The numpy value of a constant input (initializer or Constant node), else None."""
        if name in self.initializers:
            init = self.initializers[name]
            if init.data_location == 1:  # TensorProto.EXTERNAL: not loaded here, and not rewritten
                return None
            return self._to_array(init)
        node = self._constants.get(name)
        return None if node is None else self._to_array(node.attribute[0].t)

    def only_user(self, name: str) -> Any:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _int8_weight(g: _Graph, node: Any, transposed: bool) -> tuple[Any, Any, Any] | None:
    """(weight as (K, N) int8, scale (N,) or scalar, zero point) of a DequantizeLinear on a constant int8
    weight stored (N, K) with per-output-channel axis 0 (`transposed`: the layer's Transpose follows)."""
    import numpy as np

    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    w, scale = g.value(node.input[0]), g.value(node.input[1])
    zp = g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.int8)
    if w is None or scale is None or zp is None or w.dtype != np.int8 or w.ndim != 2:
        return None
    axis = _attr(node, "axis", 1)
    per_channel = scale.size > 1
    if per_channel and (axis % 2) != (0 if transposed else 1):
        return None
    weight = w.T if transposed else w
    return np.ascontiguousarray(weight), scale.astype(np.float32), zp.astype(np.int8)


def _is_bias(g: _Graph, name: str, n_out: int) -> bool:
    """A constant (N,) vector: what MatMulIntegerToFloat takes as its bias (ONNX Runtime wants N > 1)."""
    value = g.value(name)
    return value is not None and value.ndim == 1 and value.shape[0] == n_out > 1


def fuse_integer_matmuls(model: Any) -> int:
    """Rewrite `Q -> DQ -> MatMul(W) -> Add(bias)` (and `Gemm` with a bias) on int8 weights into ONNX
    Runtime's `com.microsoft.MatMulIntegerToFloat` with the bias inside, in place, where the input is
    uint8 (asymmetric). Returns the count.

    ONNX Runtime turns the QDQ MatMul into the same kernel itself but leaves the bias as a separate Add,
    which it then fuses with a following Gelu into BiasGelu, 2x slower than its Gelu on MiniLM. Its own
    MatMulIntegerToFloatFusion would take the bias, but only from `MatMulInteger -> Cast -> Mul(Mul(a_scale,
    b_scale)) -> Add`, and constant folding removes the scale product first when both scales are constants.
    OpenVINO executes MatMulIntegerToFloat with the same int8 kernels as the QDQ form (measured: equal
    latency on MiniLM). The int8 codes, scales and zero points are the ones the QDQ graph had.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    replaced: dict[int, list[Any]] = {}  # id(last node of a matched pattern) -> its replacement
    dropped: set[int] = set()
    new_initializers = []
    named: set[str] = {t.name for t in graph.initializer}
    count = 0
    for node in list(graph.node):
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type not in ("MatMul", "Gemm")
            or id(node) in dropped
        ):
            continue
        a, b = node.input[0], node.input[1]
        bias = None
        w_dq = g.producer.get(b)
        if w_dq is not None and w_dq.op_type == "Transpose":
            w_dq = g.producer.get(w_dq.input[0])
        if node.op_type == "Gemm":
            if (
                _attr(node, "transA", 0)
                or _attr(node, "alpha", 1.0) != 1.0
                or _attr(node, "beta", 1.0) != 1.0
            ):
                continue
            weight = _int8_weight(g, g.producer.get(b), transposed=bool(_attr(node, "transB", 0)))
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            last = node
        else:
            tr = g.producer.get(b)
            if tr is not None and tr.op_type == "Transpose" and list(_attr(tr, "perm", [1, 0])) == [1, 0]:
                weight = _int8_weight(g, g.producer.get(tr.input[0]), transposed=True)
            else:
                weight = _int8_weight(g, tr, transposed=False)
            last = node
            add = g.only_user(node.output[0])
            if (
                add is not None
                and add.op_type == "Add"
                and add.domain in ("", "ai.onnx")
                and weight is not None
            ):
                other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
                if _is_bias(g, other, weight[0].shape[1]):
                    bias, last = other, add
        if weight is None or (
            node.op_type == "Gemm" and bias is not None and not _is_bias(g, bias, weight[0].shape[1])
        ):
            continue
        # The activation: DQ(Q(x)) per tensor, possibly through ops the quantizer was hoisted above (they
        # commute with it, so they run on the int8 codes instead).
        layout: list[Any] = []
        source = g.producer.get(a)
        while (
            source is not None
            and source.op_type in _COMMUTING
            and source.domain in ("", "ai.onnx")
            and len(source.output) == 1
        ):
            layout.append(source)
            source = g.producer.get(source.input[0])
        dq = source
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        a_scale, a_zp = g.value(dq.input[1]), g.value(dq.input[2])
        if a_scale is None or a_zp is None or a_scale.size != 1 or a_zp.size != 1 or a_zp.dtype != np.uint8:
            # int8 inputs stay QDQ: ONNX Runtime shifts them to uint8 itself there (its int8 x int8 integer
            # matmul is 3-4x slower), which it cannot do inside MatMulIntegerToFloat; OpenVINO runs both alike.
            continue
        w, w_scale, w_zp = weight
        n_out = w.shape[1]
        if w_scale.size not in (1, n_out) or w_zp.size not in (1, n_out):
            continue
        key = f"{node.output[0]}_int8mm"
        # The weight keeps its layer's name ("encoder.layer.0.query.qweight_int8mm"): the integer-kernel report
        # names the layer by it.
        source = w_dq.input[0] if w_dq is not None and g.value(w_dq.input[0]) is not None else ""
        weight_name = f"{source}_int8mm" if source and not source.startswith("val_") else f"{key}_weight"
        if weight_name in named:  # a layer called twice (shared weights): one initializer per node
            weight_name = f"{key}_weight"
        named.add(weight_name)
        new_initializers += [
            numpy_helper.from_array(w, weight_name),
            numpy_helper.from_array(
                w_scale.reshape(-1) if w_scale.size > 1 else w_scale.reshape(()), f"{key}_scale"
            ),
            numpy_helper.from_array(
                w_zp.reshape(-1) if w_zp.size > 1 else w_zp.reshape(()), f"{key}_zero_point"
            ),
        ]
        quantized = dq.input[0]
        nodes = []
        for i, op in enumerate(reversed(layout)):
            moved = onnx.NodeProto()
            moved.CopyFrom(op)
            moved.name = f"{key}_layout{i}"
            moved.input[0] = quantized
            moved.output[0] = quantized = f"{key}_codes{i}"
            nodes.append(moved)
        nodes.append(
            helper.make_node(
                "MatMulIntegerToFloat",
                [quantized, weight_name, dq.input[1], f"{key}_scale", dq.input[2], f"{key}_zero_point"]
                + ([bias] if bias is not None else []),
                [last.output[0]],
                name=f"{key}",
                domain="com.microsoft",
            )
        )
        replaced[id(last)] = nodes
        dropped.update({id(node), id(last)})
        count += 1
    if not count:
        return 0
    order = []
    for node in graph.node:
        if id(node) in replaced:
            order.extend(replaced[id(node)])
        elif id(node) not in dropped:
            order.append(node)
    graph.initializer.extend(new_initializers)
    # What only the old pattern used (the float DQ of the weights and activations, the Transposes) goes.
    _keep_used(graph, order)
    produced = {o for n in graph.node for o in n.output}
    info = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(info)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def channels_last_flatten(model: Any) -> int:
    """Where an int8 feature map (N, C, H, W) is flattened into a `MatMulIntegerToFloat` (a CNN's
    classifier), flatten it in (N, H, W, C) order instead, with the weight's rows permuted to match, in
    place. Returns the count. The product is the same sum of the same int8 terms in another order.

    OpenVINO runs its int8 convolutions and pools in channels-last layout; flattening in channel-first order
    makes it reorder the feature map first, and the Transpose written here cancels against that reorder.
    Measured (MNIST CNN, static int8, OpenVINO, interleaved in one run, 40 rounds): 0.94x the latency at
    batch 1 and at batch 64; ONNX Runtime within noise (1.01x / 0.99x). NNCF's graph has the reorder.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    shapes: dict[str, list[int | None]] = {}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    for v in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    count = 0
    for node in list(graph.node):
        if node.op_type != "MatMulIntegerToFloat" or node.domain != "com.microsoft":
            continue
        flat = g.producer.get(node.input[0])
        if flat is None or flat.op_type not in ("Reshape", "Flatten") or g.only_user(flat.output[0]) is None:
            continue
        if flat.op_type == "Flatten" and _attr(flat, "axis", 1) != 1:
            continue
        shape, out = shapes.get(flat.input[0]), shapes.get(flat.output[0])
        weight = g.value(node.input[1])
        if shape is None or len(shape) != 4 or None in shape[1:] or weight is None or weight.ndim != 2:
            continue
        _, c, h, w = (int(d) if d is not None else -1 for d in shape)
        if (
            h * w == 1
            or weight.shape[0] != c * h * w
            or (out is not None and (len(out) != 2 or out[1] != c * h * w))
        ):
            continue
        if flat.op_type == "Reshape":
            target = g.value(flat.input[1])  # the same target must flatten the transposed map
            if target is None or target.size != 2 or int(target[1]) not in (-1, c * h * w):
                continue
        if len(g.consumers.get(node.input[1], [])) != 1:
            continue
        key = f"{node.name or node.output[0]}_nhwc"
        transpose = helper.make_node(
            "Transpose", [flat.input[0]], [f"{key}_map"], perm=[0, 2, 3, 1], name=key
        )
        flat.input[0] = transpose.output[0]
        rows = weight.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(weight.shape)
        init = g.initializers[node.input[1]]
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(rows), init.name))
        order = list(graph.node)
        order.insert(order.index(flat), transpose)
        del graph.node[:]
        graph.node.extend(order)
        count += 1
    return count


_REDUCTIONS = frozenset({"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"})
_PRODUCTS = frozenset({"MatMul", "Gemm", "MatMulIntegerToFloat", "MatMulInteger", "Conv"})
GUARD = 1e-30  # added to the product: a normal fp32 number far below any output's resolution


def guard_reductions(model: Any) -> int:
    """Put an `Add` of 1e-30 between an int8 product layer without a bias (MatMul, Gemm, Conv) and a
    Reduce{Mean,Sum,Max,Min} reading it, in place; returns how many.

    OpenVINO 2026.4's low-precision transformations compute such a graph wrongly when the reduction feeds
    another quantized layer (a mean-pooled classifier head of zero-bias Linears gave cosine -0.1 to ONNX
    Runtime's result; the same graph with any non-zero bias, or with OpenVINO's LP transformations off, is
    right). A constant Add, which OpenVINO cannot fold away, stops the faulty rewrite; the output changes by
    1e-30, nothing at fp32 resolution.

    >>> guard_reductions(onnx.load("int8.onnx"))  # doctest: +SKIP
    """
    from onnx import TensorProto, helper

    graph = model.graph
    if not any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for n in graph.node):
        return 0
    producers = {out: node for node in graph.node for out in node.output}
    zeros = _zero_initializers(graph)
    guarded = 0
    for node in list(graph.node):
        if node.op_type not in _REDUCTIONS or not node.input:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "Add" and any(i in zeros for i in source.input):
            source = producers.get(next(i for i in source.input if i not in zeros))
        if source is None or source.op_type not in _PRODUCTS:
            continue
        name = f"{node.input[0]}_guarded"
        constant = f"{name}_eps"
        graph.initializer.append(helper.make_tensor(constant, TensorProto.FLOAT, [], [GUARD]))
        add = helper.make_node("Add", [node.input[0], constant], [name], name=f"{name}_add")
        graph.node.insert(list(graph.node).index(node), add)
        node.input[0] = name
        guarded += 1
    return guarded


def _zero_initializers(graph: Any) -> set[str]:
    from onnx import numpy_helper

    out = set()
    for init in graph.initializer:
        if math.prod(init.dims) <= 1 << 16:
            value = numpy_helper.to_array(init)
            if value.dtype.kind == "f" and not value.any():
                out.add(init.name)
    return out


# ------------------------------------------------------------------------------------------------------
# Placement for ONNX Runtime
# ------------------------------------------------------------------------------------------------------

Target = Literal["openvino", "onnxruntime", "tensorrt"]
TARGETS: tuple[Target, ...] = ("openvino", "onnxruntime", "tensorrt")
TARGET_KEY = "modelpress.target"  # ONNX metadata_props key; a file without it was placed for OpenVINO

# Activations ONNX Runtime removes before a QuantizeLinear whose range they cannot change (ReluQuantFusion,
# ClipQuantFusion): Relu before a zero point at the bottom of the code range, Clip covering the Q's range.
_FOLDED_ACTIVATIONS = frozenset({"Relu", "Clip"})
_PRODUCT_OPS = frozenset({"Conv", "MatMul", "Gemm"})


def quantizes_activations(model: Any) -> bool:
    """Whether the graph quantizes an activation (a QuantizeLinear whose input is not a constant)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return any(n.op_type == "QuantizeLinear" and n.input[0] not in constants for n in model.graph.node)


def placement_warning(model: Any, runtime: str) -> str | None:
    """Why a file is about to run on a runtime its int8 activations were not placed for, or None: only a
    modelpress file (one with `TARGET_KEY`) that quantizes activations is placed per runtime."""
    placed = {p.key: p.value for p in model.metadata_props}.get(TARGET_KEY)
    if placed is None or placed == runtime or placed not in TARGETS or not quantizes_activations(model):
        return None
    names = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}
    if placed == "tensorrt":
        cost = (
            "its activations are symmetric int8 (TensorRT's only form), a coarser grid for tensors that are "
            "never negative than the uint8 ones this runtime takes"
        )
    elif runtime == "onnxruntime":
        cost = "ONNX Runtime then runs layers whose outputs are not quantized as fp32 behind DequantizeLinear (slower)"
    elif any(n.op_type == "SpaceToDepth" and n.name.endswith("_s2d_x") for n in model.graph.node):
        cost = (
            "its first conv runs on the input's SpaceToDepth with a channels-last max pool after it, which "
            "OpenVINO runs several times slower than the plain conv (MNIST's CNN: ~3x)"
        )
    else:
        cost = "OpenVINO runs ONNX Runtime's extra output quantizers a little slower (MiniLM b16: 4%)"
    return (
        f"its int8 quantizers are placed for {names[placed]}, not {names.get(runtime, runtime)}: {cost}. "
        f'Export it for this runtime: export_onnx(..., target="{runtime}") or '
        f"`modelpress export --target {runtime}`."
    )


def read_target(model: Any) -> Target:
    """The runtime an ONNX model's quantizers were placed for (`TARGET_KEY`; "openvino" when absent)."""
    for prop in model.metadata_props:
        if prop.key == TARGET_KEY and prop.value in TARGETS:
            return prop.value
    return "openvino"


def write_target(model: Any, target: Target) -> None:
    """Record `target` in the model's metadata (`TARGET_KEY`), replacing an earlier value."""
    kept = [p for p in model.metadata_props if p.key != TARGET_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    entry = model.metadata_props.add()
    entry.key, entry.value = TARGET_KEY, target


class _Placement:
    """Where ONNX Runtime needs quantized tensors that the OpenVINO placement leaves in float.

    ONNX Runtime runs a Conv/MatMul/Gemm as QLinearConv/QLinearMatMul/QGemm, an Add as QLinearAdd, a Concat
    as QLinearConcat and a global average pool as QLinearGlobalAveragePool only where it sees the whole
    `DequantizeLinear -> op -> QuantizeLinear` group (Relu/Clip between op and Q are removed by its own
    fusions when the Q's range makes them redundant). The OpenVINO placement quantizes layer inputs only.

    - A *product* is a Conv/MatMul/Gemm whose inputs are all dequantized (an int8 weight, a quantized
      activation). Its output (after Relu/Clip, and a MatMul's bias Add) is quantized when every reader can
      take int8: a QuantizeLinear (the next layer's input quantizer: its scale and zero point are reused), an
      integer join, or a MaxPool/reshape-like op whose readers can.
    - A *join* (Add or Concat of activations, global average pooling) is integer when its output can be
      quantized by the rule above; its inputs are quantized too (with the quantizer a next layer already
      reads them with, else a calibrated one). Joins and products decide each other: the set of integer
      joins is the largest one that satisfies the rule.
    - A MatMul of two activations (attention's Q K^T) gets quantizers on both inputs (the second int8, which
      ONNX Runtime's integer matmul runs fastest), unless one is a Softmax's output: probabilities over a
      long sequence are finer than an 8-bit grid (softmax V stays float; on MiniLM quantizing it too gained
      nothing measurable and cost fidelity).
    """

    def __init__(self, model: Any, *, activation_matmuls: bool = True, runtime: str = "onnxruntime") -> None:
        import onnx

        self.model = model
        self.g = _Graph(model.graph)
        self.ranks: dict[str, int] = {}
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if v.type.tensor_type.HasField("shape"):
                self.ranks[v.name] = len(v.type.tensor_type.shape.dim)
        nodes = list(model.graph.node)
        self.products = [n for n in nodes if self._is_product(n)]
        # Products of two activations (attention's Q K^T): their inputs get quantizers.
        self.matmuls = [n for n in nodes if activation_matmuls and self._is_activation_matmul(n)]
        self.products += self.matmuls
        joins = {id(n): n for n in nodes if self._is_join(n)}
        changed = True
        while changed:  # the largest self-consistent set of integer joins
            changed = False
            for key, node in list(joins.items()):
                if not self._join_holds(node, joins):
                    del joins[key]
                    changed = True
        self.joins = list(joins.values())
        # tensor -> output of the QuantizeLinear whose parameters it takes, or None (to be calibrated)
        self.tensors: dict[str, str | None] = {}
        if runtime == "openvino":
            # OpenVINO (NNCF's CPU placement): residual Adds and global average pools read quantized inputs,
            # so that the Add runs on int8 (fused into the conv before it) and the pool on codes; products'
            # outputs and the joins' own outputs stay float (the next layer's input quantizer takes them).
            self.joins = [n for n in self.joins if n.op_type in ("Add", "GlobalAveragePool", "ReduceMean")]
            self.products, self.matmuls = [], []
            for node in self.joins:
                for name in self._activation_inputs(node):
                    if not self._already_quantized(name):
                        self.tensors[name] = self._reusable(name)
            return
        for node in self.products:
            end = self._chain_end(node)
            if self._all_readers_take_int8(end, joins) and not self._already_quantized(end):
                self.tensors[end] = self._reusable(end)
        for node in self.joins:
            for name in [*self._activation_inputs(node), self._chain_end(node)]:
                if not self._already_quantized(name):
                    self.tensors[name] = self._reusable(name)
        for node in self.matmuls:
            for name in node.input[:2]:
                if not self._already_quantized(name):
                    self.tensors[name] = self._reusable(name)

    # -- what the graph holds ------------------------------------------------------------------------

    def _per_tensor_q(self, node: Any) -> bool:
        if node.op_type != "QuantizeLinear" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return False
        params = [self.g.value(n) for n in node.input[1:3] if n]
        return node.input[0] not in self.g.initializers and all(p is not None and p.size == 1 for p in params)

    def _dequantized(self, name: str) -> Any:
        """The DequantizeLinear producing `name` (through MaxPool/reshape-like ops), or None."""
        node = self.g.producer.get(name)
        while node is not None and node.op_type in _COMMUTING and len(node.output) == 1:
            node = self.g.producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            return None
        return node

    def _is_weight(self, name: str) -> bool:
        node = self.g.producer.get(name)
        if node is not None and node.op_type == "Transpose":
            node = self.g.producer.get(node.input[0])
        if node is None or node.op_type != "DequantizeLinear":
            return False
        value = self.g.value(node.input[0])
        return value is not None and value.dtype.kind in "iu"

    def _is_activation(self, name: str) -> bool:
        dq = self._dequantized(name)
        if dq is None or dq.input[0] in self.g.initializers or self.g.value(dq.input[0]) is not None:
            return False
        scale = self.g.value(dq.input[1])
        return scale is not None and scale.size == 1

    def _is_product(self, node: Any) -> bool:
        if node.op_type not in _PRODUCT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            return False
        if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0):
            return False
        a, b = node.input[0], node.input[1]
        return self._is_activation(a) and (self._is_weight(b) or self._is_activation(b))

    def _is_activation_matmul(self, node: Any) -> bool:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or self._is_product(node):
            return False
        inputs = node.input[:2]
        graph_inputs = {i.name for i in self.model.graph.input}
        return all(
            self.g.value(n) is None
            and not self._is_weight(n)
            and n not in graph_inputs
            and self.ranks.get(n, 0) >= 3
            and not self._from_softmax(n)
            for n in inputs
        )

    def _from_softmax(self, name: str) -> bool:
        """Whether `name` is a Softmax's output (through reshape-like ops)."""
        node = self.g.producer.get(name)
        while node is not None and node.op_type in _COMMUTING:
            node = self.g.producer.get(node.input[0])
        return node is not None and node.op_type == "Softmax"

    def _is_join(self, node: Any) -> bool:
        if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return False
        inputs = [n for n in node.input if n]
        constant = [self.g.value(n) is not None for n in inputs]
        if node.op_type == "Add":
            return len(inputs) == 2 and not any(constant)
        if node.op_type == "Concat":
            return len(inputs) >= 2 and not any(constant)
        if node.op_type == "GlobalAveragePool":
            return True
        if node.op_type == "ReduceMean":  # over all spatial dims: a global average pool
            rank = self.ranks.get(node.input[0])
            axes = self.g.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            if axes is None:
                axes = _attr(node, "axes", None)
            if rank is None or rank < 3 or axes is None:
                return False
            return sorted(int(a) % rank for a in list(axes)) == list(range(2, rank))
        return False

    def _activation_inputs(self, node: Any) -> list[str]:
        return [node.input[0]] if node.op_type in ("GlobalAveragePool", "ReduceMean") else list(node.input)

    def _chain_end(self, node: Any) -> str:
        """The tensor after the activations ONNX Runtime folds (and a MatMul's bias Add)."""
        name = node.output[0]
        bias = node.op_type == "MatMul"
        while name not in self.g.outputs:
            users = self.g.consumers.get(name, [])
            if len(users) != 1:
                break
            user = users[0]
            if user.op_type in _FOLDED_ACTIVATIONS and user.domain in ("", "ai.onnx"):
                if user.op_type == "Clip" and not all(
                    not n or self.g.value(n) is not None for n in user.input[1:]
                ):
                    break
            elif bias and user.op_type == "Add" and user.domain in ("", "ai.onnx"):
                other = user.input[1] if user.input[0] == name else user.input[0]
                value = self.g.value(other)
                if value is None or value.ndim != 1:
                    break
                bias = False
            else:
                break
            name = user.output[0]
        return name

    def _takes_int8(self, user: Any, name: str, joins: dict[int, Any]) -> bool:
        if self._per_tensor_q(user) or id(user) in joins:
            return True
        if user.op_type in _COMMUTING and len(user.output) == 1 and user.input[0] == name:
            return self._all_readers_take_int8(user.output[0], joins)
        return False

    def _all_readers_take_int8(self, name: str, joins: dict[int, Any]) -> bool:
        users = self.g.consumers.get(name, [])
        return (
            bool(users)
            and name not in self.g.outputs
            and all(self._takes_int8(u, name, joins) for u in users)
        )

    def _join_holds(self, node: Any, joins: dict[int, Any]) -> bool:
        # Its output is quantized anyway (every reader takes int8), so an input without a quantizer costs one
        # QuantizeLinear on that input, less than the float join and the quantizer after it.
        return self._all_readers_take_int8(self._chain_end(node), joins)

    def _already_quantized(self, name: str) -> bool:
        node = self.g.producer.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def _reusable(self, name: str) -> str | None:
        """The output of the first per-tensor QuantizeLinear reading `name`, whose parameters it can take;
        else of one reading it through MaxPool/reshape-like ops alone (quantizing before or after them gives
        the same codes, as `hoist_quantizers` uses; ONNX Runtime then runs them on the int8 codes)."""
        users = self.g.consumers.get(name, [])
        for user in users:
            if self._per_tensor_q(user) and user.input[0] == name:
                return str(user.output[0])
        if name in self.g.outputs or not users:
            return None
        for user in users:
            if user.op_type not in _COMMUTING or len(user.output) != 1 or user.input[0] != name:
                return None
        found = [self._reusable(user.output[0]) for user in users]
        return found[0] if found[0] is not None and all(f == found[0] for f in found) else None

    # -- the rewrite ---------------------------------------------------------------------------------

    def apply(self, ranges: dict[str, tuple[float, float]]) -> dict[str, int]:
        import numpy as np
        from onnx import helper, numpy_helper

        graph = self.model.graph
        g = self.g
        q_nodes = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
        new_nodes: list[Any] = []
        dropped: set[int] = set()
        pools = 0
        for node in self.joins:
            if node.op_type == "ReduceMean":
                rank = self.ranks[node.input[0]]
                squeeze = not _attr(node, "keepdims", 1)
                node.op_type = "GlobalAveragePool"
                del node.input[1:]
                del node.attribute[:]
                if squeeze:  # (N, C, 1, 1) -> (N, C): ONNX Runtime moves the quantizer back above it
                    out = node.output[0]
                    node.output[0] = f"{out}_pooled"
                    axes = f"{out}_axes"
                    graph.initializer.append(
                        numpy_helper.from_array(np.arange(2, rank, dtype=np.int64), axes)
                    )
                    new_nodes.append(helper.make_node("Squeeze", [node.output[0], axes], [out], name=axes))
                pools += 1
        created = 0
        for name, reuse in self.tensors.items():
            users = list(g.consumers.get(name, []))
            if reuse is not None and q_nodes[reuse].input[0] == name:
                q = q_nodes[reuse]
                params = list(q.input[1:])
            elif reuse is not None:  # the grid of a quantizer after a MaxPool/reshape reading this tensor
                params = list(q_nodes[reuse].input[1:])
                q = helper.make_node("QuantizeLinear", [name, *params], [f"{name}_q"], name=f"{name}_q")
                new_nodes.append(q)
            else:
                if name not in ranges:
                    raise KeyError(f"no calibrated range for tensor '{name}'")
                params = self._new_params(name, ranges[name])
                q = helper.make_node("QuantizeLinear", [name, *params], [f"{name}_q"], name=f"{name}_q")
                new_nodes.append(q)
                created += 1
            dq_out = next(
                (
                    d.output[0]
                    for d in g.consumers.get(q.output[0], [])
                    if d.op_type == "DequantizeLinear" and list(d.input[1:]) == params
                ),
                None,
            )
            if dq_out is None:
                dq_out = f"{q.output[0]}_dq"
                new_nodes.append(
                    helper.make_node("DequantizeLinear", [q.output[0], *params], [dq_out], name=dq_out)
                )
            for user in users:
                if user is q:
                    continue
                if self._per_tensor_q(user) and user.input[0] == name:
                    if self._same_params(list(user.input[1:]), params):
                        # One quantizer for one tensor: its readers take the kept one's codes.
                        for reader in g.consumers.get(user.output[0], []):
                            _rename_input(reader, user.output[0], q.output[0])
                        dropped.add(id(user))
                        continue
                    user.input[0] = dq_out  # a different grid: requantize the codes
                    continue
                _rename_input(user, name, dq_out)
        scaled = self._fold_output_scales(new_nodes, dropped)
        order = [n for n in graph.node if id(n) not in dropped] + new_nodes
        del graph.node[:]
        graph.node.extend(_toposort(order, graph))
        if scaled:
            produced = {o for n in graph.node for o in n.output}
            info = [v for v in graph.value_info if v.name in produced]
            del graph.value_info[:]
            graph.value_info.extend(info)
        return {
            "quantized_outputs": len(self.tensors),
            "new_quantizers": created,
            "integer_joins": len(self.joins),
            "pools": pools,
        }

    def _fold_output_scales(self, new_nodes: list[Any], dropped: set[int]) -> int:
        """Fold `MatMul(DQ(a), DQ(b)) -> Mul(c)` (attention's 1 / sqrt(d) after Q K^T) into a's dequantization
        scale: the product is c (a s_a)(b s_b) either way, and the Mul over the (B, heads, T, T) scores is
        gone (ONNX Runtime folds it into its float MatMul, but not into the integer one)."""
        import numpy as np
        from onnx import helper, numpy_helper

        graph = self.model.graph
        producer = {out: n for n in [*graph.node, *new_nodes] for out in n.output}
        readers: dict[str, list[Any]] = {}
        for n in [*graph.node, *new_nodes]:
            for name in n.input:
                readers.setdefault(name, []).append(n)
        outputs = {o.name for o in graph.output}
        folded = 0
        for node in self.matmuls:
            users = readers.get(node.output[0], [])
            dq = producer.get(node.input[0])
            if len(users) != 1 or node.output[0] in outputs or dq is None or dq.op_type != "DequantizeLinear":
                continue
            mul = users[0]
            if mul.op_type != "Mul" or id(mul) in dropped:
                continue
            factor = self.g.value(mul.input[1] if mul.input[0] == node.output[0] else mul.input[0])
            scale = self._value(dq.input[1])
            if (
                factor is None
                or factor.size != 1
                or scale is None
                or scale.size != 1
                or not float(factor) > 0
            ):
                continue
            key = f"{node.output[0]}_folded"
            graph.initializer.append(
                numpy_helper.from_array(np.array(float(scale) * float(factor), np.float32), f"{key}_scale")
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [dq.input[0], f"{key}_scale", *dq.input[2:]], [f"{key}_a"], name=key
                )
            )
            node.input[0] = f"{key}_a"
            node.output[0] = mul.output[0]
            dropped.add(id(mul))
            folded += 1
        return folded

    def _value(self, name: str) -> Any:
        """A constant's value, initializers added since the lookups were built included."""
        from onnx import numpy_helper

        value = self.g.value(name)
        if value is None:
            init = next((i for i in self.model.graph.initializer if i.name == name), None)
            value = None if init is None else numpy_helper.to_array(init)
        return value

    def _same_params(self, a: list[str], b: list[str]) -> bool:
        import numpy as np

        if len(a) != len(b):
            return False
        values = [(self.g.value(x), self.g.value(y)) for x, y in zip(a, b, strict=True)]
        return all(
            x is not None and y is not None and x.dtype == y.dtype and np.array_equal(x, y) for x, y in values
        )

    def _new_params(self, name: str, rng: tuple[float, float]) -> list[str]:
        import numpy as np
        from onnx import numpy_helper

        lo, hi = min(float(rng[0]), 0.0), max(float(rng[1]), 0.0)
        signed = self._signed_near(name)
        qmin, qmax = (-128, 127) if signed else (0, 255)
        scale = (hi - lo) / (qmax - qmin) if hi > lo else 1e-8
        zero = int(np.clip(round(qmin - lo / scale), qmin, qmax))
        scale_name, zero_name = f"{name}_q_scale", f"{name}_q_zero_point"
        self.model.graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                numpy_helper.from_array(np.array(zero, np.int8 if signed else np.uint8), zero_name),
            ]
        )
        return [scale_name, zero_name]

    def _signed_near(self, name: str) -> bool:
        """int8 codes where a neighbouring quantizer (of the producing layer's input, or of a join's other
        tensors) is int8: ONNX Runtime's integer kernels take one activation type per op."""
        import numpy as np

        if any(name == m.input[1] for m in self.matmuls):
            return True  # u8 x s8: the integer matmul ONNX Runtime runs fastest (u8 x u8 is slower)
        related: list[str] = []
        for node in self.products:
            if self._chain_end(node) == name:
                related.extend(n for n in node.input[:2] if self._is_activation(n))
        for node in self.joins:
            end = self._chain_end(node)
            if name == end or name in node.input:
                related.extend([*self._activation_inputs(node), end])
        for tensor in related:
            zero_point = None
            dq = self._dequantized(tensor)
            reuse = self._reusable(tensor)
            if dq is not None:
                zero_point = dq.input[2] if len(dq.input) > 2 else None
            elif reuse is not None:
                q = self.g.producer[reuse]
                zero_point = q.input[2] if len(q.input) > 2 else None
            value = self.g.value(zero_point) if zero_point else None
            if value is not None and value.dtype == np.int8:
                return True
        return False


def _rename_input(node: Any, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def _toposort(nodes: list[Any], graph: Any) -> list[Any]:
    """`nodes` in an order where every input is produced before it is read (stable otherwise)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    produced_by: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.output:
            produced_by[out] = index
    pending = {
        i: {n for n in node.input if n in produced_by and n not in available} for i, node in enumerate(nodes)
    }
    readers: dict[str, list[int]] = {}
    for i, needs in pending.items():
        for name in needs:
            readers.setdefault(name, []).append(i)
    import heapq

    ready = [i for i, needs in pending.items() if not needs]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for out in nodes[i].output:
            for j in readers.get(out, []):
                pending[j].discard(out)
                if not pending[j]:
                    heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle after placing quantizers")
    return order


def onnxruntime_plan(model: Any, *, activation_matmuls: bool = True) -> dict[str, str | None]:
    """The float tensors `place_for_onnxruntime` quantizes: tensor -> output of the QuantizeLinear whose
    scale and zero point it takes, or None where the range must be calibrated first.

    >>> needs = [t for t, q in onnxruntime_plan(model).items() if q is None]  # doctest: +SKIP
    """
    return dict(_Placement(model, activation_matmuls=activation_matmuls).tensors)


def openvino_plan(model: Any) -> dict[str, str | None]:
    """The float tensors `place_for_openvino` quantizes (as `onnxruntime_plan`)."""
    return dict(_Placement(model, runtime="openvino").tensors)


def place_for_openvino(model: Any, ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, int]:
    """Quantize the inputs of residual Adds and global average pools, in place, the way NNCF places them for
    OpenVINO's CPU plugin: the Add then runs on int8 inside the conv before it, the pool on codes (measured on
    ResNet-18 at b8: see NOTES.md). A tensor a next layer's input quantizer already reads takes its grid;
    others need a calibrated range in `ranges` (`openvino_plan` names them)."""
    return _Placement(model, runtime="openvino").apply(dict(ranges or {}))


def place_for_onnxruntime(
    model: Any, ranges: dict[str, tuple[float, float]] | None = None, *, activation_matmuls: bool = True
) -> dict[str, int]:
    """Quantize the outputs of integer Conv/MatMul/Gemm layers, residual Adds, Concats and global average
    pools so that ONNX Runtime runs them as QLinearConv/QLinearMatMul/QGemm, QLinearAdd, QLinearConcat and
    QLinearGlobalAveragePool (see `_Placement`), in place. Returns counts of what changed.

    A tensor that the next layer's input quantizer already reads takes that quantizer's scale and zero
    point (the torch model rounds it there anyway); every other one needs its (min, max) in `ranges`
    (`onnxruntime_plan` names them). The only change to what the model computes is that rounding of
    outputs that were float: a Conv's output feeding a residual Add, the Add's output, the pool's output.

    >>> place_for_onnxruntime(model, {"conv2d_2": (-3.1, 4.2)})  # doctest: +SKIP
    """
    return _Placement(model, activation_matmuls=activation_matmuls).apply(dict(ranges or {}))


def pad_conv_channels(model: Any, multiple: int = 4) -> int:
    """Pad the input channels of int8 Convs (one group) to a multiple of `multiple` with zeros, in place:
    the float input gets a zero channel before its QuantizeLinear, the int8 weight a zero input channel.
    Returns the count. The output is the same sum (the added terms are 0 x 0).

    ONNX Runtime's fastest int8 convolution (MLAS's symmetric indirect-conv kernel) takes only input
    channel counts that are multiples of 4; a 1- or 3-channel first layer otherwise runs an im2col GEMM
    with a short K (measured: MNIST's 1-channel conv 1.9x faster padded, single thread).
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    placement = _Placement(model, activation_matmuls=False)
    new_nodes: list[Any] = []
    shared: dict[tuple[Any, ...], str] = {}
    count = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or _attr(conv, "group", 1) != 1:
            continue
        if not placement._is_product(conv):
            continue
        w_dq, x_dq = g.producer.get(conv.input[1]), g.producer.get(conv.input[0])
        weight = g.value(w_dq.input[0]) if w_dq is not None else None
        if (
            w_dq is None
            or weight is None
            or weight.ndim < 3
            or weight.shape[1] % multiple == 0
            or _attr(w_dq, "axis", 1) != 0
        ):
            continue
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            continue
        x_q = g.producer.get(x_dq.input[0])
        if x_q is None or x_q.op_type != "QuantizeLinear":
            continue
        extra = -weight.shape[1] % multiple
        key = f"{conv.output[0]}_padded"
        padded = np.concatenate(
            [weight, np.zeros((weight.shape[0], extra, *weight.shape[2:]), weight.dtype)], axis=1
        )
        rank = weight.ndim
        weight_name = f"{w_dq.input[0]}_padded"  # keeps the layer's name ("stem.0.qweight_padded")
        if weight_name in g.initializers or any(i.name == weight_name for i in graph.initializer):
            weight_name = f"{key}_weight"
        graph.initializer.append(numpy_helper.from_array(padded, weight_name))
        source = (x_q.input[0], tuple(x_q.input[1:]), tuple(x_dq.input[1:]), extra, rank)
        if source not in shared:  # convs reading one input share its padded quantizer
            pads = np.zeros(2 * rank, np.int64)
            pads[rank + 1] = extra  # the end of the channel axis
            graph.initializer.append(numpy_helper.from_array(pads, f"{key}_pads"))
            new_nodes += [
                helper.make_node("Pad", [x_q.input[0], f"{key}_pads"], [f"{key}_x"], name=f"{key}_pad"),
                helper.make_node(
                    "QuantizeLinear", [f"{key}_x", *x_q.input[1:]], [f"{key}_q"], name=f"{key}_q"
                ),
                helper.make_node(
                    "DequantizeLinear", [f"{key}_q", *x_dq.input[1:]], [f"{key}_dq"], name=f"{key}_dq"
                ),
            ]
            shared[source] = f"{key}_dq"
        w_new = onnx.NodeProto()
        w_new.CopyFrom(w_dq)
        w_new.name = f"{key}_w"
        w_new.input[0] = weight_name
        w_new.output[0] = f"{key}_w"
        new_nodes.append(w_new)
        conv.input[0], conv.input[1] = shared[source], f"{key}_w"
        count += 1
    if count:
        _add_and_prune(graph, new_nodes)
    return count


def _keep_used(graph: Any, order: list[Any], *, sort: bool = False) -> None:
    """Make `order` the graph's nodes, less those (and the initializers) nothing reads any more; sorted
    topologically where `sort`."""
    outputs = {o.name for o in graph.output}
    while True:  # the replaced quantizers and weights, where only the rewritten layer read them
        used = {i for n in order for i in n.input} | outputs
        alive = [n for n in order if any(o in used for o in n.output)]
        if len(alive) == len(order):
            break
        order = alive
    del graph.node[:]
    graph.node.extend(_toposort(order, graph) if sort else order)
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _add_and_prune(graph: Any, new_nodes: list[Any]) -> None:
    """Add `new_nodes` to `graph`, drop the nodes and initializers nothing reads any more, and sort."""
    _keep_used(graph, list(graph.node) + new_nodes, sort=True)


def _static_hw(model: Any, name: str) -> tuple[int, int] | None:
    """(H, W) of the 4-D tensor `name` where shape inference knows them, else None."""
    import onnx

    graph = model.graph
    values = {v.name: v for v in list(graph.input) + list(graph.value_info)}
    if name not in values:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:
            return None
        values = {v.name: v for v in list(inferred.graph.input) + list(inferred.graph.value_info)}
    value = values.get(name)
    if value is None or not value.type.HasField("tensor_type"):
        return None
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4 or not all(d.HasField("dim_value") for d in dims[2:]):
        return None
    return dims[2].dim_value, dims[3].dim_value


def _per_tensor(g: _Graph, node: Any) -> bool:
    """Whether a QuantizeLinear / DequantizeLinear has one constant scale (not one per channel)."""
    import numpy as np

    scale = g.value(node.input[1])
    return scale is not None and np.asarray(scale).size == 1


def space_to_depth_stems(model: Any, max_channels: int = 3) -> int:
    """Rewrite each int8 Conv with at most `max_channels` input channels, stride 1, whose output goes
    (through an optional Relu and its quantizer) into a 2x2 stride-2 MaxPool, into the same maths on the
    input's 2x2 space-to-depth, in place; returns the count. ONNX Runtime (MLAS) runs a conv with 1-3 input
    channels at a fraction of its int8 speed, and the 2x2 pool after it over 4x the pixels.

    The pool's four window positions become four groups of output channels of one conv over the
    `SpaceToDepth` input (4x the channels, a quarter of the pixels, the same int8 weights placed at each
    position, zeros elsewhere), and the pool a max over the groups on the int8 codes (exact: max commutes
    with the monotone Relu and quantizer). Measured on MNIST's CNN (1 x 28 x 28, 2 threads, int8 / fp32 in
    ONNX Runtime, benchmarks/results/mnist-issue31.json): 0.620 -> 0.509 at batch 1, 0.685 -> 0.535 at 64.
    OpenVINO runs such a file ~3x slower (its per-op cost dominates there), so only the ONNX Runtime
    placement calls this.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    new_nodes: list[Any] = []
    count = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or _attr(conv, "group", 1) != 1:
            continue
        if _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            continue
        if list(_attr(conv, "strides", [1, 1])) != [1, 1] or list(_attr(conv, "dilations", [1, 1])) != [1, 1]:
            continue
        w_dq, x_dq = g.producer.get(conv.input[1]), g.producer.get(conv.input[0])
        if w_dq is None or w_dq.op_type != "DequantizeLinear" or _attr(w_dq, "axis", 1) != 0:
            continue
        weight = g.value(w_dq.input[0])
        if weight is None or weight.ndim != 4 or weight.shape[1] > max_channels:
            continue
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            continue
        x_q = g.producer.get(x_dq.input[0])
        if x_q is None or x_q.op_type != "QuantizeLinear" or not _per_tensor(g, x_q):
            continue
        # conv -> [Relu] -> QuantizeLinear -> DequantizeLinear -> MaxPool 2x2 / 2, each the only reader
        relu = g.only_user(conv.output[0])
        if relu is None or relu.op_type != "Relu":
            relu = None
        chain, name = [relu], (relu or conv).output[0]
        for op in ("QuantizeLinear", "DequantizeLinear", "MaxPool"):
            user = g.only_user(name)
            if user is None or user.op_type != op:
                break
            chain.append(user)
            name = user.output[0]
        if len(chain) != 4:
            continue
        relu, q_out, dq_out, pool = chain
        if (
            len(pool.output) != 1
            or list(_attr(pool, "kernel_shape", [])) != [2, 2]
            or list(_attr(pool, "strides", [1, 1])) != [2, 2]
            or any(_attr(pool, "pads", [0, 0, 0, 0]))
            or list(_attr(pool, "dilations", [1, 1])) != [1, 1]
            or _attr(pool, "ceil_mode", 0)
            or _attr(pool, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or not _per_tensor(g, q_out)
        ):
            continue
        hw = _static_hw(model, x_q.input[0])
        if hw is None or hw[0] % 2 or hw[1] % 2:
            continue
        c_out, c_in, k_h, k_w = weight.shape
        pads = list(_attr(conv, "pads", [0, 0, 0, 0]))
        geometry = []  # per axis: (offset of the first space-to-depth row, kernel, pad before, pad after)
        for axis, (size, k) in enumerate(zip(hw, (k_h, k_w), strict=True)):
            before, after = pads[axis], pads[axis + 2]
            pooled = (size + before + after - k + 1) // 2
            low, high = (-before) // 2, (k - before) // 2  # rows of the input's 2x2 blocks read
            kernel = high - low + 1
            end = pooled + kernel - 1 - size // 2 - (-low)
            geometry.append((low, kernel, -low, end, pooled))
        if any(g_[3] < 0 or g_[2] < 0 for g_ in geometry):
            continue
        (low_h, kern_h, _, _, out_h), (low_w, kern_w, _, _, out_w) = geometry
        packed = np.zeros((4, c_out, 4 * c_in, kern_h, kern_w), weight.dtype)
        for a in range(2):
            for b in range(2):
                for ky in range(k_h):
                    t = a - pads[0] + ky  # input row - 2 * pooled row
                    di, p = t // 2, t % 2
                    for kx in range(k_w):
                        u = b - pads[1] + kx
                        dj, q = u // 2, u % 2
                        for ci in range(c_in):
                            packed[2 * a + b, :, (2 * p + q) * c_in + ci, di - low_h, dj - low_w] = weight[
                                :, ci, ky, kx
                            ]
        key = f"{conv.output[0]}_s2d"
        scale, zero = g.value(w_dq.input[1]), g.value(w_dq.input[2]) if len(w_dq.input) > 2 else None
        if scale is None or (len(w_dq.input) > 2 and w_dq.input[2] and zero is None):
            continue
        weight_name = f"{w_dq.input[0]}_s2d"  # keeps the layer's name ("features.0.qweight_s2d")
        inits = [numpy_helper.from_array(packed.reshape(4 * c_out, 4 * c_in, kern_h, kern_w), weight_name)]
        w_inputs = [weight_name, f"{key}_wscale"]
        inits.append(numpy_helper.from_array(np.tile(np.asarray(scale).reshape(-1), 4), f"{key}_wscale"))
        if zero is not None:
            inits.append(numpy_helper.from_array(np.tile(np.asarray(zero).reshape(-1), 4), f"{key}_wzero"))
            w_inputs.append(f"{key}_wzero")
        conv_inputs = [f"{key}_x_dq", f"{key}_w"]
        if len(conv.input) > 2 and conv.input[2]:
            bias = g.value(conv.input[2])
            if bias is None:
                continue
            inits.append(numpy_helper.from_array(np.tile(bias, 4), f"{key}_bias"))
            conv_inputs.append(f"{key}_bias")
        inits.append(
            numpy_helper.from_array(np.array([0, out_h * out_w, 4, c_out], np.int64), f"{key}_cells_shape")
        )
        inits.append(
            numpy_helper.from_array(np.array([0, out_h, out_w, c_out], np.int64), f"{key}_map_shape")
        )
        graph.initializer.extend(inits)
        s2d_pads = [geometry[0][2], geometry[1][2], geometry[0][3], geometry[1][3]]
        new_conv = helper.make_node(
            "Conv",
            conv_inputs,
            [f"{key}_y"],
            name=conv.name,  # the torch layer's name, for the integer-kernel report
            kernel_shape=[kern_h, kern_w],
            pads=s2d_pads,
        )
        after = f"{key}_y"
        new_nodes += [
            helper.make_node("SpaceToDepth", [x_q.input[0]], [f"{key}_x"], name=f"{key}_x", blocksize=2),
            helper.make_node(
                "QuantizeLinear", [f"{key}_x", *x_q.input[1:]], [f"{key}_x_q"], name=f"{key}_x_q"
            ),
            helper.make_node(
                "DequantizeLinear", [f"{key}_x_q", *x_dq.input[1:]], [f"{key}_x_dq"], name=f"{key}_x_dq"
            ),
            helper.make_node("DequantizeLinear", w_inputs, [f"{key}_w"], name=f"{key}_w", axis=0),
            new_conv,
        ]
        if relu is not None:
            new_nodes.append(helper.make_node("Relu", [after], [f"{key}_relu"], name=relu.name))
            after = f"{key}_relu"

        # The max over the 4 groups as a (1, 4) MaxPool on the int8 codes, written channels-last so that
        # ONNX Runtime's layout pass cancels every Transpose here against its own around QLinearConv and
        # NhwcMaxPool: what runs is Reshape -> NhwcMaxPool -> Reshape (a Split and a Max copied 3x more).
        def transpose(src: str, dst: str, perm: list[int]) -> Any:
            return helper.make_node("Transpose", [src], [dst], name=dst, perm=perm)

        new_nodes += [
            helper.make_node("QuantizeLinear", [after, *q_out.input[1:]], [f"{key}_q"], name=q_out.name),
            transpose(f"{key}_q", f"{key}_nhwc", [0, 2, 3, 1]),
            helper.make_node(
                "Reshape", [f"{key}_nhwc", f"{key}_cells_shape"], [f"{key}_cells"], name=f"{key}_cells"
            ),
            transpose(f"{key}_cells", f"{key}_groups", [0, 3, 1, 2]),  # (N, C, pixels, 4 positions)
            helper.make_node(
                "MaxPool",
                [f"{key}_groups"],
                [f"{key}_max"],
                name=pool.name,
                kernel_shape=[1, 4],
                strides=[1, 4],
            ),
            transpose(f"{key}_max", f"{key}_max_nhwc", [0, 2, 3, 1]),
            helper.make_node(
                "Reshape", [f"{key}_max_nhwc", f"{key}_map_shape"], [f"{key}_map"], name=f"{key}_map"
            ),
            transpose(f"{key}_map", f"{key}_pooled", [0, 3, 1, 2]),
            helper.make_node(
                "DequantizeLinear", [f"{key}_pooled", *dq_out.input[1:]], [pool.output[0]], name=dq_out.name
            ),
        ]
        for node in (conv, *(n for n in chain if n is not None)):
            graph.node.remove(node)
        count += 1
    if count:
        _add_and_prune(graph, new_nodes)
    return count


def unfuse_residual_layernorm(model: Any) -> int:
    """Write each residual `Add` of two activations that feeds a `LayerNormalization` as the equivalent
    two-input `Sum`, in place; returns the count. The sum is the same (one addition, in the same order).

    ONNX Runtime's default session fuses `Add -> LayerNormalization` into its contrib
    `SkipLayerNormalization`, which onnxruntime 1.32 runs about 6x slower than the two ops it replaces on
    the x86 CPUs measured here (MiniLM b16, single thread: 12 fused nodes 40 ms; Sum + LayerNormalization
    6.8 ms), a quarter of an int8 encoder's time. The fusion matches `Add` only, so `Sum` keeps the two
    fast kernels. Both fp32 and quantized files for ONNX Runtime get it (the fp32 baseline is timed as
    exported the same way).
    """
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    count = 0
    for node in graph.node:
        if (
            node.op_type == "Add"
            and node.domain in ("", "ai.onnx")
            and len(node.input) == 2
            and not any(name in constants for name in node.input)
            and any(r.op_type == "LayerNormalization" for r in readers.get(node.output[0], []))
        ):
            node.op_type = "Sum"
            count += 1
    return count


# ------------------------------------------------------------------------------------------------------
# Placement for TensorRT
# ------------------------------------------------------------------------------------------------------


def weight_axis(node: Any, input_index: int, rank: int) -> int | None:
    """The output-channel axis of the weight that `node` (Conv, ConvTranspose, Gemm, MatMul) reads at
    `input_index`: where TensorRT wants per-channel weight scales. None where the input is no weight."""
    op = node.op_type
    if op == "Conv" and input_index == 1:
        return 0  # (out, in / group, *kernel)
    if op == "ConvTranspose" and input_index == 1:
        return 1  # (in, out / group, *kernel)
    if op == "Gemm" and input_index == 1:
        return 0 if _attr(node, "transB", 0) else 1
    if op == "Gemm" and input_index == 0:
        return 1 if _attr(node, "transA", 0) else 0
    if op == "MatMul" and input_index == 1 and rank >= 2:
        return rank - 1  # (..., in, out)
    return None


def _symmetric_int8(g: _Graph, dq: Any, axis: int) -> tuple[Any, Any] | None:
    """(int8 codes, scales) of a DequantizeLinear's constant weight re-quantized symmetric per channel on
    `axis` with codes in [-127, 127], or None where it already is so (or its value is unknown)."""
    import numpy as np

    codes, scale = g.value(dq.input[0]), g.value(dq.input[1])
    zero = g.value(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if codes is None or scale is None or (len(dq.input) > 2 and dq.input[2] and zero is None):
        return None
    per_channel = scale.size > 1
    on_axis = not per_channel or _attr(dq, "axis", 1) % codes.ndim == axis
    if (
        codes.dtype == np.int8
        and (zero is None or not zero.any())
        and on_axis
        and codes.min(initial=0) >= -127
    ):
        return None
    shape = [1] * codes.ndim
    if per_channel:
        shape[_attr(dq, "axis", 1) % codes.ndim] = -1
    z = np.zeros(()) if zero is None else zero.astype(np.float64).reshape(shape if per_channel else ())
    weight = (codes.astype(np.float64) - z) * scale.astype(np.float64).reshape(shape if per_channel else ())
    others = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.abs(weight).max(axis=others, keepdims=True)
    new_scale = np.where(amax > 0, amax / 127.0, 1.0)
    new_codes = np.clip(np.rint(weight / new_scale), -127, 127).astype(np.int8)
    return new_codes, new_scale.reshape(-1).astype(np.float32)


def _is_weight(g: _Graph, name: str) -> bool:
    """A constant, or a constant's DequantizeLinear, possibly behind ops that only move values."""
    source = g.producer.get(name)
    while source is not None and source.op_type in _COMMUTING and len(source.output) == 1:
        name, source = source.input[0], g.producer.get(source.input[0])
    if source is not None and source.op_type == "DequantizeLinear":
        name = source.input[0]
    return name in g.initializers or name in g._constants


def _dequantized_source(g: _Graph, name: str) -> bool:
    """Whether `name` comes from a DequantizeLinear through ops that commute with it."""
    source = g.producer.get(name)
    while source is not None and source.op_type in _COMMUTING and len(source.output) == 1:
        source = g.producer.get(source.input[0])
    return source is not None and source.op_type == "DequantizeLinear"


def tensorrt_plan(model: Any) -> list[str]:
    """The float tensors `place_for_tensorrt` quantizes when given their ranges: both inputs of each
    MatMul of two activations (attention's Q K^T and P V) that no DequantizeLinear feeds yet, in a graph
    that quantizes activations already (static int8). TensorRT runs such a MatMul in int8 only with both
    inputs quantized; modelpress's static int8 quantizes the inputs of Linear and Conv layers only.

    >>> tensorrt_plan(onnx.load("bert-int8.onnx"))[:2]  # doctest: +SKIP
    ['transpose', 'transpose_3']
    """
    if not quantizes_activations(model):
        return []
    g = _Graph(model.graph)
    plan: list[str] = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        if any(_is_weight(g, name) for name in node.input):
            continue
        plan += [n for n in node.input if not _dequantized_source(g, n) and n not in plan]
    return plan


def place_for_tensorrt(model: Any, ranges: dict[str, tuple[float, float]] | None = None) -> dict[str, int]:
    """Rewrite a QDQ graph into the form TensorRT's explicit quantization takes, in place; returns counts.

    - activation quantizers become per-tensor int8 with zero point 0 and the scale that covers the range
      the old (scale, zero point) covered: TensorRT quantizes symmetrically only, and a uint8 quantizer is
      refused by its ONNX parser. A range that never goes below zero loses one bit (255 codes become 128).
    - weights stay int8 with per-output-channel scales and zero point 0 (what modelpress's static int8
      writes); a weight with another zero point, uint8 codes, -128 codes or scales on another axis is
      re-quantized symmetric on its output-channel axis (`weight_axis`).
    - `DequantizeLinear(W (out, in)) -> Transpose -> MatMul` becomes `DequantizeLinear(W^T (in, out),
      axis=1) -> MatMul`, so the quantized weight feeds the layer directly.
    - the `axis` attribute of per-tensor quantizers goes (it means nothing there, and some TensorRT
      versions' parsers reject it).
    - each tensor of `tensorrt_plan` that has its (min, max) in `ranges` gets a symmetric int8 Q/DQ pair
      before the MatMuls that read it, so that attention's activation products run in int8 too.

    >>> place_for_tensorrt(onnx.load("int8.onnx"))  # doctest: +SKIP
    {'activations': 7, 'weights': 0, 'transposes': 0}
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    g = _Graph(graph)
    new_initializers: list[Any] = []
    counts = {"activations": 0, "weights": 0, "transposes": 0, "matmul_inputs": 0}

    def constant(name: str) -> bool:
        return name in g.initializers or name in g._constants

    # Weights: fold the Transpose between a weight's DequantizeLinear and its MatMul.
    dropped: set[int] = set()
    for tr in list(graph.node):
        if tr.op_type != "Transpose" or list(_attr(tr, "perm", [1, 0])) != [1, 0]:
            continue
        dq = g.producer.get(tr.input[0])
        users = g.consumers.get(tr.output[0], [])
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or not constant(dq.input[0])
            or g.only_user(dq.output[0]) is not tr
            or not users
            or any(u.op_type != "MatMul" or list(u.input).index(tr.output[0]) != 1 for u in users)
        ):
            continue
        codes = g.value(dq.input[0])
        if codes is None or codes.ndim != 2:
            continue
        name = f"{dq.input[0]}_in_out"
        new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(codes.T), name))
        dq.input[0] = name
        scale = g.value(dq.input[1])
        if scale is not None and scale.size > 1:
            _set_attr(dq, "axis", 1 - _attr(dq, "axis", 1) % 2)
        dq.output[0] = tr.output[0]
        dropped.add(id(tr))
        counts["transposes"] += 1
    if dropped:
        kept = [n for n in graph.node if id(n) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(new_initializers)
        new_initializers = []
        g = _Graph(graph)

    # Weights: symmetric int8 per output channel.
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        for index, name in enumerate(node.input[:2]):
            dq = g.producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear" or not constant(dq.input[0]):
                continue
            codes = g.value(dq.input[0])
            axis = weight_axis(node, index, codes.ndim if codes is not None else 0)
            if axis is None or len(g.consumers.get(dq.output[0], [])) != 1:
                continue
            redone = _symmetric_int8(g, dq, axis)
            if redone is None:
                continue
            key = f"{dq.output[0]}_trt"
            new_initializers += [
                numpy_helper.from_array(redone[0], f"{key}_weight"),
                numpy_helper.from_array(redone[1], f"{key}_scale"),
                numpy_helper.from_array(np.zeros(redone[1].shape, np.int8), f"{key}_zero_point"),
            ]
            del dq.input[:]
            dq.input.extend([f"{key}_weight", f"{key}_scale", f"{key}_zero_point"])
            _set_attr(dq, "axis", axis)
            counts["weights"] += 1

    # Activations: per-tensor int8, zero point 0, covering the same range.
    retyped: set[str] = set()  # codes that were uint8: their value_info goes
    for q in list(graph.node):
        if q.op_type != "QuantizeLinear" or constant(q.input[0]) or len(q.input) < 2:
            continue
        scale = g.value(q.input[1])
        zero = g.value(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            continue  # per-channel activations: left for `check_tensorrt` to name
        dqs = [u for u in g.consumers.get(q.output[0], []) if u.op_type == "DequantizeLinear"]
        if zero.dtype == np.int8 and int(zero) == 0:
            for n in (q, *dqs):
                _drop_attr(n, "axis")
            continue
        info = np.iinfo(zero.dtype)
        s, z = float(scale), int(zero)
        lo, hi = (info.min - z) * s, (info.max - z) * s
        amax = max(-lo, hi)
        key = f"{q.output[0]}_trt"
        new_initializers += [
            numpy_helper.from_array(np.array(amax / 127.0 if amax > 0 else 1e-8, np.float32), f"{key}_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{key}_zero_point"),
        ]
        for n in (q, *dqs):
            del n.input[1:]
            n.input.extend([f"{key}_scale", f"{key}_zero_point"])
            _drop_attr(n, "axis")
        retyped.add(q.output[0])
        counts["activations"] += 1

    # Attention's activation products: a new symmetric pair before the MatMuls reading each planned tensor.
    added: list[Any] = []
    for name in [n for n in tensorrt_plan(model) if n in (ranges or {})]:
        lo, hi = (ranges or {})[name]
        amax = max(-float(lo), float(hi), 0.0)
        key = f"{name}_trt_q"
        new_initializers += [
            numpy_helper.from_array(np.array(amax / 127.0 if amax > 0 else 1e-8, np.float32), f"{key}_scale"),
            numpy_helper.from_array(np.array(0, np.int8), f"{key}_zero_point"),
        ]
        params = [f"{key}_scale", f"{key}_zero_point"]
        added += [
            helper.make_node("QuantizeLinear", [name, *params], [f"{key}_codes"], name=f"{key}"),
            helper.make_node("DequantizeLinear", [f"{key}_codes", *params], [f"{key}_dq"], name=f"{key}_dq"),
        ]
        for user in g.consumers.get(name, []):
            if user.op_type == "MatMul":
                _rename_input(user, name, f"{key}_dq")
        counts["matmul_inputs"] += 1
    if added:
        order = list(graph.node) + added
        del graph.node[:]
        graph.node.extend(_toposort(order, graph))

    graph.initializer.extend(new_initializers)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept_init = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept_init)
    produced = {o for n in graph.node for o in n.output}
    info_kept = [v for v in graph.value_info if v.name in produced and v.name not in retyped]
    del graph.value_info[:]
    graph.value_info.extend(info_kept)
    return counts


def _set_attr(node: Any, name: str, value: int) -> None:
    from onnx import helper

    _drop_attr(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _drop_attr(node: Any, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
