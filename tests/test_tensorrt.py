"""TensorRT-ready ONNX: the structural checker (deploy/tensorrt.py) and the "tensorrt" placement (deploy/qdq.py)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from zoo import ZOO

import modelpress as mp
from modelpress.deploy.export import export_onnx
from modelpress.deploy.qdq import place_for_tensorrt, placement_warning, tensorrt_plan
from modelpress.deploy.tensorrt import check_tensorrt
from modelpress.errors import ExportError


def _int8(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    model, inputs = ZOO[name]()
    g = torch.Generator().manual_seed(3)
    data = [
        tuple(torch.randn(t.shape, generator=g) if t.is_floating_point() else t for t in inputs)
        for _ in range(4)
    ]
    return mp.compress(model, "int8-static", data), inputs


def _run(path_or_model: object, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = (
        path_or_model.SerializeToString()
        if isinstance(path_or_model, onnx.ModelProto)
        else str(path_or_model)
    )
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return list(session.run(None, inputs))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    model, inputs = _int8("resnet_cnn")
    out = tmp_path_factory.mktemp("trt")
    return {
        "model": model,
        "inputs": inputs,
        "tensorrt": export_onnx(model, inputs, out / "m.trt.onnx", target="tensorrt"),
        "openvino": export_onnx(model, inputs, out / "m.ov.onnx", target="openvino"),
    }


def test_static_int8_exported_for_tensorrt_has_no_findings(resnet_files: dict[str, object]) -> None:
    report = check_tensorrt(resnet_files["tensorrt"])
    assert report.ok, report.lines()
    assert report.summary == "7 of 7 Conv/MatMul/Gemm quantized"  # 6 convs + the classifier Gemm
    assert report.lines()[-1] == "TensorRT-ready: no findings"
    model = onnx.load(str(resnet_files["tensorrt"]))
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulIntegerToFloat" not in ops and {"QuantizeLinear", "DequantizeLinear"} <= ops
    for init in model.graph.initializer:  # every zero point is int8 0
        if "zero_point" in init.name or init.data_type == TensorProto.UINT8:
            value = numpy_helper.to_array(init)
            assert value.dtype == np.int8 and not value.any(), init.name
    # It computes what the int8 torch model computes, up to the symmetric activation grid.
    inputs = resnet_files["inputs"]
    with torch.no_grad():
        expected = resnet_files["model"](*inputs).numpy()
    (got,) = _run(resnet_files["tensorrt"], {"x": inputs[0].numpy()})
    assert _cosine(got, expected) > 0.999
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_default_export_is_named_node_by_node(resnet_files: dict[str, object]) -> None:
    report = check_tensorrt(resnet_files["openvino"])
    assert not report.ok
    assert report.quantized == 0 and report.layers == 7
    reasons = {(f.op_type, f.severity): f.reason for f in report.findings}
    assert "com.microsoft.MatMulIntegerToFloat" in reasons["MatMulIntegerToFloat", "error"]
    assert "uint8" in reasons["QuantizeLinear", "error"]
    text = "\n".join(report.lines())
    assert "target='tensorrt'" in text


def test_tensorrt_file_warns_on_other_runtimes(resnet_files: dict[str, object]) -> None:
    warning = placement_warning(onnx.load(str(resnet_files["tensorrt"])), "onnxruntime")
    assert warning is not None and "TensorRT" in warning and "symmetric int8" in warning


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inverted_residual_cnn", "bert_encoder"])
def test_zoo_exports_for_tensorrt(name: str, tmp_path) -> None:
    model, inputs = _int8(name)
    g = torch.Generator().manual_seed(4)
    data = [tuple(torch.randn(t.shape, generator=g) if t.is_floating_point() else t for t in inputs)] * 2
    path = export_onnx(model, inputs, tmp_path / "m.onnx", target="tensorrt", data=data)
    report = check_tensorrt(path)
    # Every layer is int8, attention's activation x activation MatMuls included (their inputs get
    # symmetric Q/DQ pairs with ranges calibrated in ONNX Runtime: `tensorrt_plan`).
    assert report.ok, report.lines()
    assert report.quantized == report.layers == (16 if name == "bert_encoder" else 15)
    feed = {i.name: t.numpy() for i, t in zip(onnx.load(str(path)).graph.input, inputs, strict=False)}
    with torch.no_grad():
        expected = model(*inputs).numpy()
    assert _cosine(_run(path, feed)[0], expected) > 0.999


def _bad_graph() -> onnx.ModelProto:
    """x (N, 4) -> [uint8 Q/DQ] -> MatMul(W int8 (4, 3), zero point 3) -> MatMulIntegerToFloat -> Conv-free
    float Gemm, plus a per-channel weight on the wrong axis: one of each thing TensorRT refuses."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "a_zero"),
        numpy_helper.from_array(rng.integers(-100, 100, (4, 3)).astype(np.int8), "w1"),
        numpy_helper.from_array(np.full(3, 0.02, np.float32), "w1_scale"),
        numpy_helper.from_array(np.array([3, 0, -2], np.int8), "w1_zero"),
        numpy_helper.from_array(rng.integers(-100, 100, (3, 5)).astype(np.int8), "w2"),
        numpy_helper.from_array(np.array(0.03, np.float32), "w2_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w2_zero"),
        numpy_helper.from_array(rng.integers(-100, 100, (2, 5)).astype(np.int8), "w3"),
        numpy_helper.from_array(np.full(5, 0.01, np.float32), "w3_scale"),
        numpy_helper.from_array(np.zeros(5, np.int8), "w3_zero"),
        numpy_helper.from_array(rng.standard_normal((2, 2)).astype(np.float32), "w4"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["xq"], name="x_quant"),
        helper.make_node("DequantizeLinear", ["xq", "a_scale", "a_zero"], ["xd"], name="x_dequant"),
        helper.make_node(
            "DequantizeLinear", ["w1", "w1_scale", "w1_zero"], ["w1d"], axis=1, name="w1_dequant"
        ),
        helper.make_node("MatMul", ["xd", "w1d"], ["h1"], name="asymmetric_weight"),
        helper.make_node("QuantizeLinear", ["h1", "a_scale", "a_zero"], ["h1q"], name="h1_quant"),
        helper.make_node(
            "MatMulIntegerToFloat",
            ["h1q", "w2", "a_scale", "w2_scale", "a_zero", "w2_zero"],
            ["h2"],
            domain="com.microsoft",
            name="contrib_matmul",
        ),
        # (N, 5) x DQ(W3 (2, 5) per channel on axis 1) transposed: Gemm transB=1 wants axis 0.
        helper.make_node(
            "DequantizeLinear", ["w3", "w3_scale", "w3_zero"], ["w3d"], axis=1, name="w3_dequant"
        ),
        helper.make_node("Gemm", ["h2", "w3d"], ["h3"], transB=1, name="wrong_axis"),
        helper.make_node("MatMul", ["h3", "w4"], ["y"], name="float_matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model


def test_checker_names_each_bad_node(tmp_path) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(_bad_graph(), str(path))
    report = check_tensorrt(path)
    by_node: dict[str, list[str]] = {}
    for f in report.findings:
        by_node.setdefault(f.node, []).append(f"{f.severity}: {f.reason}")
    assert any("zero point [3, 0, -2] is not 0" in r for r in by_node["w1_dequant"])
    assert any("uint8" in r for r in by_node["x_quant"]) and any("uint8" in r for r in by_node["x_dequant"])
    assert any("com.microsoft.MatMulIntegerToFloat" in r for r in by_node["contrib_matmul"])
    assert any("axis 1" in r and "output-channel axis 0" in r for r in by_node["wrong_axis"])
    assert any(r.startswith("fallback") and "w4" in r for r in by_node["float_matmul"])
    assert report.layers == 4 and report.quantized == 0  # MatMul, MatMulIntegerToFloat, Gemm, MatMul
    assert report.summary == "0 of 4 Conv/MatMul/Gemm quantized"
    assert all(line in report.lines() for line in (f.line() for f in report.findings))


def test_placement_fixes_what_it_can_and_keeps_the_numbers() -> None:
    # The QDQ part of the bad graph (no contrib op, no float layer): placement makes it TensorRT-ready.
    model = _bad_graph()
    graph = model.graph
    keep = {"x_quant", "x_dequant", "w1_dequant", "asymmetric_weight", "w3_dequant"}
    nodes = [n for n in graph.node if n.name in keep]
    nodes.append(helper.make_node("Gemm", ["xd", "w3d"], ["y"], transB=1, name="wrong_axis"))
    # W3 (2, 4) with scales on axis 1 (the input features): Gemm with transB wants axis 0.
    w3 = numpy_helper.from_array(np.random.default_rng(1).integers(-100, 100, (2, 4)).astype(np.int8), "w3")
    inits = [i for i in graph.initializer if i.name not in ("w3", "w3_scale", "w3_zero")] + [
        w3,
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03, 0.04], np.float32), "w3_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w3_zero"),
    ]
    outputs = [
        helper.make_tensor_value_info("h1", TensorProto.FLOAT, [None, 3]),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2]),
    ]
    small = helper.make_model(
        helper.make_graph(nodes, "qdq", list(graph.input), outputs, inits),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    small.ir_version = 10
    before = copy.deepcopy(small)
    assert not check_tensorrt(small).ok
    counts = place_for_tensorrt(small)
    assert counts == {"activations": 1, "weights": 2, "transposes": 0, "matmul_inputs": 0}
    onnx.checker.check_model(small)
    report = check_tensorrt(small)
    assert report.ok, report.lines()
    assert report.summary == "2 of 2 Conv/MatMul/Gemm quantized"
    x = np.random.default_rng(2).uniform(-3, 3, (16, 4)).astype(np.float32)
    for want, got in zip(_run(before, {"x": x}), _run(small, {"x": x}), strict=True):
        assert _cosine(got, want) > 0.999


def test_transposed_matmul_weight_is_folded() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (3, 4)).astype(np.int8)  # (out, in), per-channel on axis 0
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03], np.float32), "ws"),
        numpy_helper.from_array(np.zeros(3, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0, name="w_dq"),
        helper.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["xd", "wt"], ["y"], name="linear"),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "t",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    model.ir_version = 10
    before = copy.deepcopy(model)
    finding = check_tensorrt(model).findings
    assert len(finding) == 1 and "through Transpose" in finding[0].reason
    assert place_for_tensorrt(model) == {"activations": 0, "weights": 0, "transposes": 1, "matmul_inputs": 0}
    assert [n.op_type for n in model.graph.node] == [
        "QuantizeLinear",
        "DequantizeLinear",
        "DequantizeLinear",
        "MatMul",
    ]
    assert check_tensorrt(model).ok
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run(model, {"x": x})[0], _run(before, {"x": x})[0])


def test_float_model_and_bad_paths(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2)).eval()
    path = export_onnx(model, (torch.randn(2, 1, 4, 4),), tmp_path / "fp32.onnx", target="tensorrt")
    report = check_tensorrt(path)
    assert report.ok and not report.quantized_graph
    assert report.summary == "0 of 2 Conv/MatMul/Gemm quantized"
    assert "no Q/DQ" in report.lines()[0]
    with pytest.raises(ExportError, match="does not exist"):
        check_tensorrt(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        check_tensorrt(tmp_path / "junk.onnx")


def test_conv_transpose_weights_want_axis_1() -> None:
    # ConvTranspose weights are (in, out / group, kh, kw): the output channels are axis 1.
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
        numpy_helper.from_array(rng.integers(-127, 128, (4, 2, 3, 3)).astype(np.int8), "w"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.03, 0.04], np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0, name="w_dq"),
        helper.make_node("ConvTranspose", ["xd", "wd"], ["y"], name="deconv"),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "ct",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 5, 5])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2, 7, 7])],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    model.ir_version = 10
    before = copy.deepcopy(model)
    (finding,) = check_tensorrt(model).findings
    assert finding.node == "deconv" and "output-channel axis 1" in finding.reason
    assert place_for_tensorrt(model)["weights"] == 1
    assert check_tensorrt(model).ok
    x = np.random.default_rng(1).uniform(-2, 2, (2, 4, 5, 5)).astype(np.float32)
    assert _cosine(_run(model, {"x": x})[0], _run(before, {"x": x})[0]) > 0.999


def test_activation_matmuls_get_symmetric_pairs_from_ranges() -> None:
    # scores = (x Wq) (x Wk)^T: both MatMul inputs are activations; the Linear layers are already int8.
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.04, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np.int8), "z"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
    ]
    for p in ("q", "k"):
        inits += [
            numpy_helper.from_array(rng.integers(-127, 128, (8, 8)).astype(np.int8), f"w{p}"),
            numpy_helper.from_array(np.full(8, 0.01, np.float32), f"w{p}_s"),
            numpy_helper.from_array(np.zeros(8, np.int8), f"w{p}_z"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", [f"w{p}", f"w{p}_s", f"w{p}_z"], [f"w{p}d"], axis=1),
            helper.make_node("MatMul", ["xd", f"w{p}d"], [p]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["y"], name="scores"),
    ]
    model = helper.make_model(
        helper.make_graph(
            nodes,
            "attn",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 4])],
            inits,
        ),
        opset_imports=[helper.make_opsetid("", 21)],
    )
    model.ir_version = 10
    before = copy.deepcopy(model)
    report = check_tensorrt(model)
    assert [f.node for f in report.findings] == ["scores", "scores"] and report.summary.startswith("2 of 3")
    assert tensorrt_plan(model) == ["q", "kt"]
    x = np.random.default_rng(1).uniform(-2, 2, (3, 4, 8)).astype(np.float32)
    probe = copy.deepcopy(before)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "kt"))
    _, q, kt = _run(probe, {"x": x})
    ranges = {"q": (float(q.min()), float(q.max())), "kt": (float(kt.min()), float(kt.max()))}
    assert place_for_tensorrt(model, ranges)["matmul_inputs"] == 2
    assert check_tensorrt(model).ok and tensorrt_plan(model) == []
    assert _cosine(_run(model, {"x": x})[0], _run(before, {"x": x})[0]) > 0.999


def test_a_clustered_weight_is_named_as_computed_from_constants(tmp_path) -> None:
    """Clustering + static int8 decodes the conv's int8 codes with a codebook lookup: TensorRT needs them as
    an initializer, and the finding says so and how to fold them, instead of 'not a constant'."""
    model, inputs = ZOO["resnet_cnn"]()
    g = torch.Generator().manual_seed(3)
    data = [tuple(torch.randn(t.shape, generator=g) for t in inputs) for _ in range(4)]
    small = mp.compress(model, [mp.ClusterConfig(values=16), mp.StaticInt8Config()], data, allow_partial=True)
    path = export_onnx(small, inputs, tmp_path / "m.onnx", target="tensorrt")
    computed = [f for f in check_tensorrt(path).findings if "computed from constants" in f.reason]
    assert computed and all("--fold-constants" in f.reason for f in computed)
