"""Same host, same run: the MNIST int8-static artifact built by an older commit against the one built by the
working tree, timed interleaved in OpenVINO (or ONNX Runtime) beside fp32. Ratios measured on different hosts
are not comparable (MEASURING.md); this is how "no slower than before" is checked.

    python benchmarks/ab_commits.py 0bbf3df --recipe int8-static --runtime openvino --rounds 40

Builds the old artifact in a `git worktree` of the older commit (run with PYTHONPATH at its src/), the new one
with the installed package, then prints per-batch ratios to fp32 and the paired new/old ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BUILD = """
import sys
sys.path.insert(0, {bench!r})
import assets
import modelpress as mp

out, recipe = sys.argv[1], sys.argv[2]
model = assets.mnist_model()
x, _ = assets.mnist_data("test")
calib = [x[i * 64 : (i + 1) * 64] for i in range(16)]
mp.export_onnx(mp.compress(model, recipe, calib), (x[:1],), out + ".onnx", overwrite=True)
mp.export_onnx(model, (x[:1],), out + ".fp32.onnx", overwrite=True)
"""


def build(src: Path | None, out: Path, recipe: str) -> None:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    code = BUILD.format(bench=str(HERE))
    subprocess.run([sys.executable, "-c", code, str(out), recipe], check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("commit", help="the older commit to build the baseline artifact with")
    parser.add_argument("--recipe", default="int8-static")
    parser.add_argument("--runtime", default="openvino", choices=["openvino", "onnxruntime"])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()

    import modelpress as mp

    sys.path.insert(0, str(HERE))
    import assets

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tree = work / "old"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "-f", "-q", str(tree), args.commit], check=True
        )
        try:
            build(tree / "src", work / "old", args.recipe)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
        build(None, work / "new", args.recipe)
        x, _ = assets.mnist_data("test")
        artifacts = {
            "fp32": (str(work / "new.fp32.onnx"), args.runtime),
            "old": (str(work / "old.onnx"), args.runtime),
            "new": (str(work / "new.onnx"), args.runtime),
        }
        batches = {"b1": [x[:1].numpy()], "b64": [x[:64].numpy()]}
        result = mp.compare_artifacts(artifacts, batches, baseline="fp32", rounds=args.rounds, memory=False)
    for name, bench in result.items():
        for b, t in bench.latency.items():
            print(f"{name} {b}: {t.ratio:.3f} of fp32 [p10 {t.ratio_p10:.3f}, p90 {t.ratio_p90:.3f}]")
    for b in batches:
        new, old = result["new"].latency[b], result["old"].latency[b]
        print(
            f"new / old {b} ({args.runtime}, {args.rounds} rounds, paired per round): {new.paired_ratio(old):.3f}"
        )


if __name__ == "__main__":
    main()
