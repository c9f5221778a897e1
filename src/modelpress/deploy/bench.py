"""Benchmarking artifacts honestly: interleaved rounds, ratios to a baseline, peak memory in a fresh process.

Each round runs every variant once, in an order rotated from round to round, so drift on a shared machine
hits all variants alike. The reported speed figure is the median of per-round ratios to the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.deploy.runtime import Session, open_session


@dataclass
class Timing:
    name: str
    median_ms: float
    p90_ms: float
    throughput: float  # items per second at this batch size
    ratio: float  # median over rounds of (this / baseline); < 1 is faster
    ratio_p10: float
    ratio_p90: float
    rounds: int
    round_ms: list[float] = field(default_factory=list)  # one mean call time per round, in round order

    def paired_ratio(self, other: Timing) -> float:
        """`paired_ratio` of this runner's round times to `other`'s."""
        return paired_ratio(self.round_ms, other.round_ms, names=(self.name, other.name))


def paired_ratio(
    round_ms: Sequence[float], other_round_ms: Sequence[float], *, names: tuple[str, str] = ("a", "b")
) -> float:
    """Median over rounds of one runner's time / the other's in the same round: the same-run comparison of
    two variants with the machine's drift (which moves both) taken out of it."""
    if len(round_ms) != len(other_round_ms) or not round_ms:
        raise ValueError(f"'{names[0]}' and '{names[1]}' were not timed in the same rounds.")
    return float(np.median(np.asarray(round_ms) / np.asarray(other_round_ms)))


def _time_once(fn: Callable[[], Any], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def benchmark_interleaved(
    runners: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    batch: int,
    rounds: int = 20,
    warmup: int = 3,
    min_round_s: float = 0.02,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Timing]:
    """Time each runner in interleaved rounds (A, B, A, B ...); ratios are relative to `baseline`.

    >>> t = benchmark_interleaved({"a": lambda: None, "b": lambda: None}, baseline="a", batch=1, rounds=3)
    >>> sorted(t)
    ['a', 'b']
    """
    if baseline not in runners:
        raise ValueError(f"baseline '{baseline}' is not one of {list(runners)}")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    # Tiny models run in microseconds: repeat each call so one measurement lasts at least min_round_s.
    reps = {}
    for name in names:
        # The median of a few calls: one slow call (a runtime waking its threads) would otherwise leave a
        # fast runner at one call per round, timed at the resolution of its slowest call.
        one = float(np.median([_time_once(runners[name], 1) for _ in range(5)]))
        reps[name] = max(1, int(min_round_s / max(one, 1e-6)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            runners[name]()  # untimed: the runtime's threads and caches come back from the previous runner
            samples[name].append(_time_once(runners[name], reps[name]))
        if progress is not None:
            progress(r + 1, rounds)
    base = np.array(samples[baseline])
    out = {}
    for name in names:
        s = np.array(samples[name])
        ratios = s / base
        out[name] = Timing(
            name=name,
            median_ms=float(np.median(s) * 1e3),
            p90_ms=float(np.percentile(s, 90) * 1e3),
            throughput=float(batch / np.median(s)),
            ratio=float(np.median(ratios)),
            ratio_p10=float(np.percentile(ratios, 10)),
            ratio_p90=float(np.percentile(ratios, 90)),
            rounds=rounds,
            round_ms=[float(x * 1e3) for x in s],
        )
    return out


def session_runner(session: Session, inputs: Sequence[np.ndarray]) -> Callable[[], Any]:
    arrays = list(inputs)
    return lambda: session.run(arrays)


def process_memory_mb(field: str = "VmHWM") -> float | None:
    """This process's resident memory in MB from /proc/self/status: "VmHWM" (peak) or "VmRSS" (now);
    None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> float | None:
    """Reset this process's peak resident memory (Linux: VmHWM) and return its resident memory (MB) now,
    so that a later `process_memory_mb("VmHWM")` is the peak of what ran in between; None where the
    kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return process_memory_mb("VmRSS")


_PROBE = """
import json, sys, numpy as np
from modelpress.deploy.bench import process_memory_mb
from modelpress.deploy.runtime import open_session
path, runtime, threads, data, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
arrays = np.load(data)
inputs = [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k.split("_")[1]))]
def hwm():
    value = process_memory_mb("VmHWM")
    return float("nan") if value is None else value
before = hwm()
s = open_session(path, runtime, threads=threads)
for _ in range(runs):
    s.run(inputs)
print(json.dumps({"peak_rss_mb": hwm(), "before_load_mb": before}))
"""


def peak_memory_mb(
    path: str | os.PathLike[str],
    runtime: str,
    inputs: Sequence[np.ndarray],
    *,
    threads: int = 2,
    runs: int = 3,
) -> dict[str, float]:
    """Peak resident memory (VmHWM) of a fresh process that loads the artifact and runs it `runs` times.

    A fresh child per variant, because a parent's peak would carry into `ru_maxrss` of its children.
    Returns `{"peak_rss_mb", "before_load_mb"}` (the latter: Python + imports, before the model loads).
    """
    if not Path("/proc/self/status").exists():
        return {"peak_rss_mb": float("nan"), "before_load_mb": float("nan")}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "inputs.npz"
        arrays: dict[str, Any] = {f"input_{i}": a for i, a in enumerate(inputs)}
        np.savez(data, **arrays)
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), runtime, str(threads), str(data), str(runs)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed for {path} in {runtime}: {proc.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@dataclass
class ArtifactBench:
    name: str
    path: str
    runtime: str
    size_bytes: int
    size_ratio: float
    latency: dict[str, Timing]  # keyed by "b1", "b16", ...
    peak_rss_mb: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_artifacts(
    artifacts: Mapping[str, tuple[str | os.PathLike[str], str]],
    batches: Mapping[str, Sequence[np.ndarray]],
    *,
    baseline: str,
    threads: int = 2,
    rounds: int = 20,
    memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, ArtifactBench]:
    """Benchmark artifacts `{name: (path, runtime)}` interleaved, for each input batch `{"b1": [...], ...}`.

    Size, latency and memory are all relative to `baseline` (normally the fp32 ONNX in ONNX Runtime).
    """
    from modelpress._files import file_size

    sessions = {
        name: open_session(path, runtime, threads=threads) for name, (path, runtime) in artifacts.items()
    }
    sizes = {name: file_size(path) for name, (path, _) in artifacts.items()}
    latency: dict[str, dict[str, Timing]] = {name: {} for name in artifacts}
    for key, inputs in batches.items():
        if progress:
            progress(f"timing {key} ({rounds} interleaved rounds)")
        batch = int(inputs[0].shape[0]) if inputs and inputs[0].ndim else 1
        runners = {name: session_runner(s, inputs) for name, s in sessions.items()}
        for name, timing in benchmark_interleaved(
            runners, baseline=baseline, batch=batch, rounds=rounds
        ).items():
            latency[name][key] = timing
    del sessions
    peaks: dict[str, float | None] = {}
    first_batch = next(iter(batches.values()))
    for name, (path, runtime) in artifacts.items():
        if memory:
            if progress:
                progress(f"peak memory of {name}")
            peaks[name] = peak_memory_mb(path, runtime, first_batch, threads=threads)["peak_rss_mb"]
        else:
            peaks[name] = None
    return {
        name: ArtifactBench(
            name=name,
            path=str(path),
            runtime=runtime,
            size_bytes=sizes[name],
            size_ratio=sizes[name] / sizes[baseline],
            latency=latency[name],
            peak_rss_mb=peaks[name],
        )
        for name, (path, runtime) in artifacts.items()
    }


def synthetic_inputs(
    path: str | os.PathLike[str], *, batch: int, seq: int = 128, seed: int = 0
) -> list[np.ndarray]:
    """Inputs for an ONNX file from its declared input types: dim 0 is `batch`, other free dims are `seq`.

    Float inputs are standard normal; integer inputs (token ids, masks) are ones, valid for any vocabulary.
    """
    from onnx import helper

    from modelpress.deploy.runtime import read_onnx

    model = read_onnx(path)
    initializers = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(seed)
    arrays = []
    for inp in model.graph.input:
        if inp.name in initializers:
            continue
        tensor_type = inp.type.tensor_type
        dims = []
        for i, d in enumerate(tensor_type.shape.dim):
            dims.append(d.dim_value if d.HasField("dim_value") else (batch if i == 0 else seq))
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(dims).astype(dtype))
        else:
            arrays.append(np.ones(dims, dtype=dtype))
    return arrays
