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
