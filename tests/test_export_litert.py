"""LiteRT export (issue 29): fp32 parity, modelpress's static int8 as a full-integer .tflite, bad input."""

import numpy as np
import pytest
import torch
import zoo
from torch import nn

pytest.importorskip(
    "litert_torch", reason="the litert extra is not installed (pip install modelpress[litert])"
)
pytest.importorskip(
    "ai_edge_litert", reason="the litert extra is not installed (pip install modelpress[litert])"
)

import modelpress as mp
from modelpress.deploy.litert import (
    LiteRTSession,
    export_litert,
    float_ops,
    int8_kernels,
    open_litert,
    read_tflite,
)
from modelpress.techniques.cluster import ClusteredInt8Layer


class MnistLike(nn.Module):
    """The shape of ccexam's MNISTNet at a quarter of the width."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MlpBlock(nn.Module):
    """Transformer-ish: LayerNorm, GELU MLP with a residual, a head on the mean token."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 32)
        x = x + self.down(nn.functional.gelu(self.up(self.norm(x))))
        return self.head(x.mean(1))


def _digits(n: int, seed: int) -> torch.Tensor:
    """Blurry blobs, not white noise: the ranges look like images'."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 7, 7, generator=gen)
    return nn.functional.interpolate(x, size=(28, 28), mode="bilinear") * 2 - 0.5


@pytest.fixture(scope="module")
def mnist_like():
    torch.manual_seed(0)
    model = MnistLike().eval()
    calib = [(_digits(32, seed),) for seed in range(4)]
    small = mp.compress(model, [mp.StaticInt8Config(observer="minmax")], calib)
    return model, small, calib


@pytest.fixture(scope="module")
def int8_file(mnist_like, tmp_path_factory):
    _, small, calib = mnist_like
    return export_litert(
        small, (calib[0][0][:1],), tmp_path_factory.mktemp("litert") / "s8.tflite", data=calib
    )


def test_fp32_cnn_parity(tmp_path):
    model, (x,) = zoo.resnet_cnn()
    path = export_litert(model, (x,), tmp_path / "resnet.tflite")
    session = open_litert(path)
    assert session.runtime == "litert" and session.input_shapes == [tuple(x.shape)]
    report = mp.check_parity(model, session, mp.parity_inputs((x,)), min_cosine=0.99999)
    assert report.passed and report.skipped_samples == 1  # the batch+1 sample does not fit a static file
    assert not [op for op in read_tflite(path) if op.name.startswith("CUSTOM")]


def test_fp32_transformer_mlp_parity(tmp_path):
    torch.manual_seed(0)
    model = MlpBlock().eval()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    path = export_litert(model, (x,), tmp_path / "mlp.tflite")
    assert mp.check_parity(model, open_litert(path), mp.parity_inputs((x,)), min_cosine=0.99999).passed


def test_static_int8_is_full_integer_with_int8_weights(mnist_like, int8_file, tmp_path):
    model, _, calib = mnist_like
    ops = read_tflite(int8_file)
    kernels = [op for op in ops if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert len(kernels) == 4
    for op in kernels:  # int8 activations in and out, int8 weights, int32 bias: integer kernels
        assert [t.dtype for t in op.inputs] == ["int8", "int8", "int32"] and op.outputs[0].dtype == "int8"
    assert float_ops(int8_file) == []
    # The interpreter's own view: every weight it holds is int8 (biases int32), and it runs the file.
    session = LiteRTSession(int8_file)
    details = session._interpreter.get_tensor_details()
    weights = {op.inputs[1].name for op in kernels}
    assert {np.dtype(d["dtype"]) for d in details if d["name"] in weights} == {np.dtype(np.int8)}
    assert session.input_dtypes == [np.dtype(np.int8)]
    fp32 = export_litert(model, (calib[0][0][:1],), tmp_path / "fp32.tflite")
    assert int8_file.stat().st_size <= 0.32 * fp32.stat().st_size  # 28k weights: the flatbuffer adds ~2k


def test_static_int8_agrees_with_the_int8_torch_model(mnist_like, int8_file):
    _, small, _ = mnist_like
    x = _digits(200, seed=10)
    session = open_litert(int8_file)
    got = np.concatenate([session.run([x[i : i + 1].numpy()])[0] for i in range(len(x))])
    with torch.no_grad():
        ref = small(x).numpy()
    # An untrained net's logits are close together; where torch's top two are more than two output codes
    # apart (the logits are int8 too), LiteRT must pick the same class.
    step = session._outputs[0]["quantization"][0]
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * step
    assert clear.mean() > 0.8
    assert (got.argmax(1) == ref.argmax(1))[clear].all()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    report = mp.check_parity(small, session, [(x[i : i + 1],) for i in range(8)], min_cosine=0.995)
    assert report.passed


def test_modelpress_scales_are_kept(mnist_like, int8_file):
    """The first conv's input quantizer is modelpress's (uint8 shifted to int8), its weight codes too."""
    _, small, _ = mnist_like
    layer = small.features[0]
    session = LiteRTSession(int8_file)
    scale, zero_point = session._inputs[0]["quantization"]
    assert scale == pytest.approx(layer.input_scale, rel=1e-6)
    assert zero_point == layer.input_zero_point - (0 if layer.input_signed else 128)


def test_refuses_to_overwrite_and_leaves_the_file(tmp_path):
    model, (x,) = zoo.resnet_cnn()
    path = tmp_path / "m.tflite"
    path.write_bytes(b"keep")
    with pytest.raises(mp.ExportError, match="already exists"):
        export_litert(model, (x,), path)
    assert path.read_bytes() == b"keep"
    with pytest.raises(mp.ExportError, match="does not exist"):
        export_litert(model, (x,), tmp_path / "missing" / "m.tflite")


def test_unsupported_op_is_named(tmp_path):
    class Bessel(nn.Module):
        def forward(self, x):
            return torch.special.i0(x)

    with pytest.raises(mp.ExportError, match=r"no lowering for the op 'aten\.i0'"):
        export_litert(Bessel(), (torch.randn(2, 3),), tmp_path / "b.tflite")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_bad_requests(mnist_like, tmp_path):
    model, small, calib = mnist_like
    x = calib[0][0][:1]
    with pytest.raises(mp.ExportError, match="no statically quantized layer"):
        export_litert(model, (x,), tmp_path / "a.tflite", quantize="int8")
    with pytest.raises(mp.ExportError, match="quantize='int4' is unknown"):
        export_litert(model, (x,), tmp_path / "a.tflite", quantize="int4")  # type: ignore[arg-type]
    with pytest.raises(mp.DataError, match="differ only in the batch dim"):
        export_litert(small, (x,), tmp_path / "a.tflite", data=[(torch.randn(4, 1, 14, 14),)])
    with pytest.raises(mp.ExportError, match="fails on the example inputs"):
        export_litert(model, (torch.randn(1, 3, 28, 28),), tmp_path / "a.tflite")
    with pytest.raises(mp.ExportError, match="does not exist"):
        open_litert(tmp_path / "nothing.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(mp.ExportError, match="not a .tflite file"):
        open_litert(bad)


def test_session_says_the_fixed_shape(int8_file):
    session = open_litert(int8_file)
    with pytest.raises(ValueError, match=r"fixed shape \(1, 1, 28, 28\)"):
        session.run([np.zeros((2, 1, 28, 28), np.float32)])


def test_residual_cnn_int8_is_full_integer_with_parity(tmp_path):
    model, (x,) = zoo.resnet_cnn()
    gen = torch.Generator().manual_seed(2)
    calib = [(torch.randn(8, 3, 32, 32, generator=gen),) for _ in range(3)]
    small = mp.compress(model, [mp.StaticInt8Config(observer="minmax")], calib)
    path = export_litert(small, (x,), tmp_path / "res.tflite", data=calib)
    names = [op.name for op in read_tflite(path)]
    assert names.count("CONV_2D") == 6 and names.count("ADD") == 2 and float_ops(path) == []
    assert mp.check_parity(small, open_litert(path), [(c[0][:2],) for c in calib], min_cosine=0.999).passed


def test_a_layer_modelpress_left_in_float_stays_float(tmp_path):
    torch.manual_seed(0)
    model = MnistLike().eval()
    calib = [(_digits(32, seed),) for seed in range(2)]
    small = mp.compress(model, [mp.StaticInt8Config(observer="minmax", ignore=("classifier.2",))], calib)
    path = export_litert(small, (calib[0][0][:1],), tmp_path / "mixed.tflite", data=calib)
    fc = [op for op in read_tflite(path) if op.name == "FULLY_CONNECTED"]
    assert [op.inputs[1].dtype for op in fc] == ["int8", "float32"]  # the head keeps its fp32 weights
    assert mp.check_parity(small, open_litert(path), [(calib[1][0][i : i + 1],) for i in range(4)]).passed


def test_a_clustered_model_is_full_integer_with_the_codes_static_int8_gave_it(tmp_path):
    """cluster -> static int8 (issue 29): static int8 quantizes the clustered layers as the layers they
    wrap, so the file is full-integer, each weight the int8 codes gathered from the layer's codebooks."""
    torch.manual_seed(0)
    model = MnistLike().eval()
    calib = [(_digits(32, seed),) for seed in range(3)]
    steps = [mp.ClusterConfig(values=16), mp.StaticInt8Config(observer="minmax")]
    small = mp.compress(model, steps, calib)
    layer = small.classifier[0]
    assert isinstance(layer, ClusteredInt8Layer) and isinstance(small.features[3], ClusteredInt8Layer)
    path = export_litert(small, (calib[0][0][:1],), tmp_path / "cluster.tflite", data=calib)
    assert int8_kernels(path) == {"full-integer": 4, "dynamic": 0, "float": 0} and float_ops(path) == []
    session = open_litert(path)
    codes = layer.qweight.numpy()
    assert any(
        d["dtype"] == np.int8
        and tuple(d["shape"]) == codes.shape
        and np.array_equal(session._interpreter.get_tensor(d["index"]), codes)
        for d in session._interpreter.get_tensor_details()
    )
    fp32 = export_litert(model, (calib[0][0][:1],), tmp_path / "fp32.tflite")
    assert path.stat().st_size <= 0.32 * fp32.stat().st_size
    x = _digits(64, seed=11)
    report = mp.check_parity(small, session, [(x[i : i + 1],) for i in range(len(x))], min_cosine=0.999)
    assert report.passed, report


def test_a_batchnorm_after_a_clustered_conv_is_folded_keeping_the_codes(tmp_path):
    """static_int8 cannot fold a BatchNorm into a clustered conv; the export folds it into the float twin
    with the weight scales scaled to match, so the file keeps modelpress's codes (the converter's own
    folding over modelpress's scales gave cosine 0.9988 here)."""
    model, (x,) = zoo.resnet_cnn()
    gen = torch.Generator().manual_seed(2)
    calib = [(torch.randn(8, 3, 32, 32, generator=gen),) for _ in range(3)]
    steps = [mp.ClusterConfig(values=16), mp.StaticInt8Config(observer="minmax")]
    small = mp.compress(model, steps, calib)
    assert isinstance(small.layer1.conv1, ClusteredInt8Layer)
    assert isinstance(small.layer1.bn1, nn.BatchNorm2d)  # not folded into the clustered conv
    path = export_litert(small, (x,), tmp_path / "res.tflite", data=calib)
    assert int8_kernels(path) == {"full-integer": 7, "dynamic": 0, "float": 0} and float_ops(path) == []
    samples = [(c[0][:2],) for c in calib]
    assert mp.check_parity(small, open_litert(path), samples, min_cosine=0.9999).passed


@pytest.fixture(scope="module")
def tiny_bert():
    model, (ids, mask) = zoo.bert_encoder()
    gen = torch.Generator().manual_seed(1)
    calib = [
        (torch.randint(1, 1000, (4, 16), generator=gen), torch.ones(4, 16, dtype=torch.int64))
        for _ in range(2)
    ]
    small = mp.compress(model, "int8-static-smooth", calib)
    return model, small, (ids, mask)


def test_transformer_int8_is_dynamic_range_with_modelpress_weights(tiny_bert, tmp_path, caplog):
    """A transformer's int8 file (activations="auto") keeps int8 weights but runs its Linears as hybrid
    kernels (float input quantized per row at run time), and its int8 embeddings load in LiteRT."""
    _, small, (ids, mask) = tiny_bert
    example = (ids[:1], mask[:1])
    with caplog.at_level("INFO", logger="modelpress.deploy.litert"):
        path = export_litert(small, example, tmp_path / "bert.tflite")  # no data: nothing to calibrate
    assert "dynamic-range: 12 layers" in caplog.text
    assert int8_kernels(path) == {"full-integer": 0, "dynamic": 12, "float": 0}
    fc = [op for op in read_tflite(path) if op.name == "FULLY_CONNECTED"]
    assert {(op.inputs[0].dtype, op.inputs[1].dtype, op.outputs[0].dtype) for op in fc} == {
        ("float32", "int8", "float32")
    }
    # the word embedding table is stored as int8 codes too
    assert any(t.dtype == "int8" and t.shape == (1000, 64) for op in read_tflite(path) for t in op.inputs)
    # modelpress's weight codes: the first query layer's int8 weight equals modelpress's codes
    session = open_litert(path)
    query = small.bert.encoder.layer[0].attention.self.query
    codes = query.qweight.numpy()
    tensors = session._interpreter.get_tensor_details()
    assert any(
        d["dtype"] == np.int8
        and tuple(d["shape"]) == codes.shape
        and np.array_equal(session._interpreter.get_tensor(d["index"]), codes)
        for d in tensors
    )
    report = mp.check_parity(
        small, session, [(ids[i : i + 1], mask[i : i + 1]) for i in range(2)], min_cosine=0.999
    )
    assert report.passed


def test_activations_choice(tiny_bert, mnist_like, int8_file, tmp_path):
    """MNIST (no norm layer) stays full-integer under "auto"; "static" forces a transformer full-integer
    and "dynamic" a CNN dynamic-range; an unknown choice is an ExportError."""
    assert int8_kernels(int8_file) == {"full-integer": 4, "dynamic": 0, "float": 0}
    _, small, calib = mnist_like
    x = calib[0][0][:1]
    path = export_litert(small, (x,), tmp_path / "dyn.tflite", activations="dynamic")
    assert int8_kernels(path) == {"full-integer": 0, "dynamic": 4, "float": 0}
    assert mp.check_parity(small, open_litert(path), [(calib[1][0][i : i + 1],) for i in range(4)]).passed
    _, bert, (ids, mask) = tiny_bert
    path = export_litert(bert, (ids[:1], mask[:1]), tmp_path / "s8.tflite", activations="static")
    kernels = int8_kernels(path)
    assert kernels["full-integer"] == 12 and kernels["dynamic"] == 0
    with pytest.raises(mp.ExportError, match="activations='int4' is unknown"):
        export_litert(small, (x,), tmp_path / "a.tflite", activations="int4")  # type: ignore[arg-type]


def test_a_weight_only_model_is_refused_rather_than_written_as_float(tmp_path):
    # LiteRT has no weight-only form here: an fp32-sized file would look like a compressed one
    model, inputs = zoo.WIDE_ZOO["speech_lstm"]()
    small = mp.compress(model, "int8-weight-only")
    with pytest.raises(
        mp.ExportError, match=r"as float weights .*'frontend\.0'.*int8-static.*quantize='fp32'"
    ):
        export_litert(small, inputs, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
    assert export_litert(small, inputs, tmp_path / "f.tflite", quantize="fp32").is_file()
