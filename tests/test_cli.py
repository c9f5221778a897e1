import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch
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
    assert sorted(p.name for p in out.iterdir()) == [  # as `compress --help` lists them
        "model.compressed.onnx",
        "model.compressed.safetensors",
        "model.onnx",
        "recipe.yaml",
        "report.html",
        "report.json",
    ]
    help_text = " ".join(run("compress", "--help").output.split())
    for name in ("model.onnx", "model.compressed.onnx", "model.compressed.safetensors", "recipe.yaml", "hf/"):
        assert name in help_text
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["name"] == "build"
    # the summary's params/MACs of the compressed model
    assert report["profile"]["compressed"]["params"] > 0 and report["profile"]["compressed"]["macs"] > 0
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

    # The saved PyTorch model reloads: the same recipe and data rebuild its modules, the file fills them.
    import modelpress as mp
    from modelpress.loading import apply_state_dict, import_callable, load_model, load_state_dict_file

    recipe = mp.load_recipe(out / "recipe.yaml")
    assert [c.type for c in recipe] == ["static_int8", "weight_only"]
    model, inputs = load_model(f"{tiny_model_file}:build")
    calib = list(import_callable(f"{tiny_model_file}:calib")())
    expected = mp.compress(model, recipe, calib)
    rebuilt = mp.compress(model, recipe, calib)
    with torch.no_grad():
        for tensor in rebuilt.state_dict().values():
            tensor.zero_()  # so that equal outputs prove the file holds every value
    apply_state_dict(rebuilt, load_state_dict_file(out / "model.compressed.safetensors"), source="saved")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*inputs), expected(*inputs), rtol=0, atol=0)


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


def test_export_takes_calibration_data(tiny_model_file, tmp_path):
    args = ["export", f"{tiny_model_file}:build", "-o", str(tmp_path / "s.onnx"), "--recipe", "int8-static"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "static_int8 needs calibration data" in " ".join(result.output.split())
    assert not (tmp_path / "s.onnx").exists()
    result = run(*args, "--data", f"{tiny_model_file}:calib")
    assert result.exit_code == 0, result.output
    assert "parity ok" in result.output and (tmp_path / "s.onnx").exists()
    result = CliRunner().invoke(
        main, ["export", f"{tiny_model_file}:build", "-o", str(tmp_path / "t.onnx"), "--data", "x.py:f"]
    )
    assert result.exit_code == 2 and "--data calibrates a --recipe" in result.output


def test_allow_partial_flag(tiny_model_file, tmp_path):
    # only the 4x8 Linear of the tiny CNN: most weight bytes (the convolution) stay fp32
    (tmp_path / "fc_only.yaml").write_text("- {type: weight_only, bits: 8, targets: [fc]}\n")
    model = f"{tiny_model_file}:build"
    recipe = str(tmp_path / "fc_only.yaml")
    compress = ["compress", model, "-r", recipe, "--batch", "1", "--rounds", "2", "--runtime", "onnxruntime"]
    export = ["export", model, "-r", recipe, "--runtime", "onnxruntime"]
    for args in ([*compress, "-o", str(tmp_path / "run")], [*export, "-o", str(tmp_path / "m.onnx")]):
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 2, refused.output
        assert "--allow-partial" in " ".join(refused.output.split())
        assert run(*args, "--allow-partial").exit_code == 0
    assert (tmp_path / "run" / "model.compressed.onnx").exists() and (tmp_path / "m.onnx").exists()


def test_progress_lines_when_not_a_terminal(tiny_model_file, tmp_path):
    # CliRunner's streams are not terminals, as in a CI log: one plain line per step, with elapsed seconds
    result = run(
        "export", f"{tiny_model_file}:build", "-o", str(tmp_path / "m.onnx"), "--runtime", "onnxruntime"
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("modelpress [")]
    steps = [line.split("] ", 1)[1] for line in lines]
    assert steps == ["loading the model", "exporting", "checking parity in onnxruntime"]
    seconds = [float(line.split("[", 1)[1].split("s]", 1)[0]) for line in lines]
    assert seconds == sorted(seconds) and seconds[0] >= 0
    assert "modelpress [" not in result.stdout  # progress goes to stderr, results to stdout


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)


def test_help_is_fast_and_imports_no_torch():
    loaded = _python("import sys, modelpress.cli, modelpress; print('torch' in sys.modules)")
    assert loaded.stdout.strip() == "False"
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "modelpress.cli", "--help"], capture_output=True, text=True, check=True
        )
        walls.append(time.perf_counter() - start)
        assert "compress" in done.stdout
    assert statistics.median(walls) < 1.0, walls


def test_package_names_load_on_first_use():
    code = (
        "import sys, modelpress as mp; assert 'torch' not in sys.modules; "
        "assert mp.compress is mp.pipeline.recipe.compress and mp.WeightOnlyConfig(bits=8).bits == 8; "
        "assert sorted(mp.__all__) == sorted(mp._SOURCES) and set(mp.__all__) <= set(dir(mp)); "
        "from modelpress import *; print(export_onnx.__module__)"
    )
    assert _python(code).stdout.strip() == "modelpress.deploy.export"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import modelpress

        modelpress.nope  # noqa: B018
