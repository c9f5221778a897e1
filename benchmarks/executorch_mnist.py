#!/usr/bin/env python
"""MNIST CNN in ExecuTorch (XNNPACK): fp32 and modelpress's static int8, exported with `export_executorch`.

    python benchmarks/executorch_mnist.py --json benchmarks/results/mnist-executorch.json [--rounds N] [--quick]

Measures on the real asset (ccexam MNISTNet, MNIST test set; `bash benchmarks/setup.sh`): the .pte sizes,
what XNNPACK runs of each, accuracy on the test set in ExecuTorch, top-1 agreement of each .pte with the
torch model it was exported from, and latency of int8 vs fp32 in ExecuTorch measured in interleaved rounds
(`benchmark_interleaved`, ratio = median of per-round int8 / fp32) at batch 1 and 64, XNNPACK on 2 threads.
The int8 model is `compress(model, "int8-static", calibration)` on 1,024 training images, as in run.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets

import modelpress as mp
from modelpress._files import atomic_path
from modelpress.deploy.bench import benchmark_interleaved
from modelpress.deploy.executorch import ExecuTorchSession, export_executorch, lower_executorch

EVAL_BATCH = 250  # the test set in 40 batches; the .pte is planned for batches up to MAX_BATCH
MAX_BATCH = 256


def predict_all(run: Any, x: torch.Tensor) -> np.ndarray:
    return np.concatenate([run(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2,000 test images, 10 rounds")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = assets.mnist_model()
    x, y = assets.mnist_data("test")
    x_train, _ = assets.mnist_data("train")
    if args.quick:
        x, y, args.rounds = x[:2000], y[:2000], 10
    calibration = [(x_train[i : i + 32],) for i in range(0, 1024, 32)]
    small = mp.compress(copy.deepcopy(model), "int8-static", calibration)
    variants = {"fp32": model, "int8-static": small}

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, m in variants.items():
            t0 = time.perf_counter()
            lowered = lower_executorch(m, (x[:1],), max_batch=MAX_BATCH, data=calibration)
            path = export_executorch(
                m, (x[:1],), Path(tmp) / f"{name}.pte", max_batch=MAX_BATCH, data=calibration
            )
            export_s = time.perf_counter() - t0
            session = ExecuTorchSession(path, threads=args.threads)
            sessions[name] = session
            with torch.inference_mode():
                torch_logits = predict_all(lambda b, m=m: m(b).numpy(), x)
            et_logits = predict_all(lambda b, s=session: s.run([b.numpy()])[0], x)
            rows[name] = {
                "size_bytes": path.stat().st_size,
                "export_s": round(export_s, 2),
                "dynamic": lowered.shapes,
                "xnnpack": lowered.summary(),
                "delegation": {op: {"xnnpack": a, "outside": b} for op, (a, b) in lowered.delegation.items()},
                "int8_form": None if lowered.int8 is None else lowered.int8.__dict__,
                "accuracy_executorch": float((et_logits.argmax(1) == y.numpy()).mean()),
                "accuracy_torch": float((torch_logits.argmax(1) == y.numpy()).mean()),
                "top1_agreement_with_torch": float((et_logits.argmax(1) == torch_logits.argmax(1)).mean()),
                "max_abs_logit_diff": float(np.abs(et_logits - torch_logits).max()),
            }
            print(f"{name}: {rows[name]['size_bytes']} bytes, {lowered.summary()}", flush=True)
        rows["int8-static"]["size_ratio"] = rows["int8-static"]["size_bytes"] / rows["fp32"]["size_bytes"]
        latency: dict[str, Any] = {}
        for key, batch in (("b1", x[:1]), ("b64", x[:64])):
            arrays = {name: [batch.numpy()] for name in sessions}
            runners = {name: (lambda s=s, a=arrays[name]: s.run(a)) for name, s in sessions.items()}
            timings = benchmark_interleaved(runners, baseline="fp32", batch=len(batch), rounds=args.rounds)
            latency[key] = {
                name: {
                    "median_ms": round(t.median_ms, 4),
                    "p90_ms": round(t.p90_ms, 4),
                    "ratio_to_fp32": round(t.ratio, 4),
                    "ratio_p10": round(t.ratio_p10, 4),
                    "ratio_p90": round(t.ratio_p90, 4),
                }
                for name, t in timings.items()
            }
            print(
                f"{key}: "
                + ", ".join(
                    f"{n} {v['median_ms']:.3f} ms (x{v['ratio_to_fp32']:.3f})"
                    for n, v in latency[key].items()
                ),
                flush=True,
            )
        del sessions
    int8 = rows["int8-static"]
    result = {
        "asset": "mnist",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "test_images": len(x),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "executorch": version("executorch"),
            "machine": platform.machine(),
            "threads": args.threads,
            "rounds": args.rounds,
        },
        "recipe": "int8-static (static_int8 minmax + gptq on linear/conv; 32 batches of 32 training images)",
        "rows": rows,
        "latency": latency,
        "acceptance": {
            "int8_size_ratio<=0.27": int8["size_ratio"] <= 0.27,
            "int8_top1_agreement>=0.999": int8["top1_agreement_with_torch"] >= 0.999,
        },
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    with atomic_path(args.json, overwrite=True) as out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"size_ratio": int8["size_ratio"], **result["acceptance"]}))


if __name__ == "__main__":
    main()
