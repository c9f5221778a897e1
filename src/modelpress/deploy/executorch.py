"""Export to ExecuTorch (`.pte`) with the XNNPACK delegate, and run the file in ExecuTorch's runtime.

The path is ExecuTorch's own: `torch.export` -> `to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`
-> `.to_executorch()`. A model compressed by modelpress's static int8 technique already computes with the
pt2e quantize/dequantize ops (`torch.ops.quantized_decomposed`) and int8 weight codes, which is the form
XNNPACK lowers into integer kernels; `xnnpack_int8_form` rewrites the few details in which the two differ
(see there), so that modelpress's calibration, and whatever technique chose the codes (GPTQ rounding,
SmoothQuant, pruning first), carries over to the `.pte` instead of ExecuTorch's default quantizer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Registers torch.ops.quantized_decomposed.*: the quantizers of modelpress's static int8 layers.
import torch.ao.quantization.fx._decomposed
from torch import nn

from modelpress._files import check_output_path, make_public
from modelpress.deploy.export import _cause, _input_names, _is_token_input, trace_plans, traceable
from modelpress.errors import ExportError, RuntimeUnavailableError
from modelpress.loading import Inputs, as_inputs
from modelpress.outputs import no_cache
from modelpress.techniques.cluster import decode_clustered_int8

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 32  # items of `data` that calibrate the layer outputs XNNPACK needs quantized
IO_METHOD = "modelpress_io"  # constant method of the .pte: UTF-8 JSON of input/output names and dynamic dims

_aten = torch.ops.aten
_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default
_DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_CHOOSE = torch.ops.quantized_decomposed.choose_qparams.tensor
_Q_DYNAMIC = torch.ops.quantized_decomposed.quantize_per_tensor.tensor
_DQ_DYNAMIC = torch.ops.quantized_decomposed.dequantize_per_tensor.tensor
# Layers XNNPACK runs as integer GEMMs, and the activations it fuses into them.
_GEMMS = {_aten.linear.default, _aten.conv1d.default, _aten.conv2d.default, _aten.convolution.default}
_FUSED = {_aten.relu.default, _aten.hardtanh.default}
# Ops that commute exactly with a per-tensor quantizer: they select, move or clamp values without making
# new ones, so Q(f(DQ(Q(x)))) == Q(f(x)) and a quantizer after them may equally stand before them.
_EXACT = {
    _aten.relu.default,
    _aten.max_pool1d.default,
    _aten.max_pool2d.default,
    _aten.flatten.using_ints,
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
    _aten.permute.default,
    _aten.transpose.int,
    _aten.squeeze.dim,
    _aten.unsqueeze.default,
    _aten.clone.default,
    _aten.contiguous.default,
    _aten.dropout.default,
}


def require_executorch() -> None:
    """Raise a clear error when the `executorch` extra is not installed."""
    if importlib.util.find_spec("executorch") is None:
        raise RuntimeUnavailableError(
            "ExecuTorch is not installed. Install it with `pip install modelpress[executorch]` "
            "(executorch==1.5.1 beside torch 2.13)."
        )


# --------------------------------------------------------------------------------------------------
# modelpress's static int8 graph -> the pt2e form XNNPACK lowers
# --------------------------------------------------------------------------------------------------


def _arg(node: torch.fx.Node, i: int) -> Any:
    return node.args[i] if len(node.args) > i else None


def _is(node: Any, target: Any) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _quantized_gemms(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """GEMMs with a per-tensor dequantized input and a per-channel dequantized weight: modelpress's
    static int8 layers (QuantizedLayer with an input quantizer)."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.target in _GEMMS
        and _is(_arg(n, 0), _DQ)
        and _is(_arg(n, 1), _DQ_CHANNEL)
    ]


def _tail(gemm: torch.fx.Node) -> torch.fx.Node:
    """The GEMM, or the activation XNNPACK fuses into it (its only user)."""
    users = list(gemm.users)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in _FUSED:
        return users[0]
    return gemm


def _downstream_quantizer(tail: torch.fx.Node) -> torch.fx.Node | None:
    """The quantizer that the output of `tail` reaches through ops that commute with it exactly, if any."""
    node = tail
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _is(user, _Q):
            return user
        if user.op != "call_function" or user.target not in _EXACT or user.args[0] is not node:
            return None
        node = user
    return None


def _signed(graph: torch.fx.Graph) -> int:
    """uint8 activation codes -> the int8 codes XNNPACK runs: code - 128 with zero point - 128, the
    same grid, so the values are identical."""
    changed = 0
    for node in graph.nodes:
        if (_is(node, _Q) or _is(node, _DQ)) and node.args[-1] == torch.uint8:
            x, scale, zero_point, qmin, qmax, _ = node.args
            node.args = (x, scale, int(zero_point) - 128, int(qmin) - 128, int(qmax) - 128, torch.int8)
            changed += 1
    return changed


def _first_user_input(program: Any) -> torch.fx.Node:
    from torch.export.graph_signature import InputKind

    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    specs = program.graph_signature.input_specs
    return next(n for n, spec in zip(placeholders, specs, strict=True) if spec.kind == InputKind.USER_INPUT)


def _constant(program: Any, name: str, value: torch.Tensor) -> torch.fx.Node:
    from executorch.backends.transforms.utils import create_constant_placeholder
    from torch.export.graph_signature import InputKind

    graph = program.graph_module.graph
    with graph.inserting_before(_first_user_input(program)):
        return create_constant_placeholder(program, graph, name, InputKind.CONSTANT_TENSOR, value)


def _drop_unused_constants(program: Any) -> None:
    from executorch.backends.transforms.utils import delete_constant_placeholder, is_param_node

    graph = program.graph_module.graph
    graph.eliminate_dead_code()
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users and is_param_node(program, node):
            delete_constant_placeholder(program, node)


def _constant_zero_points(program: Any) -> int:
    """Per-channel weight dequantizers whose zero points are computed in the graph (`zeros_like(scale)`)
    read them from a constant instead: XNNPACK takes a weight's quantization parameters from constants."""
    from executorch.backends.transforms.utils import is_param_node

    changed = 0
    for node in list(program.graph_module.graph.nodes):
        if not _is(node, _DQ_CHANNEL):
            continue
        scale, zero_point = node.args[1], node.args[2]
        if isinstance(zero_point, torch.fx.Node) and is_param_node(program, zero_point):
            continue
        value = torch.zeros(scale.meta["val"].shape, dtype=torch.int64)
        node.replace_input_with(zero_point, _constant(program, f"{node.name}_zero_point", value))
        changed += 1
    _drop_unused_constants(program)
    return changed


def _float_weight(program: Any, gemm: torch.fx.Node) -> None:
    """Give `gemm` its dequantized weight as a float constant: XNNPACK runs it as a float GEMM."""
    from executorch.backends.transforms.utils import get_param_tensor

    dq = gemm.args[1]
    assert isinstance(dq, torch.fx.Node)
    args = [get_param_tensor(program, a) if isinstance(a, torch.fx.Node) else a for a in dq.args]
    weight = _DQ_CHANNEL(*args)
    gemm.replace_input_with(dq, _constant(program, f"{gemm.name}_float_weight", weight))
    _drop_unused_constants(program)


def _insert_quantizer(
    graph: torch.fx.Graph, after: torch.fx.Node, scale: float, zero_point: int, fake_mode: Any
) -> None:
    """Q -> DQ (int8, per tensor) on the output of `after`, for all its users."""
    users = list(after.users)
    with graph.inserting_after(after):
        q = graph.call_function(_Q, (after, scale, zero_point, -128, 127, torch.int8))
    with graph.inserting_after(q):
        dq = graph.call_function(_DQ, (q, scale, zero_point, -128, 127, torch.int8))
    with fake_mode:
        q.meta["val"] = _Q(after.meta["val"], scale, zero_point, -128, 127, torch.int8)
        dq.meta["val"] = _DQ(q.meta["val"], scale, zero_point, -128, 127, torch.int8)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in after.meta:
            q.meta[key] = dq.meta[key] = after.meta[key]
    for user in users:
        user.replace_input_with(after, dq)


def _dynamic_input(graph: torch.fx.Graph, gemm: torch.fx.Node, fake_mode: Any, *, source: Any = None) -> None:
    """Quantize the input of `gemm` at run time (the pattern of pt2e's dynamic quantization), in place of
    its calibrated quantizer: XNNPACK's dynamically quantized GEMM, int8 weights, float output."""
    import operator

    dq = gemm.args[0]
    assert isinstance(dq, torch.fx.Node)
    x = source
    if x is None:
        assert isinstance(dq.args[0], torch.fx.Node)
        x = dq.args[0].args[0]  # the float input of the static quantizer
    assert isinstance(x, torch.fx.Node)
    eps = float(torch.finfo(torch.float32).eps)
    with graph.inserting_before(gemm):
        params = graph.call_function(_CHOOSE, (x, -128, 127, eps, torch.int8))
        scale = graph.call_function(operator.getitem, (params, 0))
        zero_point = graph.call_function(operator.getitem, (params, 1))
        q = graph.call_function(_Q_DYNAMIC, (x, scale, zero_point, -128, 127, torch.int8))
        dq_new = graph.call_function(_DQ_DYNAMIC, (q, scale, zero_point, -128, 127, torch.int8))
    with fake_mode:
        params.meta["val"] = _CHOOSE(x.meta["val"], -128, 127, eps, torch.int8)
        scale.meta["val"], zero_point.meta["val"] = params.meta["val"]
        q.meta["val"] = _Q_DYNAMIC(
            x.meta["val"], scale.meta["val"], zero_point.meta["val"], -128, 127, torch.int8
        )
        dq_new.meta["val"] = _DQ_DYNAMIC(
            q.meta["val"], scale.meta["val"], zero_point.meta["val"], -128, 127, torch.int8
        )
    gemm.replace_input_with(dq, dq_new)


def _lifted_args(program: Any, inputs: Inputs) -> list[Any]:
    from torch.export.graph_signature import InputKind

    user = iter(inputs)
    args = []
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            args.append(next(user))
        elif spec.target in program.state_dict:
            args.append(program.state_dict[spec.target])
        else:
            args.append(program.constants[spec.target])
    return args


def _ranges(
    program: Any, nodes: list[torch.fx.Node], samples: list[Inputs]
) -> dict[str, tuple[float, float]]:
    """(min, max) of the outputs of `nodes` over `samples`, run through the exported graph in torch."""
    names = {n.name for n in nodes}
    lo: dict[str, float] = dict.fromkeys(names, math.inf)
    hi: dict[str, float] = dict.fromkeys(names, -math.inf)

    class Observer(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in names and isinstance(out, torch.Tensor) and out.numel():
                lo[n.name] = min(lo[n.name], float(out.min()))
                hi[n.name] = max(hi[n.name], float(out.max()))
            return out

    observer = Observer(program.graph_module)
    with torch.no_grad():
        for sample in samples:
            observer.run(*_lifted_args(program, sample))
    missing = sorted(n for n in names if not math.isfinite(lo[n]))
    if missing:
        raise ExportError(f"Calibration produced no values for {missing}; give non-empty calibration data.")
    return {n: (lo[n], hi[n]) for n in names}


def _int8_params(lo: float, hi: float) -> tuple[float, int]:
    """Asymmetric int8 per-tensor scale and zero point covering [lo, hi] (and 0), as pt2e's observers."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zero_point = int(min(127, max(-128, round(-128 - lo / scale))))
    return float(scale), zero_point


@dataclass
class Int8Form:
    """What `xnnpack_int8_form` changed in a graph."""

    layers: int = 0  # int8 GEMMs: static (Linear / convolution with an input quantizer) and dynamic Linear
    signed: int = 0  # uint8 quantizers rewritten as int8
    zero_points: int = 0  # weight zero points made constants
    shared: int = 0  # output quantizers copied from a quantizer downstream (exact)
    calibrated: list[str] = field(default_factory=list)  # conv output quantizers measured on calibration data
    dynamic: list[str] = field(default_factory=list)  # Linears whose inputs are quantized at run time
    # layers whose output is a model output: float GEMMs with their weight stored dequantized (float)
    float_outputs: list[str] = field(default_factory=list)


def _dynamic_linears(program: Any, fake_mode: Any) -> list[str]:
    """modelpress's dynamic int8 Linear (`torch.ops.modelpress.dynamic_quant_linear`, ONNX Runtime's
    DynamicQuantizeLinear + MatMulInteger) -> the pt2e dynamic pattern XNNPACK runs: the same int8 weights,
    the input quantized at run time (XNNPACK: int8 with a scale per row, where ONNX Runtime takes one
    uint8 scale per tensor)."""
    import modelpress.ops.dynamic  # noqa: F401  (registers torch.ops.modelpress.dynamic_quant_linear)

    op = torch.ops.modelpress.dynamic_quant_linear.default
    graph = program.graph_module.graph
    names = []
    for node in list(graph.nodes):
        if not _is(node, op):
            continue
        x, qweight, scale, bias = node.args
        assert isinstance(scale, torch.fx.Node)
        zero_point = _constant(
            program, f"{node.name}_zero_point", torch.zeros(scale.meta["val"].shape, dtype=torch.int64)
        )
        with graph.inserting_before(node):
            weight = graph.call_function(_DQ_CHANNEL, (qweight, scale, zero_point, 0, -128, 127, torch.int8))
            placeholder_dq = graph.call_function(_DQ, (x, 1.0, 0, -128, 127, torch.int8))  # replaced below
            linear = graph.call_function(_aten.linear.default, (placeholder_dq, weight, bias))
        with fake_mode:
            weight.meta["val"] = _DQ_CHANNEL(
                qweight.meta["val"], scale.meta["val"], zero_point.meta["val"], 0, -128, 127, torch.int8
            )
            linear.meta["val"] = node.meta["val"]
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if key in node.meta:
                linear.meta[key] = node.meta[key]
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        _dynamic_input(graph, linear, fake_mode, source=x)
        graph.erase_node(placeholder_dq)
        names.append(linear.name)
    return names


def xnnpack_int8_form(program: Any, calibration: Callable[[], list[Inputs]] | None = None) -> Int8Form:
    """Rewrite an exported program of a modelpress static-int8 model (in place) into the form the XNNPACK
    partitioner lowers into int8 kernels, the form ExecuTorch's own XNNPACKQuantizer + convert_pt2e emit:

    0. modelpress's dynamic int8 Linear (`int8-dynamic`, a custom op ExecuTorch cannot run) becomes pt2e's
       dynamic pattern on the same int8 weights (see `_dynamic_linears`);
    1. uint8 activation quantizers become int8 ones on the same grid (codes and zero point - 128): the
       values are identical, and XNNPACK's integer kernels take signed activations;
    2. per-channel weight dequantizers read their (zero) zero points from a constant, not `zeros_like`;
    3. each int8 GEMM's output (after a fused ReLU) is quantized too, since XNNPACK's integer GEMMs
       produce int8: with the parameters of the quantizer it reaches through max-pool / reshape / ReLU
       (exact: the same values as before). Where none is reached, a convolution's output range is measured
       on `calibration()` (the calibration data; as pt2e's output observers do), and a Linear's input is
       quantized at run time instead (XNNPACK's dynamically quantized GEMM: int8 weights, an int8 scale per
       row of the input, float output): a transformer's Linear outputs feed residual sums with outlier
       features that one int8 range per tensor cannot hold (all-MiniLM-L6-v2 with calibrated output
       quantizers: embedding cosine 0.94 to fp32). A GEMM whose output is a model output stays as
       it is (its output is not quantized): it runs as a float GEMM, its weight dequantized from the
       int8 codes into the file as float, so the model's outputs are computed as in torch.

    >>> form = xnnpack_int8_form(torch.export.export(small, (x,)), lambda: [(x,)])  # doctest: +SKIP
    """
    from torch._guards import detect_fake_mode

    graph = program.graph_module.graph
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])
    context: Any = fake_mode if fake_mode is not None else contextlib.nullcontext()
    dynamic = _dynamic_linears(program, context)
    if not _quantized_gemms(graph):
        if dynamic:
            _drop_unused_constants(program)
            graph.lint()
            program.graph_module.recompile()
        return Int8Form(layers=len(dynamic), dynamic=dynamic)
    form = Int8Form(signed=_signed(graph), zero_points=_constant_zero_points(program), dynamic=dynamic)
    form.layers = len(_quantized_gemms(graph)) + len(dynamic)  # after dead code (an unused pooler) is gone
    needs: list[torch.fx.Node] = []
    for gemm in _quantized_gemms(graph):
        tail = _tail(gemm)
        users = list(tail.users)
        if len(users) == 1 and _is(users[0], _Q):
            continue
        if any(u.op == "output" for u in users):
            _float_weight(program, gemm)
            form.float_outputs.append(gemm.name)
            continue
        found = _downstream_quantizer(tail)
        if found is not None:
            _, scale, zero_point, _, _, _ = found.args
            _insert_quantizer(graph, tail, float(scale), int(zero_point), context)  # type: ignore[arg-type]
            form.shared += 1
        elif gemm.target == _aten.linear.default:
            _dynamic_input(graph, gemm, context)
            form.dynamic.append(gemm.name)
        else:
            needs.append(tail)
    if needs:
        samples = calibration() if calibration is not None else []
        if not samples:
            raise ExportError(
                f"{len(needs)} int8 layer output(s) ({', '.join(n.name for n in needs[:4])}) need a range for "
                "XNNPACK's integer kernels; give calibration data (export_executorch(..., data=...))."
            )
        ranges = _ranges(program, needs, samples)
        for tail in needs:
            scale, zero_point = _int8_params(*ranges[tail.name])
            _insert_quantizer(graph, tail, scale, zero_point, context)
            form.calibrated.append(tail.name)
    _drop_unused_constants(program)
    graph.lint()
    program.graph_module.recompile()
    return form


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------


@dataclass
class Lowered:
    """A model lowered for ExecuTorch: the `.pte` bytes and what XNNPACK runs of it."""

    buffer: bytes
    shapes: str  # "batch and sequence", "batch" or "static": which dims stayed dynamic
    delegation: dict[str, tuple[int, int]]  # op -> (nodes run by XNNPACK, nodes run by portable kernels)
    int8: Int8Form | None  # None for a model without static int8 layers
    input_names: list[str]
    output_names: list[str]

    @property
    def delegated_ops(self) -> list[str]:
        return sorted(op for op, (inside, _) in self.delegation.items() if inside)

    @property
    def undelegated_ops(self) -> list[str]:
        return sorted(op for op, (_, outside) in self.delegation.items() if outside)

    def summary(self) -> str:
        inside = sum(a for a, _ in self.delegation.values())
        outside = sum(b for _, b in self.delegation.values())
        return (
            f"XNNPACK runs {inside} of {inside + outside} ops ({', '.join(self.delegated_ops) or 'none'}); "
            f"outside it: {', '.join(self.undelegated_ops) or 'none'}"
        )


def _bounded(
    inputs: Inputs, *, max_batch: int, max_seq: int
) -> list[tuple[str, tuple[dict[int, Any], ...] | None]]:
    """Shapes to try, most dynamic first, with the upper bounds ExecuTorch plans memory for."""
    batch = torch.export.Dim.AUTO(min=1, max=max_batch)
    seq = torch.export.Dim.AUTO(min=1, max=max_seq)
    full = tuple(
        ({0: batch} if t.ndim >= 1 else {}) | ({1: seq} if _is_token_input(t) else {}) for t in inputs
    )
    batch_only = tuple({d: v for d, v in dims.items() if d == 0} for dims in full)
    plans: list[tuple[str, tuple[dict[int, Any], ...] | None]] = []
    if batch_only != full:
        plans.append(("batch and sequence", full))
    plans.append(("batch", batch_only))
    if any(full):
        plans.append(("static", None))
    return plans


def _check_bounds(inputs: Inputs, *, max_batch: int, max_seq: int) -> None:
    for i, t in enumerate(inputs):
        if t.ndim >= 1 and t.shape[0] > max_batch:
            raise ExportError(
                f"Example input {i} has batch {t.shape[0]}, above max_batch={max_batch}: raise max_batch "
                "(ExecuTorch plans memory for it) or give a smaller example."
            )
        if _is_token_input(t) and t.shape[1] > max_seq:
            raise ExportError(
                f"Example input {i} has sequence length {t.shape[1]}, above max_seq={max_seq}: raise "
                "max_seq or give a shorter example."
            )


def _input_bounds(program: Any) -> tuple[list[list[int | None]], list[list[int]]]:
    """For each user input of an exported program: its shape (None where a dim stayed symbolic) and its
    largest shape (the upper bound of each symbolic dim, which ExecuTorch plans memory for)."""
    from torch.export.graph_signature import InputKind

    placeholders = [n for n in program.graph_module.graph.nodes if n.op == "placeholder"]
    shapes: list[list[int | None]] = []
    largest: list[list[int]] = []
    for node, spec in zip(placeholders, program.graph_signature.input_specs, strict=True):
        if spec.kind != InputKind.USER_INPUT:
            continue
        shape = list(getattr(node.meta.get("val"), "shape", ()))
        shapes.append([d if isinstance(d, int) else None for d in shape])
        bounds = []
        for d in shape:
            if isinstance(d, int):
                bounds.append(d)
            else:
                upper = program.range_constraints[d.node.expr].upper
                bounds.append(int(upper))
        largest.append(bounds)
    return shapes, largest


def _upper_bounds_pass(ranges: dict[Any, Any]) -> Any:
    """ExecuTorch's memory planning pass with the export's own bounds of each dynamic dim.

    Its default pass reads the bounds from the shape environment, which lowering narrows: torch's fake
    convolution guards on the batch size when it picks a kernel and refines the batch range to [2, 15]
    (torch 2.13), so a program exported for batches up to 64 would take at most 15."""
    import sympy
    import torch.utils._pytree as pytree
    from executorch.exir.tensor import TensorSpec
    from torch.fx.passes.infra.pass_base import PassBase, PassResult
    from torch.utils._sympy.value_ranges import bound_sympy

    def upper(value: Any) -> int:
        if isinstance(value, int):
            return value
        expr = value.node.expr
        env = value.node.shape_env.var_to_range
        bound = bound_sympy(expr, {sym: ranges.get(sym, env.get(sym)) for sym in expr.free_symbols}).upper
        if not isinstance(bound, sympy.Integer):
            raise ExportError(
                f"A tensor's size {expr} has no upper bound; ExecuTorch plans memory for the largest shape. "
                "Export with dynamic=False or bound the dynamic dims (max_batch, max_seq)."
            )
        return int(bound)

    class UpperBounds(PassBase):
        def call(self, graph_module: torch.fx.GraphModule) -> PassResult:
            for module in graph_module.modules():
                if not isinstance(module, torch.fx.GraphModule):
                    continue
                for node in module.graph.nodes:
                    for spec in pytree.tree_flatten(node.meta.get("spec", []))[0]:
                        if isinstance(spec, TensorSpec):
                            spec.shape = [upper(d) for d in spec.shape]
                            spec.stride = [upper(d) for d in spec.stride]
            return PassResult(graph_module, True)

    return UpperBounds()


def _calibration_samples(data: Iterable[Any] | None, example_inputs: Inputs) -> list[Inputs]:
    if data is not None:
        samples = [as_inputs(item, where="calibration item") for item in _take(data, CALIBRATION_BATCHES)]
        if samples:
            return samples
    from modelpress.deploy.parity import parity_inputs

    log.warning(
        "export for ExecuTorch without calibration data: the ranges of the int8 layer outputs XNNPACK "
        "quantizes come from the example inputs and perturbations of them. Pass data "
        "(export_executorch(..., data=...)) for ranges that cover real inputs."
    )
    return parity_inputs(example_inputs, count=8)


def _take(data: Iterable[Any], n: int) -> Iterator[Any]:
    for i, item in enumerate(data):
        if i >= n:
            return
        yield item


def _delegation(program: Any) -> dict[str, tuple[int, int]]:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(program.graph_module)
    return {
        op: (b.delegated, b.non_delegated)
        for op, b in info.delegation_by_operator.items()
        if op not in ("getitem", "sym_size")
    }


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch.export and ExecuTorch's passes warn about deprecations we cannot act on; keep the terminal clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def lower_executorch(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    dynamic: bool = True,
    max_batch: int = 64,
    max_seq: int = 512,
    data: Iterable[Any] | None = None,
) -> Lowered:
    """Lower `model` for ExecuTorch with XNNPACK, without writing a file (see `export_executorch`).

    >>> lowered = lower_executorch(model, (torch.randn(1, 3, 32, 32),))  # doctest: +SKIP
    >>> lowered.summary()  # doctest: +SKIP
    'XNNPACK runs 12 of 13 ops (aten_convolution_default, ...); outside it: aten_view_copy_default'
    """
    require_executorch()
    import executorch.kernels.quantized  # noqa: F401  (the .out kernels of quantize/dequantize ops)
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower

    if max_batch < 1 or max_seq < 1:
        raise ExportError(f"max_batch={max_batch} and max_seq={max_seq} must be at least 1.")
    # clustered int8 layers gather their codes from codebooks; XNNPACK takes a weight as a stored tensor
    model = decode_clustered_int8(model.eval())
    with no_cache(model), torch.no_grad():
        traced, names = traceable(model, example_inputs)
        if dynamic:
            _check_bounds(example_inputs, max_batch=max_batch, max_seq=max_seq)
        plans = _bounded(example_inputs, max_batch=max_batch, max_seq=max_seq) if dynamic else []
        if not plans:
            plans = [("static", None)]

        def export(inputs: Inputs, shapes: Any) -> Any:
            with _quiet():
                return torch.export.export(traced, tuple(inputs), dynamic_shapes=shapes, strict=False)

        program, label, _ = trace_plans(
            model, traced, example_inputs, plans, export, what="ExecuTorch export"
        )
    shapes_in, largest = _input_bounds(program)
    ranges = dict(program.range_constraints)  # before lowering narrows them (see _upper_bounds_pass)
    form = xnnpack_int8_form(program, lambda: _calibration_samples(data, example_inputs))
    int8 = form if form.layers else None
    if int8 is not None and int8.float_outputs:
        log.info(
            "int8 layer(s) %s produce model outputs: XNNPACK runs them as float layers (their outputs are not "
            "quantized), with their weights dequantized into the file",
            int8.float_outputs,
        )
    input_names = _input_names(model, len(example_inputs)) or [
        f"input_{i}" for i in range(len(example_inputs))
    ]
    io_info = {"inputs": input_names, "outputs": names, "shapes": shapes_in, "largest": largest}
    try:
        with _quiet():
            edge = to_edge_transform_and_lower(
                program,
                # The second pass takes what the first left: int8 layers whose outputs stay float run as
                # float GEMMs in XNNPACK, their weights dequantized from the stored int8 codes.
                partitioner=[
                    XnnpackPartitioner(),
                    XnnpackPartitioner(config_precisions=ConfigPrecisionType.FP32),
                ],
                constant_methods={
                    IO_METHOD: torch.tensor(list(json.dumps(io_info).encode()), dtype=torch.uint8)
                },
            )
            delegation = _delegation(edge.exported_program())
            config = ExecutorchBackendConfig(sym_shape_eval_pass=_upper_bounds_pass(ranges))
            buffer = edge.to_executorch(config).buffer
    except Exception as exc:
        raise ExportError(
            f"ExecuTorch lowering of {type(model).__name__} failed ({_cause(exc)}). The model traced, but "
            "ExecuTorch could not lower an op in it: run `modelpress export --to onnx` for this model, or "
            "report the op."
        ) from exc
    return Lowered(
        buffer=bytes(buffer),
        shapes=label,
        delegation=delegation,
        int8=int8,
        input_names=input_names,
        output_names=names,
    )


def export_executorch(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dynamic: bool = True,
    max_batch: int = 64,
    max_seq: int = 512,
    data: Iterable[Any] | None = None,
) -> Path:
    """Export `model` to an ExecuTorch program at `path` (`.pte`), XNNPACK-delegated, written atomically.

    fp32 models lower as they are. A static-int8 model (`compress(model, "int8-static", data)`) lowers
    into XNNPACK's int8 kernels with its own int8 weights and calibrated input ranges, a dynamic-int8 one
    (`int8-dynamic`) into XNNPACK's dynamically quantized GEMMs (see `xnnpack_int8_form`); convolution
    outputs XNNPACK quantizes beyond those ranges are measured on up to 32 items of `data` (else on the
    example inputs, with a warning). Weight-only int8 layers keep their int8 weights in the file and
    rebuild the float weight on each call outside XNNPACK.

    With `dynamic`, the batch dim of every input (and the sequence dim of token inputs) is dynamic up to
    `max_batch` / `max_seq` (ExecuTorch plans memory for the largest shape) where the model allows it;
    else the export falls back to a dynamic batch only, then to static shapes, and says so.

    >>> export_executorch(model, (torch.randn(1, 3, 32, 32),), "model.pte")  # doctest: +SKIP
    """
    out = check_output_path(path, overwrite=overwrite)
    lowered = lower_executorch(
        model, example_inputs, dynamic=dynamic, max_batch=max_batch, max_seq=max_seq, data=data
    )
    log.info("%s: %s", out.name, lowered.summary())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(lowered.buffer)
        make_public(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("exported %s", out)
    return out


# --------------------------------------------------------------------------------------------------
# runtime
# --------------------------------------------------------------------------------------------------


class ExecuTorchSession:
    """A `.pte` in ExecuTorch's runtime (`executorch.runtime`), behind modelpress's `Session` interface.

    `threads` sizes XNNPACK's thread pool, which ExecuTorch shares across the whole process: the last
    session opened sets it for all.

    >>> session = ExecuTorchSession("model.pte", threads=2)  # doctest: +SKIP
    >>> logits, = session.run([x.numpy()])  # doctest: +SKIP
    """

    runtime = "executorch"

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 2) -> None:
        require_executorch()
        import executorch.kernels.quantized  # noqa: F401  (kernels of quantize ops XNNPACK leaves outside)
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        p = Path(path)
        if not p.is_file():
            raise ExportError(
                f"Artifact '{p}' does not exist. Export it first (`modelpress export --to executorch`)."
            )
        if threads < 1:
            raise RuntimeUnavailableError(f"threads={threads} must be at least 1.")
        try:
            self._program = Runtime.get().load_program(p)
            method = self._program.load_method("forward")
        except Exception as exc:
            raise ExportError(
                f"'{p}' is not a readable ExecuTorch program ({_cause(exc)}). Give a .pte written by "
                "`modelpress export --to executorch`."
            ) from exc
        if method is None:
            raise ExportError(f"'{p}' has no `forward` method; give a .pte written by modelpress.")
        portable_lib._unsafe_reset_threadpool(threads)
        self._method = method
        meta = method.metadata
        count = meta.num_inputs()
        info: dict[str, Any] = {}
        if IO_METHOD in self._program.method_names:
            io_method = self._program.load_method(IO_METHOD)
            if io_method is not None:
                info = json.loads(bytes(io_method.execute([])[0].tolist()).decode())
        if not info:  # a .pte from elsewhere: its declared sizes, taken as static
            sizes = [list(meta.input_tensor_meta(i).sizes()) for i in range(count)]
            info = {"shapes": sizes, "largest": sizes}
        self.input_names: list[str] = info.get("inputs", [f"input_{i}" for i in range(count)])
        self.output_names: list[str] = info.get("outputs", [f"output_{i}" for i in range(meta.num_outputs())])
        self.input_shapes: list[tuple[int | None, ...]] = [tuple(s) for s in info["shapes"]]
        # ExecuTorch plans memory for the largest shape: the bounds a dynamic dim may reach.
        self.max_shapes: list[tuple[int, ...]] = [tuple(s) for s in info["largest"]]
        self._dtypes = [_numpy_dtype(meta.input_tensor_meta(i).dtype()) for i in range(count)]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._dtypes):
            raise ValueError(
                f"The artifact takes {len(self._dtypes)} inputs ({self.input_names}); got {len(inputs)}."
            )
        tensors = []
        for name, x, dtype, bound in zip(
            self.input_names, inputs, self._dtypes, self.max_shapes, strict=True
        ):
            if x.ndim != len(bound) or any(n > b for n, b in zip(x.shape, bound, strict=True)):
                raise ValueError(
                    f"Input '{name}' has shape {tuple(x.shape)}; this ExecuTorch program takes at most "
                    f"{tuple(bound)}. Re-export with larger max_batch / max_seq, or split the batch."
                )
            tensors.append(torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)))
        outputs = self._method.execute(tensors)
        return [o.detach().numpy().copy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]


def _numpy_dtype(code: Any) -> np.dtype:
    """The numpy type of an ExecuTorch ScalarType (an enum value or its integer code)."""
    value = int(getattr(code, "value", code))
    table = {
        0: np.uint8,
        1: np.int8,
        2: np.int16,
        3: np.int32,
        4: np.int64,
        5: np.float16,
        6: np.float32,
        7: np.float64,
        11: np.bool_,
    }
    if value not in table:
        raise ExportError(
            f"ExecuTorch input dtype code {value} has no numpy type; export float or integer inputs."
        )
    return np.dtype(table[value])
