"""`deploy.integer`: which conv/matmul layers really run as integer, read from each runtime's own graph."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from zoo import ZOO

import modelpress as mp
from modelpress.cli import main
from modelpress.deploy.integer import IntegerReport, integer_kernels
from modelpress.report.html import render_html
from modelpress.report.terminal import print_summary

RUNTIMES = ("onnxruntime", "openvino")
LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LSTM, nn.GRU)


# ---------------------------------------------------------------------------------------------------------
# A hand-written QDQ graph: conv1's output is quantized for conv2; conv2's is not (or conv1's also feeds
# a float residual Add). ONNX Runtime forms QLinearConv only around a whole DQ -> Conv -> Q.


def _qdq_convs(residual: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.uint8(128), "x_zp"),
        numpy_helper.from_array(np.float32(0.1), "y_scale"),
        numpy_helper.from_array(np.uint8(128), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dq_x"),
    ]
    for conv in ("conv1", "conv2"):
        inits += [
            numpy_helper.from_array(
                rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8), f"block.{conv}.qweight"
            ),
            numpy_helper.from_array(np.full(4, 0.01, np.float32), f"block.{conv}.scale"),
            numpy_helper.from_array(np.zeros(4, np.int8), f"block.{conv}.zero_point"),
            numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"block.{conv}.bias"),
        ]
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"block.{conv}.qweight", f"block.{conv}.scale", f"block.{conv}.zero_point"],
                [f"{conv}_w"],
                axis=0,
                name=f"dq_{conv}_w",
            )
        )
    nodes += [
        helper.make_node(
            "Conv", ["xd", "conv1_w", "block.conv1.bias"], ["y1"], pads=[1] * 4, name="node_conv1"
        ),
        helper.make_node("QuantizeLinear", ["y1", "y_scale", "y_zp"], ["y1q"], name="q_y1"),
        helper.make_node("DequantizeLinear", ["y1q", "y_scale", "y_zp"], ["y1d"], name="dq_y1"),
        helper.make_node(
            "Conv", ["y1d", "conv2_w", "block.conv2.bias"], ["y2"], pads=[1] * 4, name="node_conv2"
        ),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["y2", "y1"], ["out"], name="node_add"))
    else:
        nodes.append(helper.make_node("Identity", ["y2"], ["out"], name="node_out"))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def qdq_file(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    path = tmp_path / "qdq.onnx"
    onnx.save(_qdq_convs(residual=getattr(request, "param", False)), str(path))
    return path


def test_onnxruntime_fuses_only_a_whole_dq_conv_q_and_names_the_other_layer(qdq_file):
    report = integer_kernels(qdq_file, "onnxruntime")
    assert (report.integer, report.total) == (1, 2)
    conv1, conv2 = report.layers
    assert (conv1.name, conv1.node, conv1.kernel, conv1.kind) == (
        "block.conv1",
        "node_conv1",
        "QLinearConv",
        "integer",
    )
    assert (conv2.name, conv2.kind) == ("block.conv2", "float")
    assert "its output is not quantized" in conv2.reason and "DQ -> Conv -> Q" in conv2.reason
    assert (
        report.headline()
        == "1 of 2 conv/matmul layers run as integer in ONNX Runtime (the file's quantizers are placed for OpenVINO)"
    )
    assert report.summary().endswith(f"Not integer: block.conv2: {conv2.reason}")


@pytest.mark.parametrize("qdq_file", [True], indirect=True)
def test_a_conv_output_also_used_in_float_is_named_with_its_float_consumer(qdq_file):
    report = integer_kernels(qdq_file, "onnxruntime")
    conv1 = report.layers[0]
    assert conv1.kind == "float"
    assert "also goes unquantized to Add 'node_add'" in conv1.reason
    assert report.conv_adds == 1 and report.integer_elementwise == {}


def test_openvino_runs_both_convs_as_int8(qdq_file):
    report = integer_kernels(qdq_file, "openvino")
    assert (report.integer, report.total) == (2, 2)
    assert {layer.kernel for layer in report.layers} == {"Convolution u8"}
    assert report.headline() == "2 of 2 conv/matmul layers run as integer in OpenVINO"


def test_the_report_is_plain_json(qdq_file):
    data = json.loads(json.dumps(integer_kernels(qdq_file, "onnxruntime").to_dict()))
    assert data["runtime"] == "onnxruntime" and (data["integer"], data["total"], data["int_weights"]) == (
        1,
        2,
        0,
    )
    assert data["layers"][1]["name"] == "block.conv2" and data["layers"][1]["kind"] == "float"
    assert data["headline"].startswith("1 of 2 conv/matmul layers run as integer")


def test_bad_input_gets_a_message_not_a_traceback(qdq_file, tmp_path):
    with pytest.raises(mp.ExportError, match="does not exist. Export it first"):
        integer_kernels(tmp_path / "missing.onnx", "onnxruntime")
    with pytest.raises(mp.RuntimeUnavailableError, match="Unknown runtime 'tensorrt'"):
        integer_kernels(qdq_file, "tensorrt")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not onnx")
    with pytest.raises(mp.ExportError, match="is not a readable ONNX file"):
        integer_kernels(junk, "openvino")


# ---------------------------------------------------------------------------------------------------------
# The zoo, exported as a user would


_ARTIFACTS: dict[tuple[str, str], Path] = {}

CONFIGS: dict[str, Any] = {
    "static": [mp.StaticInt8Config(calibration_batches=1)],
    "static-ort": [mp.StaticInt8Config(calibration_batches=1)],  # exported with target="onnxruntime"
    "dynamic": [mp.DynamicInt8Config()],
    "int8-weights": [mp.WeightOnlyConfig(bits=8, layers=("linear", "conv", "rnn"))],
    "int4-weights": [mp.WeightOnlyConfig(bits=4, group_size=32, layers=("linear",))],
}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory):
    """(zoo model, technique) -> its exported compressed ONNX file, built once per module."""

    def build(name: str, technique: str) -> Path:
        key = (name, technique)
        if key not in _ARTIFACTS:
            model, inputs = ZOO[name]()
            small = mp.compress(model, CONFIGS[technique], [inputs], allow_partial=True)
            folder = tmp_path_factory.mktemp(f"{name}-{technique}")
            placement = {"target": "onnxruntime", "data": [inputs]} if technique == "static-ort" else {}
            _ARTIFACTS[key] = mp.export_onnx(small, inputs, folder / "model.onnx", **placement)
        return _ARTIFACTS[key]

    return build


def _torch_layers(name: str) -> int:
    model, _ = ZOO[name]()
    return sum(isinstance(m, LAYER_TYPES) for m in model.modules())


def _not_integer(report: IntegerReport) -> set[str]:
    return {layer.name for layer in report.not_integer}


# Today's static placement is OpenVINO's (quantizers on layer inputs only): ONNX Runtime fuses a conv into
# QLinearConv only where its output goes to the next layer's quantizer alone. These are the convs it leaves
# fp32 behind DequantizeLinear; every Linear runs as MatMulIntegerToFloat.
ORT_FP32_TODAY = {
    "resnet_cnn": {"stem.0", "layer1.conv2", "layer2.conv2", "layer2.shortcut.0"},
    "inverted_residual_cnn": {
        "stem.0",
        "blocks.0.project.0",
        "blocks.1.project.0",
        "blocks.2.project.0",
        "head.0",
    },
    "dense_unet": {"stem.0", "dense1.0", "dense2.0", "down.0", "up", "head"},
    "vit_encoder": {"vit.embeddings.patch_embeddings.projection"},
    "lstm_classifier": {"lstm"},
    "gru_classifier": {"gru"},
    "dcgan_generator": {"net.0", "net.3", "net.6"},
}
# In OpenVINO every quantized conv/matmul runs as int8; recurrent layers and the ConvTranspose layers that
# static_int8 leaves fp32 do not.
OV_FP32 = {
    "lstm_classifier": {"lstm"},
    "gru_classifier": {"gru"},
    "dcgan_generator": {"net.0", "net.3", "net.6"},
    "dense_unet": {"up"},
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_static_int8_on_every_zoo_model_in_both_runtimes(artifact, name):
    path = artifact(name, "static")
    ort, ov = (integer_kernels(path, runtime) for runtime in RUNTIMES)
    for report in (ort, ov):
        assert report.total == _torch_layers(name)  # every layer found in the runtime's graph
        assert not [layer for layer in report.layers if layer.kernel == "-"]
        assert all(layer.reason for layer in report.not_integer)
    assert _not_integer(ort) == ORT_FP32_TODAY.get(name, set()), ort.summary()
    assert _not_integer(ov) == OV_FP32.get(name, set()), ov.summary()
    linear = [layer for layer in ort.layers if layer.op_type == "MatMulIntegerToFloat"]
    assert all(layer.kind == "integer" for layer in linear)


# Placed for ONNX Runtime (export_onnx(target="onnxruntime")): every conv of the residual CNNs runs as
# QLinearConv and every residual add as QLinearAdd. What is still fp32 there today, by name:
ORT_PLACED_FP32 = {
    # down.0 feeds the ConvTranspose (fp32: static int8 leaves it weight-only), head the graph output; the
    # skip concats and the convs feeding them are integer.
    "dense_unet": {"down.0", "up", "head"},
    # The patch embedding (its output goes on to LayerNorm in fp32); its 3 input channels are padded to 4
    # in a weight named after the layer's ("...projection.qweight_padded").
    "vit_encoder": {"vit.embeddings.patch_embeddings.projection"},
}


@pytest.mark.parametrize("name", ["resnet_cnn", "inverted_residual_cnn", "dense_unet", "vit_encoder"])
def test_static_int8_placed_for_onnxruntime_runs_the_convs_as_integer(artifact, name):
    path = artifact(name, "static-ort")
    ort, ov = (integer_kernels(path, runtime) for runtime in RUNTIMES)
    assert ort.placed_for == "onnxruntime" and ort.total == _torch_layers(name)
    assert _not_integer(ort) == ORT_PLACED_FP32.get(name, set()), ort.summary()
    if name not in ORT_PLACED_FP32:
        assert ort.integer_elementwise.get("QLinearAdd", 0) == ort.conv_adds == 2
        assert "2 of 2 residual adds/concats as QLinearAdd/QLinearConcat" in ort.headline()
    assert _not_integer(ov) == OV_FP32.get(name, set()), ov.summary()  # OpenVINO takes this placement too
    assert "placed for" in ov.headline()


def test_bias_free_linears_fused_for_onnxruntime_keep_their_torch_names(tmp_path):
    # MatMulIntegerToFloat's weight keeps the layer's initializer name: without a bias there is no other
    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(32, 64, bias=False), nn.Linear(64, 16, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    torch.manual_seed(0)
    data = [(torch.randn(8, 32),) for _ in range(4)]
    small = mp.compress(Mlp().eval(), "int8-static", data)
    path = mp.export_onnx(small, data[0], tmp_path / "m.onnx", target="onnxruntime", data=data)
    layers = integer_kernels(path, "onnxruntime").layers
    assert [(k.name, k.op_type, k.kind) for k in layers] == [
        ("fc1", "MatMulIntegerToFloat", "integer"),
        ("fc2", "MatMulIntegerToFloat", "integer"),
    ]


def test_static_int8_resnet_names_why_each_conv_is_fp32_in_onnxruntime(artifact):
    report = integer_kernels(artifact("resnet_cnn", "static"), "onnxruntime")
    reasons = {layer.name: layer.reason for layer in report.not_integer}
    assert "also goes unquantized to Add" in reasons["stem.0"]  # the identity shortcut reads it in fp32
    for name in ("layer1.conv2", "layer2.conv2", "layer2.shortcut.0"):  # they feed the residual Add
        assert "its output is not quantized" in reasons[name]
    assert report.conv_adds == 2 and report.integer_elementwise.get("QLinearAdd", 0) == 0
    assert report.placed_for == "openvino"


@pytest.mark.parametrize("name", ["bert_encoder", "gpt_decoder"])
def test_dynamic_int8_every_linear_is_integer_in_onnxruntime_and_fp32_in_openvino(artifact, name):
    path = artifact(name, "dynamic")
    ort, ov = (integer_kernels(path, runtime) for runtime in RUNTIMES)
    assert ort.integer == ort.total == _torch_layers(name)
    assert {layer.kernel for layer in ort.layers} <= {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    # Every layer by its torch name (read from its scale's initializer).
    model, _ = ZOO[name]()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {layer.name for layer in ort.layers} == linears
    # OpenVINO converts MatMulInteger's operands to f32: the maths is float there.
    assert ov.integer == 0 and ov.total == ort.total
    assert all("OpenVINO runs MatMulInteger as f32 FullyConnected" in layer.reason for layer in ov.layers)


def test_int4_weight_only_bert_runs_no_layer_as_integer(artifact):
    path = artifact("bert_encoder", "int4-weights")
    for runtime in RUNTIMES:
        report = integer_kernels(path, runtime)
        assert report.integer == 0 and report.int_weights == report.total == 12, report.summary()
    ort = integer_kernels(path, "onnxruntime")
    assert {layer.kernel for layer in ort.layers} == {"MatMulNBits (4-bit weights, accuracy_level 0)"}
    assert ort.layers[0].name == "bert.encoder.layer.0.attention.self.query"


def test_int8_weight_only_convs_run_no_layer_as_integer(artifact):
    path = artifact("resnet_cnn", "int8-weights")
    for runtime in RUNTIMES:
        report = integer_kernels(path, runtime)
        assert report.integer == 0 and report.total == 7, report.summary()
    # Cast -> Sub -> Mul on the int8 codes: a default ONNX Runtime session folds it once, at load.
    ort = integer_kernels(path, "onnxruntime")
    assert all("integer weights dequantized once, at load" in layer.reason for layer in ort.layers), (
        ort.summary()
    )


def test_int8_weight_only_matmuls_run_fp32_in_onnxruntime_and_read_int8_weights_in_openvino(artifact):
    path = artifact("bert_encoder", "int8-weights")
    ort = integer_kernels(path, "onnxruntime")
    assert ort.integer == ort.int_weights == 0 and ort.total == 12, ort.summary()
    assert all("integer weights dequantized once, at load" in layer.reason for layer in ort.layers)
    ov = integer_kernels(path, "openvino")
    assert ov.integer == 0 and ov.int_weights == 12, ov.summary()
    assert {layer.kernel for layer in ov.layers} == {"FullyConnected f32, i8 weights"}
    assert all("weight-only, the file does not quantize its input" in layer.reason for layer in ov.layers)


# ---------------------------------------------------------------------------------------------------------
# Where it is shown: `bench`, the job's report.json, the terminal summary and the HTML report


def test_bench_prints_the_count_per_runtime_and_json_has_it(qdq_file, tmp_path):
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        main, ["bench", str(qdq_file), "--batch", "1", "--rounds", "2", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "1 of 2 conv/matmul layers run as integer in ONNX Runtime" in result.output
    assert "2 of 2 conv/matmul layers run as integer in OpenVINO" in result.output
    data = json.loads(out.read_text())
    assert data["artifact onnxruntime"]["integer"]["integer"] == 1
    assert data["artifact openvino"]["integer"]["total"] == 2
    from modelpress.report.html import render_any

    page = render_any(data)
    assert "What runs as integer" in page and "block.conv2" in page


def _job_result(integer: dict[str, Any]) -> dict[str, Any]:
    """The smallest job result the renderers take, with an `integer` entry."""
    timing = {
        "median_ms": 1.0,
        "p90_ms": 1.1,
        "throughput": 1000.0,
        "ratio": 1.0,
        "ratio_p10": 1.0,
        "ratio_p90": 1.0,
        "rounds": 2,
        "round_ms": [1.0, 1.0],
    }
    bench = {
        f"{label} onnxruntime": {
            "name": f"{label} onnxruntime",
            "path": f"{label}.onnx",
            "runtime": "onnxruntime",
            "size_bytes": 1000,
            "size_ratio": 1.0,
            "latency": {"b1": timing},
            "peak_rss_mb": None,
        }
        for label in ("fp32", "compressed")
    }
    profile = {"params": 1, "bytes": 4, "macs": 1, "peak_activation_bytes": 4, "layers": []}
    return {
        "model": {"name": "m", "class": "Net", "input_shapes": [[1, 4, 8, 8]]},
        "recipe": [{"type": "static_int8"}],
        "environment": {"cpu": "cpu", "threads": 2, "python": "3", "versions": {}},
        "profile": {"baseline": profile, "compressed": profile},
        "compress_wall_s": 0.1,
        "explain": [],
        "parity": [],
        "quality": {},
        "bench": bench,
        "integer": integer,
    }


def test_terminal_and_html_say_k_of_n_and_name_the_others(qdq_file):
    from rich.console import Console

    result = _job_result({"onnxruntime": integer_kernels(qdq_file, "onnxruntime").to_dict()})
    console = Console(record=True, width=300)
    print_summary(result, console)
    text = console.export_text()
    assert "- 1 of 2 conv/matmul layers run as integer in ONNX Runtime" in text and "not: block.conv2" in text
    page = render_html(result)
    assert "What runs as integer (compressed artifact)" in page
    assert "block.conv2" in page and "its output is not quantized" in page


@pytest.mark.slow
def test_run_job_stores_what_runs_as_integer(tiny, tmp_path):
    from modelpress.pipeline.run import run_job

    model, inputs = tiny
    data = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = run_job(
        model,
        inputs,
        [mp.StaticInt8Config(calibration_batches=2)],
        out_dir=tmp_path / "job",
        data=data,
        rounds=2,
        memory=False,
        batch_sizes=(1,),
    )
    stored = json.loads((Path(result["out_dir"]) / "report.json").read_text())["integer"]
    assert set(stored) == set(mp.available_runtimes())
    for runtime, report in stored.items():
        # static int8 with both runtimes: one file placed for each (deploy.export.export_for_runtimes)
        placed = "model.compressed.openvino.onnx" if runtime == "openvino" else "model.compressed.onnx"
        assert report["runtime"] == runtime and report["path"] == (
            placed if len(stored) == 2 else "model.compressed.onnx"
        )
        assert report["total"] == 2 and report["headline"].startswith(f"{report['integer']} of 2")
    assert all(report["integer"] == 2 for report in stored.values())  # each file placed for its runtime
