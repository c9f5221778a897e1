"""SmolLM2 that generates (issue 32): decode tokens/s, peak memory and perplexity measured on the
decode-ready artifacts themselves, ours beside the field's, in one run.

    python benchmarks/generate_smollm2.py --work /tmp/llm --json benchmarks/results/smollm2-generate.json

Engines (each a module with the `llm_engines.Engine` interface; a missing runtime skips its rows, named):
- ONNX Runtime GenAI (`llm_genai.py`): fp32 and the GenAI model builder's int4 (RTN, block 32), from the
  same fp32 Hugging Face folder; ours: `int4-g128-gptq-recon` (GPTQ + block reconstruction, head int8 per
  row) and `int8-weight-only`, written by `modelpress.deploy.genai.export_genai`.
- OpenVINO GenAI (`llm_openvino.py`), llama.cpp (`llm_llamacpp.py`) where installed.
- `mp-int4-gptq-recon-head4` (both runtimes): the same int4 body with the tied embedding / head int4 g32 asym
  too (GPTQ on the float head with the body's final hidden states): faster decode, worse perplexity
  (`smollm2-generate-head4.json`).
- `mp-int4-gptq-recon-g64-head4g32-emb8`: the body at group 64, the head int4 g32 (GPTQ with act_order, clip
  search and refit) beside the body's int8 embedding (`smollm2-generate-emb8.json`); `mp-int4-gptq-lm`: the
  same scheme from the built-in recipe `int4-gptq-lm` alone (`smollm2-generate-lm.json`);
  `mp-int4-gptq-lm-mixed`: the recipe `int4-gptq-lm-mixed` (down_proj and the head int8 per row).

Protocol (issue 32): 2 threads, batch 1, a 128-token prompt and 128 new tokens, greedy, every engine timed
in turn within each round (A, B, C, A, B, C...), medians over the rounds; peak RSS of a fresh process per
engine that loads it and generates once; perplexity over the first 32,768 tokens of the enwiki sample in
1024-token windows, the benchmark's evaluation text, each window from an empty cache, on the artifact.
The builds are cached under --work (delete a folder to rebuild it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import assets  # noqa: E402
import llm_engines  # noqa: E402

PPL_TOKENS = 32768
WINDOW = 1024
CALIB_WINDOWS = 128  # 512-token windows after the evaluated text and a 1024-token gap (as benchmarks/run.py)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _hf_folder(work: Path) -> Path:
    folder = work / "smollm2-hf"
    if not (folder / "model.safetensors").exists():
        model, tokenizer = assets.smollm2()
        model.hf_quantizer = None  # loaded from gguf: the dequantized fp32 weights save as a plain checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def _builder(hf: Path, out: Path, precision: str) -> None:
    import subprocess

    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
    subprocess.run([*cmd, "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")], check=True)


def _compressed(work: Path, name: str) -> tuple[Any, Any, float]:
    """Our compressed SmolLM2 (torch), built once and kept as `work/name.pt` for every export of it."""
    import modelpress as mp

    lm, tokenizer = assets.smollm2()
    saved = work / f"{name}.pt"
    if saved.exists():
        blob = torch.load(saved, weights_only=False)
        return blob["model"], tokenizer, blob["compress_s"]
    if name == "mp-int4-gptq-recon" and (work / name / "modelpress-build.json").exists():
        # built before the torch model was kept (GPTQ takes ~10 min; the int8 recipe is rebuilt in seconds)
        build_s = json.loads((work / name / "modelpress-build.json").read_text())["compress_s"]
        lm = _from_genai(work / name)
        torch.save({"model": lm, "compress_s": build_s}, saved)
        return lm, tokenizer, build_s
    t0 = time.perf_counter()
    if name in BODY_GROUP:
        model = assets.LogitsOnly(lm).eval()
        ids = assets.wiki_tokens(tokenizer, PPL_TOKENS + 1024 + 512 * CALIB_WINDOWS)[PPL_TOKENS + 1024 :]
        calibration = [(ids[i : i + 512].unsqueeze(0),) for i in range(0, 512 * CALIB_WINDOWS, 512)]
        recipe = [
            mp.GPTQConfig(
                bits=4,
                group_size=BODY_GROUP[name],
                symmetric=False,
                targets=(r"re:.*\.layers\.\d+\..*",),
                calibration_batches=CALIB_WINDOWS,
                reconstruct_epochs=1,
                reconstruct_lr=2e-3,
            ),
            mp.WeightOnlyConfig(bits=8, layers=("linear", "embedding")),
        ]
        lm = mp.compress(model, recipe, calibration).lm
    elif name in RECIPES:  # a built-in recipe: what a user gets from `compress --recipe`
        ids = assets.wiki_tokens(tokenizer, PPL_TOKENS + 1024 + 512 * CALIB_WINDOWS)[PPL_TOKENS + 1024 :]
        calibration = [(ids[i : i + 512].unsqueeze(0),) for i in range(0, 512 * CALIB_WINDOWS, 512)]
        lm = mp.compress(assets.LogitsOnly(lm).eval(), name.removeprefix("mp-"), calibration).lm
    elif name == "mp-int8":
        lm = mp.compress(lm, "int8-weight-only")
    elif name in HEAD4:
        lm = _head4(work, name, lm)
    else:
        raise ValueError(name)
    compress_s = time.perf_counter() - t0
    torch.save({"model": lm, "compress_s": compress_s}, saved)
    return lm, tokenizer, compress_s


# our int4 bodies (GPTQ + reconstruction, head int8 per row) by group size: OpenVINO's u4 kernel decodes
# SmolLM2 at g64 as fast as NNCF's file (143 vs 145 tok/s, RTN files of both sizes) and at g128 ~18% slower
BODY_GROUP = {"mp-int4-gptq-recon": 128, "mp-int4-gptq-recon-g64": 64}
# built-in recipes built as they are (`mp.compress(model, name)` on the calibration windows)
RECIPES = ("mp-int4-gptq-lm", "mp-int4-gptq-lm-mixed")
# name -> (body, group size, symmetric, own embedding, tuned) of an int4 head on that body: the embedding
# reads the head's int4 codes, or (own embedding) keeps the body's int8 table (stored beside the head's);
# tuned: GPTQ with act_order, clip search and scale refit
HEAD4 = {
    "mp-int4-gptq-recon-head4": ("mp-int4-gptq-recon", 32, False, False, False),
    "mp-int4-gptq-recon-g64-head4g16": ("mp-int4-gptq-recon-g64", 16, False, False, False),
    "mp-int4-gptq-recon-g64-head4g32-emb8": ("mp-int4-gptq-recon-g64", 32, False, True, True),
}


def _head4(work: Path, name: str, float_lm: Any) -> Any:
    """An int4 body (HEAD4's source) with its tied embedding / head int4 too: GPTQ on the float head, its
    Hessian from the final hidden states of the int4 body over the calibration windows, and the embedding
    reading the head's codes (stored once)."""
    import copy

    from torch import nn

    from modelpress.ops.gptq import gptq_quantize
    from modelpress.techniques.quantized import GroupQuantizedEmbedding, GroupQuantizedLinear

    source, group, symmetric, own_embedding, tuned = HEAD4[name]
    body, tokenizer, _ = _compressed(work, source)
    lm = copy.deepcopy(body).eval()
    weight = float_lm.model.embed_tokens.weight.detach().float()
    ids = assets.wiki_tokens(tokenizer, PPL_TOKENS + 1024 + 512 * CALIB_WINDOWS)[PPL_TOKENS + 1024 :]
    hessian = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, 512 * CALIB_WINDOWS, 512):
            h = lm.model(input_ids=ids[i : i + 512].unsqueeze(0)).last_hidden_state[0].double()
            hessian += h.T @ h
    codes, scale, zero_point = gptq_quantize(
        weight,
        hessian.float(),
        bits=4,
        group_size=group,
        symmetric=symmetric,
        act_order=tuned,
        clip_search=tuned,
        refit=tuned,
    )
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight = nn.Parameter(weight.clone(), requires_grad=False)
    lm.lm_head = GroupQuantizedLinear.from_codes(
        head, codes=codes, scale=scale, zero_point=zero_point, bits=4, group_size=group
    )
    if own_embedding:  # the body's int8 table stays (export_genai stores it beside the head's)
        return lm
    table = nn.Embedding(*weight.shape)
    table.weight = nn.Parameter(weight.clone(), requires_grad=False)
    emb = GroupQuantizedEmbedding(table, bits=4, group_size=group, symmetric=symmetric)
    emb.packed = lm.lm_head.packed.reshape(weight.shape[0], -1)  # the head's codes: one table, tied
    emb.scales = lm.lm_head.scales.reshape(weight.shape[0], -1)
    emb.zero_points = (
        None if lm.lm_head.zero_points is None else lm.lm_head.zero_points.reshape(weight.shape[0], -1)
    )
    lm.model.embed_tokens = emb
    return lm


def _from_genai(folder: Path) -> Any:
    """Our compressed SmolLM2 rebuilt in torch from the codes of its ONNX Runtime GenAI folder (exactly: the
    MatMulNBits codes, scales and zero points become the same GroupQuantizedLinear / int8 per-row layers), for
    a folder built before the torch model was kept beside it."""
    import onnx
    from onnx import helper, numpy_helper

    import modelpress as mp
    from modelpress.ops.nbits import unpack_blocks
    from modelpress.techniques.quantized import GroupQuantizedLinear

    lm, _ = assets.smollm2()
    lm.hf_quantizer = None
    graph = onnx.load(str(folder / "model.onnx")).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    head: tuple[torch.Tensor, torch.Tensor] | None = None
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        zp = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        codes, zps = unpack_blocks(
            inits[node.input[1]], zp, k=a["K"], bits=a["bits"], block_size=a["block_size"]
        )
        scales = inits[node.input[2]].reshape(a["N"], -1)
        if node.name.startswith("/lm_head/"):
            if zp is not None or a["bits"] != 8:
                raise ValueError("_from_genai rebuilds a symmetric int8 per-row head only")
            head = (codes - zps[:, :1], scales[:, 0])  # int8 per row: every block of a row shares them
            continue
        layer, part, proj = node.name.split("/")[2:5]
        names = ["q_proj", "k_proj", "v_proj"] if proj == "qkv_proj" else [proj]
        prefix = f"model.{layer}.{'self_attn' if part == 'attn' else 'mlp'}"
        start = 0
        for n in names:
            inner = lm.get_submodule(f"{prefix}.{n}")
            rows = slice(start, start + inner.out_features)
            start += inner.out_features
            new = GroupQuantizedLinear(
                inner,
                codes[rows],
                scales[rows],
                None if zp is None else zps[rows],
                bits=a["bits"],
                group_size=a["block_size"],
            )
            lm.set_submodule(f"{prefix}.{n}", new)
    assert head is not None
    q, scale = head
    lm.model.embed_tokens.weight.data = (q.float() * scale[:, None]).contiguous()
    lm = mp.compress(
        lm,
        [
            mp.WeightOnlyConfig(
                bits=8, layers=("linear", "embedding"), targets=("lm_head", "model.embed_tokens")
            )
        ],
    )
    lm.lm_head.qweight.copy_(q.to(torch.int8))  # the embedding shares these tensors (tied)
    lm.lm_head.scale.copy_(scale)
    return lm


def _ours(work: Path, name: str) -> Path:
    """Our compressed SmolLM2 as an ONNX Runtime GenAI folder (built once, cached)."""
    from modelpress.deploy.genai import export_genai

    out = work / name
    if (out / "genai_config.json").exists():
        return out
    # "-level0": the same weights with MatMulNBits computing in fp32 (accuracy_level 0; default 4 quantizes
    # the inputs to int8 per block)
    # "-b16" / "-b32": int8 per-row layers in MatMulNBits blocks of 16 / 32 (the inputs quantized per block)
    source, block = name.removesuffix("-level0"), None
    for size in (16, 32):
        if source.endswith(f"-b{size}"):
            source, block = source.removesuffix(f"-b{size}"), size
    if source.endswith("-bdown16"):  # down_proj (the MLP's outlier inputs) per 16, the rest per 32
        source, block = source.removesuffix("-bdown16"), {"down_proj": 16, "": 32}
    lm, tokenizer, compress_s = _compressed(work, source)
    level = 0 if name.endswith("-level0") else 4
    result = export_genai(lm, tokenizer, out, progress=_log, accuracy_level=level, int8_block=block)
    for line in result.notes():
        _log(f"{name}: {line}")
    (out / "modelpress-build.json").write_text(
        json.dumps(
            {
                "compress_s": compress_s,
                "checks": [c.line() for c in result.checks],
                "quantized": result.quantized,
                "float_matmuls": result.float_matmuls,
            },
            indent=1,
        )
    )
    return out


def _ov_folder(work: Path, name: str) -> Path | None:
    """An OpenVINO GenAI folder: ours (`export_openvino_genai`) or NNCF int4 through optimum-intel."""
    out = work / name
    if (out / "openvino_model.xml").exists():
        return out
    if name == "ov-nncf-int4":
        venv = Path(os.environ.get("OV_PEER_VENV", Path.home() / ".cache/modelpress/venv-ovpeer"))
        cli = venv / "bin" / "optimum-cli"
        if not cli.exists():
            _log(f"skipping {name}: no optimum-intel (OV_PEER=1 bash benchmarks/setup.sh)")
            return None
        import subprocess

        hf = _hf_folder(work)
        # optimum-cli's default int4 group (128) fails on SmolLM2's width 576 (NNCF 3.4 has no fallback that
        # works here); 64 divides it. NNCF keeps the tied embedding/head int8.
        subprocess.run(
            [
                str(cli),
                "export",
                "openvino",
                "-m",
                str(hf),
                "--task",
                "text-generation-with-past",
                "--weight-format",
                "int4",
                "--group-size",
                "64",
                str(out),
            ],
            check=True,
        )
        return out
    from modelpress.deploy.ovgenai import export_openvino_genai

    source = name.removeprefix("ov-")
    if source == "fp32":
        lm, tokenizer = assets.smollm2()
        lm.hf_quantizer = None
    else:
        lm, tokenizer, _ = _compressed(work, source)
    report = export_openvino_genai(lm, tokenizer, out)
    for c in report.checks:
        _log(f"{name}: {c.prompt!r}: first divergence {c.first_divergence}, logit gap {c.logit_gap}")
    return out


def build(work: Path, only: set[str] | None = None) -> dict[str, tuple[str, str]]:
    """name -> (engine module, path) of every artifact this run measures (those in `only`, where given);
    a runtime that is not installed skips its rows (logged)."""
    import importlib.util

    work.mkdir(parents=True, exist_ok=True)
    hf = _hf_folder(work)
    found: dict[str, tuple[str, str]] = {}

    def wanted(name: str) -> bool:
        return only is None or name in only

    for name, precision in (("genai-fp32", "fp32"), ("genai-builder-int4", "int4")):
        if not wanted(name):
            continue
        out = work / name
        if not (out / "genai_config.json").exists():
            _log(f"building {name} with the GenAI model builder")
            _builder(hf, out, precision)
        found[name] = ("llm_genai", str(out))
    for name in (
        *BODY_GROUP,
        *HEAD4,
        *RECIPES,
        "mp-int8",
        "mp-int8-level0",
        "mp-int8-b16",
        "mp-int8-b32",
        "mp-int8-bdown16",
    ):
        if not wanted(name):
            continue
        _log(f"building {name}")
        found[name] = ("llm_genai", str(_ours(work, name)))
    if importlib.util.find_spec("openvino_genai") is not None:
        ours = (*(f"ov-{n}" for n in (*BODY_GROUP, *HEAD4, *RECIPES)), "ov-mp-int8")
        for name in ("ov-fp32", *ours, "ov-nncf-int4"):
            if not wanted(name):
                continue
            _log(f"building {name}")
            folder = _ov_folder(work, name)
            if folder is not None:
                found[name] = ("llm_openvino", str(folder))
    else:
        _log("skipping OpenVINO GenAI rows: openvino-genai is not installed")
    if importlib.util.find_spec("llama_cpp") is not None:
        import llm_llamacpp

        if only is None or any(n.startswith("llamacpp-") for n in only):
            for kind, path in llm_llamacpp.smollm2_ggufs(work / "gguf").items():
                if wanted(f"llamacpp-{kind}"):
                    found[f"llamacpp-{kind}"] = ("llm_llamacpp", str(path))
    else:
        _log("skipping llama.cpp rows: LLAMA_CPP=1 bash benchmarks/setup.sh builds llama-cpp-python")
    return found


def _peak_rows(rows: dict[str, dict[str, Any]], prompt: list[int], threads: int) -> None:
    for name, row in rows.items():
        row.update(llm_engines.peak_memory(row["engine"], name, row["path"], prompt, 128, threads))
    base = rows.get("genai-fp32")
    for row in rows.values():
        if base:
            row["peak_rss_vs_fp32"] = row["peak_rss_bytes"] / base["peak_rss_bytes"]


def _remeasure_peaks(path: Path, threads: int) -> None:
    result = json.loads(path.read_text())
    tokenizer = assets.smollm2()[1]
    prompt = assets.wiki_tokens(tokenizer, 128).tolist()
    _peak_rows(result["rows"], prompt, threads)
    result.setdefault("notes", []).append(
        "peak_rss re-measured with `--peak-only` (VmHWM of each child): the first pass read ru_maxrss, which "
        "a child inherits from its large parent"
    )
    path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/llm-bench", help="cache of the built folders")
    parser.add_argument("--json", dest="json_out", help="write the results here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ppl-tokens", type=int, default=PPL_TOKENS)
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--only", help="comma-separated engine names to build and measure (default: all)")
    parser.add_argument(
        "--peak-only",
        help="re-measure only the peak memory of the rows of this result JSON (rewritten in place)",
    )
    args = parser.parse_args()
    if args.peak_only:
        _remeasure_peaks(Path(args.peak_only), args.threads)
        return
    work = Path(args.work)
    engines = build(work, set(args.only.split(",")) if args.only else None)
    if args.build_only:
        return
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and any(
        module == "llm_llamacpp" for module, _ in engines.values()
    ):  # llama.cpp's OpenMP threads then sleep at every barrier: measured 3.5x slower decode (2026-12-07)
        sys.exit(
            "unset OMP_WAIT_POLICY=PASSIVE for llama.cpp rows: its OpenMP threads would sleep at every op"
        )
    tokenizer = assets.smollm2()[1]
    ids = assets.wiki_tokens(tokenizer, args.ppl_tokens).tolist()
    windows = [ids[s : s + WINDOW] for s in range(0, len(ids), WINDOW)]
    prompt = ids[:128]
    rows: dict[str, dict[str, Any]] = {}
    opened = {}
    for name, (module, path) in engines.items():
        opened[name] = llm_engines.open_engine(module, name, path, args.threads)
        rows[name] = {"engine": module, "path": path, "file_bytes": opened[name].file_bytes()}
    for engine in opened.values():
        engine.generate(prompt, 8)  # warm-up
    decode: dict[str, list[float]] = {n: [] for n in opened}
    prefill: dict[str, list[float]] = {n: [] for n in opened}
    for r in range(args.rounds):
        for name, engine in opened.items():
            time.sleep(0.3)  # the previous runtime's worker threads stop spinning before this one starts
            timing = engine.generate(prompt, 128)
            decode[name].append(timing.decode_tok_s)
            prefill[name].append(len(prompt) / timing.prefill_s)
            rows[name]["tokens"] = timing.tokens[:32]
        _log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {decode[n][-1]:.1f}" for n in opened))
    for name, engine in opened.items():
        rows[name]["decode_tok_s"] = statistics.median(decode[name])
        rows[name]["decode_tok_s_rounds"] = decode[name]
        rows[name]["prefill_tok_s"] = statistics.median(prefill[name])
        _log(f"perplexity of {name}")
        rows[name]["perplexity"] = llm_engines.perplexity(engine, windows)
        engine.close()
    del opened
    _peak_rows(rows, prompt, args.threads)
    base = rows.get("genai-fp32")
    for row in rows.values():
        if base:
            row["decode_vs_fp32"] = row["decode_tok_s"] / base["decode_tok_s"]
            row["file_vs_fp32"] = row["file_bytes"] / base["file_bytes"]
        build_json = Path(row["path"]) / "modelpress-build.json"
        if build_json.exists():
            row["build"] = json.loads(build_json.read_text())
    result = {
        "command": " ".join(sys.argv),
        "environment": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "load_avg_start_end": os.getloadavg(),
            "torch": torch.__version__,
        },
        "protocol": f"batch 1, prompt 128 tokens, 128 new tokens greedy, median of {args.rounds} interleaved "
        f"rounds; perplexity over {len(ids)} tokens in {WINDOW}-token windows on the artifact",
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
