#!/usr/bin/env python
"""Benchmark modelpress on the three real assets (see shared ASSETS.md / MEASURING.md).

    python benchmarks/run.py {mnist,minilm,smollm2} --json OUT [--rounds N] [--quick] [--overwrite]
                             [--methods fp32,int8-weight-only]

For one asset: profile the fp32 torch model, build each method's torch model, export it to ONNX (the
library's `export_onnx`, into a temporary folder), and for each runtime the method targets:
check parity of the artifact against the torch model it was exported from, measure quality and
fidelity (agreement with the fp32 torch model) ON THE ARTIFACT in that runtime, then time all
artifacts interleaved against the fp32 ONNX Runtime baseline (`compare_artifacts`, threads=2), with
size and peak RSS. The JSON is written atomically; a compact table goes to stdout.

Adding a method = one `Method` entry in METHODS (a build function returning the torch model it exports,
or later, for peer tools, an artifact path directly).
"""

from __future__ import annotations

import os

# Before torch / onnxruntime / openvino load: OpenMP threads must not spin while another runtime runs.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import assets
import numpy as np
import torch
from torch import nn

import modelpress as mp
from modelpress._files import file_size, write_text_atomic
from modelpress.environment import environment

THREADS = 2
BASELINE = "fp32/onnxruntime"
ASSETS = ("mnist", "minilm", "smollm2")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Assets: model, inputs, metrics
# ------------------------------------------------------------------------------------------------


class CachedReference:
    """The fp32 torch model as a predictor that computes each item's output once (reused for every row).

    Keyed by the identity of the input tensors: the evaluation items are built once and kept alive.
    """

    def __init__(self, model: nn.Module) -> None:
        self.predict = mp.as_predictor(model)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        key = tuple(id(t) for t in inputs)
        if key not in self.cache:
            self.cache[key] = self.predict(inputs)
        return self.cache[key]


@dataclass
class Asset:
    name: str
    model: nn.Module  # fp32 torch model; one tensor output
    example_inputs: tuple[torch.Tensor, ...]  # export + profile inputs
    parity_samples: list[tuple[torch.Tensor, ...]]
    quality_metric: str
    quality: Callable[[Any], float]  # target: nn.Module or runtime session
    fidelity: Callable[[Any], dict[str, float]]  # agreement with the fp32 torch model
    bench_batches: dict[str, list[np.ndarray]]
    higher_is_better: bool = True
    profile_extra: Callable[[mp.Profile], dict[str, Any]] = lambda p: {}
    notes: list[str] = field(default_factory=list)
    # model inputs for calibration, disjoint from the evaluation data; empty: no calibrated method runs
    calibration: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def mnist_asset(quick: bool) -> Asset:
    model = assets.mnist_model()
    x, y = assets.mnist_data("test")
    x_train, _ = assets.mnist_data("train")  # calibration comes from the training split
    n = 2000 if quick else len(x)
    eval_items = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]
    ref = CachedReference(model)
    return Asset(
        name="mnist",
        model=model,
        example_inputs=(x[:1],),
        parity_samples=[(x[:1],), (x[1:65],), (x[1000:1064],), (x[5000:5256],)],
        quality_metric=f"top-1 accuracy, MNIST test ({n} images)",
        quality=lambda target: mp.accuracy(target, eval_items),
        fidelity=lambda target: mp.output_fidelity(target, ref, eval_items, labeled=True),
        bench_batches={"b1": [x[:1].numpy()], "b64": [x[:64].numpy()]},
        calibration=[(x_train[i : i + 32],) for i in range(0, 1024, 32)],
    )


def _bert_analytic_macs(*, layers: int, hidden: int, ffn: int, seq: int) -> int:
    """Encoder MACs per sequence: Q,K,V,O projections + FFN + attention scores and weighted sum."""
    per_layer = 4 * seq * hidden * hidden + 2 * seq * hidden * ffn + 2 * seq * seq * hidden
    return layers * per_layer


def minilm_asset(quick: bool) -> Asset:
    model, tokenizer = assets.minilm()
    lee = assets.lee_corpus()
    lee_items = [tuple(assets.minilm_tokenize(tokenizer, lee[i : i + 16]).values()) for i in range(0, 50, 16)]
    all_sentences = assets.lee_background(split_sentences=True)
    background = all_sentences[: 128 if quick else 1024]
    calib_sentences = all_sentences[1024 : 1024 + 256]
    bg_items = [
        tuple(assets.minilm_tokenize(tokenizer, background[i : i + 32]).values())
        for i in range(0, len(background), 32)
    ]
    ref = CachedReference(model)

    def embed_with(target: Any) -> Callable[[list[str]], np.ndarray]:
        predict = mp.as_predictor(target)

        def embed(texts: list[str]) -> np.ndarray:
            out = []
            for i in range(0, len(texts), 16):
                enc = assets.minilm_tokenize(tokenizer, texts[i : i + 16])
                out.append(predict((enc["input_ids"], enc["attention_mask"])).numpy())
            return np.concatenate(out)

        return embed

    def fidelity(target: Any) -> dict[str, float]:
        parts = {
            "lee_docs": (mp.output_fidelity(target, ref, lee_items), 50),
            "lee_background_sentences": (mp.output_fidelity(target, ref, bg_items), len(background)),
        }
        total = sum(n for _, n in parts.values())
        return {
            "mean_cosine": sum(f["mean_cosine"] * n for f, n in parts.values()) / total,
            "min_cosine": min(f["min_cosine"] for f, _ in parts.values()),
            **{f"{k}_mean_cosine": f["mean_cosine"] for k, (f, _) in parts.items()},
            "items": total,
        }

    seq = 128
    docs = assets.lee_background()
    b1 = assets.sentence_batches(docs[:1], tokenizer, 1, seq)[0]
    b16 = assets.sentence_batches(docs[:16], tokenizer, 16, seq)[0]
    as_np = lambda b: [b["input_ids"].numpy(), b["attention_mask"].numpy()]  # noqa: E731

    def profile_extra(p: mp.Profile) -> dict[str, Any]:
        cfg: Any = getattr(model.encoder, "config")  # noqa: B009
        analytic = _bert_analytic_macs(
            layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, ffn=cfg.intermediate_size, seq=seq
        )
        return {
            "seq": seq,
            "batch": 1,
            "analytic_macs": analytic,
            "analytic_formula": "layers * (4*s*h*h + 2*s*h*ffn + 2*s*s*h), "
            f"layers={cfg.num_hidden_layers}, h={cfg.hidden_size}, ffn={cfg.intermediate_size}, s={seq}",
            "macs_over_analytic": p.macs / analytic,
        }

    return Asset(
        name="minilm",
        model=model,
        example_inputs=(b1["input_ids"], b1["attention_mask"]),
        parity_samples=[lee_items[0], lee_items[-1], bg_items[0], (b1["input_ids"], b1["attention_mask"])],
        quality_metric="Lee corpus Pearson r (embedding cosine vs human ratings, 1225 pairs)",
        quality=lambda target: assets.lee_pearson(embed_with(target)),
        fidelity=fidelity,
        bench_batches={"b1": as_np(b1), "b16": as_np(b16)},
        profile_extra=profile_extra,
        # Background sentences after the ones fidelity is measured on: calibration never sees eval text.
        calibration=[
            tuple(assets.minilm_tokenize(tokenizer, calib_sentences[i : i + 8]).values())
            for i in range(0, len(calib_sentences), 8)
        ],
    )


class LogitsOnly(nn.Module):
    """A causal LM as ids (B, T) -> logits (B, T, V): no KV cache, no attention mask (batch 1, unpadded)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def smollm2_asset(quick: bool) -> Asset:
    lm, tokenizer = assets.smollm2()
    model = LogitsOnly(lm).eval()
    n_tokens, window = (2048 if quick else 8192), 1024
    ids = assets.wiki_tokens(tokenizer, n_tokens)
    windows = [
        ids[s : s + window].unsqueeze(0) for s in range(0, len(ids), window) if len(ids[s : s + window]) >= 2
    ]
    ref = CachedReference(model)
    prefill = ids[:128].unsqueeze(0)
    return Asset(
        name="smollm2",
        model=model,
        example_inputs=(prefill,),
        parity_samples=[
            (prefill,),
            (ids[200:500].unsqueeze(0),),
            (torch.stack([ids[600:664], ids[700:764]]),),
        ],
        quality_metric=f"perplexity, first {len(ids)} tokens of gensim's enwiki sample, windows of {window}",
        higher_is_better=False,
        quality=lambda target: mp.perplexity(target, windows),
        fidelity=lambda target: mp.output_fidelity(target, ref, windows),
        bench_batches={"b1": [prefill.numpy()]},  # prefill of 128 tokens, batch 1
    )


ASSET_BUILDERS: dict[str, Callable[[bool], Asset]] = {
    "mnist": mnist_asset,
    "minilm": minilm_asset,
    "smollm2": smollm2_asset,
}


# ------------------------------------------------------------------------------------------------
# Methods
# ------------------------------------------------------------------------------------------------


@dataclass
class Built:
    model: nn.Module | None  # the torch model the artifact is exported from (parity reference)
    path: Path | None = None  # set by build functions that produce the artifact themselves (peer tools)
    wall_s: float = 0.0  # time to compress
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    name: str
    by: str  # "modelpress" or the peer tool's name
    runtimes: tuple[str, ...]
    build: Callable[[Asset], Built]
    needs_calibration: bool = False  # skipped on assets that define no calibration data


def build_fp32(asset: Asset) -> Built:
    return Built(model=asset.model)


def build_recipe(recipe: Any) -> Callable[[Asset], Built]:
    def build(asset: Asset) -> Built:
        start = time.perf_counter()
        small = mp.compress(asset.model, recipe, asset.calibration or None)
        return Built(model=small, wall_s=time.perf_counter() - start)

    return build


METHODS: dict[str, Method] = {
    "fp32": Method("fp32", "modelpress", ("onnxruntime", "openvino"), build_fp32),
    "int8-weight-only": Method(
        "int8-weight-only", "modelpress", ("onnxruntime", "openvino"), build_recipe("int8-weight-only")
    ),
    # Static W8A8 (minmax ranges) on Linear/Conv inputs, int8 weights for embeddings: the shipped recipe.
    "int8-static": Method(
        "int8-static",
        "modelpress",
        ("onnxruntime", "openvino"),
        build_recipe("int8-static"),
        needs_calibration=True,
    ),
    # The same with SmoothQuant (alpha 0.75) on Linear inputs, for models with outlier features.
    "int8-static-smooth": Method(
        "int8-static-smooth",
        "modelpress",
        ("onnxruntime", "openvino"),
        build_recipe(
            [
                mp.StaticInt8Config(smooth_alpha=0.75),
                mp.WeightOnlyConfig(layers=("embedding",)),
            ]
        ),
        needs_calibration=True,
    ),
}


# ------------------------------------------------------------------------------------------------
# Measuring
# ------------------------------------------------------------------------------------------------


def profile_summary(p: mp.Profile, top: int = 5) -> dict[str, Any]:
    d = p.to_dict()
    layers = d.pop("layers")
    d["layer_count"] = len(layers)
    d["top_layers_by_macs"] = [
        {k: layer[k] for k in ("name", "type", "params", "macs", "latency_ms")}
        for layer in sorted(layers, key=lambda layer: -layer["macs"])[:top]
    ]
    return d


def linear_bytes(p: mp.Profile) -> int:
    """Bytes held by Linear layers (plain or wrapped by a quantizer: type '...(Linear)')."""
    return sum(layer.bytes for layer in p.layers if layer.type == "Linear" or layer.type.endswith("(Linear)"))


def parity_dict(report: mp.ParityReport) -> dict[str, Any]:
    worst = report.worst
    return {
        "passed": report.passed,
        "samples": report.samples,
        "worst_output": worst.name,
        "min_cosine": worst.min_cosine,
        "mean_cosine": worst.cosine,
        "max_abs": max(o.max_abs for o in report.outputs),
        "top1": worst.top1_agreement,
        # artifact vs torch model, each against the uncompressed model (mean cosine); None for fp32 rows
        "artifact_fidelity": worst.artifact_fidelity,
        "torch_fidelity": worst.torch_fidelity,
    }


def git_state() -> dict[str, Any]:
    src = Path(mp.__file__).resolve()
    try:
        root = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=src.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"modelpress_path": str(src.parent), "commit": commit, "src_dirty": bool(dirty)}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"modelpress_path": str(src.parent), "commit": None, "src_dirty": None}


def run(asset_name: str, *, rounds: int, quick: bool, methods: Sequence[str], memory: bool) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    t_start = time.perf_counter()
    source = git_state()  # read before anything runs: the code measured is the code imported now
    say(f"loading {asset_name}")
    asset = ASSET_BUILDERS[asset_name](quick)

    say("profiling the fp32 model")
    base_profile = mp.profile(asset.model, asset.example_inputs, repeats=3 if quick else 10)
    say("quality of the fp32 torch model")
    base_quality_torch = asset.quality(asset.model)

    rows: list[dict[str, Any]] = []
    artifacts: dict[str, tuple[Path, str]] = {}
    method_info: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=f"modelpress-bench-{asset_name}-") as tmp:
        for name in methods:
            method = METHODS[name]
            if method.needs_calibration and not asset.calibration:
                say(f"[{name}] skipped: {asset_name} defines no calibration data")
                continue
            say(f"[{name}] building")
            built = method.build(asset)
            info: dict[str, Any] = {"wall_s": built.wall_s, **built.extra}
            if built.model is not None and name != "fp32":
                say(f"[{name}] quality of the torch model")
                info["quality_torch"] = asset.quality(built.model)
                if asset_name == "smollm2":
                    p = mp.profile(built.model, asset.example_inputs, repeats=1)
                    info["linear_bytes"] = linear_bytes(p)
                    info["linear_size_ratio"] = info["linear_bytes"] / linear_bytes(base_profile)
                    info["profile_bytes_by_dtype"] = p.bytes_by_dtype
            path = built.path
            if path is None:
                assert built.model is not None
                say(f"[{name}] exporting to ONNX")
                start = time.perf_counter()
                path = mp.export_onnx(built.model, asset.example_inputs, Path(tmp) / f"{name}.onnx")
                info["export_s"] = time.perf_counter() - start
            info["size_bytes"] = file_size(path)
            method_info[name] = info
            for runtime in method.runtimes:
                key = f"{name}/{runtime}"
                say(f"[{key}] parity, quality, fidelity")
                session = mp.open_session(path, runtime, threads=THREADS)
                row: dict[str, Any] = {"method": name, "by": method.by, "runtime": runtime}
                if built.model is not None:
                    report = mp.check_parity(
                        built.model,
                        session,
                        asset.parity_samples,
                        reference=asset.model if name != "fp32" else None,
                        raise_on_failure=False,
                    )
                    row["parity"] = parity_dict(report)
                    if not report.passed:
                        say(f"[{key}] PARITY FAILED: {report.message}")
                start = time.perf_counter()
                row["quality"] = asset.quality(session)
                row["quality_metric"] = asset.quality_metric
                row["quality_s"] = time.perf_counter() - start
                row["fidelity"] = asset.fidelity(session)
                row["wall_s"] = info["wall_s"]
                for k in ("quality_torch", "linear_size_ratio", "export_s"):
                    if k in info:
                        row[k] = info[k]
                del session
                rows.append(row)
                artifacts[key] = (path, runtime)
            if built.model is not None and built.model is not asset.model:
                del built

        say(f"benchmarking {len(artifacts)} artifacts interleaved ({rounds} rounds, threads={THREADS})")
        bench = mp.compare_artifacts(
            artifacts,
            asset.bench_batches,
            baseline=BASELINE,
            threads=THREADS,
            rounds=rounds,
            memory=memory,
            progress=say,
        )
    for row in rows:
        b = bench[f"{row['method']}/{row['runtime']}"]
        row["size_bytes"] = b.size_bytes
        row["size_ratio"] = b.size_ratio
        row["latency_ratio"] = {k: t.ratio for k, t in b.latency.items()}
        row["latency_ratio_p10_p90"] = {k: [t.ratio_p10, t.ratio_p90] for k, t in b.latency.items()}
        row["latency_ms"] = {k: t.median_ms for k, t in b.latency.items()}
        row["peak_rss_mb"] = b.peak_rss_mb

    fp32_row = next(r for r in rows if f"{r['method']}/{r['runtime']}" == BASELINE)
    result: dict[str, Any] = {
        "asset": asset_name,
        "command": shlex.join([sys.executable, *sys.argv]),
        "quick": quick,
        "environment": {
            **environment(),
            "threads": THREADS,
            "torch_threads": torch.get_num_threads(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "rounds": rounds,
            "modelpress_source": source,
        },
        "baseline": {
            "quality": fp32_row["quality"],
            "quality_torch": base_quality_torch,
            "quality_metric": asset.quality_metric,
            "higher_is_better": asset.higher_is_better,
            "size_bytes": fp32_row["size_bytes"],
            "params": base_profile.params,
            "macs": base_profile.macs,
            "profile": {**profile_summary(base_profile), **asset.profile_extra(base_profile)},
        },
        "methods": method_info,
        "rows": rows,
        "notes": asset.notes,
    }
    result["acceptance"] = acceptance(result)
    result["total_wall_s"] = time.perf_counter() - t_start
    return result


def acceptance(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's acceptance criteria for this asset, each with its figure and whether it holds."""
    checks: list[dict[str, Any]] = []
    if result["asset"] != "minilm":
        return checks
    rows = {f"{r['method']}/{r['runtime']}": r for r in result["rows"]}
    base = result["baseline"]
    prof = base["profile"]

    def check(name: str, value: float, op: str, bound: float) -> None:
        ok = {"<=": value <= bound, ">=": value >= bound}[op]
        checks.append({"criterion": name, "value": value, "op": op, "bound": bound, "pass": bool(ok)})

    int8 = rows.get("int8-weight-only/onnxruntime")
    if int8 is not None:
        check("int8 weight-only ONNX size / fp32 ONNX size", int8["size_ratio"], "<=", 0.27)
        for rt in ("onnxruntime", "openvino"):
            r = rows.get(f"int8-weight-only/{rt}")
            if r is not None:
                check(
                    f"|Lee Pearson int8 ({rt}) - fp32 (onnxruntime)|",
                    abs(r["quality"] - base["quality"]),
                    "<=",
                    0.005,
                )
                check(
                    f"parity worst cosine, int8 artifact ({rt}) vs int8 torch",
                    r["parity"]["min_cosine"],
                    ">=",
                    0.999,
                )
    check(
        "profile params (M), 22.7M expected: |p - 22.7M| / 22.7M",
        abs(base["params"] / 22.7e6 - 1),
        "<=",
        0.005,
    )
    check("|profile MACs / analytic - 1| at seq 128", abs(prof["macs_over_analytic"] - 1), "<=", 0.02)
    return checks


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    batches = list(result["rows"][0]["latency_ratio"])
    head = [
        "method",
        "runtime",
        "quality",
        "fidelity",
        "size MB",
        "size x",
        *[f"lat {b}" for b in batches],
        *[f"ms {b}" for b in batches],
        "parity cos",
        "RSS MB",
    ]
    lines = [head]
    for r in result["rows"]:
        fid = r["fidelity"]
        fid_s = (
            f"top1 {fid['top1_agreement']:.4f}"
            if result["asset"] == "mnist"
            else f"cos {fid['mean_cosine']:.5f}"
        )
        if result["asset"] == "smollm2" and "top1_agreement" in fid:
            fid_s += f" top1 {fid['top1_agreement']:.3f}"
        q = r["quality"]
        lines.append(
            [
                r["method"],
                r["runtime"],
                f"{q:.4f}" if q < 10 else f"{q:.3f}",
                fid_s,
                f"{r['size_bytes'] / 1e6:.2f}",
                f"{r['size_ratio']:.3f}",
                *[f"{r['latency_ratio'][b]:.2f}" for b in batches],
                *[f"{r['latency_ms'][b]:.2f}" for b in batches],
                f"{r['parity']['min_cosine']:.6f}" if "parity" in r else "-",
                f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-",
            ]
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    out = [f"{result['asset']}: {result['baseline']['quality_metric']}"]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    base = result["baseline"]
    out.append(
        f"baseline: torch fp32 quality {base['quality_torch']:.4f}, params {base['params']:,}, MACs {base['macs']:,}"
    )
    for name, info in result["methods"].items():
        extra = ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in info.items()
            if k in ("wall_s", "export_s", "quality_torch", "linear_size_ratio")
        )
        out.append(f"  {name}: {extra}")
    prof = base["profile"]
    if "analytic_macs" in prof:
        out.append(
            f"MACs at seq {prof['seq']}: profile {base['macs']:,} vs analytic {prof['analytic_macs']:,} "
            f"(ratio {prof['macs_over_analytic']:.4f})"
        )
    for c in result["acceptance"]:
        out.append(
            f"  [{'PASS' if c['pass'] else 'FAIL'}] {c['criterion']}: {c['value']:.6g} {c['op']} {c['bound']}"
        )
    for n in result["notes"]:
        out.append(f"note: {n}")
    out.append(f"total wall {result['total_wall_s']:.0f} s")
    return "\n".join(out)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("asset", choices=ASSETS)
    parser.add_argument(
        "--json", required=True, help="output JSON path (refused if it exists, unless --overwrite)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 20, quick 5)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer rounds and evaluation samples")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {list(METHODS)} (fp32 always runs)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    out = Path(args.json)
    if out.exists() and not args.overwrite:
        parser.error(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        parser.error(f"folder {out.parent} does not exist")
    methods = ["fp32"] + [m for m in args.methods.split(",") if m and m != "fp32"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    rounds = args.rounds if args.rounds is not None else (5 if args.quick else 20)
    result = run(args.asset, rounds=rounds, quick=args.quick, methods=methods, memory=not args.no_memory)
    write_text_atomic(out, json.dumps(result, indent=2) + "\n", overwrite=args.overwrite)
    print(table(result))
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
