import json

import pytest
from click.testing import CliRunner

from modelpress.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("profile", "compress", "export", "bench", "report", "demo"):
        assert command in result.output


def test_profile_table_and_json(tiny_model_file, tmp_path):
    out = tmp_path / "p.json"
    result = run("profile", f"{tiny_model_file}:build", "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "parameters" in result.output and "MACs" in result.output and "conv" in result.output
    assert json.loads(out.read_text())["params"] == 8 * 3 * 9 + 8 + 8 + 8 + 4 * 8 + 4


def test_export_then_bench(tiny_model_file, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    result = run("export", f"{tiny_model_file}:build", "-o", str(onnx_path), "--recipe", "int8-weight-only")
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.output and onnx_path.exists()
    result = run(
        "bench", str(onnx_path), "--batch", "1,4", "--rounds", "3", "--json", str(tmp_path / "b.json")
    )
    assert result.exit_code == 0, result.output
    assert "fastest at b1" in result.output and "fastest at b4" in result.output
    assert set(json.loads((tmp_path / "b.json").read_text())) == {"artifact onnxruntime", "artifact openvino"}


def test_export_standard_ops_flag(tiny_model_file, tmp_path):
    out = tmp_path / "s.onnx"
    result = run(
        "export", f"{tiny_model_file}:build", "-o", str(out), "--recipe", "int8-weight-only", "--standard-ops"
    )
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.output and out.exists()


def test_compress_writes_folder_and_report(tiny_model_file, tmp_path):
    out = tmp_path / "run"
    result = run(
        "compress",
        f"{tiny_model_file}:build",
        "--recipe",
        "int8-weight-only",
        "--out",
        str(out),
        "--eval",
        f"{tiny_model_file}:labeled",
        "--batch",
        "1",
        "--rounds",
        "2",
        "--runtime",
        "onnxruntime",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "build.compressed.onnx",
        "build.onnx",
        "report.html",
        "report.json",
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["metric"] == "accuracy"
    assert report["quality"]["onnxruntime compressed"] == pytest.approx(report["quality"]["torch compressed"])
    html = (out / "report.html").read_text()
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")
    # re-render from JSON
    result = run("report", str(out / "report.json"), "-o", str(tmp_path / "again.html"))
    assert result.exit_code == 0 and (tmp_path / "again.html").read_text() == html


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "missing.py:build"], "Model file 'missing.py' does not exist"),
        (["profile", "{f}:broken"], "raised RuntimeError: weights server unreachable"),
        (["profile", "{f}:wrong_inputs"], "fails on its example inputs"),
        (["profile", "{f}:build", "--weights", "{d}/none.pt"], "none.pt' does not exist"),
        (
            ["compress", "{f}:build", "--recipe", "{d}/bad.yaml", "--out", "{d}/o"],
            "unknown technique type 'magic'",
        ),
        (
            ["compress", "{f}:build", "--recipe", "{d}/field.yaml", "--out", "{d}/o"],
            r"no field\(s\) \['bitz'\]",
        ),
        (
            ["compress", "{f}:build", "--recipe", "nope", "--out", "{d}/o"],
            "neither a file nor a built-in recipe",
        ),
        (
            ["compress", "{f}:build", "--recipe", "int8-weight-only", "--out", "{d}/taken"],
            "already exists and is not empty",
        ),
        (["export", "{f}:build", "-o", "{d}/taken/x.onnx"], "already exists. Choose another path"),
        (["bench", "{d}/none.onnx"], "does not exist. Export one first"),
        (["report", "{d}/bad.yaml", "-o", "{d}/r.html"], "is not a modelpress result"),
        (
            ["compress", "{f}:build", "--recipe", "int8-weight-only", "--out", "{d}/o", "--batch", "0"],
            "must be positive",
        ),
    ],
)
def test_bad_input_exit_2_and_nothing_written(tiny_model_file, tmp_path, args, message):
    (tmp_path / "bad.yaml").write_text("- {type: magic}\n")
    (tmp_path / "field.yaml").write_text("- {type: weight_only, bitz: 8}\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.onnx").write_bytes(b"keep me")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, [a.format(f=tiny_model_file, d=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    import re

    # rich wraps long paths anywhere (even inside a word): compare without whitespace
    assert re.search("".join(message.split()), "".join(result.output.split())), result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "taken" / "x.onnx").read_bytes() == b"keep me"


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = run("demo", "--out", str(out), "--rounds", "3")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["onnxruntime fp32"] > 0.95
    assert abs(report["quality"]["onnxruntime compressed"] - report["quality"]["onnxruntime fp32"]) < 0.01
    assert report["bench"]["compressed onnxruntime"]["size_ratio"] < 0.3
    assert all(p["passed"] for p in report["parity"])
    assert (tmp_path / "cache" / "modelpress" / "digits_cnn.pt").exists()
    # a second run reuses the cached CNN and replaces its own earlier output
    assert run("demo", "--out", str(out), "--rounds", "2").exit_code == 0


def test_compress_static_with_calibration_data(tiny_model_file, tmp_path):
    out = tmp_path / "run"
    args = [
        "compress",
        f"{tiny_model_file}:build",
        "--recipe",
        "int8-static",
        "--out",
        str(out),
        "--batch",
        "1",
        "--rounds",
        "2",
        "--runtime",
        "onnxruntime",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "static_int8 needs calibration data" in " ".join(result.output.split())
    assert not out.exists()
    result = run(*args, "--data", f"{tiny_model_file}:calib")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert [step["type"] for step in report["recipe"]] == ["static_int8", "weight_only"]
    assert any("[w8a8]" in layer["type"] for layer in report["profile"]["compressed"]["layers"])


def test_corrupt_artifact_and_bad_calibration_items_get_clear_messages(tiny_model_file, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx")
    result = CliRunner().invoke(main, ["bench", str(junk), "--rounds", "2"])
    assert result.exit_code == 2 and "is not a readable ONNX file" in " ".join(result.output.split())
    result = CliRunner().invoke(
        main,
        [
            "compress",
            f"{tiny_model_file}:build",
            "--recipe",
            "int8-static",
            "--data",
            f"{tiny_model_file}:build",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "calibration item must be a tensor or a tuple of tensors, got Tiny" in message
    assert "from the factory" not in message
    assert not (tmp_path / "o").exists()
