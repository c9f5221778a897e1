#!/usr/bin/env python
"""all-MiniLM-L6-v2 in ExecuTorch (XNNPACK): fp32 and modelpress's int8-static-smooth, via `export_executorch`.

    python benchmarks/executorch_minilm.py --json benchmarks/results/minilm-executorch.json [--rounds N]

Measures on the real asset (`bash benchmarks/setup.sh`): the .pte sizes, what XNNPACK runs of each,
embedding cosine of each .pte to the fp32 torch model (the 50 Lee documents and 128 background sentences,
batches of 16 padded to the longest), the Lee Pearson correlation of the embeddings the .pte computes, and
latency of int8 vs fp32 in ExecuTorch in interleaved rounds (ratio = median of per-round int8 / fp32) at
batch 1 and 16, sequence 128, XNNPACK on 2 threads. The int8 model is `compress(model,
"int8-static-smooth", calibration)` on 256 background sentences the fidelity set does not contain, as in
run.py. Its Linear layers run in XNNPACK's dynamically quantized GEMM (see `xnnpack_int8_form`).
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
from modelpress.deploy.executorch import ExecuTorchSession, lower_executorch

MAX_BATCH = 16
MAX_SEQ = 256  # MiniLM's max length in the benchmarks (assets.MINILM_MAX_LENGTH)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer = assets.minilm()
    sentences = assets.lee_background(split_sentences=True)
    calibration = [
        tuple(assets.minilm_tokenize(tokenizer, sentences[1024 + i : 1024 + i + 8]).values())
        for i in range(0, 256, 8)
    ]
    texts = assets.lee_corpus() + sentences[:128]
    batches = [
        tuple(assets.minilm_tokenize(tokenizer, texts[i : i + 16]).values()) for i in range(0, len(texts), 16)
    ]
    with torch.inference_mode():
        reference = np.concatenate([model(*b).numpy() for b in batches])
    small = mp.compress(copy.deepcopy(model), "int8-static-smooth", calibration)
    example = tuple(assets.minilm_tokenize(tokenizer, sentences[:2]).values())

    rows: dict[str, dict[str, Any]] = {}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in {"fp32": model, "int8-static-smooth": small}.items():
            t0 = time.perf_counter()
            lowered = lower_executorch(m, example, max_batch=MAX_BATCH, max_seq=MAX_SEQ, data=calibration)
            export_s = time.perf_counter() - t0
            path = Path(tmp) / f"{name}.pte"
            path.write_bytes(lowered.buffer)
            session = ExecuTorchSession(path, threads=args.threads)
            sessions[name] = session
            got = np.concatenate([session.run([t.numpy() for t in b])[0] for b in batches])
            with torch.inference_mode():
                own = np.concatenate([m(*b).numpy() for b in batches])

            def embed(items: list[str], s: ExecuTorchSession = session) -> np.ndarray:
                encoded = [
                    assets.minilm_tokenize(tokenizer, items[i : i + 16]) for i in range(0, len(items), 16)
                ]
                return np.concatenate(
                    [s.run([e["input_ids"].numpy(), e["attention_mask"].numpy()])[0] for e in encoded]
                )

            cos = cosines(got, reference)
            rows[name] = {
                "size_bytes": len(lowered.buffer),
                "export_s": round(export_s, 1),
                "dynamic": lowered.shapes,
                "xnnpack": lowered.summary(),
                "delegation": {op: {"xnnpack": a, "outside": b} for op, (a, b) in lowered.delegation.items()},
                "int8_form": None if lowered.int8 is None else lowered.int8.__dict__,
                "cosine_to_fp32_mean": float(cos.mean()),
                "cosine_to_fp32_min": float(cos.min()),
                "torch_cosine_to_fp32_mean": float(cosines(own, reference).mean()),
                "cosine_to_own_torch_mean": float(cosines(got, own).mean()),
                "lee_pearson": float(assets.lee_pearson(embed)),
                "fidelity_items": len(texts),
            }
            print(
                f"{name}: {len(lowered.buffer)} bytes, cosine {cos.mean():.6f}, {lowered.summary()}",
                flush=True,
            )
        rows["int8-static-smooth"]["size_ratio"] = (
            rows["int8-static-smooth"]["size_bytes"] / rows["fp32"]["size_bytes"]
        )
        docs = assets.lee_background()
        latency: dict[str, Any] = {}
        for key, size in (("b1", 1), ("b16", 16)):
            b = assets.sentence_batches(docs[:size], tokenizer, size, 128)[0]
            arrays = [b["input_ids"].numpy(), b["attention_mask"].numpy()]
            runners = {name: (lambda s=s, a=arrays: s.run(a)) for name, s in sessions.items()}
            timings = benchmark_interleaved(runners, baseline="fp32", batch=size, rounds=args.rounds)
            latency[key] = {
                name: {
                    "median_ms": round(t.median_ms, 3),
                    "p90_ms": round(t.p90_ms, 3),
                    "ratio_to_fp32": round(t.ratio, 4),
                    "ratio_p10": round(t.ratio_p10, 4),
                    "ratio_p90": round(t.ratio_p90, 4),
                }
                for name, t in timings.items()
            }
            print(f"{key}: {latency[key]}", flush=True)
        sessions.clear()
    int8 = rows["int8-static-smooth"]
    result = {
        "asset": "minilm",
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "executorch": version("executorch"),
            "machine": platform.machine(),
            "threads": args.threads,
            "rounds": args.rounds,
        },
        "recipe": "int8-static-smooth (static_int8 smooth_alpha 0.75 + gptq on Linear; int8 weight-only embeddings)",
        "rows": rows,
        "latency": latency,
        "acceptance": {
            "int8_cosine_to_fp32>=0.998": int8["cosine_to_fp32_mean"] >= 0.998,
        },
        "total_wall_s": round(time.perf_counter() - start, 1),
    }
    with atomic_path(args.json, overwrite=True) as out:
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"size_ratio": int8["size_ratio"], **result["acceptance"]}))


if __name__ == "__main__":
    main()
