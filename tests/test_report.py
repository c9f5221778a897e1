"""The HTML report and the terminal summary: honest speed findings, fidelity to the original, plots, every
JSON kind through `modelpress report`, and a real report opened in headless Chromium."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from modelpress.cli import main
from modelpress.errors import DataError
from modelpress.report.html import (
    compare_speed,
    findings,
    render_any,
    render_bench_html,
    render_html,
    render_profile_html,
    report_kind,
)
from modelpress.report.terminal import print_summary

CHROMIUM = Path("/usr/bin/chromium")


def _timing(name: str, round_ms: list[float], base_ms: list[float]) -> dict[str, Any]:
    ratios = [a / b for a, b in zip(round_ms, base_ms, strict=True)]
    s = sorted(round_ms)
    return {
        "name": name,
        "median_ms": s[len(s) // 2],
        "p90_ms": s[-1],
        "throughput": 1e3 / s[len(s) // 2],
        "ratio": sorted(ratios)[len(ratios) // 2],
        "ratio_p10": min(ratios),
        "ratio_p90": max(ratios),
        "rounds": len(round_ms),
        "round_ms": round_ms,
    }


def _bench(rounds: dict[str, list[float]], *, size: dict[str, int]) -> dict[str, Any]:
    """{"fp32 onnxruntime": [...ms per round], ...} -> bench entries at one batch size, against fp32 ORT."""
    base = rounds["fp32 onnxruntime"]
    return {
        key: {
            "name": key,
            "path": f"/x/{'m.onnx' if key.startswith('fp32') else 'm.compressed.onnx'}",
            "runtime": key.split(" ")[1],
            "size_bytes": size[key.split(" ")[0]],
            "size_ratio": size[key.split(" ")[0]] / size["fp32"],
            "latency": {"b1": _timing(key, ms, base)},
            "peak_rss_mb": None,
        }
        for key, ms in rounds.items()
    }


def _layer(name: str, type_: str, nbytes: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": type_,
        "params": nbytes // 4,
        "bytes": nbytes,
        "dtypes": {"float32": nbytes},
        "macs": 1000,
        "latency_ms": 0.01,
        "output_bytes": 64,
    }


def _profile(layers: list[dict[str, Any]], macs: int) -> dict[str, Any]:
    return {
        "model": "Net",
        "input_shapes": [[1, 8]],
        "params": sum(x["params"] for x in layers),
        "bytes": sum(x["bytes"] for x in layers),
        "bytes_by_dtype": {"float32": sum(x["bytes"] for x in layers)},
        "macs": macs,
        "latency_ms": 0.05,
        "threads": 2,
        "peak_activation_bytes": 256,
        "layers": layers,
    }


def _result(rounds: dict[str, list[float]], *, fidelity: float | None = 0.99871) -> dict[str, Any]:
    """A job result as run_job writes it, with chosen per-round times."""
    parity = []
    for runtime in ("onnxruntime", "openvino"):
        for label in ("fp32", "compressed"):
            compressed = label == "compressed"
            parity.append(
                {
                    "artifact": label,
                    "runtime": runtime,
                    "samples": 4,
                    "outputs": [
                        {
                            "name": "logits",
                            "max_abs": 1e-3,
                            "mean_abs": 1e-4,
                            "cosine": 0.99999,
                            "min_cosine": 0.99998,
                            "top1_agreement": 1.0,
                            "artifact_fidelity": fidelity if compressed else None,
                            "torch_fidelity": 0.99876 if compressed and fidelity is not None else None,
                        }
                    ],
                    "passed": True,
                    "message": "",
                }
            )
    return {
        "model": {"name": "net", "class": "Net", "input_shapes": [[1, 8]]},
        "recipe": [{"type": "weight_only", "bits": 8}],
        "environment": {"cpu": "test cpu", "threads": 2, "python": "3.11", "versions": {"torch": "x"}},
        "profile": {
            "baseline": _profile([_layer("encoder.block.0.projection", "Linear", 4096)], macs=3_000_000),
            "compressed": _profile(
                [_layer("encoder.block.0.projection", "QuantizedLayer[w8](Linear)", 1100)], macs=2_000_000
            ),
        },
        "compress_wall_s": 0.5,
        "explain": [
            {
                "name": "encoder.block.0.projection",
                "scheme": "w8",
                "weight_sqnr_db": 41.0,
                "output_sqnr_db": 38.5,
                "input_range": None,
                "clipped_fraction": None,
            }
        ],
        "parity": parity,
        "quality": {
            "metric": "accuracy",
            "onnxruntime fp32": 0.91,
            "onnxruntime compressed": 0.9,
            "openvino fp32": 0.91,
            "openvino compressed": 0.9,
        },
        "bench": _bench(rounds, size={"fp32": 4096, "compressed": 1100}),
    }


# fp32 OpenVINO is 1.5x the baseline (a runtime difference); compressed ORT is within noise of fp32 ORT
# (ratios 0.9 .. 1.1); compressed OV is consistently faster than fp32 OV (about 0.8x, every round).
ROUNDS = {
    "fp32 onnxruntime": [1.0, 1.0, 1.0, 1.0, 1.0],
    "compressed onnxruntime": [0.9, 1.05, 1.1, 0.95, 1.0],
    "fp32 openvino": [1.5, 2.0, 1.5, 1.5, 1.5],
    "compressed openvino": [1.2, 1.6, 1.25, 1.2, 1.17],
}


def _rows(page: str) -> dict[str, str]:
    """Table rows of the artifact table, keyed by their first cell's text."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        first = re.sub(r"<small>.*?</small>|<[^>]+>", "", row.split("</td>")[0]).strip()
        rows.setdefault(first, row)
    return rows


def test_speed_is_paired_per_round_within_the_same_runtime():
    bench = _result(ROUNDS)["bench"]
    c = compare_speed(bench, "compressed openvino", "fp32 openvino", "b1")
    # per-round ratios 0.8, 0.8, 0.833, 0.8, 0.78: their median and percentiles (not a ratio of medians)
    assert c.ratio == pytest.approx(0.8)
    assert c.low == pytest.approx(0.788, abs=1e-3) and c.high == pytest.approx(0.82)
    assert c.within_noise is False
    noisy = compare_speed(bench, "compressed onnxruntime", "fp32 onnxruntime", "b1")
    assert noisy.low < 1.0 < noisy.high and noisy.within_noise is True


def test_findings_carry_spread_and_say_within_noise():
    lines = findings(_result(ROUNDS))
    ort = next(line for line in lines if line.startswith("onnxruntime, b1"))
    ov = next(line for line in lines if line.startswith("openvino, b1"))
    assert "within noise of fp32 in the same runtime" in ort and "slower" not in ort and "faster" not in ort
    assert "p10-p90 0.920-1.080x over 5 rounds" in ort
    # against fp32 OpenVINO (not the ONNX Runtime baseline, which it is 1.2x slower than)
    assert "1.25x faster than fp32 in the same runtime (0.800x, p10-p90 0.788-0.820x over 5 rounds)" in ov


def test_a_consistent_small_slowdown_is_not_noise():
    rounds = {**ROUNDS, "compressed onnxruntime": [1.04, 1.05, 1.06, 1.05, 1.05]}
    ort = next(line for line in findings(_result(rounds)) if line.startswith("onnxruntime, b1"))
    assert "1.05x slower than fp32 in the same runtime" in ort and "within noise" not in ort


def test_results_without_per_round_times_still_render():
    result = _result(ROUNDS)
    for v in result["bench"].values():
        del v["latency"]["b1"]["round_ms"]
    lines = findings(result)
    # against the benchmark's baseline the stored ratios are already paired; elsewhere the spread is unknown
    assert any(line.startswith("onnxruntime, b1") and "p10-p90 0.900-1.100x" in line for line in lines)
    assert any(line.startswith("openvino, b1") and "per-round spread not recorded" in line for line in lines)
    assert "time ratio per round" in render_html(result)


def test_fidelity_to_the_original_is_always_reported():
    result = _result(ROUNDS)
    line = next(line for line in findings(result) if line.startswith("Fidelity to the original"))
    assert "0.998710 in onnxruntime" in line and "0.998710 in openvino" in line and "0.998760" in line
    page = render_html(result)
    assert "fidelity to original" in page and "0.998710" in page
    old = _result(ROUNDS, fidelity=None)
    assert any("not recorded" in line for line in findings(old))
    assert "fidelity to original" in render_html(old)


def test_baseline_rows_are_never_coloured_as_regressions():
    rows = _rows(render_html(_result(ROUNDS)))
    fp32_ov = rows["fp32 openvino"]
    assert "1.500x" in fp32_ov and "bad" not in fp32_ov and "good" not in fp32_ov
    assert "bad" not in rows["fp32 onnxruntime"]
    # within noise: no colour; consistently faster: green
    assert (
        "class='bad'" not in rows["compressed onnxruntime"]
        and "class='good'" not in rows["compressed onnxruntime"]
    )
    assert "<span class='good'>0.800x</span>" in rows["compressed openvino"]
    slower = {**ROUNDS, "compressed onnxruntime": [1.2, 1.3, 1.25, 1.2, 1.22]}
    assert "<span class='bad'>1.220x</span>" in _rows(render_html(_result(slower)))["compressed onnxruntime"]


def test_job_report_has_inline_plots_and_no_external_reference():
    page = render_html(_result(ROUNDS))
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    assert "<img" not in page and "url(" not in page and "@import" not in page
    for title in (
        "file size",
        "latency b1: median ms per call",
        "quality: accuracy",
        "b1: time ratio per round",
        "output SQNR per layer",
        "bytes after / before per changed layer",
    ):
        assert f"aria-label='{title}" in page, title
    # the spread plot has one dot per round for each pair: 2 same-runtime pairs + fp32 OV vs the baseline
    spread = page[page.index("aria-label='b1: time ratio per round") :]
    assert spread[: spread.index("</svg>")].count("<circle") == 3 * 5


def test_terminal_summary_shows_compressed_params_macs_and_fidelity():
    console = Console(record=True, width=300)
    print_summary(_result(ROUNDS), console)
    text = " ".join(console.export_text().split())
    assert "params 1.02k -> 275" in text and "MACs 3.00M -> 2.00M" in text
    assert "Fidelity to the original (uncompressed) model" in text and "0.998710 in openvino" in text
    assert "within noise of fp32 in the same runtime" in text


def test_report_kind_is_told_from_the_keys():
    result = _result(ROUNDS)
    assert report_kind(result) == "job"
    assert report_kind(result["bench"]) == "bench"
    assert report_kind(result["profile"]["baseline"]) == "profile"
    for data, found in (([1, 2], "a JSON list"), ({"rows": []}, "keys ['rows']"), ({}, "keys []")):
        with pytest.raises(DataError, match="not a modelpress result") as info:
            report_kind(data)
        message = str(info.value)
        assert found in message and "bench --json" in message and "profile --json" in message


def test_bench_and_profile_pages():
    result = _result(ROUNDS)
    bench_page = render_bench_html(result["bench"])
    assert "against <b>fp32 onnxruntime</b>" in bench_page
    assert "b1: compressed openvino is 1.20x slower than fp32 onnxruntime" in bench_page
    assert "aria-label='b1: time ratio per round" in bench_page
    assert render_any(result["bench"]) == bench_page
    profile_page = render_profile_html(result["profile"]["baseline"])
    assert "modelpress profile: Net" in profile_page and "aria-label='slowest layers" in profile_page
    assert "encoder.block.0.projection" in profile_page


# ---------------------------------------------------------------------------------------------------------
# Real results: a job on a tiny seeded model, and `profile --json` / `bench --json` through the CLI


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """run_job on the tiny seeded CNN (weight-only int8), with an evaluation set whose labels are the fp32
    model's own predictions, so that quality shows a real figure."""
    from conftest import TINY_MODEL

    from modelpress.loading import load_model
    from modelpress.pipeline.run import run_job

    folder = tmp_path_factory.mktemp("job")
    (folder / "tiny.py").write_text(TINY_MODEL)
    model, inputs = load_model(f"{folder / 'tiny.py'}:build")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        eval_data = [
            (x, model(x).argmax(-1)) for x in (torch.randn(8, 3, 8, 8, generator=g) for _ in range(2))
        ]
    return run_job(
        model,
        inputs,
        "int8-weight-only",
        out_dir=folder / "out",
        name="tiny",
        eval_data=eval_data,
        metric="accuracy",
        rounds=3,
        memory=False,
        batch_sizes=(1, 2),
    )


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.slow
def test_report_command_renders_every_json_modelpress_writes(tiny_job, tiny_model_file, tmp_path):
    out = Path(tiny_job["out_dir"])
    assert tiny_job["quality"]["onnxruntime fp32"] == 1.0

    job = _cli("report", out / "report.json", "-o", tmp_path / "job.html")
    assert job.exit_code == 0, job.output
    assert "job report" in job.output
    assert (tmp_path / "job.html").read_text() == (out / "report.html").read_text()

    profile = _cli("profile", f"{tiny_model_file}:build", "--json", tmp_path / "p.json")
    assert profile.exit_code == 0, profile.output
    result = _cli("report", tmp_path / "p.json", "-o", tmp_path / "p.html")
    assert result.exit_code == 0 and "profile report" in result.output, result.output
    page = (tmp_path / "p.html").read_text()
    assert "modelpress profile: Tiny" in page and "aria-label='slowest layers" in page and "conv" in page

    fp32, compressed = (next(p for p in out.glob("*.onnx") if ("compressed" in p.name) == c) for c in (0, 1))
    bench = _cli(
        "bench",
        compressed,
        "--baseline",
        fp32,
        "--batch",
        "1,2",
        "--rounds",
        "3",
        "--json",
        tmp_path / "b.json",
    )
    assert bench.exit_code == 0, bench.output
    result = _cli("report", tmp_path / "b.json", "-o", tmp_path / "b.html")
    assert result.exit_code == 0 and "bench report" in result.output, result.output
    page = (tmp_path / "b.html").read_text()
    assert "modelpress bench:" in page and "aria-label='b2: time ratio per round" in page
    assert "artifact openvino" in page and "p10-p90" in page


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "is not a modelpress result: it is a JSON list"),
        ('{"rows": []}', "Expected the report.json of `modelpress compress`"),
        ("not json", "is not a modelpress result: it is not JSON"),
        ('{"model": {}, "recipe": [], "profile": {}, "parity": [], "bench": {}}', "lacks a field"),
    ],
)
def test_report_command_refuses_other_json(tmp_path, content, message):
    (tmp_path / "x.json").write_text(content)
    result = _cli("report", tmp_path / "x.json", "-o", tmp_path / "x.html")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "x.html").exists()


# ---------------------------------------------------------------------------------------------------------
# The real report in a real browser


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _chromium() -> Any:
    """playwright's sync API, driving Debian's Chromium (no browser download)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}; the report test needs it. Install it with "
            "`apt-get install -y chromium` (Debian; .ci/run does this in CI)."
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The playwright package is missing; install the test extra: pip install -e '.[test]'.")
    return sync_playwright


@pytest.mark.slow
def test_report_in_headless_chromium(tiny_job, tmp_path):
    sync_playwright = _chromium()
    out = Path(tiny_job["out_dir"])
    pages = {"job": out / "report.html"}
    for kind, data in (("bench", tiny_job["bench"]), ("profile", tiny_job["profile"]["compressed"])):
        pages[kind] = tmp_path / f"{kind}.html"
        pages[kind].write_text(render_any(data))
    charts = {
        "job": 7,
        "bench": 5,
        "profile": 2,
    }  # size, b1, b2, quality, 2 spreads, SQNR (+ weight SQNR, bytes)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            for kind, path in pages.items():
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                requests: list[str] = []
                page.on(
                    "console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None
                )
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("request", lambda r, requests=requests: requests.append(r.url))
                page.goto(path.as_uri(), wait_until="load")
                shot = page.screenshot(full_page=True)
                (tmp_path / f"{kind}.png").write_bytes(shot)
                assert errors == [], (kind, errors)
                assert requests == [path.as_uri()], (kind, requests)
                width, height = _png_size(shot)
                assert width == 1280 and height >= 900 and len(shot) > 30_000, (
                    kind,
                    width,
                    height,
                    len(shot),
                )
                layout = page.evaluate(
                    """() => ({
                        page: document.documentElement.scrollWidth,
                        view: document.documentElement.clientWidth,
                        tables: [...document.querySelectorAll('.wrap')]
                            .filter(e => e.scrollWidth > e.clientWidth + 1).length,
                        charts: [...document.querySelectorAll('svg.chart')]
                            .filter(e => e.getBoundingClientRect().width > 0).length,
                        wide: [...document.querySelectorAll('svg.chart')]
                            .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth).length,
                    })"""
                )
                assert layout["page"] <= layout["view"] == 1280, (kind, layout)
                assert layout["tables"] == 0 and layout["wide"] == 0, (kind, layout)
                assert layout["charts"] >= charts[kind], (kind, layout)
                page.close()
        finally:
            browser.close()
