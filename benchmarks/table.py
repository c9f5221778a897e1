"""Render the committed benchmark JSON as the Markdown table the README shows.

python benchmarks/table.py benchmarks/results/{mnist,minilm,smollm2}.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(paths: list[str]) -> str:
    lines = [
        "| asset | method | runtime | quality | fidelity | size | latency ratio | compress s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        result = json.loads(Path(path).read_text())
        for row in result["rows"]:
            fid = row.get("fidelity") or {}
            if "top1_agreement" in fid:
                fidelity = f"top-1 {fid['top1_agreement']:.4f}"
            else:
                fidelity = f"cos {fid.get('mean_cosine', float('nan')):.4f}"
            latency = ", ".join(f"{k} {v:.2f}" for k, v in row["latency_ratio"].items())
            lines.append(
                f"| {result['asset']} | {row['method']} | {row['runtime']} | {row['quality']:.4f} | {fidelity} | "
                f"{row['size_ratio']:.3f}x | {latency} | {row.get('wall_s') or 0:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
