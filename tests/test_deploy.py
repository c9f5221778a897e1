from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import modelpress as mp
import modelpress.deploy.export as export
from modelpress._files import file_size
from modelpress.deploy.bench import synthetic_inputs
from modelpress.deploy.export import dynamic_axes


@pytest.fixture()
def exported(tiny, tmp_path):
    model, inputs = tiny
    small = mp.compress(model, "int8-weight-only")
    fp32 = mp.export_onnx(model, inputs, tmp_path / "fp32.onnx")
    q8 = mp.export_onnx(small, inputs, tmp_path / "int8.onnx")
    return model, small, inputs, fp32, q8


def test_int8_initializers_are_decompressed_by_plain_ops(exported):
    # Cast -> Sub -> Mul, which ONNX Runtime folds at load (DequantizeLinear it would redo on every call)
    _, _, _, _, q8 = exported
    graph = onnx.load(str(q8)).graph
    int8 = [
        i
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2 and i.dims[-1] > 1
    ]  # the codes; zero points are (C, 1, ...)
    assert {tuple(i.dims) for i in int8} == {(8, 3, 3, 3), (4, 8)}
    cast_inputs = {n.input[0] for n in graph.node if n.op_type == "Cast"}
    assert {i.name for i in int8} <= cast_inputs
    assert "DequantizeLinear" not in {n.op_type for n in graph.node}
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]
    assert all(i.dims[-1] == 1 for i in floats)  # scales (C, 1, ...): no fp32 weight


def test_file_really_shrinks_about_4x(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    inputs = (torch.randn(2, 256),)
    fp32 = mp.export_onnx(model, inputs, tmp_path / "fp32.onnx")
    q8 = mp.export_onnx(mp.compress(model, "int8-weight-only"), inputs, tmp_path / "int8.onnx")
    assert 0.25 < file_size(q8) / file_size(fp32) < 0.27


@pytest.mark.parametrize("runtime", mp.available_runtimes())
def test_parity_and_dynamic_batch(exported, runtime):
    model, small, inputs, fp32, q8 = exported
    for module, path in ((model, fp32), (small, q8)):
        session = mp.open_session(path, runtime)
        samples = [*mp.parity_inputs(inputs), (torch.randn(5, 3, 8, 8),), (torch.randn(1, 3, 8, 8),)]
        report = mp.check_parity(module, session, samples)
        assert report.passed and report.samples == 6
        assert report.worst.min_cosine > 0.9999 and report.worst.top1_agreement == 1.0


def test_parity_failure_names_worst_output(exported):
    model, _, inputs, _, _ = exported
    other = mp.export_onnx(
        nn.Sequential(nn.Conv2d(3, 4, 8), nn.Flatten()).eval(), inputs, exported[3].parent / "other.onnx"
    )
    with pytest.raises(mp.ParityError, match="output '.*': worst cosine"):
        mp.check_parity(model, mp.open_session(other), [inputs])


def test_export_refuses_existing_path_and_leaves_nothing(tiny, tmp_path):
    model, inputs = tiny
    target = tmp_path / "m.onnx"
    target.write_bytes(b"user data")
    with pytest.raises(mp.ExportError, match="already exists. Choose another path"):
        mp.export_onnx(model, inputs, target)
    assert target.read_bytes() == b"user data"
    mp.export_onnx(model, inputs, target, overwrite=True)
    assert onnx.load(str(target)).graph.node
    with pytest.raises(mp.ExportError, match="does not exist; create it first"):
        mp.export_onnx(model, inputs, tmp_path / "no" / "m.onnx")


def test_untraceable_model_gives_clear_error(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor value
                return x * 2
            return x

    with pytest.raises(mp.ExportError, match="ONNX export of DataDependent failed") as failure:
        mp.export_onnx(DataDependent(), (torch.randn(2, 3),), tmp_path / "d.onnx")
    assert list(tmp_path.iterdir()) == []
    # the cause (data-dependent control flow), not the exporter's step banner, and no terminal colours
    assert "data-dependent" in str(failure.value).lower() and "\x1b" not in str(failure.value)


def test_export_falls_back_to_static_shapes_and_says_so(tmp_path, monkeypatch, caplog):
    trace = export._trace

    def no_dynamic(model, inputs, kwargs):
        if kwargs.get("dynamic_shapes") is not None:
            raise RuntimeError("Constraints violated (batch)")
        return trace(model, inputs, kwargs)

    monkeypatch.setattr(export, "_trace", no_dynamic)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 3)).eval()
    ids = torch.randint(0, 30, (2, 6))
    path = mp.export_onnx(model, (ids,), tmp_path / "static.onnx")
    assert "static dims instead" in caplog.text and "Constraints violated" in caplog.text
    assert dynamic_axes(path) == {"input": {}}
    session = mp.open_session(path)
    report = mp.check_parity(model, session, mp.parity_inputs((ids,)))
    assert (
        report.passed and report.skipped_samples == 1
    )  # the batch + 1 sample does not fit a static artifact


def test_hugging_face_outputs_are_named_and_caches_left_out(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    assert model.config.use_cache  # the model returns its key/value cache unless told otherwise
    ids = torch.randint(0, 50, (2, 5))
    path = mp.export_onnx(model, (ids,), tmp_path / "gpt2.onnx")
    assert model.config.use_cache  # the user's setting is back
    session = mp.open_session(path)
    assert session.input_names == ["input_ids"] and session.output_names == ["logits"]
    assert mp.check_parity(model, session, mp.parity_inputs((ids,))).passed
    assert set(dynamic_axes(path)["input_ids"]) == {0, 1}  # batch and sequence


def test_inference_mode_models_and_data_calibrate(tmp_path):
    # A model (and data) made under torch.inference_mode(): techniques that save tensors for backward work.
    with torch.inference_mode():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        data = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    for config in (
        mp.StaticInt8Config(calibration_batches=3, equalize=True, bias_correction=True),
        mp.QATConfig(calibration_batches=3),
    ):
        small = mp.compress(model, [config], data)
        assert small(torch.randn(1, 3, 12, 12)).shape == (1, 8, 8, 8)


def test_token_inputs_get_dynamic_sequence(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 3)).eval()
    path = mp.export_onnx(model, (torch.randint(0, 30, (2, 6)),), tmp_path / "t.onnx")
    session = mp.open_session(path)
    ids = torch.randint(0, 30, (3, 11))
    assert np.allclose(session.run([ids.numpy()])[0], model(ids).detach().numpy(), atol=1e-5)
    assert [a.shape for a in synthetic_inputs(path, batch=4, seq=9)] == [(4, 9)]


def test_unknown_runtime_and_missing_artifact(tmp_path):
    with pytest.raises(mp.ExportError, match="does not exist. Export it first"):
        mp.open_session(tmp_path / "absent.onnx")
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(mp.RuntimeUnavailableError, match="Unknown runtime 'tensorrt'"):
        mp.open_session(tmp_path / "x.onnx", "tensorrt")


def test_interleaved_bench_ratios_and_memory(exported):
    _, _, inputs, fp32, q8 = exported
    results = mp.compare_artifacts(
        {"fp32": (fp32, "onnxruntime"), "int8": (q8, "onnxruntime")},
        {"b1": [inputs[0][:1].numpy()], "b4": [torch.randn(4, 3, 8, 8).numpy()]},
        baseline="fp32",
        rounds=5,
    )
    assert results["fp32"].latency["b1"].ratio == 1.0 and results["fp32"].size_ratio == 1.0
    assert results["int8"].size_ratio == pytest.approx(file_size(q8) / file_size(fp32))
    assert results["int8"].latency["b4"].median_ms > 0 and results["int8"].latency["b4"].rounds == 5
    assert results["int8"].peak_rss_mb is not None and results["int8"].peak_rss_mb > 10


def test_benchmark_interleaves_in_rotating_order():
    calls = []
    timings = mp.benchmark_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        baseline="a",
        batch=1,
        rounds=2,
        warmup=0,
        min_round_s=0,
    )
    # Each turn is one untimed call (the runtime comes back from the other runner) and one timed call.
    assert calls[-8:] == ["a", "a", "b", "b", "b", "b", "a", "a"]
    assert len(timings["b"].round_ms) == 2 and timings["b"].paired_ratio(timings["b"]) == 1.0


def test_written_files_have_ordinary_permissions(tmp_path):
    import os

    from modelpress._files import write_text_atomic

    path = write_text_atomic(tmp_path / "r.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_parity_with_reference_accepts_equally_faithful_artifact(exported):
    model, small, inputs, _, q8 = exported
    session = mp.open_session(q8)
    noisy = nn.Sequential(small, nn.Dropout(0.0))  # same function as the artifact's model

    class Jitter(nn.Module):
        # torch "simulation" that differs from the artifact a little, but is as far from fp32 as it is
        def __init__(self, inner, sign):
            super().__init__()
            self.inner, self.sign = inner, sign

        def forward(self, x):
            out = self.inner(x)
            return out + self.sign * 0.2 * out.std() * torch.ones_like(out).cumsum(-1).remainder(2)

    sim = Jitter(noisy, 1.0)
    with pytest.raises(mp.ParityError, match="worst cosine"):
        mp.check_parity(sim, session, [inputs], min_cosine=0.9999)
    report = mp.check_parity(
        sim, session, [inputs], min_cosine=0.9999, reference=model, fidelity_tolerance=1.0
    )
    assert report.passed and report.worst.artifact_fidelity is not None
    # the fp32 model is perfectly faithful to itself; the int8 artifact is not, so with no tolerance it fails
    with pytest.raises(mp.ParityError, match="below the torch model's"):
        mp.check_parity(model, session, [inputs], min_cosine=1.0001, reference=model, fidelity_tolerance=0.0)


@pytest.mark.skipif("openvino" not in mp.available_runtimes(), reason="OpenVINO is not installed")
def test_openvino_session_owns_its_outputs_and_converts_inputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 3)).eval()
    path = mp.export_onnx(model, (torch.randint(0, 30, (2, 6)),), tmp_path / "t.onnx")
    session = mp.open_session(path, "openvino")
    a, b = torch.randint(0, 30, (3, 5)), torch.randint(0, 30, (3, 5))
    first = session.run([a.numpy().astype(np.int32)])[0]  # int32 ids into an int64 input: converted
    second = session.run([b.numpy()])[0]
    # The zero-copy path must not hand back the request's buffer: the second call would overwrite it.
    assert np.allclose(first, model(a).detach().numpy(), atol=1e-5)
    assert np.allclose(second, model(b).detach().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="takes 1 inputs"):
        session.run([a.numpy(), b.numpy()])


def test_openvino_session_compiles_repeated_shapes_static(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 8), nn.Linear(8, 3)).eval()
    path = mp.export_onnx(model, (torch.randint(0, 30, (2, 6)),), tmp_path / "t.onnx")
    session = mp.open_session(path, "openvino")
    inputs = [
        torch.randint(0, 30, shape) for shape in [(3, 5), (3, 5), (4, 7), (3, 5), (4, 7), (1, 2), (1, 2)]
    ]
    for x in inputs:  # dynamic for a new shape, static from its second call on; same numbers either way
        assert np.allclose(session.run([x.numpy()])[0], model(x).detach().numpy(), atol=1e-5)
    static = session._requests
    assert len(static) == session.STATIC_SHAPES and ((1, 2),) in static and ((4, 7),) in static
    assert all(r is not session._request for r in static.values())


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_peak_memory_resets_to_what_is_resident_now():
    from modelpress.deploy.bench import process_memory_mb, reset_peak_memory

    block = np.ones(64 * 2**20 // 8)  # 64 MB touched, then freed
    del block
    before = reset_peak_memory()
    if before is None:
        pytest.skip("the kernel does not allow resetting the peak")
    peak = process_memory_mb("VmHWM")
    assert peak is not None and peak < before + 32  # the 64 MB block is no longer in the peak
