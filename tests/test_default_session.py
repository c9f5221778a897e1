"""Weight-only artifacts in the session a user opens, `onnxruntime.InferenceSession(path)` with no options:
int8 codes in the file, decompressed by plain ops that ONNX Runtime folds once at load (nothing is
dequantized per call), the torch model's numbers in ONNX Runtime and OpenVINO. Timing is measured apart
(no timing assertions here)."""

import hashlib

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.ops.quant import decompress_per_channel, dequantize_per_channel


class _Mixed(nn.Module):
    """Every weight-only layer kind, with weights that dominate the file: tokens -> Embedding -> Conv1d ->
    LSTM -> Linear -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(300, 64)
        self.conv = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm = nn.LSTM(128, 64, batch_first=True)
        self.fc = nn.Linear(64, 256)
        self.head = nn.Linear(256, 7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)  # (B, T, 128)
        out, _ = self.lstm(h)  # (B, T, 64)
        return self.head(torch.relu(self.fc(out.mean(1))))


def _model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    return _Mixed().eval(), (ids,)


_RECIPES = {
    "asymmetric": "int8-weight-only",
    "symmetric": [mp.WeightOnlyConfig(symmetric=True)],
    "int8 groups": [mp.WeightOnlyConfig(bits=8, group_size=32, symmetric=False)],
}


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    model, inputs = _model()
    return mp.export_onnx(model, inputs, tmp_path_factory.mktemp("fp32") / "fp32.onnx")


@pytest.fixture(scope="module", params=list(_RECIPES))
def exported(request, tmp_path_factory, fp32_file):
    model, inputs = _model()
    small = mp.compress(model, _RECIPES[request.param])
    path = mp.export_onnx(small, inputs, tmp_path_factory.mktemp("int8") / "int8.onnx")
    return small, inputs, path, fp32_file


def _weight_codes(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """The int8/uint8 matrices: weight codes (zero points are one value per row or block: (C, 1, ...))."""
    kinds = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return [i for i in graph.initializer if i.data_type in kinds and len(i.dims) >= 2 and i.dims[-1] > 1]


def test_the_file_holds_int8_codes_and_no_dequantize_linear(exported) -> None:
    _, _, path, fp32 = exported
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"DequantizeLinear", "MatMulNBits", "QuantizeLinear"}
    codes = _weight_codes(graph)
    # embedding, conv, the LSTM's two matrices, fc, head: none folded into fp32 by the exporter
    assert len(codes) == 6
    assert sum(int(np.prod(i.dims)) for i in codes) >= sum(
        p.numel() for n, p in _model()[0].named_parameters() if p.dim() >= 2
    )
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) <= 1024  # biases, scales: no weight is fp32
    assert path.stat().st_size < 0.3 * fp32.stat().st_size


def test_a_default_session_folds_the_weights_once_and_leaves_the_file_int8(exported, tmp_path) -> None:
    import onnxruntime as ort

    small, inputs, path, _ = exported
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    session = ort.InferenceSession(str(path))  # what a user opens: no session options
    feed = {session.get_inputs()[0].name: inputs[0].numpy()}
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, feed)[0], small(*inputs).numpy(), atol=2e-5, rtol=0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert len(_weight_codes(onnx.load(str(path)).graph)) == 6

    # The graph the default session runs (default optimisations; the option only saves it): each weight is
    # a constant the layer reads as is. Only the embedding reads int8 at run time: it gathers the rows it
    # needs, then scales them (Gather -> Cast -> Sub -> Mul, or GatherBlockQuantized).
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options)
    graph = onnx.load(str(tmp_path / "optimized.onnx")).graph
    int8 = {i.name for i in _weight_codes(graph)}
    assert len(int8) == 1
    readers = [n.op_type for n in graph.node if int8 & set(n.input)]
    assert readers in (["Gather"], ["GatherBlockQuantized"])
    assert not {n.op_type for n in graph.node} & {"DequantizeLinear", "MatMulNBits"}
    initializers = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type in ("Conv", "LSTM", "Gemm", "MatMul", "FusedMatMul"):
            weight = initializers.get(node.input[1])
            assert weight is not None and weight.data_type == onnx.TensorProto.FLOAT, node.op_type


@pytest.mark.parametrize("runtime", mp.available_runtimes())
def test_parity_in_every_runtime(exported, runtime) -> None:
    small, inputs, path, _ = exported
    samples = [inputs, (torch.randint(0, 300, (1, 4)),)]
    report = mp.check_parity(small, mp.open_session(path, runtime), samples)
    assert report.passed, report.message


def test_openvino_keeps_the_linear_weights_int8(exported) -> None:
    """OpenVINO reads `Convert -> Subtract -> Multiply` on an int8 constant as compressed weights: its
    FullyConnected layers take the int8 codes (as NNCF's weight-only files make them do)."""
    ov = pytest.importorskip("openvino")
    _, _, path, _ = exported
    core = ov.Core()
    compiled = core.compile_model(
        core.read_model(str(path)),
        "CPU",
        {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0},
    )
    fully_connected = [
        op
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"
    ]
    assert len(fully_connected) == 2  # fc and head
    for op in fully_connected:
        types = {op.input(i).get_element_type() for i in range(op.get_input_size())}
        assert types & {ov.Type.i8, ov.Type.u8}, types


def test_static_int8_keeps_dequantize_linear_on_its_weights(tmp_path) -> None:
    """Statically quantized layers keep DequantizeLinear on the int8 weight: half of the QDQ pattern that
    runtimes turn into integer kernels."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()).eval()
    data = [(torch.randn(2, 3, 12, 12),) for _ in range(3)]
    small = mp.compress(model, [mp.StaticInt8Config()], data=data)
    graph = onnx.load(str(mp.export_onnx(small, data[0], tmp_path / "static.onnx"))).graph
    codes = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4}
    dequantized = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert len(codes) == 2 and codes <= dequantized


def test_ort_session_sets_no_quantization_option(exported) -> None:
    """modelpress's own session runs a weight-only file as a default session does: no option a user would
    not know about (threads and idle spinning aside)."""
    _, _, path, _ = exported
    options = mp.open_session(path, "onnxruntime")._session.get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        options.get_session_config_entry("session.disable_quant_qdq")


def test_decompression_is_dequantize_linear_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-128, 128, (16, 8, 3), generator=g).to(torch.int8)
    scale = torch.rand(16, generator=g) * 0.1 + 1e-3
    zero_point = torch.randint(-20, 20, (16,), generator=g).to(torch.int8)
    for zp in (None, zero_point):
        expected = dequantize_per_channel(codes, scale, axis=0, zero_point=zp)
        assert torch.equal(decompress_per_channel(codes, scale, axis=0, zero_point=zp), expected)
    # ConvTranspose weights: channels on axis 1
    assert torch.equal(
        decompress_per_channel(codes, scale[:8], axis=1), dequantize_per_channel(codes, scale[:8], axis=1)
    )
