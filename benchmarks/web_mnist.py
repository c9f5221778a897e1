"""The browser (onnxruntime-web WASM in headless Chromium) and TensorRT-ready ONNX on the real MNIST CNN
(issue 29).

    python benchmarks/web_mnist.py [--images 1000] [--json benchmarks/results/mnist-web.json]

Rows:
- fp32 / int8-static in the browser: ccexam's MNISTNet, and `mp.compress(model, "int8-static", calibration)`
  (1,024 training images), exported for ONNX Runtime (`target="onnxruntime"`), run in onnxruntime-web
  (one thread) on the first `--images` test images in batches of 100. Top-1 agreement with the torch model
  it came from (target >= 99.9% for int8) and with ONNX Runtime in Python, accuracy, and the median
  in-page latency at batch 1 and 64 (beside ONNX Runtime in Python, one thread, for scale).
- tensorrt: the same int8 model exported with `target="tensorrt"`: `check_tensorrt` findings, and top-1
  agreement of that file (run in ONNX Runtime, Python) with the int8 torch model.
Needs: `apt-get install -y chromium`, `npm install --prefix ~/.cache/modelpress/web onnxruntime-web@1.30.0`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).parent))
import assets

import modelpress as mp
from modelpress.deploy.export import export_onnx
from modelpress.deploy.tensorrt import check_tensorrt
from modelpress.deploy.web import WebSession

BATCH = 100


def _torch_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)]).numpy()


def _ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def _ort_median_ms(path: Path, x: np.ndarray, runs: int) -> float:
    """Median latency of ONNX Runtime in Python, one thread: the same file's native CPU figure."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _agree(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1000, help="test images run in the browser")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/mnist-web.json"))
    args = parser.parse_args()
    started = time.time()
    model = assets.mnist_model()
    x_test, y_test = assets.mnist_data("test")
    x_train, _ = assets.mnist_data("train")
    calibration = [(x_train[i : i + 32],) for i in range(0, 1024, 32)]
    int8 = mp.compress(model, "int8-static", calibration)
    x, y = x_test[: args.images], y_test[: args.images].numpy()
    xs = x.numpy()
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("fp32", model), ("int8-static", int8)):
            path = export_onnx(
                m, (x[:1],), Path(tmp) / f"{name}.onnx", target="onnxruntime", data=calibration
            )
            reference = _torch_logits(m, x)
            python_ort = _ort_logits(path, xs)
            t0 = time.time()
            with WebSession(path) as session:
                browser = np.concatenate(
                    [session.run([xs[i : i + BATCH]])[0] for i in range(0, len(xs), BATCH)]
                )
                b1 = session.timed_run([xs[:1]], runs=50, warmup=5)
                b64 = session.timed_run([xs[:64]], runs=20, warmup=3)
                version = session.version
            rows[name] = {
                "images": len(xs),
                "file_bytes": path.stat().st_size,
                "top1_agreement_with_torch": _agree(browser, reference),
                "top1_agreement_with_onnxruntime_python": _agree(browser, python_ort),
                "max_abs_vs_onnxruntime_python": float(np.abs(browser - python_ort).max()),
                "accuracy_browser": float((browser.argmax(1) == y).mean()),
                "accuracy_torch": float((reference.argmax(1) == y).mean()),
                "latency_ms_b1_median": b1.latency_ms,
                "latency_ms_b64_median": b64.latency_ms,
                "onnxruntime_python_ms_b1_median": _ort_median_ms(path, xs[:1], 50),
                "onnxruntime_python_ms_b64_median": _ort_median_ms(path, xs[:64], 20),
                "browser_seconds": round(time.time() - t0, 1),
                "onnxruntime_web": version,
            }
            print(name, json.dumps(rows[name]), flush=True)
        trt_path = export_onnx(int8, (x[:1],), Path(tmp) / "int8.trt.onnx", target="tensorrt")
        report = check_tensorrt(trt_path)
        trt_logits = _ort_logits(trt_path, xs)
        int8_reference = _torch_logits(int8, x)
        rows["tensorrt"] = {
            "summary": report.summary,
            "findings": [f.line() for f in report.findings],
            "top1_agreement_with_int8_torch_in_onnxruntime": _agree(trt_logits, int8_reference),
            "accuracy_onnxruntime": float((trt_logits.argmax(1) == y).mean()),
        }
        print("tensorrt", json.dumps(rows["tensorrt"]), flush=True)
    result = {
        "command": "python benchmarks/web_mnist.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "load_1min": os.getloadavg()[0],
        "threads": 1,
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
