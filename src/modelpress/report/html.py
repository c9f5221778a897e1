"""A single self-contained HTML report (inline CSS, no script, no network) from a job's result dict."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from modelpress._files import write_text_atomic
from modelpress.analyse.profile import human_bytes, human_count

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.88rem;margin:.6rem 0}
th,td{padding:.3rem .55rem;border-bottom:1px solid #e6e8ee;text-align:right;white-space:nowrap}
th{background:#f4f6fa;font-weight:600}td:first-child,th:first-child{text-align:left}
td.l{text-align:left}.good{color:#0a7d32;font-weight:600}.bad{color:#b3261e;font-weight:600}
.muted{color:#667085;font-size:.85rem}.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #dde;border-radius:8px;padding:.7rem 1rem;min-width:150px}
.card b{display:block;font-size:1.4rem}.bar{background:#4f6bed;height:.6rem;border-radius:3px;display:inline-block}
code{background:#f4f6fa;padding:0 .25rem;border-radius:3px}.wrap{overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _ratio(r: float | None, *, lower_is_better: bool = True) -> str:
    if r is None:
        return "-"
    good = r < 0.97 if lower_is_better else r > 1.03
    bad = r > 1.03 if lower_is_better else r < 0.97
    cls = "good" if good else "bad" if bad else ""
    return f'<span class="{cls}">{r:.3f}x</span>'


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures a user looks for first, all from the exported artifacts in this run."""
    bench = result["bench"]
    base_key = (
        next(k for k in bench if k.startswith("fp32 onnxruntime"))
        if any(k.startswith("fp32 onnxruntime") for k in bench)
        else next(iter(bench))
    )
    compressed = {k: v for k, v in bench.items() if k.startswith("compressed")}
    batches = list(next(iter(compressed.values()))["latency"])
    # per batch size, the fastest compressed artifact (runtime) and its ratio
    best = {}
    for b in batches:
        name = min(compressed, key=lambda k: float(compressed[k]["latency"][b]["ratio"]))
        best[b] = (name, compressed[name])
    size_ratio = next(iter(compressed.values()))["size_ratio"]
    q = result.get("quality") or {}
    return {
        "baseline": base_key,
        "size_ratio": size_ratio,
        "size_bytes": next(iter(compressed.values()))["size_bytes"],
        "baseline_size_bytes": bench[base_key]["size_bytes"],
        "fastest": {b: kv[0] for b, kv in best.items()},
        "fastest_ratios": {b: kv[1]["latency"][b]["ratio"] for b, kv in best.items()},
        "quality": q,
        "parity_ok": all(p["passed"] for p in result["parity"]),
    }


# What each technique does to speed, said beside the measured figures.
TECHNIQUE_NOTES = {
    "weight_only": (
        "Weight-only quantization stores int8 weights (about 4x smaller) or packed int4 weights with a scale per "
        "group (about 7x smaller, run as MatMulNBits / GatherBlockQuantized) but computes in fp32: a runtime "
        "dequantizes the weights, once at load time or inside its kernel, so expect little or no speedup. For "
        "faster inference use static int8 (activations quantized too)."
    ),
    "dynamic_int8": (
        "Dynamic int8 stores int8 weights and quantizes each Linear input at run time (DynamicQuantizeLinear + "
        "MatMulInteger): no calibration data, integer matmuls, plus the cost of finding each input's range. "
        "Convolutions are left in fp32."
    ),
    "qat": (
        "Quantization-aware training fine-tuned the weights and the quantization scales with int8 rounding in "
        "the loop; the artifact is the same static int8 (QDQ) graph as post-training quantization."
    ),
    "static_int8": (
        "Static int8 quantizes each Linear/Conv input and weight (QDQ). A runtime is faster only where it fuses "
        "that pattern into an integer kernel: OpenVINO does for Linear and Conv; ONNX Runtime does for MatMul, "
        "but for Conv it also needs the output quantized, so a CNN can run slower there (see the ratios above). "
        "On CPUs without VNNI (AVX2 only) ONNX Runtime's int8 kernels saturate on full-range weights, so "
        "weights are quantized to 7 bits there unless reduce_range is set to false."
    ),
    "sparsity": (
        "Sparsity zeroed a share of the weights and stores each pruned layer as a bitmask plus its kept values, "
        "so the file is smaller; but ONNX Runtime and OpenVINO have no sparse kernel for these layers here: they "
        "rebuild the dense weight when the model loads and compute densely, so expect no speedup from sparsity "
        "(and no lower runtime memory). Speed comes from structured pruning (fewer channels) or quantization."
    ),
}


def findings(result: dict[str, Any]) -> list[str]:
    """Plain sentences from the measured figures: per runtime, the compressed artifact against fp32 in the same runtime."""
    bench = result["bench"]
    out = []
    for key, v in bench.items():
        if not key.startswith("compressed"):
            continue
        runtime = v["runtime"]
        fp32 = bench.get(f"fp32 {runtime}")
        if fp32 is None:
            continue
        for b, t in v["latency"].items():
            rel = t["ratio"] / fp32["latency"][b]["ratio"]
            if rel < 0.95:
                verdict = f"{1 / rel:.2f}x faster than"
            elif rel > 1.05:
                verdict = f"{rel:.2f}x slower than"
            else:
                verdict = "no faster than"
            out.append(
                f"{runtime}, {b}: the compressed artifact is {verdict} fp32 in the same runtime ({rel:.3f}x)."
            )
    kinds = {step["type"] for step in result["recipe"]}
    # A weight-only step beside an activation-quantizing one (int8 embeddings in a static recipe) does not
    # decide the speed, so its note would mislead.
    if "static_int8" in kinds:
        kinds.discard("weight_only")
    for kind in sorted(kinds):
        note = TECHNIQUE_NOTES.get(kind)
        if note:
            out.append(note)
    return out


def render_html(result: dict[str, Any]) -> str:
    """The report as one HTML string."""
    h = headline(result)
    model = result["model"]
    prof_b, prof_c = result["profile"]["baseline"], result["profile"]["compressed"]
    env = result["environment"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>modelpress report: {_e(model['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>modelpress report: {_e(model['name'])}</h1>",
        f"<p class='muted'>{_e(model['class'])}, inputs {_e(model['input_shapes'])}. Recipe: "
        + ", ".join(f"<code>{_e(step)}</code>" for step in result["recipe"])
        + "</p>",
        "<div class='cards'>",
        f"<div class='card'>file size<b>{h['size_ratio']:.3f}x</b>{human_bytes(h['size_bytes'])} vs "
        f"{human_bytes(h['baseline_size_bytes'])}</div>",
    ]
    for b, r in h["fastest_ratios"].items():
        parts.append(f"<div class='card'>latency {_e(b)}<b>{r:.3f}x</b>{_e(h['fastest'][b])}</div>")
    q = h["quality"]
    if q:
        parts.append(
            f"<div class='card'>{_e(q['metric'])}<b>{q.get('onnxruntime compressed', q.get('torch compressed', 0)):.4f}</b>"
            f"fp32 {q.get('onnxruntime fp32', q.get('torch fp32', 0)):.4f}</div>"
        )
    parts.append(
        f"<div class='card'>parity<b class='{'good' if h['parity_ok'] else 'bad'}'>"
        f"{'passed' if h['parity_ok'] else 'FAILED'}</b>every artifact vs its torch model</div></div>"
    )
    parts.append(
        "<p class='muted'>Ratios are compressed / "
        f"<b>{_e(h['baseline'])}</b>, measured on the exported artifacts in this run; latency ratios are the median "
        "of per-round ratios over interleaved rounds (A, B, A, B ...). Lower is better.</p>"
    )

    parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{_e(f)}</li>" for f in findings(result)) + "</ul>")

    # Before / after, one row per artifact and runtime.
    parts.append("<h2>Before and after (exported artifacts)</h2>")
    batches = list(next(iter(result["bench"].values()))["latency"])
    headers = ["artifact", "runtime", "size", "size ratio", "MACs (torch)"]
    for b in batches:
        headers += [f"{b} median ms", f"{b} p90 ms", f"{b} ratio"]
    headers += ["peak RSS", "quality"]
    rows = []
    for key, v in result["bench"].items():
        label = key.split(" ")[0]
        macs = prof_b["macs"] if label == "fp32" else prof_c["macs"]
        row = [
            f"<span class='l'>{_e(label)}</span> <span class='muted'>{_e(v['path'])}</span>",
            _e(v["runtime"]),
            human_bytes(v["size_bytes"]),
            _ratio(v["size_ratio"]),
            human_count(macs),
        ]
        for b in batches:
            t = v["latency"][b]
            row += [f"{t['median_ms']:.3f}", f"{t['p90_ms']:.3f}", _ratio(t["ratio"])]
        row.append(f"{v['peak_rss_mb']:.0f} MB" if v.get("peak_rss_mb") else "-")
        qv = q.get(f"{v['runtime']} {label}") if q else None
        row.append(f"{qv:.4f}" if isinstance(qv, float) else "-")
        rows.append(row)
    parts.append(_table(headers, rows))
    if q:
        parts.append(
            "<p class='muted'>Quality ("
            + _e(q["metric"])
            + "): "
            + ", ".join(f"{_e(k)} {v:.4f}" for k, v in q.items() if isinstance(v, float))
            + "</p>"
        )

    parts.append("<h2>Parity: each artifact against the torch model it came from</h2>")
    prow = []
    for p in result["parity"]:
        for o in p["outputs"]:
            prow.append(
                [
                    _e(p["artifact"]),
                    _e(p["runtime"]),
                    _e(o["name"]),
                    f"{o['max_abs']:.3g}",
                    f"{o['cosine']:.6f}",
                    f"{o['min_cosine']:.6f}",
                    "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.4f}",
                    "<span class='good'>ok</span>" if p["passed"] else "<span class='bad'>failed</span>",
                ]
            )
    parts.append(
        _table(["artifact", "runtime", "output", "max abs", "mean cosine", "worst cosine", "top-1", ""], prow)
    )

    if result.get("explain"):
        parts.append("<h2>Quantization error per layer (worst first)</h2>")
        parts.append(
            "<p class='muted'>SQNR in dB (higher is better; int8 is typically 30-45 dB). Output SQNR feeds each "
            "layer the original model's input, so it is that layer's own error. Clipped: share of the input "
            "outside the calibrated range.</p>"
        )
        erows = []
        for row in result["explain"]:
            rng = row["input_range"]
            erows.append(
                [
                    f"<span class='l'>{_e(row['name'])}</span>",
                    _e(row["scheme"]),
                    f"{row['weight_sqnr_db']:.1f}",
                    f"{row['output_sqnr_db']:.1f}",
                    "-" if rng is None else f"[{rng[0]:.3g}, {rng[1]:.3g}]",
                    "-" if row["clipped_fraction"] is None else f"{100 * row['clipped_fraction']:.3f}%",
                ]
            )
        parts.append(
            _table(["layer", "scheme", "weight SQNR", "output SQNR", "input range", "clipped"], erows)
        )

    parts.append("<h2>Per layer (torch, before and after)</h2>")
    after = {layer["name"]: layer for layer in prof_c["layers"]}
    max_lat = max((layer["latency_ms"] for layer in prof_b["layers"]), default=0) or 1.0
    lrows = []
    for layer in prof_b["layers"]:
        a = after.get(layer["name"])
        bar = f"<span class='bar' style='width:{60 * layer['latency_ms'] / max_lat:.0f}px'></span>"
        lrows.append(
            [
                f"<span class='l'>{_e(layer['name'])}</span>",
                _e(layer["type"]),
                human_count(layer["params"]),
                human_bytes(layer["bytes"]),
                human_bytes(a["bytes"]) if a else "-",
                _e(a["type"]) if a and a["type"] != layer["type"] else "",
                human_count(layer["macs"]),
                f"{layer['latency_ms']:.3f} {bar}",
                f"{a['latency_ms']:.3f}" if a else "-",
                human_bytes(layer["output_bytes"]),
            ]
        )
    parts.append(
        _table(
            [
                "layer",
                "type",
                "params",
                "bytes",
                "bytes after",
                "now",
                "MACs",
                "ms before",
                "ms after",
                "output",
            ],
            lrows,
        )
    )
    parts.append(
        f"<p class='muted'>Totals: {human_count(prof_b['params'])} parameters, {human_bytes(prof_b['bytes'])} -> "
        f"{human_bytes(prof_c['bytes'])} in torch; {human_count(prof_b['macs'])} MACs; peak activation memory "
        f"{human_bytes(prof_b['peak_activation_bytes'])}. Per-layer torch latency is for orientation only; "
        "deployment speed is the artifact table above.</p>"
    )
    parts.append("<h2>Environment</h2>")
    parts.append(
        f"<p class='muted'>{_e(env['cpu'])}, {_e(env['threads'])} runtime threads, Python {_e(env['python'])}; "
        + ", ".join(f"{_e(k)} {_e(v)}" for k, v in env["versions"].items())
        + f". Compression took {result['compress_wall_s']:.2f} s.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the HTML report atomically."""
    return write_text_atomic(path, render_html(result), overwrite=overwrite)
