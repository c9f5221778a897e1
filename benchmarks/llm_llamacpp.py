"""llama.cpp (through llama-cpp-python) as a peer engine of the LLM generation benchmark (issue 32).

The GGUF files are made the way a llama.cpp user makes them: the fp32 Hugging Face folder goes through
llama.cpp's own ``convert_hf_to_gguf.py`` (an F32 GGUF), then ``llama_model_quantize`` writes Q8_0, Q4_0
and Q4_K_M with llama.cpp's default tensor mixes. The converter is the one vendored in the installed
llama-cpp-python's sdist (same llama.cpp commit as the library that runs the files).

Token ids go in and out: the engine drives ``llama_decode`` on our tokenizer's ids, so no llama.cpp
tokenization is timed and the perplexity windows are the same ids every engine reads. Greedy is an argmax
over the last logits row (first index on ties, as ``torch.argmax``).

Install (a benchmark setup step, never CI; a source build with the AMX kernels off, ~11 min on 2 busy cores):
``LLAMA_CPP=1 bash benchmarks/setup.sh``.

    python benchmarks/llm_llamacpp.py WORK_DIR   # SmolLM2 GGUFs into WORK_DIR, then a quick check
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from llm_engines import GenerateTiming

# llama.cpp's llama_ftype values (llama.h; llama_cpp.LLAMA_FTYPE_MOSTLY_*), by our variant name.
QUANT_FTYPES: dict[str, int] = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
VARIANTS = ("f32", *QUANT_FTYPES)

WINDOW = 1024  # perplexity window (benchmarks/assets.perplexity)
N_CTX = WINDOW + 256  # a window, or a 128-token prompt + 128 new tokens, with room to spare
N_BATCH = WINDOW  # one llama_decode call takes a whole window (split into ubatches by llama.cpp)
N_UBATCH = 512  # llama.cpp's default physical batch (the compute buffer a user has)


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the benchmark environment
        raise RuntimeError(
            "llama-cpp-python is not installed: run `LLAMA_CPP=1 bash benchmarks/setup.sh` "
            "(a ~11 min source build with the AMX kernels off)"
        ) from e
    # llama.cpp logs every tensor on load and quantize; keep errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp


# --------------------------------------------------------------------------------------------
# Making the GGUF files
# --------------------------------------------------------------------------------------------


def converter(work: Path) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` (with its ``conversion/`` and ``gguf-py/``) from the sdist of the
    installed llama-cpp-python, extracted once into ``work/llama.cpp-VERSION``."""
    version = importlib.metadata.version("llama-cpp-python")
    folder = work / f"llama.cpp-{version}"
    script = folder / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        # From pip's cache after the source build; --no-deps: nothing else is fetched.
        pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps"]
        _run(
            [*pip, "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp],
            "download the llama-cpp-python sdist (for convert_hf_to_gguf.py)",
        )
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(sdist) as tar:
            members = []
            for member in tar.getmembers():
                rel = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and (
                    rel == "convert_hf_to_gguf.py" or rel.startswith(("conversion/", "gguf-py/"))
                ):
                    member.name = rel
                    members.append(member)
            tar.extractall(staging, members=members, filter="data")
        staging.rename(folder)
    return script


def make_ggufs(hf_folder: Path, out_dir: Path, *, threads: int = 2) -> dict[str, Path]:
    """F32, Q8_0, Q4_0 and Q4_K_M GGUFs of an fp32 Hugging Face folder, by variant name (``VARIANTS``).

    Files already in ``out_dir`` are reused (delete them to rebuild): the F32 one from llama.cpp's
    ``convert_hf_to_gguf.py --outtype f32``, the others from it with ``llama_model_quantize``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "model-f32.gguf"
    if not f32.is_file():
        partial = out_dir / "model-f32.gguf.partial"
        _run(
            [
                sys.executable,
                str(converter(out_dir)),
                str(hf_folder),
                "--outtype",
                "f32",
                "--outfile",
                str(partial),
            ],
            f"convert {hf_folder} to GGUF",
        )
        partial.rename(f32)
    paths = {"f32": f32}
    for name, ftype in QUANT_FTYPES.items():
        paths[name] = out_dir / f"model-{name}.gguf"
        if not paths[name].is_file():
            quantize(f32, paths[name], ftype=ftype, threads=threads)
    return paths


def quantize(src: Path, dst: Path, *, ftype: int, threads: int = 2) -> None:
    """``llama_model_quantize`` with llama.cpp's default parameters except the file type and threads."""
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    partial = dst.with_name(dst.name + ".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, ftype {ftype}) returned {rc}")
    partial.rename(dst)


def smollm2_ggufs(work: Path, *, threads: int = 2) -> dict[str, Path]:
    """The SmolLM2 GGUFs (``make_ggufs``) of ``benchmarks/assets.smollm2()``, cached in ``work``."""
    cached = {"f32": work / "model-f32.gguf"} | {n: work / f"model-{n}.gguf" for n in QUANT_FTYPES}
    if all(p.is_file() for p in cached.values()):
        return cached
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_folder(Path(tmp))
        return make_ggufs(Path(tmp), work, threads=threads)


def save_hf_folder(folder: Path) -> None:
    """The SmolLM2 asset as a plain fp32 Hugging Face folder (model + tokenizer) for the converter."""
    import copy

    import assets

    model, tokenizer = assets.smollm2()
    # Loaded from a GGUF, the model carries transformers' gguf "quantizer", which refuses save_pretrained:
    # the same weights (already dequantized to fp32) go into a fresh model of the same config.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _run(cmd: list[str], what: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"could not {what} (exit {out.returncode}): {' '.join(cmd)}\n{tail}")


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


class LlamaCppEngine:
    """One GGUF in llama.cpp: a model, a context (F16 KV cache, flash attention as llama.cpp decides) and a
    batch, driven with ``llama_decode`` on token ids."""

    def __init__(self, kind: str, path: str | Path, threads: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no GGUF at {self.path}: make it with llm_llamacpp.make_ggufs")
        self.name = f"llama.cpp {kind}"
        self._lib = lib = _llama_cpp()
        lib.llama_backend_init()
        self._model = lib.llama_model_load_from_file(
            str(self.path).encode(), lib.llama_model_default_params()
        )
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        params = lib.llama_context_default_params()
        params.n_ctx = N_CTX
        params.n_batch = N_BATCH
        params.n_ubatch = N_UBATCH
        params.n_threads = threads
        params.n_threads_batch = threads
        self._ctx = lib.llama_init_from_model(self._model, params)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not make a context for {self.path}")
        self._batch = lib.llama_batch_init(N_BATCH, 0, 1)
        self.n_vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model)))
        self._closed = False

    def _clear(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def _decode(self, ids: list[int], pos: int, *, all_logits: bool) -> None:
        """Append ``ids`` at positions pos.. to the KV cache; logits of every token or only of the last."""
        batch = self._batch
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits
        batch.logits[len(ids) - 1] = True
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} ({len(ids)} tokens at position {pos})")

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def generate(self, prompt: list[int], new_tokens: int) -> GenerateTiming:
        """Greedy: exactly ``new_tokens`` new tokens (no stop at EOS), timed as prefill and decode."""
        if len(prompt) + new_tokens > N_CTX or len(prompt) > N_BATCH:
            raise ValueError(
                f"{len(prompt)} + {new_tokens} tokens do not fit n_ctx {N_CTX} / n_batch {N_BATCH}"
            )
        self._clear()
        t0 = time.perf_counter()
        self._decode(prompt, 0, all_logits=False)
        tokens = [int(np.argmax(self._last_logits()))]
        t1 = time.perf_counter()
        for step in range(new_tokens - 1):
            self._decode(tokens[-1:], len(prompt) + step, all_logits=False)
            tokens.append(int(np.argmax(self._last_logits())))
        t2 = time.perf_counter()
        return GenerateTiming(tokens=tokens, prefill_s=t1 - t0, decode_s=t2 - t1)

    def window_logits(self, ids: list[int]) -> np.ndarray:
        """(L, V) float32 logits of one window from an empty cache (for perplexity)."""
        if len(ids) > N_CTX:
            raise ValueError(f"a {len(ids)}-token window does not fit n_ctx {N_CTX}")
        self._clear()
        rows = []
        for start in range(0, len(ids), N_BATCH):
            chunk = ids[start : start + N_BATCH]
            self._decode(chunk, start, all_logits=True)
            # (len(chunk), V): the output rows of the tokens with logits on, in batch order.
            out = np.ctypeslib.as_array(
                self._lib.llama_get_logits(self._ctx), shape=(len(chunk), self.n_vocab)
            )
            rows.append(out.copy())
        return np.concatenate(rows).astype(np.float32, copy=False)

    def file_bytes(self) -> int:
        """Bytes of the GGUF (weights, config and the tokenizer llama.cpp keeps inside it)."""
        return self.path.stat().st_size

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._ctx)
        self._lib.llama_model_free(self._model)


def open_engine(kind: str, path: str, threads: int) -> LlamaCppEngine:
    """``kind`` names the variant (``f32``, ``q8_0``, ``q4_0``, ``q4_k_m``); ``path`` is its GGUF file."""
    return LlamaCppEngine(kind, path, threads)


# --------------------------------------------------------------------------------------------
# Quick check: python benchmarks/llm_llamacpp.py WORK_DIR [THREADS] [WINDOWS]
# --------------------------------------------------------------------------------------------


def _quick_check(work: Path, threads: int = 2, n_windows: int = 8, repeats: int = 3) -> dict:
    import assets
    import torch
    from llm_engines import perplexity

    t0 = time.perf_counter()
    paths = smollm2_ggufs(work, threads=threads)
    make_s = time.perf_counter() - t0
    model, tokenizer = assets.smollm2()
    tokens = assets.wiki_tokens(tokenizer, 32768)
    windows = [tokens[i * WINDOW : (i + 1) * WINDOW].tolist() for i in range(n_windows)]
    prompt = tokens[-128:].tolist()  # not one of the perplexity windows' first tokens
    torch.set_num_threads(threads)
    with torch.inference_mode():
        torch_ppl = assets.perplexity(assets.torch_logits(model), tokens, WINDOW, n_windows * WINDOW)
        # HF greedy may stop at EOS before 32 tokens: the comparison then covers the tokens it made.
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        ref_logits = model(input_ids=torch.tensor([windows[0]]), use_cache=False).logits[0].numpy()
    torch_tokens = ref[0, len(prompt) :].tolist()
    report: dict[str, Any] = {"make_ggufs_s": make_s, "torch_fp32_perplexity": torch_ppl, "variants": {}}
    report["torch_greedy_tokens_compared"] = len(torch_tokens)
    # llama.cpp's threads meet at an OpenMP barrier per op: on a busy 2-core host, 2-thread decode collapses
    # (several x slower, rounds 5x apart) while 1 thread does not. The load says whether a timing means anything.
    report["loadavg_before"] = os.getloadavg()
    for name, path in paths.items():
        engine = open_engine(name, str(path), threads)
        try:
            runs = [engine.generate(prompt, 128) for _ in range(repeats)]
            row: dict[str, Any] = {
                "file_mb": engine.file_bytes() / 1e6,
                "decode_tok_s": float(np.median([r.decode_tok_s for r in runs])),
                "prefill_tok_s": float(np.median([len(prompt) / r.prefill_s for r in runs])),
                "perplexity": perplexity(engine, windows),
            }
            first = next(
                (i for i, (a, b) in enumerate(zip(runs[0].tokens, torch_tokens, strict=False)) if a != b),
                None,
            )
            row["greedy_first_divergence_vs_torch"] = first  # None: the first 32 tokens agree
            if name == "f32":
                diff = np.abs(engine.window_logits(windows[0]) - ref_logits)
                row["window0_max_abs_logit_diff_vs_torch"] = float(diff.max())
                row["window0_mean_abs_logit_diff_vs_torch"] = float(diff.mean())
        finally:
            engine.close()
        report["variants"][name] = row
        print(name, row, flush=True)
    report["loadavg_after"] = os.getloadavg()
    return report


if __name__ == "__main__":
    import json

    args = sys.argv[1:]
    result = _quick_check(Path(args[0]), *(int(a) for a in args[1:3]))
    print(json.dumps(result, indent=2))
