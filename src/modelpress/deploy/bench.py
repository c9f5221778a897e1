"""Benchmarking artifacts honestly: interleaved rounds, ratios to a baseline, peak memory in a fresh process.

Each round runs every variant once, in an order rotated from round to round, so drift on a shared machine
hits all variants alike. The reported speed figure is the median of per-round ratios to the baseline.

Any deployment format is timed in the runtimes it runs in (`deploy.formats.open_artifact`); a baseline may
be another format in another runtime (fp32 `.onnx` in ONNX Runtime beside an int8 `.pte` in ExecuTorch),
in which case its ratios measure the runtime and the compression together.
"""

from __future__ import annotations

import importlib.util
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
from modelpress.errors import RuntimeUnavailableError

#: The runtimes each artifact type runs in, the default ones first.
RUNTIMES_FOR: dict[str, tuple[str, ...]] = {
    ".onnx": ("onnxruntime", "openvino", "onnxruntime-web"),
    ".xml": ("openvino",),
    ".tflite": ("litert", "tflite-micro"),
    ".pte": ("executorch",),
}
#: Timed only when named: a browser round trip per call, or reference kernels meant for microcontrollers.
ON_REQUEST = ("onnxruntime-web", "tflite-micro")
#: The module whose presence means a runtime is installed, and the extra that installs it.
_MODULE = {
    "onnxruntime": ("onnxruntime", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "litert": ("ai_edge_litert", "litert"),
    "executorch": ("executorch", "executorch"),
    "tflite-micro": ("tflite_micro", "tflm"),
    "onnxruntime-web": ("playwright", "web"),
}
#: Runtimes whose memory is not the Python process's (onnxruntime-web runs in a browser process of its own):
#: no peak memory for them.
OUT_OF_PROCESS = ("onnxruntime-web",)


def _suffix(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in RUNTIMES_FOR:
        raise RuntimeUnavailableError(
            f"'{path}' is not an artifact modelpress can time: give a .onnx, OpenVINO .xml, .tflite or .pte "
            "file (`modelpress export --to ...` writes them)."
        )
    return suffix


def runs_in(path: str | os.PathLike[str], runtime: str) -> bool:
    """Whether `runtime` runs files of `path`'s type (installed or not)."""
    return runtime in RUNTIMES_FOR.get(Path(path).suffix.lower(), ())


def artifact_runtimes(path: str | os.PathLike[str], runtimes: Sequence[str] = ()) -> list[str]:
    """The runtimes to time `path` in: `runtimes` if given (each checked against the file type), else every
    installed runtime of its type except the slow ones (`ON_REQUEST`).

    >>> artifact_runtimes("mnist.pte")  # doctest: +SKIP
    ['executorch']
    """
    suffix = _suffix(path)
    allowed = RUNTIMES_FOR[suffix]
    for runtime in runtimes:
        if runtime not in allowed:
            raise RuntimeUnavailableError(
                f"{runtime} does not run {suffix} files ('{path}'); for {suffix} choose {', '.join(allowed)}."
            )
    if runtimes:
        return list(dict.fromkeys(runtimes))
    found = [
        r for r in allowed if r not in ON_REQUEST and importlib.util.find_spec(_MODULE[r][0]) is not None
    ]
    if not found:
        default = [r for r in allowed if r not in ON_REQUEST] or list(allowed)
        extras = ", ".join(f"`pip install modelpress[{_MODULE[r][1]}]`" for r in default)
        raise RuntimeUnavailableError(
            f"No runtime for {suffix} files is installed ('{path}'): install {extras}"
            + (f", or name one of {', '.join(ON_REQUEST)} with --runtime." if suffix == ".onnx" else ".")
        )
    return found


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
from modelpress.deploy.formats import close, open_artifact
path, runtime, threads, data, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
arrays = np.load(data)
inputs = [arrays[k] for k in sorted(arrays.files, key=lambda k: int(k.split("_")[1]))]
def hwm():
    value = process_memory_mb("VmHWM")
    return float("nan") if value is None else value
before = hwm()
s = open_artifact(path, runtime, threads=threads)
for _ in range(runs):
    s.run(inputs)
close(s)
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
    Returns `{"peak_rss_mb", "before_load_mb"}` (the latter: Python + imports, before the model loads);
    NaN for a runtime in `OUT_OF_PROCESS` (onnxruntime-web: the memory is the browser's).
    """
    if not Path("/proc/self/status").exists() or runtime in OUT_OF_PROCESS:
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
    skipped: dict[str, str] = field(default_factory=dict)  # batch key -> why this variant could not take it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_artifacts(
    artifacts: Mapping[str, tuple[str | os.PathLike[str], str]],
    batches: Mapping[str, Sequence[np.ndarray]] | Sequence[int],
    *,
    baseline: str,
    threads: int = 2,
    rounds: int = 20,
    memory: bool = True,
    seq: int = 128,
    progress: Callable[[str], None] | None = None,
) -> dict[str, ArtifactBench]:
    """Benchmark artifacts `{name: (path, runtime)}` interleaved, for each input batch: `{"b1": [arrays]}`
    given to every variant, or batch sizes `[1, 16]`, each variant then getting `session_inputs` of its own
    (a dim 0 the file fixes takes only its own batch: such batches are left out for all variants and the
    reason is kept in `skipped` of the variant that could not take them). Any format runs in any of its
    runtimes (`formats.open_artifact`).

    Size, latency and memory are all relative to `baseline` (normally the fp32 ONNX in ONNX Runtime).
    """
    from modelpress._files import file_size
    from modelpress.deploy.formats import close

    latency: dict[str, dict[str, Timing]] = {name: {} for name in artifacts}
    skipped: dict[str, dict[str, str]] = {name: {} for name in artifacts}
    first_inputs: dict[str, list[np.ndarray]] = {}
    sessions: dict[str, Session] = {}
    try:
        for name, (path, runtime) in artifacts.items():
            sessions[name] = _open(path, runtime, threads=threads)
        # after opening: a corrupt file gets the runtime loader's clear message, not the size reader's
        sizes = {name: file_size(path) for name, (path, _) in artifacts.items()}
        plan: dict[str, dict[str, list[np.ndarray]]] = {}  # batch key -> variant -> its inputs
        if isinstance(batches, Mapping):
            plan = {key: {name: list(inputs) for name in artifacts} for key, inputs in batches.items()}
        else:
            for size in batches:
                key, fit = f"b{size}", {}
                for name, (path, _) in artifacts.items():
                    try:
                        fit[name] = session_inputs(sessions[name], path, batch=size, seq=seq)
                    except ValueError as exc:
                        skipped[name][key] = str(exc)
                if len(fit) == len(artifacts):
                    plan[key] = fit
        if not plan:
            reasons = "; ".join(f"{name}: {why}" for name, s in skipped.items() for why in s.values())
            raise RuntimeUnavailableError(f"No batch size fits every variant ({reasons}).")
        for key, inputs in plan.items():
            if progress:
                progress(f"timing {key} ({rounds} interleaved rounds)")
            first = next(iter(inputs.values()))
            batch = int(first[0].shape[0]) if first and first[0].ndim else 1
            runners = {name: session_runner(sessions[name], inputs[name]) for name in artifacts}
            for name, timing in benchmark_interleaved(
                runners, baseline=baseline, batch=batch, rounds=rounds
            ).items():
                latency[name][key] = timing
            for name in artifacts:
                first_inputs.setdefault(name, inputs[name])
    finally:
        for session in sessions.values():
            close(session)
    sessions.clear()
    peaks: dict[str, float | None] = {}
    for name, (path, runtime) in artifacts.items():
        peaks[name] = None
        if memory and runtime not in OUT_OF_PROCESS:
            if progress:
                progress(f"peak memory of {name}")
            peaks[name] = peak_memory_mb(path, runtime, first_inputs[name], threads=threads)["peak_rss_mb"]
    return {
        name: ArtifactBench(
            name=name,
            path=str(path),
            runtime=runtime,
            size_bytes=sizes[name],
            size_ratio=sizes[name] / sizes[baseline],
            latency=latency[name],
            peak_rss_mb=peaks[name],
            skipped=skipped[name],
        )
        for name, (path, runtime) in artifacts.items()
    }


def _open(path: str | os.PathLike[str], runtime: str, *, threads: int) -> Session:
    """`open_artifact` for the runtimes of other formats; this module's `open_session` for the rest (which
    benchmarks/peers.py replaces to time runtime settings of its own)."""
    from modelpress.deploy.formats import open_artifact

    if runtime in ("litert", "executorch", "tflite-micro", "onnxruntime-web"):
        return open_artifact(path, runtime, threads=threads)
    return open_session(path, runtime, threads=threads)


def session_inputs(
    session: Session, path: str | os.PathLike[str], *, batch: int, seq: int = 128, seed: int = 0
) -> list[np.ndarray]:
    """Synthetic inputs of `batch` items for an open session of `path`: an ONNX file's from its declared
    types (`synthetic_inputs`), any other's from the session's input shapes and types (free dim 0 is `batch`,
    other free dims `seq`). Raises ValueError, saying why, where the artifact cannot take `batch` (a .tflite
    fixes its export's shapes; a .pte bounds its dynamic dims).

    Float inputs are standard normal (int8 inputs of a quantized .tflite too: the session quantizes them, as
    it does in a parity check); other integer inputs are ones.
    """
    shapes = [tuple(s) for s in session.input_shapes]
    bounds = getattr(session, "max_shapes", None) or [(None,) * len(s) for s in shapes]
    wanted = []
    for name, shape, bound in zip(session.input_names, shapes, bounds, strict=True):
        dims = tuple(d if d is not None else (batch if i == 0 else seq) for i, d in enumerate(shape))
        if shape and shape[0] is not None and shape[0] != batch:
            raise ValueError(
                f"input '{name}' has the fixed shape {shape} in {session.runtime}: it takes only batch "
                f"{shape[0]} (export with example inputs of the batch to time)"
            )
        over = [(n, b) for n, b in zip(dims, bound, strict=True) if b is not None and n > b]
        if over:
            raise ValueError(
                f"input '{name}' of shape {dims} is beyond the {session.runtime} program's largest "
                f"{tuple(bound)} (re-export with larger max_batch / max_seq, or a smaller --batch / --seq)"
            )
        wanted.append(dims)
    if Path(path).suffix.lower() == ".onnx":
        return synthetic_inputs(path, batch=batch, seq=seq, seed=seed)
    rng = np.random.default_rng(seed)
    arrays = []
    for dims, dtype in zip(wanted, _input_dtypes(session), strict=True):
        if dtype is None or np.issubdtype(dtype, np.floating) or dtype in (np.int8, np.uint8):
            arrays.append(rng.standard_normal(dims).astype(np.float32 if dtype is None else _float(dtype)))
        else:  # token ids, masks: ones are valid for any vocabulary
            arrays.append(np.ones(dims, dtype=dtype))
    return arrays


def _float(dtype: np.dtype) -> type[np.floating[Any]] | np.dtype:
    """The float type to give an input of `dtype`: itself if float, else float32 (int8 / uint8 inputs are
    those of a quantized file, which its session quantizes from float)."""
    return dtype if np.issubdtype(dtype, np.floating) else np.float32


def _input_dtypes(session: Session) -> list[np.dtype | None]:
    """Each input's numpy type, from what the session knows (None where it does not say)."""
    declared = getattr(session, "input_dtypes", None)
    if declared is None:
        # ExecuTorch and OpenVINO sessions keep the types they cast to; TFLite Micro its tensor details.
        declared = getattr(session, "_dtypes", None)
    if declared is None:
        details = getattr(session, "_inputs", None)
        if isinstance(details, list) and all(isinstance(d, dict) and "dtype" in d for d in details):
            declared = [d["dtype"] for d in details]
    if declared is None or len(declared) != len(session.input_names):
        return [None] * len(session.input_names)
    return [None if d is None else np.dtype(d) for d in declared]


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
