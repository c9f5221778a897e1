"""The browser runtime (deploy/web.py): onnxruntime-web (WASM) in headless Chromium against ONNX Runtime.

The browser tests skip with the reason when Chromium, playwright or onnxruntime-web is missing; CI installs
onnxruntime-web with `npm install --prefix ~/.cache/modelpress/web onnxruntime-web@1.30.0`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from zoo import ZOO

import modelpress as mp
from modelpress.deploy.export import export_onnx
from modelpress.deploy.parity import check_parity
from modelpress.deploy.web import (
    WebSession,
    find_chromium,
    find_onnxruntime_web,
    install_command,
    run_in_browser,
)
from modelpress.errors import ExportError, RuntimeUnavailableError


def _browser_or_skip() -> None:
    try:
        find_chromium()
        find_onnxruntime_web()
    except RuntimeUnavailableError as exc:
        pytest.skip(str(exc))
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    _browser_or_skip()  # before the exports: a machine without the browser skips at once
    model, (x,) = ZOO["resnet_cnn"]()
    g = torch.Generator().manual_seed(5)
    calibration = [(torch.randn(4, 3, 32, 32, generator=g),) for _ in range(4)]
    int8 = mp.compress(model, "int8-static", calibration)
    out = tmp_path_factory.mktemp("web")
    return {
        "models": {"fp32": model, "int8": int8},
        "x": x,
        "batch": torch.randn(16, 3, 32, 32, generator=g),
        "fp32": export_onnx(model, (x,), out / "fp32.onnx", target="onnxruntime", data=calibration),
        "int8": export_onnx(int8, (x,), out / "int8.onnx", target="onnxruntime", data=calibration),
    }


def _ort(path: object, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_browser_matches_onnxruntime(cnn_files: dict[str, object], kind: str) -> None:
    _browser_or_skip()
    x = cnn_files["batch"].numpy()
    result = run_in_browser(cnn_files[kind], [x], latency_runs=5)
    (got,) = result.outputs
    want = _ort(cnn_files[kind], x)
    assert got.shape == want.shape == (16, 10) and got.dtype == np.float32
    assert _cosine(got, want) > 0.9999
    assert (got.argmax(1) == want.argmax(1)).all()
    assert result.latency_ms is not None and result.latency_ms > 0 and len(result.times_ms) == 5
    assert result.version == "1.30.0"


@pytest.mark.slow
def test_web_session_passes_check_parity(cnn_files: dict[str, object]) -> None:
    _browser_or_skip()
    samples = [(cnn_files["x"],), (cnn_files["batch"][:5],)]  # a dynamic batch: 2 then 5
    with WebSession(cnn_files["int8"]) as session:
        assert session.runtime == "onnxruntime-web"
        assert session.input_names == ["x"] and session.input_shapes == [(None, 3, 32, 32)]
        report = check_parity(cnn_files["models"]["int8"], session, samples, min_cosine=0.999, min_top1=1.0)
    assert report.passed and report.runtime == "onnxruntime-web"


@pytest.mark.slow
def test_integer_and_bool_tensors_round_trip(tmp_path: Path) -> None:
    _browser_or_skip()
    # y = (ids + 1) as int64, mask passed through: non-float inputs and outputs keep their types.
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ids", "one"], ["y"]),
            helper.make_node("Not", ["mask"], ["not_mask"]),
        ],
        "types",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 3]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.INT64, [None, 3]),
            helper.make_tensor_value_info("not_mask", TensorProto.BOOL, [None, 3]),
        ],
        [numpy_helper.from_array(np.array(1, np.int64), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "types.onnx"
    onnx.save(model, str(path))
    ids = np.array([[1, 2, 3], [2**40, -5, 0]], np.int64)
    mask = np.array([[True, False, True], [False, False, True]])
    y, not_mask = run_in_browser(path, [ids, mask], latency_runs=0).outputs
    np.testing.assert_array_equal(y, ids + 1)
    np.testing.assert_array_equal(not_mask, ~mask)


def test_external_data_is_refused(tmp_path: Path) -> None:
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [weight],
    )
    path = tmp_path / "ext.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="ext.onnx.data")
    assert (tmp_path / "ext.onnx.data").is_file()
    with pytest.raises(ExportError, match=r"external data \(ext.onnx.data\).*single .onnx file"):
        run_in_browser(path, [np.ones((1, 64), np.float32)])


def test_missing_pieces_name_the_fix(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2).eval()
    path = export_onnx(model, (torch.randn(2, 4),), tmp_path / "lin.onnx")
    empty = tmp_path / "no-npm-here"
    with pytest.raises(RuntimeUnavailableError, match=f"npm install --prefix {empty} onnxruntime-web@1.30.0"):
        WebSession(path, web_dir=empty)
    assert install_command() == "npm install --prefix ~/.cache/modelpress/web onnxruntime-web@1.30.0"
    with pytest.raises(RuntimeUnavailableError, match="apt-get install -y chromium"):
        find_chromium(tmp_path / "chromium")
    with pytest.raises(ExportError, match="does not exist"):
        run_in_browser(tmp_path / "missing.onnx", [])


@pytest.mark.slow
def test_a_model_the_browser_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    _browser_or_skip()
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="example.custom")],
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)]
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=r"onnxruntime-web 1.30.0 failed to load 'custom.onnx' in Chromium"):
        run_in_browser(path, [np.ones((1, 4), np.float32)])
