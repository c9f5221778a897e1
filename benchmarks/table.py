"""Render the committed benchmark JSON as the Markdown table the README shows.

python benchmarks/table.py benchmarks/results/{mnist,minilm,smollm2}.json

Peer tools' rows (by != modelpress) come from the same runs. "integer kernels": how many of the conv/matmul
layers the runtime's optimised graph runs as integer (static / dynamic int8 rows, issue 31). Rows in runtime "torch" have no artifact: their
size is the saved state dict against the fp32 model's, and they are not timed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TIMING_ONLY = ("resnet18", "mobilenet_v2")  # random-init weights: quality is top-1 agreement with fp32


def table(paths: list[str]) -> str:
    lines = [
        "| asset | method | by | runtime | quality | fidelity | size | latency ratio | integer kernels | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    torch_rows = False
    for path in paths:
        result = json.loads(Path(path).read_text())
        # A second run on the same asset (its own fp32 rows) is told apart by its file name.
        label = (
            result["asset"]
            if Path(path).stem == result["asset"]
            else f"{result['asset']} ({Path(path).stem})"
        )
        for row in result["rows"]:
            fid = row.get("fidelity") or {}
            if "top1_agreement" in fid and result["asset"] in TIMING_ONLY:
                fidelity = f"cos {fid['mean_cosine']:.4f}, top-1 {fid['top1_agreement']:.3f}"
            elif "top1_agreement" in fid:
                fidelity = f"top-1 {fid['top1_agreement']:.4f}"
            else:
                fidelity = f"cos {fid.get('mean_cosine', float('nan')):.4f}"
            counts = row.get("integer_kernels") or {}
            integer = f"{counts['integer']}/{counts['total']}" if "total" in counts else ""
            latency = ", ".join(f"{k} {v:.2f}" for k, v in row.get("latency_ratio", {}).items()) or "-"
            size = f"{row['size_ratio']:.3f}x"
            if row["runtime"] == "torch":
                size += "*"
                torch_rows = True
            lines.append(
                f"| {label} | {row['method']} | {row.get('by', 'modelpress')} | {row['runtime']} | "
                f"{row['quality']:.4f} | {fidelity} | {size} | {latency} | {integer or '-'} | "
                f"{row.get('wall_s') or 0:.1f} |"
            )
    if torch_rows:
        lines.append("")
        lines.append(
            "\\* torch only (no exportable artifact): size of the saved state dict vs the fp32 model's; not timed."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
