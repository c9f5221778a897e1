"""A single self-contained HTML report (inline CSS and SVG, no script, no network) from any JSON modelpress writes.

Three kinds: the result of a whole job (`report.json` of `modelpress compress` / `demo`), the output of
`modelpress bench --json` and of `modelpress profile --json`. `write_report` tells them apart by their keys.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelpress._files import write_text_atomic
from modelpress.analyse.profile import human_bytes, human_count
from modelpress.deploy.integer import RUNTIME_LABELS
from modelpress.errors import DataError
from modelpress.report import svg

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1d2330;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem;overflow-wrap:anywhere}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.3rem}
table{border-collapse:collapse;width:100%;font-size:.84rem;margin:.6rem 0}
th,td{padding:.3rem .45rem;border-bottom:1px solid #e6e8ee;text-align:right;vertical-align:top}
td{white-space:nowrap}th{background:#f4f6fa;font-weight:600;white-space:normal}
td:first-child,th:first-child{text-align:left}td.name{white-space:normal;overflow-wrap:anywhere;min-width:11rem;text-align:left}
th.name{text-align:left}
.good{color:#0a7d32;font-weight:600}.bad{color:#b3261e;font-weight:600}.base{color:#667085}
.muted{color:#667085;font-size:.85rem}small{color:#667085;font-size:.75rem;display:block;font-weight:400}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #dde;border-radius:8px;padding:.7rem 1rem;flex:1 1 150px;max-width:250px}
.card b{display:block;font-size:1.4rem;margin:.1rem 0}.card small{display:block;margin-top:.2rem}
ul.recipe{margin:.3rem 0;padding-left:1.2rem;font-size:.8rem}
.charts{display:flex;flex-wrap:wrap;align-items:flex-start;gap:1.2rem 2.5rem;margin:.8rem 0}.chart{max-width:100%;height:auto}
code{background:#f4f6fa;padding:0 .25rem;border-radius:3px;overflow-wrap:anywhere}.wrap{overflow-x:auto}
ul li{margin:.25rem 0}
"""

ReportKind = Literal["job", "bench", "profile"]
_JOB_KEYS = {"model", "recipe", "profile", "parity", "bench"}
_PROFILE_KEYS = {"model", "params", "bytes", "macs", "layers"}
_BENCH_KEYS = {"runtime", "size_bytes", "latency"}
_SHORT_RUNTIME = {"onnxruntime": "ORT", "openvino": "OV"}
_MAX_PLOTTED_LAYERS = 25


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[str]], *, name_cols: int = 1) -> str:
    """A table whose first `name_cols` columns wrap long names; headers are HTML."""
    head = "".join(
        f"<th class='name'>{h}</th>" if i < name_cols else f"<th>{h}</th>" for i, h in enumerate(headers)
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='name'>{c}</td>" if i < name_cols else f"<td>{c}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<div class='wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _ratio(r: float | None, *, baseline: bool = False, lower_is_better: bool = True) -> str:
    """A ratio, green/red when clearly better/worse; a baseline row is never coloured."""
    if r is None or not math.isfinite(r):
        return "-"
    if baseline:
        return f'<span class="base">{r:.3f}x</span>'
    good = r < 0.97 if lower_is_better else r > 1.03
    bad = r > 1.03 if lower_is_better else r < 0.97
    cls = "good" if good else "bad" if bad else ""
    return f'<span class="{cls}">{r:.3f}x</span>'


def _page(title: str, parts: list[str]) -> str:
    return "\n".join(
        [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{_e(title)}</h1>",
            *parts,
            "</body></html>",
        ]
    )


def _charts(*svgs: str) -> str:
    return "<div class='charts'>" + "".join(s for s in svgs if s) + "</div>"


def _artifact_label(key: str, runtime: str) -> str:
    """'compressed openvino' -> 'compressed OV'."""
    head = key.removesuffix(f" {runtime}")
    return f"{head} {_SHORT_RUNTIME.get(runtime, runtime)}"


# ---------------------------------------------------------------------------------------------------------
# Speed: paired per-round ratios and what they mean


@dataclass(frozen=True)
class SpeedComparison:
    """One variant's latency against another's at one batch size, from interleaved rounds.

    `ratio` is the median of the per-round ratios subject / reference (< 1: the subject is faster), `low` and
    `high` their 10th and 90th percentiles; `None` where the per-round times were not recorded.
    """

    subject: str
    reference: str
    batch: str
    ratio: float
    low: float | None
    high: float | None
    round_ratios: tuple[float, ...]

    @property
    def within_noise(self) -> bool | None:
        """Whether the p10-p90 interval contains 1.0; None when there is no interval."""
        if self.low is None or self.high is None:
            return None
        return self.low <= 1.0 <= self.high

    def spread(self) -> str:
        if self.low is None or self.high is None:
            return "per-round spread not recorded"
        return f"p10-p90 {self.low:.3f}-{self.high:.3f}x over {len(self.round_ratios)} rounds"


def compare_speed(bench: Mapping[str, Any], subject: str, reference: str, batch: str) -> SpeedComparison:
    """Pair `subject`'s rounds with `reference`'s (they ran interleaved, round by round) at `batch`."""
    s, r = bench[subject]["latency"][batch], bench[reference]["latency"][batch]
    s_ms, r_ms = s.get("round_ms") or [], r.get("round_ms") or []
    if s_ms and len(s_ms) == len(r_ms):
        ratios = np.asarray(s_ms, dtype=float) / np.asarray(r_ms, dtype=float)
        return SpeedComparison(
            subject=subject,
            reference=reference,
            batch=batch,
            ratio=float(np.median(ratios)),
            low=float(np.percentile(ratios, 10)),
            high=float(np.percentile(ratios, 90)),
            round_ratios=tuple(float(x) for x in ratios),
        )
    if r["ratio"] == 1.0 and r.get("ratio_p10") == 1.0 and r.get("ratio_p90") == 1.0:
        # the reference is the benchmark's own baseline: the stored ratios are already paired
        return SpeedComparison(subject, reference, batch, s["ratio"], s["ratio_p10"], s["ratio_p90"], ())
    return SpeedComparison(subject, reference, batch, s["ratio"] / r["ratio"], None, None, ())


def speed_verdict(c: SpeedComparison, *, subject: str, reference: str) -> str:
    """'X is 1.25x faster than Y (0.800x, p10-p90 ...)', or 'within noise of' when the interval holds 1.0."""
    noise = c.within_noise
    if noise is True:
        verdict = f"is within noise of {reference}"
    elif noise is None and 0.95 <= c.ratio <= 1.05:
        verdict = f"is about as fast as {reference}"
    elif c.ratio < 1.0:
        speedup = 1.0 / c.ratio
        verdict = (
            f"is {speedup:.2f}x faster than {reference}"
            if speedup >= 1.005
            else f"is slightly faster than {reference}"
        )
    else:
        verdict = (
            f"is {c.ratio:.2f}x slower than {reference}"
            if c.ratio >= 1.005
            else f"is slightly slower than {reference}"
        )
    return f"{subject} {verdict} ({c.ratio:.3f}x, {c.spread()})"


def same_runtime_speed(bench: Mapping[str, Any]) -> list[SpeedComparison]:
    """Every compressed artifact against fp32 in the same runtime, at every batch size."""
    out = []
    for key, v in bench.items():
        reference = f"fp32 {v['runtime']}"
        if key.startswith("compressed") and reference in bench:
            out += [compare_speed(bench, key, reference, b) for b in v["latency"]]
    return out


def _baseline_key(bench: Mapping[str, Any]) -> str:
    """The variant every stored ratio is relative to (its own ratios are exactly 1), else the first."""
    for key, v in bench.items():
        if all(t["ratio"] == 1.0 and t.get("ratio_p90", 1.0) == 1.0 for t in v["latency"].values()):
            return key
    return next(iter(bench))


# ---------------------------------------------------------------------------------------------------------
# Fidelity and quality


def fidelity_to_original(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per runtime, the compressed artifact's cosine to the ORIGINAL (uncompressed) model, worst output.

    Each row: runtime, output, artifact (the artifact's mean cosine), torch (the compressed torch model's);
    the values are None where the result does not record them.
    """
    rows = []
    for p in result.get("parity", []):
        if p.get("artifact") != "compressed" or not p.get("outputs"):
            continue
        outs = p["outputs"]
        recorded = [o for o in outs if o.get("artifact_fidelity") is not None]
        worst = min(recorded, key=lambda o: o["artifact_fidelity"]) if recorded else outs[0]
        rows.append(
            {
                "runtime": p["runtime"],
                "output": worst["name"],
                "artifact": worst.get("artifact_fidelity"),
                "torch": worst.get("torch_fidelity"),
            }
        )
    return rows


def fidelity_sentence(result: Mapping[str, Any]) -> str:
    """One line saying how close the compressed artifact is to the original model, in every runtime."""
    rows = fidelity_to_original(result)
    recorded = [r for r in rows if r["artifact"] is not None]
    if not recorded:
        return (
            "Fidelity to the original model: not recorded in this result (it predates the check); run "
            "`modelpress compress` again to measure it."
        )
    per_runtime = ", ".join(f"{r['artifact']:.6f} in {r['runtime']}" for r in recorded)
    torch_fid = next((r["torch"] for r in recorded if r["torch"] is not None), None)
    torch_part = f"; the compressed torch model: {torch_fid:.6f}" if torch_fid is not None else ""
    outputs = sorted({r["output"] for r in recorded})
    return (
        f"Fidelity to the original (uncompressed) model, mean cosine of output '{', '.join(outputs)}': "
        f"the compressed artifact {per_runtime}{torch_part}."
    )


def _quality_value(q: Mapping[str, Any], runtime: str, label: str) -> float | None:
    v = q.get(f"{runtime} {label}")
    return float(v) if isinstance(v, int | float) else None


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
    # per batch size, the fastest compressed artifact (runtime) and its ratio to the baseline
    best = {}
    for b in batches:
        name = min(compressed, key=lambda k: float(compressed[k]["latency"][b]["ratio"]))
        best[b] = compare_speed(bench, name, base_key, b)
    size_ratio = next(iter(compressed.values()))["size_ratio"]
    q = result.get("quality") or {}
    return {
        "baseline": base_key,
        "size_ratio": size_ratio,
        "size_bytes": next(iter(compressed.values()))["size_bytes"],
        "baseline_size_bytes": bench[base_key]["size_bytes"],
        "fastest": {b: c.subject for b, c in best.items()},
        "fastest_ratios": {b: c.ratio for b, c in best.items()},
        "fastest_speed": best,
        "quality": q,
        "fidelity": fidelity_to_original(result),
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
    "structured": (
        "Structured pruning removed whole channels (conv filters, neurons, attention heads) from the tensors: "
        "the artifact is an ordinary smaller dense model with fewer multiply-accumulates, so every runtime does "
        "less work (int8 weights beside it only shrink the file: a runtime dequantizes them at load time)."
    ),
    "sparsity": (
        "Sparsity zeroed a share of the weights and stores each pruned layer as a bitmask plus its kept values, "
        "so the file is smaller; but ONNX Runtime and OpenVINO have no sparse kernel for these layers here: they "
        "rebuild the dense weight when the model loads and compute densely, so expect no speedup from sparsity "
        "(and no lower runtime memory). Speed comes from structured pruning (fewer channels) or quantization."
    ),
}


def findings(result: dict[str, Any]) -> list[str]:
    """Plain sentences from the measured figures: per runtime, the compressed artifact against fp32 in the
    same runtime (with the spread of the per-round ratios), and its fidelity to the original model."""
    bench = result["bench"]
    out = []
    for c in same_runtime_speed(bench):
        runtime = bench[c.subject]["runtime"]
        out.append(
            f"{runtime}, {c.batch}: "
            + speed_verdict(c, subject="the compressed artifact", reference="fp32 in the same runtime")
            + "."
        )
    out.append(fidelity_sentence(result))
    kinds = {step["type"] for step in result["recipe"]}
    # A weight-only step beside an activation-quantizing one (int8 embeddings in a static recipe) or after
    # structured pruning does not decide the speed, so its note would mislead.
    if kinds & {"static_int8", "structured"}:
        kinds.discard("weight_only")
    for kind in sorted(kinds):
        note = TECHNIQUE_NOTES.get(kind)
        if note:
            out.append(note)
    return out


# ---------------------------------------------------------------------------------------------------------
# Charts shared by the pages


def _ms(v: float) -> str:
    return f"{v:.3g}"


def _latency_bars(bench: Mapping[str, Any], batch: str, base_key: str) -> str:
    items = [
        svg.Bar(
            _artifact_label(k, v["runtime"]),
            float(v["latency"][batch]["median_ms"]),
            "baseline" if k.startswith(("fp32", "baseline")) else "subject",
        )
        for k, v in bench.items()
    ]
    base_ms = float(bench[base_key]["latency"][batch]["median_ms"])
    return svg.bars(
        f"latency {batch}: median ms per call",
        items,
        fmt=_ms,
        reference=base_ms,
        reference_label=_artifact_label(base_key, bench[base_key]["runtime"]),
        width=340,
    )


def _size_bars(bench: Mapping[str, Any], base_key: str) -> str:
    files: dict[str, svg.Bar] = {}
    for k, v in bench.items():
        name = Path(str(v.get("path", k))).name
        role = "baseline" if k.startswith(("fp32", "baseline")) else "subject"
        files.setdefault(name, svg.Bar(name, float(v["size_bytes"]), role, f" ({v['size_ratio']:.3f}x)"))
    return svg.bars(
        "file size",
        list(files.values()),
        fmt=human_bytes,
        reference=float(bench[base_key]["size_bytes"]),
        reference_label="baseline",
        width=340,
        tick_scale=_byte_unit(max(b.value for b in files.values())),
    )


def _byte_unit(n: float) -> float:
    """The unit human_bytes shows `n` in, so that axis ticks are round in it."""
    unit = 1.0
    while n >= 1024 * unit and unit < 1024**3:
        unit *= 1024
    return unit


def _spread_strips(title: str, comparisons: list[SpeedComparison], labels: list[str]) -> str:
    rows = []
    for c, label in zip(comparisons, labels, strict=True):
        points = c.round_ratios or (c.ratio,)
        low = c.low if c.low is not None else c.ratio
        high = c.high if c.high is not None else c.ratio
        role = "baseline" if c.subject.startswith(("fp32", "baseline")) else "subject"
        rows.append(svg.Strip(label, points, c.ratio, low, high, role))
    return svg.strips(title, rows, fmt=lambda t: f"{t:g}x", reference=1.0, reference_label="same speed")


_SPREAD_NOTE = (
    "<p class='muted'>Each dot is one interleaved round's time ratio (rounds run the variants A, B, A, B ..., "
    "so each ratio pairs two runs under the same machine load); the box spans the 10th to 90th percentile, the "
    "dark bar is the median. Left of the dashed line at 1.0 is faster; a box that crosses it is within "
    "noise.</p>"
)


# ---------------------------------------------------------------------------------------------------------
# The job report


def _job_cards(result: dict[str, Any], h: dict[str, Any]) -> list[str]:
    parts = [
        "<div class='cards'>",
        f"<div class='card'>file size<b>{h['size_ratio']:.3f}x</b>{human_bytes(h['size_bytes'])} vs "
        f"{human_bytes(h['baseline_size_bytes'])}<small>compressed / fp32 file</small></div>",
    ]
    bench = result["bench"]
    for b, c in h["fastest_speed"].items():
        noise = "within noise: " if c.within_noise else ""
        parts.append(
            f"<div class='card'>latency {_e(b)}<b>{c.ratio:.3f}x</b>"
            f"{_e(_artifact_label(c.subject, bench[c.subject]['runtime']))} vs "
            f"{_e(_artifact_label(c.reference, bench[c.reference]['runtime']))}<small>{noise}{_e(c.spread())}</small></div>"
        )
    q = h["quality"]
    if q:
        parts.append(
            f"<div class='card'>{_e(q['metric'])}<b>{q.get('onnxruntime compressed', q.get('torch compressed', 0)):.4f}</b>"
            f"fp32 {q.get('onnxruntime fp32', q.get('torch fp32', 0)):.4f}<small>on the evaluation data</small></div>"
        )
    recorded = [r for r in h["fidelity"] if r["artifact"] is not None]
    if recorded:
        worst = min(recorded, key=lambda r: r["artifact"])
        parts.append(
            f"<div class='card'>fidelity to original<b>{worst['artifact']:.6f}</b>mean cosine, {_e(worst['runtime'])}"
            "<small>compressed artifact vs the uncompressed model (worst runtime)</small></div>"
        )
    else:
        parts.append("<div class='card'>fidelity to original<b>-</b>not recorded in this result</div>")
    parts.append(
        f"<div class='card'>parity<b class='{'good' if h['parity_ok'] else 'bad'}'>"
        f"{'passed' if h['parity_ok'] else 'FAILED'}</b>{len(result['parity'])} artifact checks"
        "<small>every artifact vs the torch model it came from</small></div></div>"
    )
    return parts


def _job_plots(result: dict[str, Any], base_key: str) -> list[str]:
    bench = result["bench"]
    batches = list(next(iter(bench.values()))["latency"])
    parts = ["<h2>Each artifact against the baseline</h2>"]
    charts = [_size_bars(bench, base_key)] + [_latency_bars(bench, b, base_key) for b in batches]
    q = result.get("quality") or {}
    if q:
        items = []
        for k, v in bench.items():
            label = k.removesuffix(f" {v['runtime']}")
            value = _quality_value(q, v["runtime"], label)
            if value is not None:
                role = "baseline" if label == "fp32" else "subject"
                items.append(svg.Bar(_artifact_label(k, v["runtime"]), value, role))
        base_q = _quality_value(q, bench[base_key]["runtime"], "fp32")
        if items:
            charts.append(
                svg.bars(
                    f"quality: {q['metric']}",
                    items,
                    fmt=lambda t: f"{t:.4f}" if abs(t) < 10 else f"{t:.2f}",
                    tick_fmt=lambda t: f"{t:g}",
                    reference=base_q,
                    reference_label="baseline" if base_q is not None else "",
                    width=340,
                )
            )
    parts.append(_charts(*charts))
    parts.append(
        "<p class='muted'>Grey: the fp32 export; blue: the compressed one. The dashed line marks the baseline "
        f"<b>{_e(base_key)}</b>.</p>"
    )

    # the spread: compressed against fp32 in the same runtime, and other runtimes' fp32 against the baseline
    parts.append("<h2>Latency spread over the interleaved rounds</h2>")
    strips = []
    for b in batches:
        comps, labels = [], []
        for c in same_runtime_speed(bench):
            if c.batch == b:
                rt = _SHORT_RUNTIME.get(bench[c.subject]["runtime"], bench[c.subject]["runtime"])
                comps.append(c)
                labels.append(f"compressed / fp32, {rt}")
        for k, v in bench.items():
            if k.startswith("fp32") and k != base_key:
                comps.append(compare_speed(bench, k, base_key, b))
                labels.append(
                    f"{_artifact_label(k, v['runtime'])} / {_artifact_label(base_key, bench[base_key]['runtime'])}"
                )
        if comps:
            strips.append(_spread_strips(f"{b}: time ratio per round", comps, labels))
    parts.append(_charts(*strips))
    parts.append(_SPREAD_NOTE)
    return parts


def _layer_plots(result: dict[str, Any]) -> list[str]:
    explain = result.get("explain") or []
    charts = []
    if explain:
        worst = explain[:_MAX_PLOTTED_LAYERS]
        charts.append(
            svg.bars(
                "output SQNR per layer (dB, worst first)",
                [svg.Bar(r["name"], float(r["output_sqnr_db"])) for r in worst],
                fmt=lambda t: f"{t:.1f}",
                tick_fmt=lambda t: f"{t:g}",
            )
        )
        charts.append(
            svg.bars(
                "weight SQNR per layer (dB, same order)",
                [svg.Bar(r["name"], float(r["weight_sqnr_db"]), "baseline") for r in worst],
                fmt=lambda t: f"{t:.1f}",
                tick_fmt=lambda t: f"{t:g}",
            )
        )
    prof_b, prof_c = result["profile"]["baseline"], result["profile"]["compressed"]
    after = {layer["name"]: layer for layer in prof_c["layers"]}
    changed = [
        (layer, after.get(layer["name"]))
        for layer in prof_b["layers"]
        if layer["bytes"] and (layer["name"] not in after or after[layer["name"]]["bytes"] != layer["bytes"])
    ]
    changed.sort(key=lambda pair: -pair[0]["bytes"])
    if changed:
        charts.append(
            svg.bars(
                "bytes after / before per changed layer (largest first)",
                [
                    svg.Bar(layer["name"], (a["bytes"] if a else 0) / layer["bytes"])
                    for layer, a in changed[:_MAX_PLOTTED_LAYERS]
                ],
                fmt=lambda t: f"{t:.2f}x",
                tick_fmt=lambda t: f"{t:g}x",
                reference=1.0,
                reference_label="unchanged",
            )
        )
    if not charts:
        return []
    shown = "" if len(explain) <= _MAX_PLOTTED_LAYERS else f" The plots show the {_MAX_PLOTTED_LAYERS} worst."
    return [
        "<h2>Per-layer error and size</h2>",
        _charts(*charts),
        "<p class='muted'>SQNR: signal to quantization noise of each quantized layer (higher is better; int8 is "
        "typically 30-45 dB, int4 lower). Output SQNR feeds each layer the original model's input, so it is "
        f"that layer's own error.{shown}</p>",
    ]


def _fmt_quality(t: float) -> str:
    return f"{t:.4f}" if abs(t) < 10 else f"{t:.2f}"


def progressive_chart(trajectory: Mapping[str, Any]) -> str:
    """Quality against strength for one progressive step (`optimize.progressive.Trajectory.to_dict()`): the
    original, every step measured in order, the floor dashed, the kept step ringed, the rolled-back one red."""
    points = [svg.Point("original", float(trajectory["baseline"]), "baseline")]
    for p in trajectory["points"]:
        kept = p["strength"] == trajectory.get("chosen")
        role = "good" if kept else "subject" if p["passed"] else "bad"
        points.append(svg.Point(f"{p['strength']:g}", float(p["quality"]), role, ring=kept))
    return svg.line(
        f"progressive {trajectory['technique']}: {trajectory['metric']}",
        points,
        fmt=_fmt_quality,
        reference=float(trajectory["floor"]),
        reference_label="floor",
        x_title=f"{trajectory['param']}, in the order stepped",
        desc=f"{trajectory['metric']} after each {trajectory['param']} step; dashed: the floor",
    )


def _progressive_section(result: Mapping[str, Any]) -> list[str]:
    trajectories = result.get("progressive") or []
    if not trajectories:
        return []
    lines = []
    for t in trajectories:
        crossed = [p["strength"] for p in t["points"] if not p["passed"]]
        kept = (
            f"{t['param']} {t['chosen']:g} kept" if t.get("chosen") is not None else "no step met the floor"
        )
        rolled = f"; {t['param']} {crossed[0]:g} crossed the floor and was rolled back" if crossed else ""
        lines.append(f"<li>{_e(t['technique'])}: {_e(kept + rolled)}.</li>")
    return [
        "<h2>Progressive compression</h2>",
        _charts(*(progressive_chart(t) for t in trajectories)),
        "<ul>" + "".join(lines) + "</ul>",
        "<p class='muted'>Measured in torch after each step on the held-out items; green ringed: the step kept; "
        "red: the step that crossed the floor, rolled back.</p>",
    ]


def sensitivity_chart(table: Mapping[str, Any], *, limit: int = _MAX_PLOTTED_LAYERS) -> str:
    """A heatmap of the drop per layer (rows, the most sensitive first) and family@strength (columns) from
    `optimize.sensitivity.FamilySensitivity.to_dict()`."""
    drops: dict[tuple[str, str], float | None] = {}
    for r in table["rows"]:
        drops[(r["layer"], f"{r['family']}@{r['strength']:g}")] = r["drop"]
    columns = list(dict.fromkeys(c for _, c in drops))
    worst: dict[str, float] = {}
    for (layer, _), d in drops.items():
        worst[layer] = max(worst.get(layer, -math.inf), d if d is not None else -math.inf)
    layers = sorted(worst, key=lambda name: -worst[name])[:limit]
    return svg.heatmap(
        f"drop of {table['metric']}, one layer compressed",
        layers,
        columns,
        lambda layer, column: drops.get((layer, column)),
        fmt=lambda t: f"{t:.4f}" if abs(t) < 10 else f"{t:.2f}",
        desc="Per layer and family: the quality lost with only that layer compressed",
    )


def _sensitivity_section(result: Mapping[str, Any]) -> list[str]:
    table = result.get("sensitivity")
    if not table or not table.get("rows"):
        return []
    layers = len({r["layer"] for r in table["rows"]})
    shown = "" if layers <= _MAX_PLOTTED_LAYERS else f" The {_MAX_PLOTTED_LAYERS} most sensitive are shown."
    source = " (read from the cache)" if table.get("cached") else ""
    return [
        "<h2>Sensitivity per layer and family</h2>",
        _charts(sensitivity_chart(table)),
        f"<p class='muted'>Each cell: {_e(table['metric'])} of the original model ({table['reference']:.5f}) "
        f"less that with only this layer compressed by the family at that strength, on {table['items']} "
        f"item(s){source}; darker is more sensitive, '-': the family does not apply to the layer.{shown}</p>",
    ]


def render_html(result: dict[str, Any]) -> str:
    """The report of a whole job (the `report.json` of `modelpress compress`) as one HTML string."""
    h = headline(result)
    model, env, base_key = result["model"], result["environment"], h["baseline"]
    parts = [
        f"<p class='muted'>{_e(model['class'])}, inputs {_e(model['input_shapes'])}. Recipe:</p>",
        "<ul class='recipe'>"
        + "".join(f"<li><code>{_e(step)}</code></li>" for step in result["recipe"])
        + "</ul>",
        *_job_cards(result, h),
        "<p class='muted'>Measured on the exported artifacts in this run. Latency ratios are medians of "
        "per-round ratios over interleaved rounds (A, B, A, B ...), with their 10th-90th percentile spread; "
        "lower is better.</p>",
        "<h2>Findings</h2><ul>" + "".join(f"<li>{_e(f)}</li>" for f in findings(result)) + "</ul>",
        *_job_plots(result, base_key),
        *_artifact_table(result, h),
        *_integer_section(result.get("integer") or {}, title="What runs as integer (compressed artifact)"),
        *_parity_table(result),
        *_layer_plots(result),
        *_progressive_section(result),
        *_sensitivity_section(result),
        *_coverage_table(result),
        *_layer_tables(result),
    ]
    parts.append("<h2>Environment</h2>")
    parts.append(
        f"<p class='muted'>{_e(env['cpu'])}, {_e(env['threads'])} runtime threads, Python {_e(env['python'])}; "
        + ", ".join(f"{_e(k)} {_e(v)}" for k, v in env["versions"].items())
        + f". Compression took {result['compress_wall_s']:.2f} s.</p>"
    )
    return _page(f"modelpress report: {model['name']}", parts)


def _artifact_table(result: dict[str, Any], h: dict[str, Any]) -> list[str]:
    """Before / after, one row per artifact and runtime."""
    bench, base_key, q = result["bench"], h["baseline"], h["quality"]
    prof_b, prof_c = result["profile"]["baseline"], result["profile"]["compressed"]
    parts = ["<h2>Before and after (exported artifacts)</h2>"]
    batches = list(next(iter(bench.values()))["latency"])
    same_rt = {(c.subject, c.batch): c for c in same_runtime_speed(bench)}
    fid = {r["runtime"]: r["artifact"] for r in h["fidelity"]}
    headers = ["artifact<small>file</small>", "size", "size ratio", "MACs (torch)"]
    for b in batches:
        headers += [f"{_e(b)} median ms<small>p90</small>", f"{_e(b)} ratio<small>p10-p90</small>"]
    headers += ["peak RSS", f"quality<small>{_e(q['metric'])}</small>" if q else "quality"]
    headers.append("cosine to original<small>uncompressed model</small>")
    rows = []
    for key, v in bench.items():
        label = key.removesuffix(f" {v['runtime']}")
        is_fp32 = label == "fp32"
        macs = prof_b["macs"] if is_fp32 else prof_c["macs"]
        row = [
            f"{_e(label)} {_e(v['runtime'])}<small>{_e(v['path'])}</small>",
            human_bytes(v["size_bytes"]),
            _ratio(v["size_ratio"], baseline=is_fp32),
            human_count(macs),
        ]
        for b in batches:
            t = v["latency"][b]
            c = same_rt.get((key, b))
            if c is None:  # an fp32 row: against the baseline, never coloured
                c = compare_speed(bench, key, base_key, b)
                cell = "baseline" if key == base_key else _ratio(c.ratio, baseline=True)
            else:
                # coloured only when the whole p10-p90 interval is on one side of 1.0
                cls = "" if c.within_noise in (True, None) else "good" if c.ratio < 1 else "bad"
                cell = f"<span class='{cls}'>{c.ratio:.3f}x</span>"
            spread = "" if c.low is None or key == base_key else f"<small>{c.low:.2f}-{c.high:.2f}</small>"
            row += [f"{t['median_ms']:.3f}<small>{t['p90_ms']:.3f}</small>", cell + spread]
        row.append(f"{v['peak_rss_mb']:.0f} MB" if v.get("peak_rss_mb") else "-")
        qv = _quality_value(q, v["runtime"], label) if q else None
        row.append(f"{qv:.4f}" if qv is not None else "-")
        fv = 1.0 if is_fp32 else fid.get(v["runtime"])
        row.append("-" if fv is None else "(original)" if is_fp32 else f"{fv:.6f}")
        rows.append(row)
    parts.append(_table(headers, rows))
    parts.append(
        "<p class='muted'>Ratio: a compressed artifact against fp32 in the same runtime (green or red only when "
        f"its whole p10-p90 interval is below or above 1.0); an fp32 row against the baseline {_e(base_key)} "
        "(grey: a runtime comparison, not a regression).</p>"
    )
    if q:
        parts.append(
            "<p class='muted'>Quality ("
            + _e(q["metric"])
            + "): "
            + ", ".join(f"{_e(k)} {v:.4f}" for k, v in q.items() if isinstance(v, float))
            + "</p>"
        )

    return parts


def _parity_table(result: dict[str, Any]) -> list[str]:
    parts = ["<h2>Parity: each artifact against the torch model it came from</h2>"]
    prow = []
    for p in result["parity"]:
        for o in p["outputs"]:
            art_fid, torch_fid = o.get("artifact_fidelity"), o.get("torch_fidelity")
            prow.append(
                [
                    f"{_e(p['artifact'])} {_e(p['runtime'])}",
                    _e(o["name"]),
                    f"{o['max_abs']:.3g}",
                    f"{o['cosine']:.6f}",
                    f"{o['min_cosine']:.6f}",
                    "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.4f}",
                    "-" if art_fid is None else f"{art_fid:.6f}",
                    "-" if torch_fid is None else f"{torch_fid:.6f}",
                    "<span class='good'>ok</span>" if p["passed"] else "<span class='bad'>failed</span>",
                ]
            )
    parts.append(
        _table(
            [
                "artifact",
                "output",
                "max abs",
                "mean cosine",
                "worst cosine",
                "top-1",
                "artifact to original<small>mean cosine</small>",
                "torch to original<small>mean cosine</small>",
                "",
            ],
            prow,
            name_cols=2,
        )
    )
    parts.append(
        "<p class='muted'>The first columns compare each artifact with the torch model it was exported from; "
        "the two 'to original' columns compare the compressed artifact and the compressed torch model with the "
        "original, uncompressed model.</p>"
    )

    return parts


def integer_line(report: Mapping[str, Any], *, names: int = 6) -> str:
    """One `integer_kernels` report (its dict) in a sentence: "k of n conv/matmul layers run as integer in
    <runtime>", then the layers that do not, by name."""
    others = [layer["name"] for layer in report["layers"] if layer["kind"] != "integer"]
    if not others:
        return str(report["headline"])
    more = f" and {len(others) - names} more" if len(others) > names else ""
    return f"{report['headline']}; not: {', '.join(others[:names])}{more}"


def _integer_section(integer: Mapping[str, Any], *, title: str) -> list[str]:
    """Per runtime, what runs as integer, and a table of the layers that do not, with the reason."""
    if not integer:
        return []
    parts = [
        f"<h2>{_e(title)}</h2>",
        "<ul>" + "".join(f"<li>{_e(r['headline'])}</li>" for r in integer.values()) + "</ul>",
    ]
    rows = [
        [
            _e(layer["name"]),
            _e(layer["reason"]),
            _e(RUNTIME_LABELS.get(r["runtime"], r["runtime"])),
            _e(layer["op_type"]),
            _e(layer["kernel"]),
        ]
        for r in integer.values()
        for layer in r["layers"]
        if layer["kind"] != "integer"
    ]
    if rows:
        parts.append(
            _table(["layer", "why not integer", "runtime", "op in the file", "runs as"], rows, name_cols=2)
        )
    parts.append(
        "<p class='muted'>Read from the graph each runtime runs: ONNX Runtime's optimised graph as a default "
        "session saves it, OpenVINO's compiled runtime graph and its layer precisions. Int weights: the weights "
        "stay integer in memory, the maths is floating point.</p>"
    )
    return parts


def coverage_line(result: dict[str, Any]) -> str | None:
    """What the recipe did to the weight layers, in one sentence (None for results without coverage)."""
    cov = result.get("coverage")
    if not cov or not cov.get("layers"):
        return None
    layers = cov["layers"]
    done = [row for row in layers if row["status"] != "left alone"]
    return (
        f"{len(done)} of {len(layers)} weight layers compressed or removed, {1 - cov['untouched_share']:.0%} of "
        f"the weight bytes; {len(layers) - len(done)} left alone."
    )


def _coverage_table(result: dict[str, Any]) -> list[str]:
    line = coverage_line(result)
    if line is None:
        return []
    alone = sorted(
        (row for row in result["coverage"]["layers"] if row["status"] == "left alone"),
        key=lambda r: -r["bytes"],
    )
    parts = ["<h2>Layers the recipe left alone</h2>", f"<p class='muted'>{_e(line)}</p>"]
    if alone:
        rows = [[_e(r["name"]), _e(r["type"]), human_bytes(r["bytes"]), _e(r["reason"])] for r in alone]
        parts.append(_table(["layer", "type", "weight bytes", "why"], rows))
    return parts


def _layer_tables(result: dict[str, Any]) -> list[str]:
    parts = []
    prof_b, prof_c = result["profile"]["baseline"], result["profile"]["compressed"]
    if result.get("explain"):
        parts.append("<h2>Quantization error per layer (worst first)</h2>")
        parts.append(
            "<p class='muted'>Clipped: share of the input outside the calibrated range (static schemes).</p>"
        )
        erows = []
        for row in result["explain"]:
            rng = row["input_range"]
            erows.append(
                [
                    _e(row["name"]),
                    _e(row["scheme"]),
                    f"{row['weight_sqnr_db']:.1f}",
                    f"{row['output_sqnr_db']:.1f}",
                    "-" if rng is None else f"[{rng[0]:.3g}, {rng[1]:.3g}]",
                    "-" if row["clipped_fraction"] is None else f"{100 * row['clipped_fraction']:.3f}%",
                ]
            )
        parts.append(
            _table(
                ["layer", "scheme", "weight SQNR (dB)", "output SQNR (dB)", "input range", "clipped"], erows
            )
        )

    parts.append("<h2>Per layer (torch, before and after)</h2>")
    after = {layer["name"]: layer for layer in prof_c["layers"]}
    lrows = []
    for layer in prof_b["layers"]:
        a = after.get(layer["name"])
        lrows.append(
            [
                _e(layer["name"]),
                _e(layer["type"])
                + (f"<small>now {_e(a['type'])}</small>" if a and a["type"] != layer["type"] else ""),
                human_count(layer["params"]),
                human_bytes(layer["bytes"]),
                human_bytes(a["bytes"]) if a else "removed",
                human_count(layer["macs"]),
                f"{layer['latency_ms']:.3f}",
                f"{a['latency_ms']:.3f}" if a else "-",
                human_bytes(layer["output_bytes"]),
            ]
        )
    parts.append(
        _table(
            ["layer", "type", "params", "bytes", "bytes after", "MACs", "ms before", "ms after", "output"],
            lrows,
            name_cols=2,
        )
    )
    parts.append(
        f"<p class='muted'>Totals: {human_count(prof_b['params'])} -> {human_count(prof_c['params'])} parameters, "
        f"{human_bytes(prof_b['bytes'])} -> {human_bytes(prof_c['bytes'])} in torch; {human_count(prof_b['macs'])} "
        f"-> {human_count(prof_c['macs'])} MACs; peak activation memory "
        f"{human_bytes(prof_b['peak_activation_bytes'])}. Per-layer torch latency is for orientation only; "
        "deployment speed is the artifact table above.</p>"
    )
    return parts


# ---------------------------------------------------------------------------------------------------------
# `modelpress bench --json`


def bench_findings(bench: Mapping[str, Any]) -> list[str]:
    """Each variant against the baseline variant, per batch size, with the per-round spread."""
    base = _baseline_key(bench)
    out = []
    for key, v in bench.items():
        if key == base:
            continue
        for b in v["latency"]:
            c = compare_speed(bench, key, base, b)
            out.append(f"{b}: " + speed_verdict(c, subject=key, reference=base) + ".")
    return out


def render_bench_html(bench: dict[str, Any]) -> str:
    """The output of `modelpress bench --json` (variant name -> ArtifactBench.to_dict()) as one HTML page."""
    base = _baseline_key(bench)
    batches = list(bench[base]["latency"])
    files = sorted({Path(str(v["path"])).name for v in bench.values()})
    parts = [
        f"<p class='muted'>Variants: {_e(', '.join(bench))}. Ratios are against <b>{_e(base)}</b>: medians of "
        "per-round ratios over interleaved rounds, with their 10th-90th percentile spread; lower is faster.</p>",
        "<div class='cards'>",
    ]
    for b in batches:
        fastest = min(bench, key=lambda k: bench[k]["latency"][b]["median_ms"])
        t = bench[fastest]["latency"][b]
        parts.append(
            f"<div class='card'>fastest at {_e(b)}<b>{_e(_artifact_label(fastest, bench[fastest]['runtime']))}</b>"
            f"{t['median_ms']:.3f} ms, {t['throughput']:.0f} items/s</div>"
        )
    parts.append("</div>")
    findings_ = bench_findings(bench)
    if findings_:
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{_e(f)}</li>" for f in findings_) + "</ul>")
    parts.append("<h2>Size and latency</h2>")
    parts.append(_charts(_size_bars(bench, base), *[_latency_bars(bench, b, base) for b in batches]))
    others = [k for k in bench if k != base]
    if others:
        parts.append(f"<h2>Latency spread against {_e(base)}</h2>")
        strips = [
            _spread_strips(
                f"{b}: time ratio per round",
                [compare_speed(bench, k, base, b) for k in others],
                [_artifact_label(k, bench[k]["runtime"]) for k in others],
            )
            for b in batches
        ]
        parts.append(_charts(*strips))
        parts.append(_SPREAD_NOTE)
    integer = {k: v["integer"] for k, v in bench.items() if v.get("integer")}
    parts += _integer_section(integer, title="What runs as integer")
    parts.append("<h2>Every variant</h2>")
    headers = ["variant<small>file</small>", "size", "size ratio"]
    for b in batches:
        headers += [
            f"{_e(b)} median ms<small>p90</small>",
            f"{_e(b)} items/s",
            f"{_e(b)} ratio<small>p10-p90</small>",
        ]
    headers.append("peak RSS")
    rows = []
    for key, v in bench.items():
        is_base = key == base
        row = [
            f"{_e(key)}<small>{_e(Path(str(v['path'])).name)}</small>",
            human_bytes(v["size_bytes"]),
            _ratio(v["size_ratio"], baseline=is_base),
        ]
        for b in batches:
            t = v["latency"][b]
            if is_base:
                cell = "baseline"
            else:
                c = compare_speed(bench, key, base, b)
                cls = "" if c.within_noise in (True, None) else "good" if c.ratio < 1 else "bad"
                spread = "" if c.low is None else f"<small>{c.low:.2f}-{c.high:.2f}</small>"
                cell = f"<span class='{cls}'>{c.ratio:.3f}x</span>{spread}"
            row += [f"{t['median_ms']:.3f}<small>{t['p90_ms']:.3f}</small>", f"{t['throughput']:.0f}", cell]
        row.append(f"{v['peak_rss_mb']:.0f} MB" if v.get("peak_rss_mb") else "-")
        rows.append(row)
    parts.append(_table(headers, rows))
    rounds = bench[base]["latency"][batches[0]].get("rounds", "?")
    parts.append(f"<p class='muted'>{_e(rounds)} interleaved rounds per batch size.</p>")
    return _page(f"modelpress bench: {', '.join(files)}", parts)


# ---------------------------------------------------------------------------------------------------------
# `modelpress profile --json`


def render_profile_html(prof: dict[str, Any]) -> str:
    """The output of `modelpress profile --json` (Profile.to_dict()) as one HTML page."""
    layers = prof["layers"]
    layer_sum = sum(layer["latency_ms"] for layer in layers)
    dtypes = ", ".join(f"{_e(k)} {human_bytes(v)}" for k, v in prof.get("bytes_by_dtype", {}).items())
    parts = [
        f"<p class='muted'>Inputs {_e(prof.get('input_shapes', '?'))}; measured in torch with "
        f"{_e(prof.get('threads', '?'))} threads.</p>",
        "<div class='cards'>",
        f"<div class='card'>parameters<b>{human_count(prof['params'])}</b>{prof['params']:,}</div>",
        f"<div class='card'>bytes<b>{human_bytes(prof['bytes'])}</b><small>{dtypes}</small></div>",
        f"<div class='card'>MACs<b>{human_count(prof['macs'])}</b><small>per forward at these inputs</small></div>",
    ]
    if "latency_ms" in prof:
        spread = (
            f"p10-p90 {prof['latency_p10_ms']:.3f}-{prof['latency_p90_ms']:.3f} ms; "
            if "latency_p10_ms" in prof and "latency_p90_ms" in prof
            else ""
        )
        parts.append(
            f"<div class='card'>latency<b>{prof['latency_ms']:.3f} ms</b>whole forward, median<small>{spread}"
            f"the layers sum to {prof.get('layers_ms', layer_sum):.3f} ms</small></div>"
        )
    if "peak_activation_bytes" in prof:
        parts.append(
            f"<div class='card'>peak activations<b>{human_bytes(prof['peak_activation_bytes'])}</b>"
            "<small>live during one forward</small></div>"
        )
    parts.append("</div>")
    if layers:
        slow = sorted(layers, key=lambda layer: -layer["latency_ms"])[:_MAX_PLOTTED_LAYERS]
        big = sorted((layer for layer in layers if layer["bytes"]), key=lambda layer: -layer["bytes"])
        parts.append("<h2>Where the time and the bytes are</h2>")
        parts.append(
            _charts(
                svg.bars(
                    "slowest layers (ms, torch)",
                    [svg.Bar(layer["name"], float(layer["latency_ms"])) for layer in slow],
                    fmt=lambda t: f"{t:.3g}",
                ),
                svg.bars(
                    "largest layers (parameters and buffers)",
                    [svg.Bar(layer["name"], float(layer["bytes"])) for layer in big[:_MAX_PLOTTED_LAYERS]],
                    fmt=human_bytes,
                    tick_scale=_byte_unit(big[0]["bytes"]),
                )
                if big
                else "",
            )
        )
        if len(layers) > _MAX_PLOTTED_LAYERS:
            parts.append(
                f"<p class='muted'>The plots show the {_MAX_PLOTTED_LAYERS} slowest and largest of "
                f"{len(layers)} layers; the table has them all.</p>"
            )
    parts.append("<h2>Every layer</h2>")
    rows = [
        [
            _e(layer["name"]),
            _e(layer["type"]),
            human_count(layer["params"]),
            human_bytes(layer["bytes"]),
            human_count(layer["macs"]),
            f"{layer['latency_ms']:.3f}",
            human_bytes(layer["output_bytes"]),
        ]
        for layer in layers
    ]
    parts.append(_table(["layer", "type", "params", "bytes", "MACs", "ms", "output"], rows, name_cols=2))
    return _page(f"modelpress profile: {prof['model']}", parts)


# ---------------------------------------------------------------------------------------------------------
# Any of them


def report_kind(data: Any, *, source: str = "This JSON") -> ReportKind:
    """Which JSON modelpress wrote `data`: a job's report.json ("job"), `bench --json` or `profile --json`.

    >>> report_kind({"model": "Net", "params": 1, "bytes": 4, "macs": 1, "layers": []})
    'profile'
    """
    if isinstance(data, dict):
        if data.keys() >= _JOB_KEYS:
            return "job"
        if data.keys() >= _PROFILE_KEYS:
            return "profile"
        if data and all(isinstance(v, dict) and v.keys() >= _BENCH_KEYS for v in data.values()):
            return "bench"
        found = f"an object with keys {sorted(data)[:12]}"
    else:
        found = f"a JSON {type(data).__name__}"
    raise DataError(
        f"{source} is not a modelpress result: it is {found}. Expected the report.json of `modelpress "
        f"compress` or `demo` (keys {sorted(_JOB_KEYS)}), the output of `modelpress bench --json` (variant "
        f"name -> {{{', '.join(sorted(_BENCH_KEYS))}, ...}}) or of `modelpress profile --json` (keys "
        f"{sorted(_PROFILE_KEYS)})."
    )


_RENDERERS: dict[ReportKind, Callable[[dict[str, Any]], str]] = {
    "job": render_html,
    "bench": render_bench_html,
    "profile": render_profile_html,
}


def render_any(data: Any) -> str:
    """The HTML page for any JSON modelpress writes (see `report_kind`)."""
    return _RENDERERS[report_kind(data)](data)


def write_report(data: dict[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the HTML report of any modelpress JSON (a job result, bench or profile output) atomically."""
    return write_text_atomic(path, render_any(data), overwrite=overwrite)
