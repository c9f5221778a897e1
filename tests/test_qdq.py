"""Quantizer placement passes on QDQ ONNX graphs (deploy/qdq.py)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from modelpress.deploy.qdq import hoist_quantizers


def _graph(*, per_channel: bool = False, extra_user: bool = False) -> onnx.ModelProto:
    """x (N, 2, 8, 8) -> Relu -> MaxPool -> Flatten -> Q -> DQ -> Gemm (32 -> 3) [-> y]."""
    rng = np.random.default_rng(0)
    scale = np.array([0.02, 0.03], np.float32) if per_channel else np.array(0.02, np.float32)
    zero = np.zeros(2, np.uint8) if per_channel else np.array(0, np.uint8)
    inits = [
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(zero, "z"),
        numpy_helper.from_array(rng.standard_normal((3, 32)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("QuantizeLinear", ["f", "s", "z"], ["q"], **({"axis": 1} if per_channel else {})),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], **({"axis": 1} if per_channel else {})),
        helper.make_node("Gemm", ["d", "w"], ["y"], transB=1),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])]
    if extra_user:
        outputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, [None, 32]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 8, 8])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0])


def test_hoists_above_maxpool_and_flatten_exactly() -> None:
    model = _graph()
    before = copy.deepcopy(model)
    assert hoist_quantizers(model) == 2
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Relu", "QuantizeLinear", "DequantizeLinear", "MaxPool", "Flatten", "Gemm"]
    x = torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(1)).numpy()
    np.testing.assert_array_equal(_run(model, x), _run(before, x))
    assert hoist_quantizers(model) == 0  # nothing left to move


@pytest.mark.parametrize("kind", ["per_channel", "extra_user"])
def test_leaves_quantizers_that_do_not_commute(kind: str) -> None:
    # A per-channel quantizer's axis changes meaning across Flatten; a tensor other nodes (or the graph
    # output) also read must keep its float value.
    model = _graph(per_channel=kind == "per_channel", extra_user=kind == "extra_user")
    before = [n.op_type for n in model.graph.node]
    assert hoist_quantizers(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def _int8_linear_model(tmp_path, *, integer_matmul: bool, seq: bool, activations: str = "asymmetric"):
    """A two-Linear model with static int8 (GELU between, as a transformer FFN), exported both ways."""
    from torch import nn

    import modelpress as mp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    shape = (4, 6, 16) if seq else (4, 16)
    data = [(torch.randn(*shape),) for _ in range(4)]
    q = mp.compress(model, [mp.StaticInt8Config(layers=("linear",), activations=activations)], data=data)
    name = f"{'mmi' if integer_matmul else 'qdq'}{'-seq' if seq else ''}-{activations}.onnx"
    return q, data, mp.export_onnx(q, data[0], tmp_path / name, integer_matmul=integer_matmul)


@pytest.mark.parametrize("seq", [True, False], ids=["matmul-3d", "gemm-2d"])
def test_int8_linears_become_matmul_integer_to_float_with_their_bias(tmp_path, seq) -> None:
    import modelpress as mp
    from modelpress._files import file_size

    q, data, fused = _int8_linear_model(tmp_path, integer_matmul=True, seq=seq)
    _, _, plain = _int8_linear_model(tmp_path, integer_matmul=False, seq=seq)
    graph = onnx.load(str(fused)).graph
    ops = [n.op_type for n in graph.node if n.op_type != "Constant"]
    fused_nodes = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused_nodes) == 2 and all(
        n.domain == "com.microsoft" and len(n.input) == 7 for n in fused_nodes
    )
    # No float weight, no separate bias Add, no DequantizeLinear left: the codes feed the integer kernel.
    assert "Add" not in ops and "DequantizeLinear" not in ops and "Gemm" not in ops and "MatMul" not in ops
    int8 = [i for i in graph.initializer if i.data_type == TensorProto.INT8 and len(i.dims) == 2]
    assert sorted(tuple(i.dims) for i in int8) == [(16, 32), (32, 8)]  # (K, N)
    assert file_size(fused) <= file_size(plain) * 1.02
    for runtime in mp.available_runtimes():
        a = mp.open_session(fused, runtime).run([data[1][0].numpy()])[0]
        b = mp.open_session(plain, runtime).run([data[1][0].numpy()])[0]
        np.testing.assert_allclose(a, b, atol=1e-4)
        assert mp.check_parity(q, mp.open_session(fused, runtime), data[:2]).passed


def test_int8_inputs_stay_qdq(tmp_path) -> None:
    # ONNX Runtime shifts int8 QDQ inputs to uint8 itself; inside MatMulIntegerToFloat it could not.
    _, _, path = _int8_linear_model(tmp_path, integer_matmul=True, seq=True, activations="symmetric")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "MatMulIntegerToFloat" not in ops and ops.count("QuantizeLinear") == 2  # both inputs go below 0


def test_int8_feature_maps_flatten_channels_last_into_the_classifier(tmp_path) -> None:
    # OpenVINO keeps int8 maps channels-last: flattening them (N, H, W, C) with the weight's rows permuted
    # saves it a reorder; the codes and the sum are the same, so the outputs match the torch model.
    from torch import nn

    import modelpress as mp

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    ).eval()
    data = [(torch.randn(4, 1, 8, 8),) for _ in range(4)]
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    path = mp.export_onnx(q, data[0], tmp_path / "cnn.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node if n.op_type != "Constant"]
    assert ops[-3:] == ["Transpose", "Reshape", "MatMulIntegerToFloat"] or ops[-3:] == [
        "Transpose",
        "Flatten",
        "MatMulIntegerToFloat",
    ]
    assert [list(_attr_ints(n, "perm")) for n in graph.node if n.op_type == "Transpose"] == [[0, 2, 3, 1]]
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(path, runtime), data[:2]).passed, runtime
    plain = mp.export_onnx(q, data[0], tmp_path / "qdq.onnx", integer_matmul=False)
    assert "Transpose" not in [n.op_type for n in onnx.load(str(plain)).graph.node]


def _attr_ints(node: onnx.NodeProto, name: str) -> list[int]:
    return next(list(a.ints) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("integer_matmul", [True, False])
def test_a_reduction_after_a_bias_free_int8_layer_is_right_in_every_runtime(tmp_path, integer_matmul) -> None:
    # Linear (no bias) -> mean over tokens -> Linear, both int8 with int8 inputs: OpenVINO's low-precision
    # rewrite got this wrong (cosine -0.09 to the torch model) until the export guards the reduction.
    from torch import nn

    import modelpress as mp

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(64, 32, bias=False)
            self.classifier = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.proj(x).mean(1))

    torch.manual_seed(0)
    model = Head().eval()
    data = [(torch.randn(2, 32, 64),) for _ in range(4)]
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    path = mp.export_onnx(q, data[0], tmp_path / "head.onnx", integer_matmul=integer_matmul)
    assert "ReduceMean" in [n.op_type for n in onnx.load(str(path)).graph.node]
    for runtime in mp.available_runtimes():
        report = mp.check_parity(q, mp.open_session(path, runtime), data[:2], raise_on_failure=False)
        assert report.passed, (runtime, report.message)


def _residual_graph(*, add_is_output: bool) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv1 -> Relu -> Q1 -> DQ1 -> Conv2 -> Add(Conv2, Relu) [-> Q2 -> DQ2 -> Conv3] -> y."""
    rng = np.random.default_rng(0)

    def weight(name: str) -> list[onnx.TensorProto]:
        codes = rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8)
        return [
            numpy_helper.from_array(codes, f"{name}_w"),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), f"{name}_ws"),
            numpy_helper.from_array(np.zeros(4, np.int8), f"{name}_wz"),
        ]

    inits = [*weight("c1"), *weight("c2"), *weight("c3")]
    for name, scale in (("x", 0.05), ("r", 0.03), ("a", 0.04)):
        inits += [
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
            numpy_helper.from_array(np.array(0 if name != "x" else 128, np.uint8), f"{name}_z"),
        ]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
    ]
    for name in ("c1", "c2", "c3"):
        nodes.append(
            helper.make_node(
                "DequantizeLinear", [f"{name}_w", f"{name}_ws", f"{name}_wz"], [f"{name}_wd"], axis=0
            )
        )
    nodes += [
        helper.make_node("Conv", ["xd", "c1_wd"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "r_s", "r_z"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "r_s", "r_z"], ["rd"]),
        helper.make_node("Conv", ["rd", "c2_wd"], ["c2"], **conv),
        helper.make_node("Add", ["c2", "r"], ["a"]),
    ]
    out = "a"
    if not add_is_output:
        nodes += [
            helper.make_node("QuantizeLinear", ["a", "a_s", "a_z"], ["aq"]),
            helper.make_node("DequantizeLinear", ["aq", "a_s", "a_z"], ["ad"]),
            helper.make_node("Conv", ["ad", "c3_wd"], ["y"], **conv),
        ]
        out = "y"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 6, 6])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, 4, 6, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def test_onnxruntime_plan_reuses_input_quantizers_and_names_what_to_calibrate(tmp_path) -> None:
    from modelpress.deploy.qdq import onnxruntime_plan, place_for_onnxruntime

    model = _residual_graph(add_is_output=False)
    plan = onnxruntime_plan(model)
    # Conv2's output feeds the integer Add: its range is new; the ReLU output and the Add output take the
    # quantizers the next layers already read them with.
    assert plan == {"r": "rq", "c2": None, "a": "aq"}
    before = copy.deepcopy(model)
    counts = place_for_onnxruntime(model, {"c2": (-2.0, 3.0)})
    assert counts["new_quantizers"] == 1 and counts["integer_joins"] == 1
    onnx.checker.check_model(model)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    add = next(n for n in model.graph.node if n.op_type == "Add")
    assert [producers[i] for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]
    # ONNX Runtime now runs Conv1, Conv2 and the Add as integer (Conv3 feeds the graph output: float).
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("QLinearAdd") == 1 and "Add" not in ops
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 6)).astype(np.float32)
    assert ort.InferenceSession(before.SerializeToString()).run(None, {"x": x})[0].shape == (2, 4, 6, 6)


def test_a_residual_add_that_is_the_graph_output_stays_float() -> None:
    from modelpress.deploy.qdq import onnxruntime_plan

    plan = onnxruntime_plan(_residual_graph(add_is_output=True))
    assert plan == {}  # no integer reader: quantizing the Add or Conv2's output would only add rounding
