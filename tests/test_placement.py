"""Quantizer placement per target runtime (issue 31): ONNX Runtime runs a static int8 file as integer."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import zoo
from torch import nn

import modelpress as mp
from modelpress.deploy.export import export_for_runtimes
from modelpress.deploy.integer import integer_kernels
from modelpress.deploy.qdq import TARGET_KEY, placement_warning, read_target
from modelpress.errors import ExportError


def _calibration(example: tuple[torch.Tensor, ...], n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, *example[0].shape[1:], generator=gen),) for _ in range(n)]


@pytest.fixture(scope="module", params=["resnet_cnn", "inverted_residual_cnn"])
def residual_cnn(request, tmp_path_factory) -> tuple[str, nn.Module, nn.Module, list, Path]:
    model, example = getattr(zoo, request.param)()
    data = _calibration(example)
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    path = mp.export_onnx(
        q, example, tmp_path_factory.mktemp(request.param) / "ort.onnx", target="onnxruntime", data=data
    )
    return request.param, model, q, data, path


def _optimized_ops(path: Path, tmp_path: Path) -> Counter[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_every_conv_and_residual_add_runs_as_integer_in_onnxruntime(residual_cnn, tmp_path) -> None:
    name, model, _, _, path = residual_cnn
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == convs and not ops["Conv"] and not ops["FusedConv"], ops
    assert ops["QLinearAdd"] == 2 and not ops["Add"], ops  # both zoo models have two residual adds
    assert ops["QLinearGlobalAveragePool"] == 1, ops
    # Between the input and the classifier nothing is dequantized: no fp32 op runs on a feature map.
    assert ops["DequantizeLinear"] == 0, ops
    report = integer_kernels(path, "onnxruntime")
    assert report.integer == report.total == convs + 1, report.summary()  # + the Linear classifier
    assert not report.not_integer, name


def test_the_file_before_placement_left_convs_fp32_in_onnxruntime(residual_cnn, tmp_path) -> None:
    # The OpenVINO placement (layer inputs only) is what ONNX Runtime could not run as integer.
    _, model, q, data, _ = residual_cnn
    path = mp.export_onnx(q, data[0], tmp_path / "ov.onnx", target="openvino")
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] < sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops["QLinearAdd"] == 0


@pytest.mark.parametrize("runtime", mp.available_runtimes())
def test_onnxruntime_placement_keeps_parity_with_the_original_model(residual_cnn, runtime) -> None:
    # The only change to what the model computes is the rounding of conv/add/pool outputs that were float.
    _, model, q, data, path = residual_cnn
    samples = mp.parity_inputs((data[0][0][:2],)) + data[1:3]
    report = mp.check_parity(q, mp.open_session(path, runtime), samples, reference=model)
    assert report.passed
    worst = report.worst
    assert worst.artifact_fidelity is not None and worst.torch_fidelity is not None
    assert worst.artifact_fidelity >= worst.torch_fidelity - 0.002


def test_the_target_is_in_the_file_metadata(residual_cnn, tmp_path) -> None:
    _, _, q, data, path = residual_cnn
    assert read_target(onnx.load(str(path))) == "onnxruntime"
    ov = mp.export_onnx(q, data[0], tmp_path / "ov.onnx")
    props = {p.key: p.value for p in onnx.load(str(ov)).metadata_props}
    assert props[TARGET_KEY] == "openvino"  # the default placement, named
    bare = onnx.load(str(ov))
    del bare.metadata_props[:]
    assert read_target(bare) == "openvino"  # files from before issue 31


def test_default_export_is_the_openvino_placement(residual_cnn, tmp_path) -> None:
    _, _, q, data, _ = residual_cnn
    default = onnx.load(str(mp.export_onnx(q, data[0], tmp_path / "default.onnx")))
    named = onnx.load(str(mp.export_onnx(q, data[0], tmp_path / "ov.onnx", target="openvino")))
    assert [(n.op_type, list(n.input)) for n in default.graph.node] == [
        (n.op_type, list(n.input)) for n in named.graph.node
    ]
    # Without data, layer inputs only: the residual adds read float tensors, not dequantized ones.
    producers = {o: n.op_type for n in default.graph.node for o in n.output}
    adds = [n for n in default.graph.node if n.op_type == "Add" and len(n.input) == 2]
    assert adds and not [n for n in adds if "DequantizeLinear" in (producers.get(i) for i in n.input)]


def test_with_data_openvino_residual_adds_and_pools_read_int8_as_nncf_places_them(
    residual_cnn, tmp_path
) -> None:
    name, model, q, data, _ = residual_cnn
    path = mp.export_onnx(q, data[0], tmp_path / "ov.onnx", target="openvino", data=data)
    graph = onnx.load(str(path)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    adds = [n for n in graph.node if n.op_type == "Add" and all(i in producers for i in n.input)]
    assert len(adds) == 2 and all(producers[i] == "DequantizeLinear" for n in adds for i in n.input), name
    (pool,) = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    assert producers[pool.input[0]] == "DequantizeLinear"
    assert read_target(onnx.load(str(path))) == "openvino"
    # OpenVINO runs the adds inside the convs and the pool on int8 (NNCF's runtime graph has the same).
    report = integer_kernels(path, "openvino")
    assert report.integer == report.total, report.summary()
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(path, runtime), data, reference=model).passed, runtime


def test_without_data_the_ranges_come_from_the_example_with_a_warning(tmp_path, caplog) -> None:
    model, example = zoo.resnet_cnn()
    q = mp.compress(model, [mp.StaticInt8Config()], data=_calibration(example))
    with caplog.at_level(logging.WARNING, logger="modelpress.deploy.export"):
        path = mp.export_onnx(q, example, tmp_path / "m.onnx", target="onnxruntime")
    assert any("without calibration data" in r.getMessage() for r in caplog.records)
    assert mp.check_parity(q, mp.open_session(path, "onnxruntime"), [example]).passed


def test_unknown_target_is_refused(tmp_path) -> None:
    model, example = zoo.resnet_cnn()
    with pytest.raises(ExportError, match="coreml.*onnxruntime"):
        mp.export_onnx(model, example, tmp_path / "m.onnx", target="coreml")  # type: ignore[arg-type]


def test_a_pooled_mean_without_kept_dims_runs_as_an_integer_pool(tmp_path) -> None:
    # x.mean((2, 3)) (no keepdim) before the classifier, as many user models write it.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    data = _calibration((torch.zeros(1, 3, 8, 8),))
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    path = mp.export_onnx(q, data[0], tmp_path / "m.onnx", target="onnxruntime", data=data)
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(path, runtime), data, reference=model).passed, runtime


@pytest.mark.parametrize("channels", [1, 3])
def test_few_input_channels_are_padded_to_four_exactly(tmp_path, channels) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    data = _calibration((torch.zeros(1, channels, 10, 10),))
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    ort_path = mp.export_onnx(q, data[0], tmp_path / "ort.onnx", target="onnxruntime", data=data)
    ov_path = mp.export_onnx(q, data[0], tmp_path / "ov.onnx", target="openvino")
    graph = onnx.load(str(ort_path)).graph
    weights = {i.name: tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert (16, 4, 3, 3) in weights.values() and "Pad" in [n.op_type for n in graph.node]
    x = data[1][0].numpy()
    # The same integer sums: the padded channel adds 0 x 0.
    a = mp.open_session(ort_path, "onnxruntime").run([x])[0]
    b = mp.open_session(ov_path, "onnxruntime").run([x])[0]
    np.testing.assert_allclose(a, b, atol=1e-5)
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(ort_path, runtime), data).passed, runtime


@pytest.mark.parametrize(
    ("channels", "kernel", "padding", "relu", "size"),
    [(1, 3, 1, True, 12), (3, 5, 2, False, 10), (1, 3, 0, True, 12), (2, 4, 1, True, 10), (3, 3, 1, True, 9)],
)
def test_a_few_channel_conv_before_a_2x2_pool_runs_on_its_space_to_depth_exactly(
    tmp_path, monkeypatch, channels, kernel, padding, relu, size
) -> None:
    # MNIST's stem: a conv on 1-3 channels, then a 2x2 max pool. For ONNX Runtime it becomes one conv on
    # the input's 2x2 SpaceToDepth (4 groups of outputs, one per pool position) and a Max of the groups.
    torch.manual_seed(0)
    layers = [nn.Conv2d(channels, 8, kernel, padding=padding)] + ([nn.ReLU()] if relu else [])
    tail = [
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ]
    model = nn.Sequential(*layers, *tail).eval()
    data = _calibration((torch.zeros(1, channels, size, size),))
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    ort_path = mp.export_onnx(q, data[0], tmp_path / "ort.onnx", target="onnxruntime", data=data)
    monkeypatch.setattr("modelpress.deploy.export.space_to_depth_stems", lambda model: 0)
    plain = mp.export_onnx(q, data[0], tmp_path / "plain.onnx", target="onnxruntime", data=data)
    nodes = onnx.load(str(ort_path)).graph.node
    ops = Counter(n.op_type for n in nodes)
    rewritten = size % 2 == 0  # SpaceToDepth takes even sides only: an odd one keeps the padded conv
    assert (ops["SpaceToDepth"], ops["Pad"]) == ((1, 0) if rewritten else (0, 1)), ops
    (pool,) = [n for n in nodes if n.op_type == "MaxPool"]
    kernel = list(next(a.ints for a in pool.attribute if a.name == "kernel_shape"))
    assert kernel == ([1, 4] if rewritten else [2, 2])  # the max over the 4 pool positions' groups
    if rewritten:  # OpenVINO runs this form slower: opening the file there says so
        assert "SpaceToDepth" in str(placement_warning(onnx.load(str(ort_path)), "openvino"))
    optimized = _optimized_ops(ort_path, tmp_path)
    assert optimized["QLinearConv"] == 2 and not optimized["Conv"], optimized
    assert optimized["NhwcMaxPool"] == 1 and not optimized["MaxPool"], optimized
    # channels-last throughout: no Transpose beyond those of the file without the rewrite
    assert optimized["Transpose"] <= _optimized_ops(plain, tmp_path)["Transpose"], optimized
    report = integer_kernels(ort_path, "onnxruntime")
    assert report.integer == report.total == 3, report.summary()
    x = data[1][0].numpy()
    a = mp.open_session(ort_path, "onnxruntime").run([x])[0]
    b = mp.open_session(plain, "onnxruntime").run([x])[0]
    np.testing.assert_allclose(a, b, atol=1e-6)  # the same integer sums, the same pooled codes
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(ort_path, runtime), data).passed, runtime


def test_attention_scores_run_as_integer_with_the_scale_folded(tmp_path) -> None:
    model, example = zoo.bert_encoder()
    gen = torch.Generator().manual_seed(2)
    data = [
        (torch.randint(0, 1000, (4, 16), generator=gen), torch.ones(4, 16, dtype=torch.long))
        for _ in range(4)
    ]
    q = mp.compress(model, [mp.StaticInt8Config(layers=("linear",))], data=data, allow_partial=True)
    path = mp.export_onnx(q, example, tmp_path / "bert.onnx", target="onnxruntime", data=data)
    graph = onnx.load(str(path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    activation_products = [
        n
        for n in graph.node
        if n.op_type == "MatMul" and all(producers[i].op_type == "DequantizeLinear" for i in n.input)
    ]
    assert len(activation_products) == 2  # Q K^T in each of the 2 layers (softmax V stays float)
    softmax_v = [
        n for n in graph.node if n.op_type == "MatMul" and producers[n.input[0]].op_type == "Softmax"
    ]
    assert len(softmax_v) == 2
    # The 1/sqrt(d) Mul after Q K^T went into the dequantization scale of Q.
    assert not [
        n for n in graph.node if n.op_type == "Mul" and producers.get(n.input[0]) in activation_products
    ]
    ops = _optimized_ops(path, tmp_path)
    # 12 Linear layers and the 2 Q K^T products: integer matmuls; no float Q K^T (FusedMatMul) is left.
    assert ops["MatMulIntegerToFloat"] == 14 and not ops["FusedMatMul"], ops
    for runtime in mp.available_runtimes():
        report = mp.check_parity(q, mp.open_session(path, runtime), data[:2], reference=model)
        assert report.passed, (runtime, report.message)


def test_export_for_runtimes_places_one_file_per_runtime_where_they_differ(tmp_path) -> None:
    model, example = zoo.resnet_cnn()
    data = _calibration(example)
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    both = ["onnxruntime", "openvino"]
    paths = export_for_runtimes(q, example, tmp_path / "m.onnx", both, data=data)
    assert paths["onnxruntime"].name == "m.onnx" and paths["openvino"].name == "m.openvino.onnx"
    assert {rt: read_target(onnx.load(str(p))) for rt, p in paths.items()} == {rt: rt for rt in both}
    weight_only = mp.compress(model, [mp.WeightOnlyConfig()])
    one = export_for_runtimes(weight_only, example, tmp_path / "w.onnx", both)
    assert one["onnxruntime"] == one["openvino"]  # nothing to place: one file
    named = export_for_runtimes(q, example, tmp_path / "n.onnx", both, target="openvino")
    assert set(named.values()) == {tmp_path / "n.onnx"}


def test_a_concat_of_conv_outputs_runs_as_an_integer_concat(tmp_path) -> None:
    # Inception-style: two convs on one input (sharing its padded quantizer), concatenated, then a conv.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(3, 8, 1)
            self.c = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([torch.relu(self.a(x)), self.b(x)], 1)).flatten(1)

    torch.manual_seed(0)
    model = Net().eval()
    data = _calibration((torch.zeros(1, 3, 8, 8),))
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    path = mp.export_onnx(q, data[0], tmp_path / "m.onnx", target="onnxruntime", data=data)
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("Pad") == 1
    ops = _optimized_ops(path, tmp_path)
    # The last conv writes the graph's output, which stays float: ONNX Runtime runs it as a float Conv.
    assert ops["QLinearConcat"] == 1 and ops["QLinearConv"] == 2 and ops["Conv"] == 1, ops
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(path, runtime), data, reference=model).passed, runtime


def test_a_pooled_stem_feeding_a_residual_runs_on_int8_codes(tmp_path) -> None:
    # resnet18's stem: Conv -> ReLU -> MaxPool, whose output feeds both the block's conv and its residual
    # add. The ReLU output takes the grid of the quantizer after the pool, so the pool runs on codes.
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.fc = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.pool(torch.relu(self.stem(x)))
            return self.fc(torch.relu(self.conv(y) + y).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    data = _calibration((torch.zeros(1, 3, 16, 16),))
    q = mp.compress(model, [mp.StaticInt8Config()], data=data)
    path = mp.export_onnx(q, data[0], tmp_path / "m.onnx", target="onnxruntime", data=data)
    ops = _optimized_ops(path, tmp_path)
    assert ops["NhwcMaxPool"] == 1 and not ops["MaxPool"] and not ops["DequantizeLinear"], ops
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1 and ops["QLinearGlobalAveragePool"] == 1, ops
    for runtime in mp.available_runtimes():
        assert mp.check_parity(q, mp.open_session(path, runtime), data, reference=model).passed, runtime


def test_cli_export_places_for_the_target(tiny_model_file, tmp_path) -> None:
    from click.testing import CliRunner

    from modelpress.cli import main

    base = [
        "export",
        f"{tiny_model_file}:build",
        "--recipe",
        "int8-static",
        "--data",
        f"{tiny_model_file}:calib",
    ]
    for target in ("onnxruntime", "openvino"):
        out = tmp_path / f"{target}.onnx"
        result = CliRunner().invoke(main, [*base, "-o", str(out), "--target", target], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert read_target(onnx.load(str(out))) == target
    default = tmp_path / "default.onnx"
    assert CliRunner().invoke(main, [*base, "-o", str(default)], catch_exceptions=False).exit_code == 0
    assert read_target(onnx.load(str(default))) == "onnxruntime"  # what most users load a file into


@pytest.mark.parametrize("arch", ["bert_encoder", "resnet_cnn"])
def test_an_fp32_model_exported_for_onnxruntime_gets_no_quantizer(arch, tmp_path, caplog) -> None:
    # Placement completes a quantized graph; an fp32 (or weight-only) model stays exactly what it was.
    model, inputs = zoo.ZOO[arch]()
    with caplog.at_level(logging.WARNING):
        path = mp.export_onnx(model, inputs, tmp_path / "fp32.onnx", target="onnxruntime")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert "without calibration data" not in caplog.text
    assert read_target(onnx.load(str(path))) == "onnxruntime"


@pytest.mark.parametrize("quantized", [False, True])
def test_residual_adds_before_layernorm_stay_unfused_in_onnxruntime(quantized, tmp_path) -> None:
    # ONNX Runtime 1.32's SkipLayerNormalization runs several times slower than Add + LayerNormalization on
    # x86 here: files for ONNX Runtime write those adds as Sum (the same sum), fp32 and int8 alike.
    model, inputs = zoo.bert_encoder()
    data = [inputs] * 2
    if quantized:
        model = mp.compress(model, [mp.StaticInt8Config(calibration_batches=2)], data, allow_partial=True)
    ort_path = mp.export_onnx(model, inputs, tmp_path / "ort.onnx", target="onnxruntime", data=data)
    ov_path = mp.export_onnx(model, inputs, tmp_path / "ov.onnx", target="openvino", data=data)
    assert _optimized_ops(ort_path, tmp_path)["SkipLayerNormalization"] == 0
    assert _optimized_ops(ov_path, tmp_path)["SkipLayerNormalization"] > 0  # the file without the rewrite
    feed = {
        i.name: t.numpy()
        for i, t in zip(ort.InferenceSession(str(ort_path)).get_inputs(), inputs, strict=True)
    }
    got = ort.InferenceSession(str(ort_path)).run(None, feed)[0]
    want = ort.InferenceSession(str(ov_path)).run(None, feed)[0]
    np.testing.assert_allclose(got, want, atol=1e-4 if not quantized else 0.05)


def test_opening_a_file_on_a_runtime_it_was_not_placed_for_warns(residual_cnn, tmp_path, caplog) -> None:
    _, model, q, data, ort_path = residual_cnn
    ov_path = mp.export_onnx(q, data[0], tmp_path / "ov.onnx", target="openvino")
    fp32_path = mp.export_onnx(model, data[0], tmp_path / "fp32.onnx", target="onnxruntime")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelpress.deploy.runtime"):
        mp.open_session(ort_path, "onnxruntime")
        mp.open_session(ov_path, "openvino")
        mp.open_session(fp32_path, "openvino")  # nothing placed: nothing to warn about
    assert "placed for" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="modelpress.deploy.runtime"):
        mp.open_session(ov_path, "onnxruntime")
    assert "placed for OpenVINO, not ONNX Runtime" in caplog.text
    assert 'target="onnxruntime"' in caplog.text and "--target onnxruntime" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelpress.deploy.runtime"):
        mp.check_parity(q, mp.open_session(ort_path, "openvino"), data[:1], min_cosine=0.9)
    assert "placed for ONNX Runtime, not OpenVINO" in caplog.text
