#!/usr/bin/env python
"""Clustering carried over to LiteRT and ExecuTorch (issue 29, item 2): the MNIST CNN clustered to 16 shared
values per layer, then static int8, exported to ONNX, LiteRT and ExecuTorch.

    python benchmarks/cluster_deploy_mnist.py --json benchmarks/results/mnist-cluster-deploy.json [--quick]

Recipe: `mp.compress(model, [ClusterConfig(values=16), StaticInt8Config()], calibration)` on 1,024 training
images (static_int8 quantizes each clustered layer as the Linear/Conv it wraps, keeping its shared values
on each row's int8 grid). Per runtime: file bytes and the ratio to that runtime's fp32 file (target <= 0.27x
for LiteRT and ExecuTorch), what runs as int8, accuracy on the 10k test set (target >= 98.8%), and top-1
agreement with the int8 torch model. ONNX keeps the 4-bit indices (a constant gather the runtimes fold);
LiteRT and ExecuTorch store the dense int8 codes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets

import modelpress as mp
from modelpress.deploy.executorch import ExecuTorchSession, export_executorch, lower_executorch
from modelpress.deploy.integer import integer_kernels
from modelpress.deploy.litert import export_litert, float_ops, int8_kernels, open_litert

BATCH = 250  # ExecuTorch and ONNX Runtime: the test set in batches; LiteRT's graph is static at batch 1


def _predict(run: Any, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/mnist-cluster-deploy.json"))
    parser.add_argument("--quick", action="store_true", help="2,000 test images")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = assets.mnist_model()
    x, y = assets.mnist_data("test")
    x_train, _ = assets.mnist_data("train")
    if args.quick:
        x, y = x[:2000], y[:2000]
    xs, ys = x.numpy(), y.numpy()
    calibration = [(x_train[i : i + 32],) for i in range(0, 1024, 32)]
    start = time.perf_counter()
    small = mp.compress(model, [mp.ClusterConfig(values=16), mp.StaticInt8Config()], calibration)
    compress_s = time.perf_counter() - start
    with torch.inference_mode():
        torch_fp32 = _predict(lambda b: model(torch.from_numpy(b)).numpy(), xs, 500)
        torch_int8 = _predict(lambda b: small(torch.from_numpy(b)).numpy(), xs, 500)
    result: dict[str, Any] = {
        "asset": "mnist (ccexam MNISTNet, 421,642 parameters)",
        "recipe": "cluster (16 values per layer) -> static_int8 (minmax, nearest), 1024 calibration images",
        "test_images": len(x),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "versions": {p: version(p) for p in ("torch", "litert-torch", "ai-edge-litert", "executorch")},
        "command": "python benchmarks/cluster_deploy_mnist.py" + (" --quick" if args.quick else ""),
        "layers": {n: m.scheme for n, m in small.named_modules() if hasattr(m, "scheme")},
        "compress_s": round(compress_s, 1),
        "torch_fp32_accuracy": float((torch_fp32.argmax(1) == ys).mean()),
        "torch_int8_accuracy": float((torch_int8.argmax(1) == ys).mean()),
    }
    print({k: v for k, v in result.items() if k != "versions"}, flush=True)

    def row(logits: np.ndarray, size: int, fp32_size: int, **extra: Any) -> dict[str, Any]:
        ratio = size / fp32_size
        accuracy = float((logits.argmax(1) == ys).mean())
        return {
            "bytes": size,
            "fp32_bytes": fp32_size,
            "size_vs_fp32": round(ratio, 4),
            "accuracy": accuracy,
            "top1_agreement_with_torch_int8": float((logits.argmax(1) == torch_int8.argmax(1)).mean()),
            "mean_abs_vs_torch_int8": float(np.abs(logits - torch_int8).mean()),
            "max_abs_vs_torch_int8": float(np.abs(logits - torch_int8).max()),
            **extra,
            "met": bool(ratio <= 0.27 and accuracy >= 0.988),
        }

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        onnx_fp32 = mp.export_onnx(model, (x[:1],), work / "fp32.onnx")
        for runtime in mp.available_runtimes():  # ONNX placed for each runtime
            onnx_int8 = mp.export_onnx(small, (x[:1],), work / f"cluster-int8-{runtime}.onnx", target=runtime)
            session = mp.open_session(onnx_int8, runtime=runtime)
            logits = _predict(lambda b, s=session: s.run([b])[0], xs, BATCH)
            kernels = integer_kernels(onnx_int8, runtime)
            result[runtime] = row(
                logits,
                onnx_int8.stat().st_size,
                onnx_fp32.stat().st_size,
                integer_layers=[k.name for k in kernels.layers if k.kind == "integer"],
            )
            print(runtime, result[runtime], flush=True)

        lite_fp32 = export_litert(model, (x[:1],), work / "fp32.tflite")
        start = time.perf_counter()
        lite_int8 = export_litert(small, (x[:1],), work / "cluster-int8.tflite", data=calibration)
        export_s = time.perf_counter() - start
        lite = open_litert(lite_int8, threads=1)
        logits = _predict(lambda b: lite.run([b])[0], xs, 1)
        result["litert"] = row(
            logits,
            lite_int8.stat().st_size,
            lite_fp32.stat().st_size,
            kernels=int8_kernels(lite_int8),
            float_ops=float_ops(lite_int8),
            export_s=round(export_s, 1),
        )
        print("litert", result["litert"], flush=True)

        pte_fp32 = export_executorch(model, (x[:1],), work / "fp32.pte", max_batch=BATCH, data=calibration)
        start = time.perf_counter()
        lowered = lower_executorch(small, (x[:1],), max_batch=BATCH, data=calibration)
        pte_int8 = export_executorch(
            small, (x[:1],), work / "cluster-int8.pte", max_batch=BATCH, data=calibration
        )
        export_s = time.perf_counter() - start
        et = ExecuTorchSession(pte_int8, threads=2)
        logits = _predict(lambda b: et.run([b])[0], xs, BATCH)
        form = lowered.int8
        result["executorch"] = row(
            logits,
            pte_int8.stat().st_size,
            pte_fp32.stat().st_size,
            int8_layers=form.layers if form else 0,
            float_output_layers=form.float_outputs if form else [],
            delegation=lowered.summary(),
            export_s=round(export_s, 1),
        )
        print("executorch", result["executorch"], flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
