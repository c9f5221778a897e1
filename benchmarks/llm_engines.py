"""One interface for the engines that generate text in the LLM benchmark (issue 32).

Each engine module (`llm_genai.py` for ONNX Runtime GenAI, `llm_openvino.py` for OpenVINO GenAI,
`llm_llamacpp.py` for llama.cpp) has `open_engine(kind, path, threads) -> Engine`. The driver
(`generate_smollm2.py`) times every engine interleaved in one process (A, B, A, B...) and measures peak
memory in a fresh child process per engine (`python benchmarks/llm_engines.py MODULE KIND PATH`).

Token ids go in and out: every engine reads the same ids (our tokenizer's), so the perplexity windows and
prompts are identical across engines whatever their own tokenizer does.
"""

from __future__ import annotations

import importlib
import json
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

HERE = Path(__file__).resolve().parent


@dataclass
class GenerateTiming:
    tokens: list[int]  # the new tokens, greedy
    prefill_s: float  # prompt in, first new token's logits out
    decode_s: float  # the remaining new tokens (len(tokens) - 1 steps)

    @property
    def decode_tok_s(self) -> float:
        return (len(self.tokens) - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class Engine(Protocol):
    name: str

    def generate(self, prompt: list[int], new_tokens: int) -> GenerateTiming:
        """Greedy: exactly `new_tokens` new tokens (no stop at EOS), timed as prefill and decode."""
        ...

    def window_logits(self, ids: list[int]) -> np.ndarray:
        """(L, V) float32 logits of one window from an empty cache (for perplexity)."""
        ...

    def file_bytes(self) -> int:
        """Bytes on disk of what the runtime loads (weights and graph; tokenizer files excluded)."""
        ...

    def close(self) -> None: ...


def perplexity(engine: Engine, windows: list[list[int]]) -> float:
    """exp(mean NLL) of tokens 1..L-1 of each window given its own prefix."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = engine.window_logits(ids).astype(np.float64)
        z = logits[:-1] - logits[:-1].max(axis=-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def open_engine(module: str, kind: str, path: str, threads: int) -> Engine:
    sys.path.insert(0, str(HERE))
    return importlib.import_module(module).open_engine(kind, path, threads)  # type: ignore[no-any-return]


def peak_memory(module: str, kind: str, path: str, prompt: list[int], new_tokens: int, threads: int) -> dict:
    """Peak RSS (bytes) of a fresh process that loads the engine and generates once."""
    out = subprocess.run(
        [sys.executable, __file__, module, kind, path, json.dumps(prompt), str(new_tokens), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hwm_bytes() -> int:
    """This process's peak resident set (VmHWM). Not `getrusage`'s ru_maxrss: Linux keeps that across
    fork and exec, so a child of a large process reports its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(module: str, kind: str, path: str, prompt: str, new_tokens: str, threads: str) -> None:
    base = _hwm_bytes()
    t0 = time.perf_counter()
    engine = open_engine(module, kind, path, int(threads))
    load_s = time.perf_counter() - t0
    loaded = _hwm_bytes()
    timing = engine.generate(json.loads(prompt), int(new_tokens))
    peak = _hwm_bytes()
    print(
        json.dumps(
            {
                "peak_rss_bytes": peak,
                "rss_after_load_bytes": loaded,
                "rss_before_load_bytes": base,
                "load_s": load_s,
                "child_decode_tok_s": timing.decode_tok_s,  # one run, not interleaved: not the row's figure
            }
        )
    )


if __name__ == "__main__":
    _child(*sys.argv[1:7])
