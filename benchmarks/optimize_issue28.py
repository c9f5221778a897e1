"""Issue 28 items 2 and 3 on the real assets: progressive compression and per-family sensitivity.

MNIST CNN: progressive sparsity (SparseGPT, conv + linear, ratio 0.5 -> 0.95) under a 0.5% relative accuracy
drop on 1,024 held-out validation images; the kept model is exported and its accuracy measured on the 10k test
set in ONNX Runtime beside the fp32 export. Per-family sensitivity (bits, sparsity, rank, structured) of the
MNIST CNN (accuracy on 512 validation images) and of MiniLM (cosine to fp32 on 64 Lee sentences): wall time
measured, then again from the cache.

    python benchmarks/optimize_issue28.py --json benchmarks/results/optimize-issue28.json
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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets

import modelpress as mp
from modelpress.optimize.sensitivity import family_sensitivity

FAMILIES = ["bits", "sparsity:0.5,0.9", "rank", "structured"]


def _batches(x: torch.Tensor, y: torch.Tensor, n: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def _timed_sensitivity(
    model: torch.nn.Module, data: list[Any], metric: str | None, cache: Path
) -> dict[str, Any]:
    start = time.perf_counter()
    table = family_sensitivity(model, data, FAMILIES, metric=metric, max_items=len(data), cache=cache)
    first = time.perf_counter() - start
    start = time.perf_counter()
    again = family_sensitivity(model, data, FAMILIES, metric=metric, max_items=len(data), cache=cache)
    second = time.perf_counter() - start
    assert again.cached and again.rows == table.rows
    worst = sorted((r for r in table.rows if r.drop is not None), key=lambda r: -(r.drop or 0.0))[:5]
    probes = sum(r.value is not None for r in table.rows)
    print(table.format())
    return {
        "metric": table.metric,
        "reference": table.reference,
        "layers": len(table.layers),
        "probes": len(table.rows),
        "probes_applicable": probes,
        "first_s": round(first, 2),
        "cached_s": round(second, 3),
        "most_sensitive": [f"{r.layer} {r.family}@{r.strength:g}: {r.drop:.5f}" for r in worst],
    }


def mnist_progressive() -> dict[str, Any]:
    model = assets.mnist_model()
    xv, yv = assets.mnist_data("val")
    xt, yt = assets.mnist_data("test")
    # the first 8 batches (1,024 images) measure each step, the next 8 calibrate SparseGPT
    data = _batches(xv, yv, 2048, 128)
    config = mp.ProgressiveConfig(
        technique={"type": "sparsity", "layers": ["linear", "conv"], "calibration_batches": 8},
        steps=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
        max_drop=0.005,
        metric="accuracy",
        holdout=8,
    )
    start = time.perf_counter()
    small, trajectory = mp.progressive(model, config, data)
    wall = time.perf_counter() - start
    print(trajectory.format())
    test = _batches(xt, yt, len(xt), 500)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = mp.export_onnx(model, (xt[:1],), Path(tmp) / "fp32.onnx")
        kept = mp.export_onnx(small, (xt[:1],), Path(tmp) / "kept.onnx")
        accuracy = {
            "onnxruntime fp32": mp.evaluate(mp.open_session(fp32, "onnxruntime"), test, "accuracy"),
            "onnxruntime kept": mp.evaluate(mp.open_session(kept, "onnxruntime"), test, "accuracy"),
            "torch kept": mp.evaluate(small, test, "accuracy"),
        }
        sizes = {"fp32_bytes": fp32.stat().st_size, "kept_bytes": kept.stat().st_size}
    print(accuracy, sizes)
    return {"trajectory": trajectory.to_dict(), "wall_s": round(wall, 1), "test_accuracy": accuracy, **sizes}


def minilm_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, tokenizer = assets.minilm()
    texts = assets.lee_corpus()[:64]
    out = []
    for i in range(0, len(texts), 16):
        enc = assets.minilm_tokenize(tokenizer, texts[i : i + 16])
        out.append((enc["input_ids"], enc["attention_mask"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "load_at_start": os.getloadavg(),
        },
    }
    with tempfile.TemporaryDirectory() as cache:
        xv, yv = assets.mnist_data("val")
        result["mnist_sensitivity"] = _timed_sensitivity(
            assets.mnist_model(), _batches(xv, yv, 512, 128), "accuracy", Path(cache)
        )
        if not args.skip_minilm:
            model, _ = assets.minilm()
            result["minilm_sensitivity"] = _timed_sensitivity(model, minilm_data(), None, Path(cache))
    result["mnist_progressive"] = mnist_progressive()
    result["environment"]["load_at_end"] = os.getloadavg()
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
