#!/usr/bin/env python
"""One static-int8 MNIST CNN deployed to every installed runtime (issue 29): `mp.deploy(..., to=FORMAT)`,
then top-1 agreement with the int8 torch model and accuracy on the test set in each runtime, beside the fp32
artifact's size in the same format.

    python benchmarks/deploy_mnist.py --json benchmarks/results/mnist-deploy.json [--images N]

Real asset (ccexam MNISTNet, MNIST test set; `bash benchmarks/setup.sh`). The int8 model is
`compress(model, "int8-static", calibration)` on 1,024 training images, as in run.py; the same calibration
data goes to each export. Static-shape formats (LiteRT, TFLite Micro) run one image at a time; the browser
runs `--web-images` images (each call crosses into Chromium). No timing here: see the per-runtime scripts
(`executorch_mnist.py`, `litert_mnist.py`, `web_mnist.py`) and `run.py`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets

import modelpress as mp
from modelpress._files import atomic_path
from modelpress.deploy.formats import close, deploy, open_artifact
from modelpress.errors import ModelpressError

# format -> (file suffix, the runtime it runs in, the module that runtime needs, batch it takes)
FORMATS: dict[str, tuple[str, str, str, int]] = {
    "onnx": (".onnx", "onnxruntime", "onnxruntime", 250),
    "openvino": (".xml", "openvino", "openvino", 250),
    "litert": (".tflite", "litert", "ai_edge_litert", 1),
    "executorch": (".pte", "executorch", "executorch", 1),
    "tflm": (".tflite", "tflite-micro", "tflite_micro", 1),
    "web": (".onnx", "onnxruntime-web", "playwright", 250),
}


def logits_of(session: Any, x: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([session.run([x[i : i + batch].numpy()])[0] for i in range(0, len(x), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--web-images", type=int, default=10_000)
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = assets.mnist_model()
    x, y = assets.mnist_data("test")
    x, y = x[: args.images], y[: args.images].numpy()
    x_train, _ = assets.mnist_data("train")
    calibration = [(x_train[i : i + 32],) for i in range(0, 1024, 32)]
    small = mp.compress(copy.deepcopy(model), "int8-static", calibration)
    with torch.inference_mode():
        torch_int8 = small(x).argmax(-1).numpy()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for to in args.formats.split(","):
            suffix, runtime, module, batch = FORMATS[to]
            if importlib.util.find_spec(module) is None:
                rows[to] = {"skipped": f"{module} is not installed"}
                continue
            row: dict[str, Any] = {"runtime": runtime}
            try:
                sizes = {}
                for name, m in (("fp32", model), ("int8", small)):
                    if to == "tflm" and name == "fp32":
                        continue  # TFLite Micro runs full-integer models only
                    out = deploy(m, (x[:1],), Path(tmp) / f"{to}-{name}{suffix}", to=to, data=calibration)  # type: ignore[arg-type]
                    sizes[name] = sum(p.stat().st_size for p in out.files if p.suffix in (suffix, ".bin"))
                    if name == "int8":
                        n = args.web_images if to == "web" else len(x)
                        session = open_artifact(out.path, runtime, arena_bytes=out.arena_bytes)
                        try:
                            t0 = time.perf_counter()
                            top1 = logits_of(session, x[:n], batch).argmax(-1)
                            row["run_s"] = round(time.perf_counter() - t0, 1)
                        finally:
                            close(session)
                        row["images"] = n
                        row["top1_agreement_with_int8_torch"] = float((top1 == torch_int8[:n]).mean())
                        row["accuracy"] = float((top1 == y[:n]).mean())
                        row["notes"] = out.notes
                row["size_bytes"] = sizes
                if "fp32" in sizes:
                    row["size_ratio"] = sizes["int8"] / sizes["fp32"]
            except ModelpressError as exc:
                row["error"] = str(exc)
            rows[to] = row
            print(to, json.dumps(row), flush=True)
    result = {
        "asset": "mnist",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "torch_int8_accuracy": float((torch_int8 == y).mean()),
        "rows": rows,
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    with atomic_path(args.json, overwrite=True) as out_path:
        out_path.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
