"""`modelpress export --to FORMAT`: one compressed model written for each deployment runtime and checked there
against the torch model (issue 29). A format whose runtime is not installed is skipped with the reason."""

from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from modelpress.cli import main


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install modelpress[...]: see pyproject's extras)")


def _export(model_file, out, *extra: str):
    args = [
        "export",
        f"{model_file}:build",
        "-o",
        str(out),
        "-r",
        "int8-static",
        "--data",
        f"{model_file}:calib",
    ]
    return CliRunner().invoke(main, [*args, *extra])


@pytest.mark.parametrize(
    ("to", "suffix", "module", "runtime"),
    [
        ("openvino", ".xml", "openvino", "openvino"),
        ("litert", ".tflite", "ai_edge_litert", "litert"),
        ("executorch", ".pte", "executorch", "executorch"),
    ],
)
def test_export_to_each_runtime_checks_parity_there(tiny_model_file, tmp_path, to, suffix, module, runtime):
    _needs(module)
    out = tmp_path / f"m{suffix}"
    result = _export(tiny_model_file, out, "--to", to)
    assert result.exit_code == 0, result.output
    assert f"{runtime}: parity ok" in result.output and out.is_file()
    if to == "openvino":
        assert out.with_suffix(".bin").is_file()


def test_export_to_tflm_measures_the_arena_against_the_budget(tiny_model_file, tmp_path):
    _needs("tflite_micro")
    out = tmp_path / "m.tflite"
    refused = _export(tiny_model_file, out, "--to", "tflm", "--mcu", "1KB/1KB")
    assert refused.exit_code == 2, refused.output
    assert "KB" in refused.output and not list(tmp_path.glob("m*"))
    result = _export(tiny_model_file, out, "--to", "tflm", "--mcu", "256KB/64KB")
    assert result.exit_code == 0, result.output
    assert "tflite-micro: parity ok" in result.output and "arena" in result.output
    assert out.is_file() and list(tmp_path.glob("m*.cc")) and list(tmp_path.glob("m*.h"))


def test_export_for_tensorrt_names_what_would_fall_back(tiny_model_file, tmp_path):
    result = _export(tiny_model_file, tmp_path / "m.onnx", "--target", "tensorrt", "--runtime", "onnxruntime")
    assert result.exit_code == 0, result.output
    assert "Conv/MatMul/Gemm quantized" in result.output and "onnxruntime: parity ok" in result.output


def test_export_to_web_runs_in_the_browser(tiny_model_file, tmp_path):
    from modelpress.deploy.web import find_chromium, find_onnxruntime_web
    from modelpress.errors import ModelpressError

    try:
        find_chromium(), find_onnxruntime_web()
    except ModelpressError as exc:
        pytest.skip(str(exc))
    result = _export(tiny_model_file, tmp_path / "m.onnx", "--to", "web")
    assert result.exit_code == 0, result.output
    assert "onnxruntime-web: parity ok" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--to", "litert", "--target", "openvino"], "apply to --to onnx only"),
        (["--mcu", "256KB/64KB"], "--mcu is the budget of --to tflm"),
        (["--to", "executorch"], "name the output 'm.pte'"),
    ],
)
def test_export_flags_that_do_not_fit_the_format_are_refused(tiny_model_file, tmp_path, extra, message):
    result = _export(tiny_model_file, tmp_path / "m.onnx", *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "m.onnx").exists()


def test_compress_for_tensorrt_checks_its_rules(tiny_model_file, tmp_path):
    args = ["compress", f"{tiny_model_file}:build", "-r", "int8-static", "--data", f"{tiny_model_file}:calib"]
    args += ["--out", str(tmp_path / "run"), "--target", "tensorrt", "--batch", "1", "--rounds", "2"]
    result = CliRunner().invoke(main, [*args, "--runtime", "onnxruntime"])
    assert result.exit_code == 0, result.output
    assert "Conv/MatMul/Gemm quantized" in result.output and "TensorRT-ready" in result.output
