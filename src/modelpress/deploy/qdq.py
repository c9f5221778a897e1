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
from typing import Any

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
        new_initializers += [
            numpy_helper.from_array(w, f"{key}_weight"),
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
                [quantized, f"{key}_weight", dq.input[1], f"{key}_scale", dq.input[2], f"{key}_zero_point"]
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
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in order for i in n.input} | outputs
        alive = [n for n in order if any(o in used for o in n.output)]
        if len(alive) == len(order):
            break
        order = alive
    del graph.node[:]
    graph.node.extend(order)
    used = {i for n in graph.node for i in n.input} | outputs
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
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
