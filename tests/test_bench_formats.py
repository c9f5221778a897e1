"""`modelpress bench` for every artifact format: default runtimes by file type, a baseline of another format
(ratios across runtimes), synthetic inputs from the session, batches a static file cannot take skipped.

The end-to-end tests skip with the reason when an extra (executorch, litert, the browser) is missing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from modelpress.cli import main
from modelpress.deploy import bench
from modelpress.deploy.bench import artifact_runtimes, compare_artifacts, session_inputs
from modelpress.errors import RuntimeUnavailableError


def _needs(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"the {extra} extra is not installed (pip install modelpress[{extra}])")


class _Fake:
    """A session of a .tflite-like file: fixed (1, 3) float input and an int8 (quantized) one."""

    runtime = "fake"

    def __init__(self, shapes: list[tuple[int | None, ...]], dtypes: list[str]) -> None:
        self.input_names = [f"x{i}" for i in range(len(shapes))]
        self.output_names = ["y"]
        self.input_shapes = shapes
        self.input_dtypes = [np.dtype(d) for d in dtypes]
        self.closed = False
        self.calls = 0

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        self.calls += 1
        return [inputs[0]]

    def close(self) -> None:
        self.closed = True


def test_default_runtimes_follow_the_file_type(tmp_path: Path) -> None:
    installed = [r for r in ("onnxruntime", "openvino") if importlib.util.find_spec(r) is not None]
    assert artifact_runtimes(tmp_path / "m.onnx") == installed  # never the browser unless named
    assert artifact_runtimes(tmp_path / "m.onnx", ["onnxruntime-web"]) == ["onnxruntime-web"]
    if importlib.util.find_spec("ai_edge_litert") is not None:
        assert artifact_runtimes(tmp_path / "m.tflite") == ["litert"]  # tflite-micro only when named
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime does not run .tflite files"):
        artifact_runtimes(tmp_path / "m.tflite", ["onnxruntime"])
    with pytest.raises(RuntimeUnavailableError, match="give a .onnx, OpenVINO .xml, .tflite or .pte"):
        artifact_runtimes(tmp_path / "m.h5")


def test_session_inputs_from_shapes_and_types(tmp_path: Path) -> None:
    session = _Fake([(None, 4), (2, 3), (None, None)], ["float32", "int8", "int64"])
    x, q, ids = session_inputs(session, tmp_path / "m.pte", batch=2, seq=5)
    assert x.shape == (2, 4) and x.dtype == np.float32
    assert q.shape == (2, 3) and q.dtype == np.float32  # a quantized input: the session quantizes floats
    assert ids.shape == (2, 5) and ids.dtype == np.int64 and (ids == 1).all()
    with pytest.raises(ValueError, match="fixed shape \\(2, 3\\) in fake: it takes only batch 2"):
        session_inputs(session, tmp_path / "m.pte", batch=4)
    session.max_shapes = [(8, 4), (2, 3), (8, 16)]  # type: ignore[attr-defined]  # ExecuTorch's bounds
    with pytest.raises(ValueError, match="beyond the fake program's largest \\(8, 16\\)"):
        session_inputs(session, tmp_path / "m.pte", batch=2, seq=32)


def test_batches_a_static_file_cannot_take_are_skipped(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "a.tflite").write_bytes(b"x" * 100)
    (tmp_path / "b.tflite").write_bytes(b"x" * 50)
    sessions = {"a.tflite": _Fake([(None, 3)], ["float32"]), "b.tflite": _Fake([(1, 3)], ["float32"])}
    monkeypatch.setattr(bench, "_open", lambda path, runtime, *, threads: sessions[Path(path).name])
    artifacts = {"base": (str(tmp_path / "a.tflite"), "x"), "small": (str(tmp_path / "b.tflite"), "x")}
    results = compare_artifacts(artifacts, [1, 4], baseline="base", rounds=2, memory=False)
    assert list(results["base"].latency) == ["b1"] and list(results["small"].latency) == ["b1"]
    assert "takes only batch 1" in results["small"].skipped["b4"] and not results["base"].skipped
    assert results["small"].size_ratio == 0.5 and all(s.closed for s in sessions.values())
    with pytest.raises(RuntimeUnavailableError, match="No batch size fits every variant"):
        compare_artifacts(artifacts, [4], baseline="base", rounds=2, memory=False)


def _export(tiny_model_file: Path, tmp_path: Path, to: str, name: str, *, batch: int | None = None) -> Path:
    from modelpress.deploy.formats import deploy
    from modelpress.loading import load_model

    model, (x,) = load_model(f"{tiny_model_file}:build")
    return deploy(model, (x if batch is None else x[:batch],), tmp_path / name, to=to).path  # type: ignore[arg-type]


@pytest.mark.slow
def test_pte_against_an_onnx_baseline(tiny_model_file: Path, tmp_path: Path) -> None:
    _needs("executorch", "executorch")
    onnx_path = _export(tiny_model_file, tmp_path, "onnx", "fp32.onnx")
    pte = _export(tiny_model_file, tmp_path, "executorch", "m.pte")
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(pte),
            "--baseline",
            str(onnx_path),
            "--batch",
            "1,2",
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "across runtimes" in " ".join(result.output.split())
    data = json.loads(out.read_text())
    assert set(data) == {"baseline onnxruntime", "artifact executorch"}
    assert (
        data["artifact executorch"]["runtime"] == "executorch"
        and "integer" not in data["artifact executorch"]
    )
    assert set(data["artifact executorch"]["latency"]) == {"b1", "b2"}
    assert data["artifact executorch"]["peak_rss_mb"] > 10  # ExecuTorch runs in the probe's own process


@pytest.mark.slow
def test_static_tflite_times_its_own_batch(tiny_model_file: Path, tmp_path: Path) -> None:
    _needs("ai_edge_litert", "litert")
    tflite = _export(tiny_model_file, tmp_path, "litert", "m.tflite", batch=1)
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        main,
        ["bench", str(tflite), "--batch", "1,4", "--rounds", "2", "--json", str(out)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "skipped b4: artifact litert" in result.output and "takes only batch 1" in result.output
    data = json.loads(out.read_text())
    assert set(data) == {"artifact litert"} and set(data["artifact litert"]["latency"]) == {"b1"}
    result = CliRunner().invoke(main, ["bench", str(tflite), "--runtime", "onnxruntime"])
    assert result.exit_code == 2 and "onnxruntime does not run .tflite files" in " ".join(
        result.output.split()
    )
