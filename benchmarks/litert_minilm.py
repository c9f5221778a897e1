"""all-MiniLM-L6-v2 in LiteRT (issue 29): fp32 and int8-static-smooth .tflite, sentence-embedding cosine to
the fp32 torch model on the 50 Lee documents (target for int8: >= 0.998), sizes.

    python benchmarks/litert_minilm.py [--json benchmarks/results/minilm-litert.json]

Static shapes: every document is padded to 256 tokens (the model's maximum) and run one at a time.
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
import torch

sys.path.insert(0, str(Path(__file__).parent))
import assets

import modelpress as mp
from modelpress.deploy.litert import export_litert, float_ops, open_litert

SEQ = 256


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default="benchmarks/results/minilm-litert.json")
    args = parser.parse_args()
    model, tokenizer = assets.minilm()
    docs = assets.lee_corpus()
    enc = tokenizer(docs, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    background = assets.lee_background(64, split_sentences=True)
    cal = tokenizer(background, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    calibration = [(cal["input_ids"][i : i + 8], cal["attention_mask"][i : i + 8]) for i in range(0, 64, 8)]
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    work = Path(tempfile.mkdtemp(prefix="litert-minilm-"))
    example = (ids[:1], mask[:1])
    result: dict[str, object] = {
        "asset": "all-MiniLM-L6-v2 (SentenceEmbedder: mean pooling + L2 norm)",
        "data": f"50 Lee documents padded to {SEQ} tokens; calibration: 64 Lee background sentences",
        "command": "python benchmarks/litert_minilm.py",
        "machine": f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
    }

    def run(path: Path) -> np.ndarray:
        session = open_litert(path, threads=2)
        return np.concatenate(
            [session.run([ids[i : i + 1].numpy(), mask[i : i + 1].numpy()])[0] for i in range(len(docs))]
        )

    start = time.perf_counter()
    fp32 = export_litert(model, example, work / "fp32.tflite")
    fp32_s = time.perf_counter() - start
    cos = _cosine(ref, run(fp32))
    result["fp32"] = {
        "bytes": fp32.stat().st_size,
        "export_s": round(fp32_s, 1),
        "cosine_to_fp32_torch": {"mean": float(cos.mean()), "min": float(cos.min())},
    }
    print("fp32", result["fp32"], flush=True)

    start = time.perf_counter()
    small = mp.compress(model, "int8-static-smooth", calibration)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    int8 = export_litert(small, example, work / "int8.tflite", data=calibration)
    int8_s = time.perf_counter() - start
    with torch.no_grad():
        torch_int8 = small(ids, mask).numpy()
    got = run(int8)
    cos = _cosine(ref, got)
    floats = float_ops(int8)
    result["int8-static-smooth"] = {
        "bytes": int8.stat().st_size,
        "size_vs_fp32": round(int8.stat().st_size / fp32.stat().st_size, 4),
        "compress_s": round(compress_s, 1),
        "export_s": round(int8_s, 1),
        "cosine_to_fp32_torch": {"mean": float(cos.mean()), "min": float(cos.min())},
        "torch_int8_cosine_to_fp32": float(_cosine(ref, torch_int8).mean()),
        "cosine_to_torch_int8": float(_cosine(torch_int8, got).mean()),
        "target_cosine": 0.998,
        "float_ops": len(floats),
        "met": bool(cos.mean() >= 0.998),
        "why_not": (
            "TFLite's int8 FULLY_CONNECTED writes int8 outputs: the pt2e graph litert-torch converts quantizes "
            "every Linear's output per tensor (modelpress's torch graph quantizes only Linear inputs), which "
            "BERT's outlier features do not survive; the same graph simulated in torch gives the same cosine."
        ),
    }
    print("int8", result["int8-static-smooth"], flush=True)
    out = Path(args.json)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
