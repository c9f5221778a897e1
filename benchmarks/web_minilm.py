"""all-MiniLM-L6-v2 in the browser (onnxruntime-web WASM in headless Chromium; issue 29).

    python benchmarks/web_minilm.py [--sentences 256] [--json benchmarks/results/minilm-web.json]

fp32 and `int8-static-smooth` (SmoothQuant 0.75 + GPTQ, calibrated on 256 Lee background sentences that the
evaluation never sees) exported for ONNX Runtime, each run in the browser on the 50 Lee documents and the first
`--sentences` background sentences (batches of 16). Reported: embedding cosine to the fp32 torch model (the
issue's target: int8 >= 0.998 mean), cosine to the same file in ONNX Runtime (Python), the Lee Pearson r of
the browser's embeddings, and the median in-page latency at batch 1 (128 tokens). Row "tensorrt": the int8
model exported with `target="tensorrt"`, its `check_tensorrt` summary and its cosine to fp32 in ONNX Runtime.
Needs: `apt-get install -y chromium`, `npm install --prefix ~/.cache/modelpress/web onnxruntime-web@1.30.0`.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/minilm-web.json"))
    args = parser.parse_args()
    started = time.time()
    model, tokenizer = assets.minilm()
    sentences = assets.lee_background(split_sentences=True)
    texts = assets.lee_corpus() + sentences[: args.sentences]
    calib = sentences[1024 : 1024 + 256]
    calibration = [
        tuple(assets.minilm_tokenize(tokenizer, calib[i : i + 8]).values()) for i in range(0, len(calib), 8)
    ]
    batches = [
        tuple(assets.minilm_tokenize(tokenizer, texts[i : i + 16]).values()) for i in range(0, len(texts), 16)
    ]
    with torch.no_grad():
        fp32_ref = np.concatenate([model(*b).numpy() for b in batches])
    int8 = mp.compress(model, "int8-static-smooth", calibration)
    b1 = assets.sentence_batches(assets.lee_background()[:1], tokenizer, 1, 128)[0]
    b1_np = [b1["input_ids"].numpy(), b1["attention_mask"].numpy()]
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("fp32", model), ("int8-static-smooth", int8)):
            path = export_onnx(
                m, batches[0], Path(tmp) / f"{name}.onnx", target="onnxruntime", data=calibration
            )
            python = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = [i.name for i in python.get_inputs()]
            feeds = [[t.numpy() for t in b] for b in batches]
            in_python = np.concatenate([python.run(None, dict(zip(names, f, strict=True)))[0] for f in feeds])
            t0 = time.time()
            with WebSession(path) as session:
                browser = np.concatenate([session.run(f)[0] for f in feeds])
                timed = session.timed_run(b1_np, runs=20, warmup=3)
                version = session.version
            to_fp32 = _cos(browser, fp32_ref)
            emb = browser[:50] / np.linalg.norm(browser[:50], axis=1, keepdims=True)
            cos = emb @ emb.T
            iu = np.triu_indices(50, k=1)
            rows[name] = {
                "texts": len(texts),
                "file_bytes": path.stat().st_size,
                "cosine_to_fp32_torch_mean": float(to_fp32.mean()),
                "cosine_to_fp32_torch_min": float(to_fp32.min()),
                "cosine_to_onnxruntime_python_min": float(_cos(browser, in_python).min()),
                "lee_pearson_browser": float(np.corrcoef(cos[iu], assets.lee_human_scores()[iu])[0, 1]),
                "latency_ms_b1_s128_median": timed.latency_ms,
                "browser_seconds": round(time.time() - t0, 1),
                "onnxruntime_web": version,
            }
            print(name, json.dumps(rows[name]), flush=True)
        # The same int8 model placed for TensorRT (symmetric int8, attention's MatMuls quantized too), run
        # in ONNX Runtime (Python): TensorRT itself does not install here.
        path = export_onnx(int8, batches[0], Path(tmp) / "int8.trt.onnx", target="tensorrt", data=calibration)
        report = check_tensorrt(path)
        python = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in python.get_inputs()]
        trt = np.concatenate(
            [python.run(None, {n: t.numpy() for n, t in zip(names, b, strict=True)})[0] for b in batches]
        )
        to_fp32 = _cos(trt, fp32_ref)
        rows["tensorrt"] = {
            "summary": report.summary,
            "findings": [f.line() for f in report.findings],
            "cosine_to_fp32_torch_mean_in_onnxruntime": float(to_fp32.mean()),
            "cosine_to_fp32_torch_min_in_onnxruntime": float(to_fp32.min()),
        }
        print("tensorrt", json.dumps(rows["tensorrt"]), flush=True)
    result = {
        "command": "python benchmarks/web_minilm.py " + " ".join(sys.argv[1:]),
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
