"""The summary table printed on the terminal after a job."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from modelpress.analyse.profile import human_bytes, human_count


def print_summary(result: dict[str, Any], console: Console) -> None:
    """The artifact table, the findings (speed with its spread, fidelity to the original model), the worst
    layers and the original and compressed model's size and MACs."""
    bench = result["bench"]
    batches = list(next(iter(bench.values()))["latency"])
    q = result.get("quality") or {}
    short = {"onnxruntime": "ORT", "openvino": "OV"}
    table = Table(title=f"{result['model']['name']}: exported artifacts; x = ratio to {next(iter(bench))}")
    for col in ["artifact", "size", "size x"] + [f"{b} ms" for b in batches] + [f"{b} x" for b in batches]:
        table.add_column(col, justify="left" if col == "artifact" else "right")
    if q:
        table.add_column(str(q["metric"])[:8], justify="right")
    for key, v in bench.items():
        label = key.split(" ")[0]
        row = [
            f"{label} {short.get(v['runtime'], v['runtime'])}",
            human_bytes(v["size_bytes"]),
            f"{v['size_ratio']:.3f}",
        ]
        row += [f"{v['latency'][b]['median_ms']:.3f}" for b in batches]
        row += [f"{v['latency'][b]['ratio']:.3f}" for b in batches]
        if q:
            val = q.get(f"{v['runtime']} {label}")
            row.append(f"{val:.4f}" if isinstance(val, float) else "-")
        table.add_row(*row)
    console.print(table)
    from modelpress.report.html import coverage_line, findings, integer_line

    for line in findings(result):
        console.print(f"- {line}", highlight=False)
    for report in (result.get("integer") or {}).values():
        console.print(f"- {integer_line(report)}", highlight=False)
    covered = coverage_line(result)
    if covered:
        alone = [row for row in result["coverage"]["layers"] if row["status"] == "left alone"]
        largest = max(alone, key=lambda row: row["bytes"], default=None)
        tail = f" Largest left alone: {largest['name']} ({largest['reason']})." if largest else ""
        console.print(f"- {covered}{tail}", highlight=False)
    worst = result.get("explain", [])[:3]
    if worst:
        console.print(
            "worst layers (output SQNR): "
            + ", ".join(f"{row['name']} {row['output_sqnr_db']:.1f} dB" for row in worst)
        )
    base, small = result["profile"]["baseline"], result["profile"]["compressed"]
    console.print(
        f"params {human_count(base['params'])} -> {human_count(small['params'])}, "
        f"MACs {human_count(base['macs'])} -> {human_count(small['macs'])}, "
        f"torch bytes {human_bytes(base['bytes'])} -> {human_bytes(small['bytes'])} (original -> compressed); "
        f"parity: {'all passed' if all(p['passed'] for p in result['parity']) else 'FAILED'}; "
        f"compression took {result['compress_wall_s']:.2f} s"
    )
