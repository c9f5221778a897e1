"""ONNX Runtime GenAI engine for the LLM benchmark (issue 32): a folder that `onnxruntime_genai.Model`
reads (ours from `modelpress export --to genai`, or the GenAI model builder's), driven by its own
generate loop. See `llm_engines.py` for the interface."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
from llm_engines import GenerateTiming


class GenAIEngine:
    def __init__(self, name: str, folder: str, threads: int) -> None:
        self.name, self.folder = name, Path(folder)
        config = og.Config(str(folder))
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.threads = threads
        self._session: ort.InferenceSession | None = None
        genai = json.loads((self.folder / "genai_config.json").read_text())
        self.decoder = genai["model"]["decoder"]

    def generate(self, prompt: list[int], new_tokens: int) -> GenerateTiming:
        params = og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(tokens) < new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        t2 = time.perf_counter()
        del generator
        return GenerateTiming(tokens, t1 - t0, t2 - t1)

    def window_logits(self, ids: list[int]) -> np.ndarray:
        """The file's logits for one window with an empty cache, in a plain InferenceSession."""
        if self._session is None:
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = self.threads, 1
            path = str(self.folder / self.decoder["filename"])
            self._session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        sess = self._session
        feeds: dict[str, np.ndarray] = {}
        n = len(ids)
        for inp in sess.get_inputs():
            if inp.name == "input_ids":
                feeds[inp.name] = np.asarray([ids], dtype=np.int64)
            elif inp.name == "attention_mask":
                feeds[inp.name] = np.ones((1, n), dtype=np.int64)
            elif inp.name == "position_ids":
                feeds[inp.name] = np.arange(n, dtype=np.int64)[None]
            elif inp.name.startswith("past_key_values"):
                kv = self.decoder["num_key_value_heads"]
                head = self.decoder["head_size"]
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((1, kv, 0, head), dtype=dtype)
            else:
                raise ValueError(f"unexpected input {inp.name} in {self.folder}")
        logits = sess.run(["logits"], feeds)[0]
        return np.asarray(logits[0], dtype=np.float32)

    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.name.startswith("model.onnx"))

    def close(self) -> None:
        self._session = None
        del self.model


def open_engine(kind: str, path: str, threads: int) -> GenAIEngine:
    return GenAIEngine(kind, path, threads)
