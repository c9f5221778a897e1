"""OpenVINO GenAI engine for the LLM benchmark (issue 32): a folder that `openvino_genai.LLMPipeline` reads
(ours from `modelpress.deploy.ovgenai.export_openvino_genai`, or optimum-intel's `optimum-cli export
openvino`), driven by its own generate loop. See `llm_engines.py` for the interface.

A kind containing ':f32' compiles with fp32 maths and KV cache and no activation quantization (what the
export's greedy check uses); otherwise the CPU plugin's defaults (on CPUs with bf16: bf16 maths, u8 KV
cache, activations quantized per group of 32 in front of int4/int8 weights), as a user runs the folder.
Generation runs LLMPipeline's default paged-attention scheduler with prefix caching off (on, it serves every
repeat of the timed prompt from its cache: "prefill" at 16,000 tokens/s); ':sdpa' in the kind runs the
stateful IR's own loop instead (ATTENTION_BACKEND=SDPA).

    python benchmarks/llm_openvino.py export RECIPE OUT   # our SmolLM2 folder (fp32, a recipe name, or a .pt
                                                          # that generate_smollm2.py saved)
    python benchmarks/llm_openvino.py measure KIND=FOLDER ... [--threads 2] [--rounds 3] [--windows 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai
from llm_engines import GenerateTiming, perplexity

EXACT = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}


class _Clock(openvino_genai.StreamerBase):
    """Records when each new token reaches the caller (the pipeline may stream several at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def write(self, token: int | list[int]) -> openvino_genai.StreamingStatus:
        now = time.perf_counter()
        self.times.extend([now] * (len(token) if isinstance(token, list) else 1))
        return openvino_genai.StreamingStatus.RUNNING

    def end(self) -> None:
        pass


class OpenVINOEngine:
    def __init__(self, name: str, folder: str, threads: int) -> None:
        self.name, self.folder = name, Path(folder)
        self.properties: dict[str, object] = {"INFERENCE_NUM_THREADS": threads}
        if ":f32" in name:
            self.properties.update(EXACT)
        if ":sdpa" in name:  # the stateful IR's own loop instead of the default paged-attention scheduler
            backend: dict[str, object] = {"ATTENTION_BACKEND": "SDPA"}
        else:  # the default scheduler, without prefix caching (it would serve every repeat of a prompt)
            scheduler = openvino_genai.SchedulerConfig()
            scheduler.enable_prefix_caching = False
            backend = {"scheduler_config": scheduler}
        self.pipe = openvino_genai.LLMPipeline(str(folder), "CPU", **self.properties, **backend)
        self._compiled: ov.CompiledModel | None = None

    def generate(self, prompt: list[int], new_tokens: int) -> GenerateTiming:
        config = self.pipe.get_generation_config()
        config.do_sample = False
        config.max_new_tokens = new_tokens
        config.ignore_eos = True
        streamer = _Clock()
        t0 = time.perf_counter()
        result = self.pipe.generate(ov.Tensor(np.asarray([prompt], dtype=np.int64)), config, streamer)
        tokens = [int(t) for t in result.tokens[0]]
        # Wall clock at each streamed token: prefill = prompt in to the first new token, decode = the rest.
        return GenerateTiming(tokens, streamer.times[0] - t0, streamer.times[-1] - streamer.times[0])

    def window_logits(self, ids: list[int]) -> np.ndarray:
        """The IR's logits for one window from a fresh state (input names as LLMPipeline feeds them)."""
        if self._compiled is None:
            core = ov.Core()
            self._compiled = core.compile_model(
                str(self.folder / "openvino_model.xml"), "CPU", self.properties
            )
        request = self._compiled.create_infer_request()
        request.reset_state()
        n = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        }
        names = {name for port in self._compiled.inputs for name in port.get_names()}
        request.infer({k: v for k, v in feeds.items() if k in names})
        # a copy, not a view of the request's buffer: one run's ov-mp-int8 perplexity read 6.8e12 and the
        # next 20.80; a view outliving its request is the suspect (not reproduced on a toy model)
        return np.array(request.get_tensor("logits").data[0], dtype=np.float32, copy=True)

    def file_bytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in ("openvino_model.xml", "openvino_model.bin"))

    def close(self) -> None:
        self._compiled = None
        del self.pipe


def open_engine(kind: str, path: str, threads: int) -> OpenVINOEngine:
    return OpenVINOEngine(kind, path, threads)


def _export(recipe: str, out: str) -> None:
    import assets
    import torch

    import modelpress as mp
    from modelpress.deploy.ovgenai import export_openvino_genai

    model, tokenizer = assets.smollm2()
    model.hf_quantizer = None
    t0 = time.perf_counter()
    if recipe.endswith(".pt"):  # a compressed model saved by generate_smollm2.py ({"model": lm, ...})
        model = torch.load(recipe, weights_only=False)["model"]
    elif recipe != "fp32":
        model = mp.compress(model, recipe)
    t1 = time.perf_counter()
    report = export_openvino_genai(model, tokenizer, out, overwrite=True)
    print(f"compress {t1 - t0:.0f} s, export + check {time.perf_counter() - t1:.0f} s")
    print(
        f"prefill logits max |diff| (fp32 IR vs torch): {report.prefill_max_abs_diff:.3g}; weights {report.weights}"
    )
    for c in report.checks:
        print(f"  {c.prompt!r}: first divergence {c.first_divergence}, logit gap {c.logit_gap}")


def _measure(specs: list[str], threads: int, rounds: int, windows: int) -> dict:
    import assets

    _, tokenizer = assets.smollm2()
    ids = assets.wiki_tokens(tokenizer, 32768).tolist()
    prompt = ids[:128]
    engines = [open_engine(kind, folder, threads) for kind, folder in (s.split("=", 1) for s in specs)]
    decode: dict[str, list[float]] = {e.name: [] for e in engines}
    prefill: dict[str, list[float]] = {e.name: [] for e in engines}
    for e in engines:
        e.generate(prompt, 8)  # warm-up
    for _ in range(rounds):
        for e in engines:  # interleaved: A, B, C, A, B, C...
            timing = e.generate(prompt, 128)
            decode[e.name].append(timing.decode_tok_s)
            prefill[e.name].append(len(prompt) / timing.prefill_s)
    rows = {}
    for e in engines:
        wins = [ids[i * 1024 : (i + 1) * 1024] for i in range(windows)]
        rows[e.name] = {
            "folder": str(e.folder),
            "file_mb": round(e.file_bytes() / 1e6, 1),
            "decode_tok_s": round(statistics.median(decode[e.name]), 1),
            "decode_tok_s_all": [round(x, 1) for x in decode[e.name]],
            "prefill_tok_s": round(statistics.median(prefill[e.name]), 1),
            "perplexity": round(perplexity(e, wins), 3) if wins else None,
        }
        print(e.name, rows[e.name], flush=True)
    return {
        "threads": threads,
        "rounds": rounds,
        "windows": windows,
        "prompt": 128,
        "new_tokens": 128,
        "rows": rows,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("recipe")
    ex.add_argument("out")
    me = sub.add_parser("measure")
    me.add_argument("specs", nargs="+", help="KIND=FOLDER (a kind ending in ':f32' runs fp32 maths)")
    me.add_argument("--threads", type=int, default=2)
    me.add_argument("--rounds", type=int, default=3)
    me.add_argument("--windows", type=int, default=8)
    me.add_argument("--json")
    args = parser.parse_args()
    if args.cmd == "export":
        _export(args.recipe, args.out)
    else:
        result = _measure(args.specs, args.threads, args.rounds, args.windows)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
