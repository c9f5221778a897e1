"""ExecuTorch export (XNNPACK): fp32 and modelpress static int8 in a .pte, checked in ExecuTorch's runtime."""

import copy

import numpy as np
import pytest
import torch
import zoo
from torch import nn

import modelpress as mp

pytest.importorskip(
    "executorch", reason="the executorch extra is not installed (pip install modelpress[executorch])"
)

from modelpress.deploy.executorch import (
    ExecuTorchSession,
    export_executorch,
    lower_executorch,
)


def _cnn() -> tuple[nn.Module, list[torch.Tensor]]:
    """~80k parameters: conv -> relu -> maxpool twice, then a two-layer head (MNIST-like, 12x12 input)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 3, 12, 12, generator=gen) for _ in range(4)]
    return model, data


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    model, data = _cnn()
    small = mp.compress(copy.deepcopy(model), [mp.StaticInt8Config(observer="minmax")], data)
    folder = tmp_path_factory.mktemp("et")
    calib = [(d,) for d in data]
    fp32 = export_executorch(model, (data[0][:1],), folder / "fp32.pte", max_batch=32)
    int8 = lower_executorch(small, (data[0][:1],), max_batch=32, data=calib)
    int8_path = folder / "int8.pte"
    int8_path.write_bytes(int8.buffer)
    return model, small, data, fp32, int8, int8_path


def test_fp32_cnn_matches_torch_with_dynamic_batch(cnn_files):
    model, _, data, fp32, _, _ = cnn_files
    session = ExecuTorchSession(fp32)
    assert session.runtime == "executorch" and session.input_shapes == [(None, 3, 12, 12)]
    report = mp.check_parity(model, session, [(data[1][:1],), (data[1],), (data[2][:7],)], min_cosine=0.99999)
    assert report.passed and report.samples == 3


def test_static_int8_cnn_lowers_to_xnnpack_int8_kernels(cnn_files):
    _, small, data, fp32, int8, int8_path = cnn_files
    # Every conv/linear, quantizer and pool runs in XNNPACK; only the flatten's view stays outside.
    assert int8.undelegated_ops == ["aten_view_copy_default"], int8.summary()
    assert {"aten_convolution_default", "quantized_decomposed_quantize_per_tensor_default"} <= set(
        int8.delegated_ops
    )
    form = int8.int8
    assert form is not None and form.layers == 4 and form.shared == 2 and form.float_outputs == ["linear_1"]
    # int8 weights in the file: a quarter of fp32 and a little more (the float head is 1,280 weights).
    assert int8_path.stat().st_size < 0.3 * fp32.stat().st_size
    session = ExecuTorchSession(int8_path)
    samples = [(d,) for d in data] + [(data[0][:1],)]
    report = mp.check_parity(small, session, samples, min_cosine=0.999, min_top1=0.98)
    assert report.passed


def test_a_clustered_int8_cnn_lowers_to_the_same_int8_kernels(cnn_files, tmp_path):
    """cluster -> static int8 (issue 29): the clustered layers lower as the int8 layers they are, their
    codes decoded from the codebooks into the file; the model keeps its clustered form."""
    from modelpress.techniques.cluster import ClusteredInt8Layer

    model, _, data, fp32, _, _ = cnn_files
    steps = [mp.ClusterConfig(values=16), mp.StaticInt8Config(observer="minmax")]
    small = mp.compress(copy.deepcopy(model), steps, data)
    assert [type(small[i]).__name__ for i in (3, 7, 9)] == ["ClusteredInt8Layer"] * 3
    lowered = lower_executorch(small, (data[0][:1],), max_batch=32, data=[(d,) for d in data])
    assert isinstance(small[3], ClusteredInt8Layer)
    assert lowered.undelegated_ops == ["aten_view_copy_default"], lowered.summary()
    assert lowered.int8 is not None and lowered.int8.layers == 4
    path = tmp_path / "cluster.pte"
    path.write_bytes(lowered.buffer)
    assert path.stat().st_size < 0.3 * fp32.stat().st_size
    samples = [(d,) for d in data] + [(data[0][:1],)]
    report = mp.check_parity(small, ExecuTorchSession(path), samples, min_cosine=0.999, min_top1=0.98)
    assert report.passed, report


def test_int8_uses_calibration_for_outputs_no_quantizer_reaches(tmp_path):
    # conv -> global average pool -> linear: the pool does not commute with a quantizer, so the conv's
    # output range is measured on the calibration data.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    ).eval()
    data = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    small = mp.compress(model, [mp.StaticInt8Config(observer="minmax")], data)
    lowered = lower_executorch(small, (data[0],), data=[(d,) for d in data])
    assert lowered.int8 is not None and lowered.int8.calibrated == ["relu"]
    path = tmp_path / "m.pte"
    path.write_bytes(lowered.buffer)
    assert mp.check_parity(small, ExecuTorchSession(path), [(d,) for d in data], min_cosine=0.999).passed


def test_int8_linears_without_output_quantizer_quantize_inputs_at_run_time(tmp_path):
    # Linear -> LayerNorm -> Linear -> GELU -> Linear: no quantizer follows the first two, so they run as
    # XNNPACK's dynamically quantized GEMMs; the last one produces the model output and stays float.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    data = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    small = mp.compress(model.eval(), [mp.StaticInt8Config(observer="minmax")], data)
    lowered = lower_executorch(small, (data[0],))
    form = lowered.int8
    assert form is not None and form.dynamic == ["linear", "linear_1"] and form.float_outputs == ["linear_2"]
    assert "quantized_decomposed_choose_qparams_tensor" in lowered.delegated_ops
    path = tmp_path / "m.pte"
    path.write_bytes(lowered.buffer)
    assert mp.check_parity(small, ExecuTorchSession(path), [(d,) for d in data], min_cosine=0.999).passed


def test_int8_dynamic_linears_lower_to_xnnpack_dynamic_gemms(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    small = mp.compress(model, "int8-dynamic")
    lowered = lower_executorch(small, (x,))
    assert lowered.int8 is not None and len(lowered.int8.dynamic) == 2
    assert lowered.undelegated_ops == [], lowered.summary()
    path = tmp_path / "m.pte"
    path.write_bytes(lowered.buffer)
    assert mp.check_parity(small, ExecuTorchSession(path), mp.parity_inputs((x,)), min_cosine=0.999).passed


@pytest.mark.slow
def test_fp32_transformer_encoder_matches_torch(tmp_path):
    wrapper, inputs = zoo.bert_encoder()
    model = wrapper.bert  # the Hugging Face BertModel itself: it returns a ModelOutput
    path = export_executorch(model, inputs, tmp_path / "bert.pte", dynamic=False)
    session = ExecuTorchSession(path)
    assert session.input_names == ["input_ids", "attention_mask"]
    assert session.output_names == ["last_hidden_state"]
    report = mp.check_parity(model, session, mp.parity_inputs(inputs), min_cosine=0.99999)
    assert report.passed


def test_bad_inputs_give_modelpress_errors(cnn_files, tmp_path):
    model, _, _, fp32, _, _ = cnn_files
    with pytest.raises(mp.ExportError, match=r"fails on the example inputs \[\(1, 5, 12, 12\) float32\]"):
        export_executorch(model, (torch.randn(1, 5, 12, 12),), tmp_path / "bad.pte")

    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(mp.ExportError, match="ExecuTorch export of DataDependent failed.*torch.export must"):
        export_executorch(DataDependent(), (torch.ones(2, 3),), tmp_path / "dd.pte")
    with pytest.raises(mp.ExportError, match="batch 40, above max_batch=32"):
        export_executorch(model, (torch.randn(40, 3, 12, 12),), tmp_path / "big.pte", max_batch=32)
    not_pte = tmp_path / "x.pte"
    not_pte.write_bytes(b"not a program")
    with pytest.raises(mp.ExportError, match="is not a readable ExecuTorch program"):
        ExecuTorchSession(not_pte)
    session = ExecuTorchSession(fp32)
    with pytest.raises(ValueError, match=r"takes at most \(32, 3, 12, 12\).*max_batch"):
        session.run([np.zeros((33, 3, 12, 12), np.float32)])


def test_existing_file_is_not_overwritten(cnn_files, tmp_path):
    model, _, data, _, _, _ = cnn_files
    out = tmp_path / "m.pte"
    out.write_bytes(b"keep me")
    with pytest.raises(mp.ExportError, match="already exists"):
        export_executorch(model, (data[0][:1],), out)
    assert out.read_bytes() == b"keep me"
    export_executorch(model, (data[0][:1],), out, overwrite=True, max_batch=4)
    assert out.read_bytes()[4:8] == b"ET12"  # an ExecuTorch flatbuffer
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
