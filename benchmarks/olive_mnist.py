"""Issue 28's Olive target: Olive and modelpress on the same MNIST CNN, same accuracy goal, one run.

    OMP_WAIT_POLICY=PASSIVE nice -n 5 python benchmarks/olive_mnist.py \
        --json benchmarks/results/mnist-olive.json [--work DIR] [--olive-iters 40] [--rounds 150] [--smoke]

Target: modelpress's chosen point (benchmarks/results/mnist-search.json) is smaller and faster than Olive's best
at equal or better accuracy. Olive (`olive-ai[cpu]`, benchmarks/setup.sh with OLIVE_PEER=1) gets the fp32 ONNX
file modelpress exports, the goal accuracy >= 98.8% on the 10k MNIST test set (priority 1) and average latency
at batch 64 (priority 2, lower is better), and searches its CPU passes with its TPE sampler, one workflow per
family (a workflow is a chain of passes, so families with different chains run as separate workflows):
  - ort-quant: OnnxQuantization, its own search space (static / dynamic, QDQ / QOperator, int8 / uint8, per
    channel, reduce range, calibration method, pre-processing) - calibrated on 2048 training images;
  - weight-only-int4: GraphSurgeries(GemmToMatMulAdd) then OnnxBlockWiseRtnQuantization, block 32/64/128,
    symmetric or not (the CNN's linear layers are Gemm nodes, which the RTN pass skips as they are);
  - openvino-nncf: OpenVINOConversion (dynamic batch) then OpenVINOQuantization (NNCF), preset
    PERFORMANCE / MIXED - same calibration images.
Every candidate Olive evaluated goes into the JSON with Olive's accuracy and latency and its bytes on disk;
Olive's own pick is its rule (sort by the objectives in priority order among candidates that meet the goal:
the most accurate, then the fastest), per workflow and over all of them.

Then, in this process, interleaved rounds (benchmarks/MEASURING rules: 2 threads, spinning off): every
distinct Olive candidate that meets the floor is screened at batch 64 against the fp32 file, and the final
rounds time at batch 64 and 1 the fp32 ONNX in ONNX Runtime (baseline), modelpress's point in OpenVINO
(rebuilt from the chosen recipe of mnist-search.json with search.py's calibration, or --mp-artifact), the
most accurate point of that search's front (also rebuilt), and Olive's smallest candidate, its pick, the ORT
workflow's pick and the three fastest of the screening, each in the runtime Olive targeted (ONNX files in
ONNX Runtime CPU, OpenVINO IR in OpenVINO). Accuracy of the timed artifacts is measured here
again on the 10k test set. Olive's best = the Olive candidate meeting the floor that is fastest at b64 in
the final rounds.

The strict reading ("at equal or better accuracy" than Olive's best, not only at the same goal): before the
final rounds, modelpress's search runs again with the floor raised to the best accuracy among the
contenders for Olive's best (the three fastest of the screening, accuracy measured here), in a space of
structured ratios x keeping the int8-sensitive layers out, static int8, recovering each cut by distillation
with the hard labels mixed in (`recover: {loss: kl, alpha: 0.5}`: items are (images, labels) pairs, so a user
with labels gets their accuracy back). Its chosen point is timed in the final rounds as
"modelpress-at-olive-accuracy".

Olive problems met (olive-ai 0.13.0) and what this script does about them are listed in the JSON ("olive_issues").
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import assets
import numpy as np
import torch

import modelpress as mp
from modelpress._files import file_size
from modelpress.deploy.bench import compare_artifacts
from modelpress.deploy.runtime import open_session
from modelpress.environment import environment
from modelpress.pipeline.run import benchmark_batches

FLOOR = 0.988
THREADS = 2
CALIB_IMAGES = 2048  # search.py's static int8 calibrates on the first 32 batches of 64
ACC = "accuracy-accuracy_score"
LAT = "latency-avg"

# Registered into Olive's data registry when Olive imports this file (its `user_script`).
USER_SCRIPT = '''
import os

import numpy as np
import torch
from olive.data.registry import Registry


class _Images(torch.utils.data.Dataset):
    """(image, label) items; `as_dict` gives {"x": image}: Olive's ORT calibration reader takes only dicts,
    while its OpenVINO evaluator and NNCF dataset take only plain tensors."""

    def __init__(self, x, y, as_dict):
        self.x, self.y, self.as_dict = x, y, as_dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        item = torch.from_numpy(self.x[i])
        return ({"x": item} if self.as_dict else item), int(self.y[i])


@Registry.register_dataset()
def mnist_npy(data_dir, split, limit=0, as_dict=False):
    x = np.load(os.path.join(data_dir, f"{split}_x.npy"))
    y = np.load(os.path.join(data_dir, f"{split}_y.npy"))
    if limit:
        x, y = x[:limit], y[:limit]
    return _Images(x, y, as_dict)


@Registry.register_post_process()
def mnist_argmax(output_data, **kwargs):
    logits = output_data if isinstance(output_data, torch.Tensor) else torch.as_tensor(np.asarray(output_data))
    return logits.argmax(dim=-1)
'''

OLIVE_ISSUES = [
    "search_strategy sampler settings (max_samples, seed) are dropped: the engine config is dumped with "
    "sampler_config typed as the ConfigBase base class, so TPE sees max_samples=0 and searches exhaustively "
    "(the ORT quantization space has ~190 points); this script bounds each workflow with max_iter instead, "
    "and the TPE seed is Olive's default (1)",
    "a TPE point whose pass run is already cached (two points that give the same model, e.g. dynamic mode "
    "with different calibration settings) crashes in Footprint.record ('FootprintNode' object has no field "
    "'model_config'); the engine logs it and skips the point, so such points have no metrics",
    "the ORT calibration reader asserts dict batches while the OpenVINO evaluator and NNCF's dataset need "
    "plain tensors: the script registers both forms of the same images",
    "OnnxBlockWiseRtnQuantization leaves Gemm nodes alone (this CNN's linear layers): the weight-only workflow "
    "first runs GraphSurgeries(GemmToMatMulAdd)",
    "in a workflow of two passes, every search point after the first reuses the first pass's cached output and "
    "crashes on that cache hit (same error): weight-only (GraphSurgeries + RTN) and OpenVINO (conversion + NNCF) "
    "gave 1 candidate of 6 and 1 of 2 under TPE; the script runs each of their points as its own workflow",
    "OpenVINOConversion makes a static model by default: static=False keeps the batch dynamic for b1 and b64",
    "OpenVINO candidates carry no size on disk in Olive's footprint: sizes here are the .xml + .bin bytes",
    "not used here, seen in a 4-step probe: with alternative passes in one slot ([OnnxQuantization, "
    "OnnxBlockWiseRtnQuantization]), TPE's first point ran OnnxQuantization with its search parameters "
    "unresolved and was pruned ('Unsupported precision: Categorical([int8, uint8])'); the next points ran",
]


def load() -> float:
    return os.getloadavg()[0]


def sha(path: Path) -> str:
    h = hashlib.sha256()
    paths = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    for p in paths:
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def clean_params(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """A pass's run config as Olive records it, with the parameters that do not apply to the point (Olive leaves
    their whole search-parameter definition in the record, e.g. calibrate_method in dynamic mode) as "n/a".

    >>> clean_params({"quant_mode": "dynamic", "calibrate_method": {"olive_parameter_type": "SearchParameter"}})
    {'quant_mode': 'dynamic', 'calibrate_method': 'n/a'}
    """
    if params is None:
        return None
    return {
        k: "n/a" if isinstance(v, dict) and v.get("olive_parameter_type") == "SearchParameter" else v
        for k, v in params.items()
    }


def olive_pick(cands: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Olive's rule (engine/output.py `_sort_by_metrics`): among candidates meeting the goal, the highest
    priority-1 objective (accuracy), ties broken by the priority-2 one (lower latency)."""
    met = [c for c in cands if c["olive_goal_met"]]
    return max(met, key=lambda c: (c["olive_accuracy"], -c["olive_latency_ms"])) if met else None


# --------------------------------------------------------------------------------------------- Olive


def workflows(iters: int) -> dict[str, tuple[dict[str, Any], int]]:
    """name -> (passes, TPE max_iter).

    The ORT family is one pass: one TPE search over its space. The two-pass families (weight-only, OpenVINO)
    cannot be searched in one workflow here: from the second point on, the first pass's output comes from
    Olive's cache and that cache hit crashes the step (see OLIVE_ISSUES), so only the first point would be
    evaluated. Their spaces are small (6 and 2 points), so each point runs as a workflow of its own: the same
    points an exhaustive search would visit."""
    out: dict[str, tuple[dict[str, Any], int]] = {
        "ort-quant": ({"quantization": {"type": "OnnxQuantization", "data_config": "calib_dict"}}, iters)
    }
    for block in (32, 64, 128):
        for symmetric in (True, False):
            out[f"weight-only-int4-b{block}-{'sym' if symmetric else 'asym'}"] = (
                {
                    "gemm_to_matmul": {
                        "type": "GraphSurgeries",
                        "surgeries": [{"surgeon": "GemmToMatMulAdd"}],
                    },
                    "rtn": {
                        "type": "OnnxBlockWiseRtnQuantization",
                        "block_size": block,
                        "is_symmetric": symmetric,
                    },
                },
                1,
            )
    for preset in ("PERFORMANCE", "MIXED"):
        out[f"openvino-nncf-{preset.lower()}"] = (
            {
                "conversion": {"type": "OpenVINOConversion", "static": False},
                "nncf": {"type": "OpenVINOQuantization", "data_config": "calib", "preset": preset},
            },
            1,
        )
    return out


def olive_config(
    name: str, passes: dict[str, Any], max_iter: int, work: Path, fp32: Path, eval_images: int
) -> dict[str, Any]:
    def data(dname: str, split: str, batch: int, *, as_dict: bool = False, limit: int = 0) -> dict[str, Any]:
        return {
            "name": dname,
            "user_script": str(work / "olive_user_script.py"),
            "script_dir": str(work),
            "load_dataset_config": {
                "type": "mnist_npy",
                "params": {"data_dir": str(work), "split": split, "limit": limit, "as_dict": as_dict},
            },
            "post_process_data_config": {"type": "mnist_argmax"},
            "dataloader_config": {"params": {"batch_size": batch}},
        }

    metrics = [
        {
            "name": "accuracy",
            "type": "accuracy",
            "data_config": "test",
            "sub_types": [
                {
                    "name": "accuracy_score",
                    "priority": 1,
                    "goal": {"type": "threshold", "value": FLOOR},
                    "metric_config": {"task": "multiclass", "num_classes": 10},
                }
            ],
        },
        {
            "name": "latency",
            "type": "latency",
            "data_config": "latency_b64",
            "sub_types": [{"name": "avg", "priority": 2}],
        },
    ]
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(fp32)},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "data_configs": [
            data("test", "test", 256, limit=eval_images),
            data("latency_b64", "test", 64, limit=64),
            data("calib_dict", "calib", 64, as_dict=True),
            data("calib", "calib", 64),
        ],
        "evaluators": {"mnist": {"metrics": metrics}},
        "passes": passes,
        "search_strategy": {"execution_order": "joint", "sampler": "tpe", "max_iter": max_iter},
        "evaluator": "mnist",
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(work / name / "cache"),
        "output_dir": str(work / name / "out"),
        "log_severity_level": 1,
    }


def artifact_of(node: dict[str, Any]) -> Path | None:
    config = (node.get("model_config_data") or {}).get("config") or {}
    path = config.get("model_path")
    if not path:
        return None
    p = Path(path)
    if p.is_dir():  # OpenVINO: a folder with <model_name>.xml/.bin; ONNX: a folder with one .onnx
        found = sorted(p.glob("*.xml")) or sorted(p.glob("*.onnx"))
        return found[0] if found else None
    return p


def run_olive(
    name: str, config: dict[str, Any], work: Path, say: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = folder / "config.json"
    cfg.write_text(json.dumps(config, indent=1), encoding="utf-8")
    log = folder / "olive.log"
    say(f"olive {name}: running (log {log})")
    start = time.perf_counter()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with log.open("w", encoding="utf-8") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "olive", "run", "--config", str(cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
            env=env,
            check=False,
        ).returncode
    wall = time.perf_counter() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    info: dict[str, Any] = {
        "returncode": rc,
        "wall_s": wall,
        "steps": text.count("] Step "),
        "steps_failed": len(re.findall(r"\] Step \d+ search point", text)),
        "cache_hit_crashes": text.count('has no field "model_config"'),
        "pruned": text.count("Invalid config, pruned"),
        "config": str(cfg),
        "log": str(log),
    }
    fp = folder / "out" / "footprint.json"
    if rc != 0 or not fp.exists():
        tail = [ln for ln in text.splitlines() if ln.strip()][-3:]
        info["error"] = " | ".join(tail)
        say(f"olive {name}: failed ({info['error'][:300]})")
        return [], info
    nodes = json.loads(fp.read_text(encoding="utf-8"))
    cands = []
    for node in nodes.values():
        metrics = node.get("metrics") or {}
        values = metrics.get("value") or {}
        if node.get("parent_model_id") is None:
            info["input_model"] = {
                "accuracy": values.get(ACC, {}).get("value"),
                "latency_ms": values.get(LAT, {}).get("value"),
            }
            continue
        if ACC not in values:
            continue
        path = artifact_of(node)
        if path is None or not path.exists():
            continue
        cands.append(
            {
                "workflow": name,
                "model_id": node["model_id"],
                "pass": node.get("from_pass"),
                "params": clean_params(node.get("pass_run_config")),
                "olive_accuracy": float(values[ACC]["value"]),
                "olive_latency_ms": float(values[LAT]["value"]),
                "olive_goal_met": bool(metrics.get("if_goals_met")),
                "olive_pareto": bool(node.get("is_pareto_frontier")),
                "runtime": "openvino" if path.suffix == ".xml" else "onnxruntime",
                "path": str(path),
                "size_bytes": file_size(path),
                "sha": sha(path),
            }
        )
    pick = olive_pick(cands)
    info["candidates"] = len(cands)
    info["olive_pick"] = pick["model_id"] if pick else None
    say(f"olive {name}: {len(cands)} candidates in {wall:.0f} s (pick {info['olive_pick']})")
    return cands, info


# ---------------------------------------------------------------------------------------- modelpress


def modelpress_point(
    args: argparse.Namespace, work: Path, say: Any, *, which: str = "chosen"
) -> tuple[Path, dict[str, Any]]:
    """A recipe of mnist-search.json rebuilt as search.py's trials build it: the chosen one, or ("accurate")
    the most accurate trial of its Pareto front."""
    from modelpress.deploy.export import export_for_runtimes
    from modelpress.optimize.search import describe_recipe
    from modelpress.pipeline.recipe import load_recipe

    result = json.loads(Path(args.search_json).read_text(encoding="utf-8"))
    trials = {t["number"]: t for t in result["search"]["trials"]}
    if which == "chosen":
        chosen_no = result["search"]["chosen"]
    else:
        chosen_no = max(result["search"]["front"], key=lambda n: (trials[n]["quality"], -n))
    trial = trials[chosen_no]
    info = {
        "source": args.search_json,
        "trial": chosen_no,
        "recipe": trial["recipe"],
        "recipe_text": describe_recipe(trial["recipe"]),
        "search_quality": trial["quality"],
        "search_size_bytes": trial["size_bytes"],
        "search_speedup_b64": trial["speedup"],
    }
    if args.mp_artifact and which == "chosen":
        info["rebuilt"] = False
        return Path(args.mp_artifact), info
    train_images = (
        int(result["command"].split("--train-images")[1].split()[0])
        if "--train-images" in result["command"]
        else 4096
    )
    x_train, _ = assets.mnist_data("train")
    calibration = [x_train[i : i + 64] for i in range(0, train_images, 64)]
    x, _ = assets.mnist_data("test")
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    say(f"modelpress: rebuilding trial {chosen_no} ({info['recipe_text']}) on {train_images} training images")
    start = time.perf_counter()
    small = mp.compress(assets.mnist_model(), load_recipe(trial["recipe"]), calibration, allow_partial=True)
    out = work / f"modelpress-{which}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = export_for_runtimes(
        small, (x[:1],), out / "model.onnx", ["openvino"], target="openvino", data=calibration
    )["openvino"]
    info.update(rebuilt=True, train_images=train_images, wall_s=time.perf_counter() - start, seed=0)
    return Path(path), info


def modelpress_at(
    args: argparse.Namespace, work: Path, floor: float, say: Any
) -> tuple[Path | None, dict[str, Any]]:
    """modelpress's search with the floor at `floor` (the strict reading): its chosen artifact (None when no
    trial meets the floor) and the search's summary."""
    x, y = assets.mnist_data("test")
    x_train, y_train = assets.mnist_data("train")
    n = args.strict_train_images
    labeled = [(x_train[i : i + 64], y_train[i : i + 64]) for i in range(0, n, 64)]
    recover = {"loss": "kl", "alpha": 0.5, "epochs": args.strict_epochs, "lr": 1e-3}
    space = mp.SearchSpace(
        structured=(0.0, 0.25, 0.375, 0.5),
        lowrank=(0.0,),
        sparsity=(0.0,),
        cluster=(0,),
        quantize=("static_int8",),
        keep=(0, 1),
        round_to=8,
        recover=recover,
    )
    out = work / "modelpress-at-olive-accuracy"
    shutil.rmtree(out, ignore_errors=True)
    config = mp.SearchConfig(
        out_dir=str(out),
        runtime="openvino",
        baseline_runtime="onnxruntime",
        trials=args.strict_trials,
        space=space,
        batch=64,
        rounds=args.screen_rounds,
        threads=THREADS,
    )
    say(f"modelpress: search at Olive's accuracy (floor {floor:.4f}), {args.strict_trials} trials")
    torch.manual_seed(0)
    start = time.perf_counter()
    result = mp.search(
        assets.mnist_model(),
        labeled,
        mp.metric_evaluator([(x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)], "accuracy"),
        mp.Constraints(floor=floor),
        example_inputs=(x[:1],),
        config=config,
        progress=lambda msg: say(f"  search: {msg}"),
    )
    chosen = result.chosen
    info = {
        "floor": floor,
        "met": result.met,
        "message": result.message,
        "space": "structured (0, 0.25, 0.375, 0.5) x keep (0, 1) + static_int8",
        "recover": recover,
        "train_images": n,
        "trials": [
            {k: t.to_dict()[k] for k in ("number", "state", "recipe", "quality", "size_bytes", "speedup")}
            for t in result.trials
        ],
        "chosen": chosen.number if chosen else None,
        "recipe": chosen.recipe if chosen else None,
        "wall_s": time.perf_counter() - start,
    }
    if not result.met or chosen is None or not chosen.artifact:
        return None, info
    return Path(chosen.artifact), info


# ------------------------------------------------------------------------------------------- measure


def accuracy(path: Path, runtime: str, x: torch.Tensor, y: torch.Tensor) -> float:
    session = open_session(path, runtime, threads=THREADS)
    return assets.mnist_accuracy(lambda b: session.run([b])[0], x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="The result file to write.")
    parser.add_argument("--work", default="/tmp/olive-mnist", help="Olive's workflows, caches and artifacts.")
    parser.add_argument("--search-json", default=str(Path(__file__).parent / "results" / "mnist-search.json"))
    parser.add_argument(
        "--mp-artifact", help="modelpress's point as a file (default: rebuilt from the recipe)."
    )
    parser.add_argument("--olive-iters", type=int, default=40, help="TPE iterations of the ORT workflow.")
    parser.add_argument("--eval-images", type=int, default=10000, help="Test images Olive evaluates on.")
    parser.add_argument("--rounds", type=int, default=150, help="Final interleaved rounds per batch size.")
    parser.add_argument("--screen-rounds", type=int, default=20)
    parser.add_argument(
        "--strict-trials", type=int, default=8, help="Trials of the search at Olive's accuracy."
    )
    parser.add_argument("--strict-epochs", type=int, default=3, help="Its recovery epochs after each cut.")
    parser.add_argument("--strict-train-images", type=int, default=49152, help="Its labeled training images.")
    parser.add_argument("--smoke", action="store_true", help="Tiny settings to check the plumbing.")
    args = parser.parse_args()
    if args.smoke:
        args.olive_iters, args.eval_images, args.rounds, args.screen_rounds = 4, 1000, 3, 2
        args.strict_trials, args.strict_epochs, args.strict_train_images = 2, 1, 2048

    t0, load_before = time.perf_counter(), load()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    model = assets.mnist_model()
    x, y = assets.mnist_data("test")
    x_train, _ = assets.mnist_data("train")
    np.save(work / "test_x.npy", x.numpy())
    np.save(work / "test_y.npy", y.numpy())
    np.save(work / "calib_x.npy", x_train[:CALIB_IMAGES].numpy())
    np.save(work / "calib_y.npy", np.zeros(CALIB_IMAGES, dtype=np.int64))
    (work / "olive_user_script.py").write_text(USER_SCRIPT, encoding="utf-8")
    fp32 = work / "fp32.onnx"
    for p in (fp32, Path(f"{fp32}.data")):
        p.unlink(missing_ok=True)
    fp32 = Path(mp.export_onnx(model, (x[:1],), fp32))
    say(f"fp32 ONNX exported: {fp32} ({file_size(fp32)} bytes)")

    # 1. Olive
    cands: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    olive_start = time.perf_counter()
    for name, (passes, max_iter) in workflows(args.olive_iters).items():
        config = olive_config(name, passes, max_iter, work, fp32, args.eval_images)
        found, info = run_olive(name, config, work, say)
        info["max_iter"] = max_iter
        runs[name] = info
        cands.extend(found)
    olive_wall = time.perf_counter() - olive_start
    for i, c in enumerate(cands):
        c["id"] = f"olive-{c['workflow']}-{c['model_id']}"
        c["index"] = i

    # 2. modelpress's point
    mp_path, mp_info = modelpress_point(args, work, say)
    acc_path, acc_info = modelpress_point(args, work, say, which="accurate")

    # 3. screening: every distinct floor-meeting Olive candidate, b64, against fp32
    distinct: dict[str, dict[str, Any]] = {}
    for c in cands:
        if c["olive_goal_met"]:
            distinct.setdefault(c["sha"], c)
    b64 = benchmark_batches((x[:1],), [64])
    screen: dict[str, Any] = {}
    if distinct:
        say(f"screening {len(distinct)} distinct Olive candidates at b64 ({args.screen_rounds} rounds)")
        arts = {"fp32": (fp32, "onnxruntime")} | {
            c["id"]: (Path(c["path"]), c["runtime"]) for c in distinct.values()
        }
        res = compare_artifacts(
            arts, b64, baseline="fp32", threads=THREADS, rounds=args.screen_rounds, memory=False
        )
        screen = {name: r.latency["b64"].ratio for name, r in res.items() if name != "fp32"}
    for c in cands:
        first = distinct.get(c["sha"])
        c["same_file_as"] = first["id"] if first and first["id"] != c["id"] else None
        c["screen_ratio_b64"] = screen.get(first["id"]) if first else None

    met = list(distinct.values())
    smallest = min(met, key=lambda c: c["size_bytes"]) if met else None
    fastest = min(met, key=lambda c: screen[c["id"]]) if met else None
    pick = olive_pick(cands)
    chosen: dict[str, dict[str, Any]] = {}
    # timed in the final rounds: Olive's smallest, its pick, the searched ORT workflow's own pick, and the three
    # fastest of the screening (the screening's order is noisy under load; the final rounds decide "best")
    ranked = sorted(met, key=lambda c: screen[c["id"]])
    ort_pick = runs.get("ort-quant", {}).get("olive_pick")
    wanted = [smallest, pick, next((c for c in cands if c["model_id"] == ort_pick), None), *ranked[:3]]
    for want in wanted:
        if want is not None:
            first = distinct.get(want["sha"], want)
            chosen.setdefault(first["id"], first)

    # 4. the strict reading: modelpress's search with the floor at the contenders' best accuracy
    contenders = [distinct.get(c["sha"], c) for c in ranked[:3]]
    for c in contenders:
        c["accuracy_here"] = accuracy(Path(c["path"]), c["runtime"], x, y)
    strict_floor = max((c["accuracy_here"] for c in contenders), default=FLOOR)
    strict_path, strict_info = modelpress_at(args, work, strict_floor, say)
    strict_info["contenders"] = {c["id"]: c["accuracy_here"] for c in contenders}

    # 5. final interleaved rounds, b64 and b1
    arts = {
        "fp32": (fp32, "onnxruntime"),
        "modelpress": (mp_path, "openvino"),
        "modelpress-most-accurate-front": (acc_path, "openvino"),
    }
    if strict_path is not None:
        arts["modelpress-at-olive-accuracy"] = (strict_path, "openvino")
    arts |= {cid: (Path(c["path"]), c["runtime"]) for cid, c in chosen.items()}
    say(f"final timing of {len(arts)} artifacts, b64 and b1, {args.rounds} interleaved rounds")
    final = compare_artifacts(
        arts, [64, 1], baseline="fp32", threads=THREADS, rounds=args.rounds, memory=False
    )
    rows = []
    for name, (path, runtime) in arts.items():
        say(f"accuracy of {name} on {len(x)} test images")
        r = final[name]
        cand = chosen.get(name)
        roles = [
            role
            for role, cc in (
                ("olive_smallest", smallest),
                ("olive_fastest_screen", fastest),
                ("olive_pick", pick),
            )
            if cc is not None and cand is not None and cc["sha"] == cand["sha"]
        ]
        rows.append(
            {
                "name": name,
                "runtime": runtime,
                "path": str(path),
                "roles": roles
                + [
                    f"olive_pick:{w}"
                    for w, i in runs.items()
                    if cand
                    and i.get("olive_pick")
                    and any(
                        cc["model_id"] == i["olive_pick"] and cc["workflow"] == w and cc["sha"] == cand["sha"]
                        for cc in cands
                    )
                ],
                "accuracy": accuracy(path, runtime, x, y),
                "size_bytes": r.size_bytes,
                "size_ratio": r.size_ratio,
                "ratio_b64": r.latency["b64"].ratio,
                "ratio_b1": r.latency["b1"].ratio,
                "median_ms_b64": r.latency["b64"].median_ms,
                "median_ms_b1": r.latency["b1"].median_ms,
                "ratio_p10_p90_b64": [r.latency["b64"].ratio_p10, r.latency["b64"].ratio_p90],
                "ratio_p10_p90_b1": [r.latency["b1"].ratio_p10, r.latency["b1"].ratio_p90],
                "olive": {
                    k: cand[k] for k in ("workflow", "pass", "params", "olive_accuracy", "olive_latency_ms")
                }
                if cand
                else None,
            }
        )
    by = {r["name"]: r for r in rows}
    olive_rows = [r for r in rows if r["olive"] is not None and r["accuracy"] >= FLOOR]
    best = min(olive_rows, key=lambda r: r["ratio_b64"]) if olive_rows else None
    small_row = by.get(distinct[smallest["sha"]]["id"]) if smallest else None

    def versus(ours: dict[str, Any], other: dict[str, Any] | None, what: str) -> dict[str, Any]:
        if other is None:
            return {
                "check": f"{ours['name']} vs {what}",
                "met": None,
                "why": "no Olive candidate meets the floor",
            }
        smaller = ours["size_bytes"] < other["size_bytes"]
        faster = ours["ratio_b64"] < other["ratio_b64"]
        return {
            "check": f"{ours['name']} smaller AND faster (b64) than {what}",
            "olive": other["name"],
            "smaller": smaller,
            "size_factor": other["size_bytes"] / ours["size_bytes"],
            "faster_b64": faster,
            "speed_factor_b64": other["ratio_b64"] / ours["ratio_b64"],
            "faster_b1": ours["ratio_b1"] < other["ratio_b1"],
            "speed_factor_b1": other["ratio_b1"] / ours["ratio_b1"],
            # median over the same rounds of (Olive's time / ours): the direct pairwise comparison
            "paired_speed_factor_b64": final[other["name"]]
            .latency["b64"]
            .paired_ratio(final[ours["name"]].latency["b64"]),
            "paired_speed_factor_b1": final[other["name"]]
            .latency["b1"]
            .paired_ratio(final[ours["name"]].latency["b1"]),
            "accuracy_ours": ours["accuracy"],
            "accuracy_olive": other["accuracy"],
            "accuracy_equal_or_better": ours["accuracy"] >= other["accuracy"],
            # the same accuracy goal: both at or above the floor
            "met_at_goal": smaller and faster and ours["accuracy"] >= FLOOR and other["accuracy"] >= FLOOR,
            # strictly: no accuracy given up against that Olive candidate
            "met_strict": smaller and faster and ours["accuracy"] >= other["accuracy"],
        }

    chosen_row, accurate_row = by["modelpress"], by["modelpress-most-accurate-front"]
    pick_row = by.get(distinct[pick["sha"]]["id"]) if pick else None
    acceptance = {
        "floor": FLOOR,
        "modelpress_meets_floor": chosen_row["accuracy"] >= FLOOR,
        "best_definition": "the Olive candidate meeting the floor (10k test set, measured here) that is fastest "
        "at b64 in the final interleaved rounds",
        "vs_olive_best": versus(chosen_row, best, "Olive's best (fastest at b64)"),
        "vs_olive_smallest": versus(chosen_row, small_row, "Olive's smallest"),
        "vs_olive_pick": versus(chosen_row, pick_row, "Olive's own pick"),
        "most_accurate_front_vs_olive_best": versus(accurate_row, best, "Olive's best (fastest at b64)"),
        "most_accurate_front_vs_olive_smallest": versus(accurate_row, small_row, "Olive's smallest"),
    }
    strict_row = by.get("modelpress-at-olive-accuracy")
    if strict_row is not None:
        acceptance["at_olive_accuracy_vs_olive_best"] = versus(
            strict_row, best, "Olive's best (fastest at b64)"
        )
        acceptance["at_olive_accuracy_vs_olive_smallest"] = versus(strict_row, small_row, "Olive's smallest")
    acceptance["met_at_goal"] = bool(acceptance["vs_olive_best"].get("met_at_goal"))
    # strictly: the floor-0.988 point, or the search asked for Olive's accuracy, is smaller, faster and at
    # least as accurate as Olive's best
    acceptance["met_strict"] = bool(acceptance["vs_olive_best"].get("met_strict")) or bool(
        acceptance.get("at_olive_accuracy_vs_olive_best", {}).get("met_strict")
    )
    data = {
        "asset": "mnist",
        "command": " ".join(["python", *sys.argv]),
        "environment": environment()
        | {"olive-ai": _version("olive-ai"), "nncf": _version("nncf"), "optuna": _version("optuna")},
        "threads": THREADS,
        "settings": {
            "floor": FLOOR,
            "olive_eval_images": args.eval_images,
            "calibration_images": CALIB_IMAGES,
            "olive_latency_metric": "Olive's latency-avg at batch 64 (ms), its runtime's default session",
            "rounds": args.rounds,
            "screen_rounds": args.screen_rounds,
            "smoke": args.smoke,
            "ort_session": "modelpress open_session: 2 intra-op threads, spinning off",
            "openvino": "modelpress open_session: 2 threads",
        },
        "load_before": load_before,
        "load_after": load(),
        "total_wall_s": time.perf_counter() - t0,
        "olive_wall_s": olive_wall,
        "olive_runs": runs,
        "olive_issues": OLIVE_ISSUES,
        "modelpress": mp_info,
        "modelpress_most_accurate_front": acc_info,
        "modelpress_at_olive_accuracy": strict_info,
        "acceptance": acceptance,
        "rows": rows,
        "olive_candidates": cands,
    }
    Path(args.json).write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    say(f"wrote {args.json}")
    print(f"{'name':48s} {'runtime':11s} {'acc':>7s} {'bytes':>9s} {'size':>6s} {'b64':>6s} {'b1':>6s}")
    for row in rows:
        print(
            f"{row['name']:48s} {row['runtime']:11s} {row['accuracy']:7.4f} {row['size_bytes']:9d} "
            f"{row['size_ratio']:6.3f} {row['ratio_b64']:6.3f} {row['ratio_b1']:6.3f}"
        )
    print(json.dumps(acceptance, indent=1))


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
