"""Profile a model: parameters and bytes (total, per layer, by dtype), MACs from PyTorch's own FLOP counter,
per-layer and whole-forward CPU latency, and peak activation memory.

How latency is measured, and why the layers add up to the whole
---------------------------------------------------------------
The whole forward is timed as a user runs it, with no instrumentation. Each leaf module is timed in
isolation: one instrumented forward records the inputs (and outputs) of every leaf call, then each leaf is
called alone on its recorded inputs. Timing leaves with forward hooks and a timer around each call would
put the hooks' own dispatch (microseconds per module, as much as a small layer's work) inside every layer's
figure, and would time a slower forward than the one the layers are compared with. In isolation a layer's
figure is its call as the forward makes it (module dispatch included) and nothing else. What runs outside
the leaves (residual adds, reshapes, attention matmuls and softmax written as functions, the Python of
container modules) is timed directly too: the forward once more with every leaf replaced by its recorded
output ("other ops").

Whole forward, each leaf and the other ops are timed round-robin, `repeats` rounds after `warmup` forwards,
with torch's intra-op thread count pinned for the duration and recorded. The agreement this gives, and
tests/test_profile.py checks (the bound is wide enough for a shared 2-core machine):
- layers + other ops are within [0.7, 1.3] of the whole forward, on any model;
- on a CNN, where leaf modules do the work, the layers alone are within [0.7, 1.3] of the whole forward.
`unattributed_ms` (whole - layers) is the remainder; `other_ops_ms` is what measures it. Isolation calls a
layer on inputs that are warm in cache, as they are in the forward right after the layer that made them;
an input that comes from far back (a long skip connection) may be colder in the real forward.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from modelpress.errors import ModelpressError
from modelpress.loading import Inputs

log = logging.getLogger(__name__)

# The agreement tests/test_profile.py asserts: (layers + other ops) / whole forward, and on a CNN
# layers / whole forward, fall within this interval.
AGREEMENT = (0.7, 1.3)


@dataclass
class LayerProfile:
    name: str
    type: str
    params: int
    bytes: int  # parameters and buffers as stored
    dtypes: dict[str, int]  # bytes by dtype
    macs: int  # multiply-accumulates counted by torch.utils.flop_counter (flops / 2)
    latency_ms: float  # median CPU time of this layer's calls in one forward, timed alone on recorded inputs
    latency_p10_ms: float  # 10th / 90th percentile over the rounds: the spread of that figure
    latency_p90_ms: float
    calls: int  # times one forward calls it (a module used twice: its latency covers both calls)
    output_bytes: int  # activation bytes this layer produces in one forward


@dataclass
class Profile:
    model: str
    input_shapes: list[list[int]]
    params: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    macs: int
    latency_ms: float  # median whole-forward CPU latency in torch, uninstrumented
    latency_p10_ms: float
    latency_p90_ms: float
    layers_ms: float  # sum of the leaf layers' median latencies
    unattributed_ms: float  # latency_ms - layers_ms: time outside the leaf layers (negative: within noise)
    # Median forward with every leaf replaced by its recorded output: the time outside leaves, measured
    # (None when the model's code cannot run that way; 0 when the model is a single leaf).
    other_ops_ms: float | None
    threads: int  # torch intra-op threads, pinned while timing
    warmup: int
    repeats: int
    peak_activation_bytes: int
    layers: list[LayerProfile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with no children, where a wrapper marked `_modelpress_atomic` counts as one leaf."""
    out = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if getattr(module, "_modelpress_atomic", False):
            skip.append(name)
            out.append((name, module))
        elif not list(module.children()):
            out.append((name, module))
    return out


def _describe(module: nn.Module) -> str:
    """Type name; a wrapper shows what it wraps and its scheme, e.g. 'QuantizedLayer[w8a8](Linear)'."""
    inner = getattr(module, "inner", None)
    if not isinstance(inner, nn.Module):
        return type(module).__name__
    scheme = getattr(module, "scheme", None)
    tag = f"[{scheme}]" if scheme else ""
    return f"{type(module).__name__}{tag}({type(inner).__name__})"


def _tensor_bytes(module: nn.Module) -> tuple[int, int, dict[str, int]]:
    params = 0
    by_dtype: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for _, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, nn.Parameter) or t.dtype in (torch.int8, torch.uint8):
            params += t.numel()
        by_dtype[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return params, sum(by_dtype.values()), dict(by_dtype)


class _LiveMemory(TorchDispatchMode):
    """Tracks bytes of storages created during forward that are still referenced; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # data_ptr -> [nbytes, refcount]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves = out if isinstance(out, (tuple, list)) else [out]
        for t in leaves:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            if key in self.live:
                self.live[key][1] += 1
            else:
                self.live[key] = [storage.nbytes(), 1]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def _strip_root(key: str, root: str) -> str:
    if key == root:
        return ""
    return key.removeprefix(root + ".")


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """Run with torch's intra-op thread count set to `threads` (None: the current count), then restore it.

    >>> with pinned_threads(1) as n:
    ...     n
    1
    """
    if threads is not None and threads < 1:
        raise ModelpressError(
            f"profile: threads={threads} must be at least 1 (or None for torch's current count)."
        )
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class _Tensors:
    """Recorded tensors reused across timed calls. A call that modifies one in place (an in-place ReLU on its
    input, `out += x` on a leaf's output) is undone before the next, so values never drift to denormals or
    infinities, whose arithmetic is slower: the first modified value is kept and copied back each time."""

    def __init__(self, tree: Any) -> None:
        memo: dict[int, torch.Tensor] = {}

        def clone(t: Any) -> Any:
            # One clone per distinct tensor: a call that passes one tensor twice (q, k, v) still does.
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) not in memo:
                memo[id(t)] = t.detach().clone()
            return memo[id(t)]

        self.tree = torch.utils._pytree.tree_map(clone, tree)
        self.tensors = list(memo.values())
        self.versions = [t._version for t in self.tensors]
        self.kept: dict[int, torch.Tensor] = {}

    def restore(self) -> None:
        with torch.no_grad():
            for i, t in enumerate(self.tensors):
                if t._version == self.versions[i]:
                    continue
                if i in self.kept:
                    t.copy_(self.kept[i])
                else:
                    self.kept[i] = t.clone()
                self.versions[i] = t._version


@dataclass
class _Calls:
    """One leaf's calls in one forward: recorded (args, kwargs) and outputs, in call order."""

    inputs: list[_Tensors] = field(default_factory=list)
    outputs: list[_Tensors] = field(default_factory=list)


def _record(model: nn.Module, leaves: list[tuple[str, nn.Module]], inputs: Inputs) -> dict[str, _Calls]:
    calls = {name: _Calls() for name, _ in leaves}
    handles = []
    for name, module in leaves:

        def pre(_m: nn.Module, args: Any, kwargs: Any, name: str = name) -> None:
            calls[name].inputs.append(_Tensors((args, kwargs)))

        def post(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            calls[name].outputs.append(_Tensors(out))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Replay(nn.Module):
    """Stands in for a leaf: returns its recorded outputs in call order, with no module dispatch (that
    belongs to the leaf's own time)."""

    def __init__(self, leaf: nn.Module, outputs: list[_Tensors]) -> None:
        super().__init__()
        object.__setattr__(self, "_leaf", leaf)  # not registered: the model's tree stays as it was
        self.outputs = outputs
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.outputs[self.count % len(self.outputs)].tree
        self.count += 1
        return out

    def __getattr__(self, name: str) -> Any:
        # Model code may read a leaf's attributes (`self.proj.weight.dtype`): answer as the leaf would.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_leaf"], name)


@contextlib.contextmanager
def _leaves_replaced(model: nn.Module, calls: dict[str, _Calls]) -> Iterator[None]:
    """Every called leaf, wherever a parent holds it, replaced by a `_Replay` of its recorded outputs."""
    replays = {}
    for name, module in _leaf_modules(model):
        if name and calls[name].outputs:
            replays[id(module)] = (module, _Replay(module, calls[name].outputs))
    swapped = []
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replays:
                parent._modules[child_name] = replays[id(child)][1]
                swapped.append((parent, child_name, child))
    try:
        yield
    finally:
        for parent, child_name, child in swapped:
            parent._modules[child_name] = child


def _time_other_ops(
    model: nn.Module, inputs: Inputs, calls: dict[str, _Calls], times: list[float]
) -> list[float] | None:
    """`times` plus one forward with the leaves replayed; None when the model's code fails that way."""
    try:
        with _leaves_replaced(model, calls), torch.no_grad():
            return [*times, _seconds(lambda: model(*inputs))]
    except Exception as exc:  # the model's own code needs what its leaves compute: say so, report None
        log.warning(
            "profile: the time outside leaf layers is not measured: the forward fails with its leaves "
            "replaced by their recorded outputs (%s: %s)",
            type(exc).__name__,
            exc,
        )
        return None


def _spread(seconds: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile, in ms."""
    ms = np.asarray(seconds) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90))


def _recurrent_macs(rnn: nn.RNNBase, args: Any) -> int:
    """Multiply-accumulates of one call: per time step, item, layer and direction, each gate's input and
    hidden matmuls (LSTM 4 gates, GRU 3, RNN 1)."""
    x = args[0] if isinstance(args, (tuple, list)) and args else None
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        return 0
    steps, batch = (
        (x.shape[0], 1) if x.dim() == 2 else ((x.shape[1], x.shape[0]) if rnn.batch_first else x.shape[:2])
    )
    gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
    hidden = rnn.hidden_size
    out = rnn.proj_size or hidden
    directions = 2 if rnn.bidirectional else 1
    per_step = 0
    for layer in range(rnn.num_layers):
        width = rnn.input_size if layer == 0 else out * directions
        per_step += directions * (gates * hidden * (width + out) + (hidden * out if rnn.proj_size else 0))
    return int(steps * batch * per_step)


def profile(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
) -> Profile:
    """Measure the model on `example_inputs`; latency with torch's thread count pinned to `threads`
    (None: the current count), `warmup` forwards, then `repeats` round-robin rounds (see the module doc).

    >>> import torch
    >>> p = profile(torch.nn.Linear(8, 4), (torch.randn(2, 8),), repeats=3)
    >>> p.params, p.macs
    (36, 64)
    """
    if repeats < 1 or warmup < 0:
        raise ModelpressError(
            f"profile: repeats={repeats} must be at least 1 and warmup={warmup} at least 0."
        )
    model = model.eval()
    leaves = _leaf_modules(model)
    root = type(model).__name__

    with pinned_threads(threads) as used:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*example_inputs)
        flops_by_module = {
            _strip_root(k, root): sum(v.values()) for k, v in counter.get_flop_counts().items()
        }
        total_flops = counter.get_total_flops()

        with torch.no_grad():
            for _ in range(warmup):
                model(*example_inputs)
        calls = _record(model, leaves, example_inputs)
        # torch's FLOP counter does not count LSTMs (it sees GRUs' matmuls); count the gates' matmuls here.
        for name, module in leaves:
            rnn = getattr(module, "inner", module)
            if isinstance(rnn, nn.RNNBase) and not flops_by_module.get(name):
                found = sum(_recurrent_macs(rnn, item.tree[0]) for item in calls[name].inputs)
                flops_by_module[name] = flops_by_module.get(name, 0) + 2 * found
                total_flops += 2 * found
        called = [(name, module) for name, module in leaves if calls[name].inputs]
        one_leaf = any(not name for name, _ in leaves)  # the model itself: nothing runs outside it
        other: list[float] | None = []  # None once the model's code fails with its leaves replayed
        whole: list[float] = []
        per_leaf: dict[str, list[float]] = {name: [] for name, _ in called}
        with torch.no_grad():
            for _ in range(repeats):
                whole.append(_seconds(lambda: model(*example_inputs)))
                for name, module in called:
                    recorded = calls[name].inputs

                    def run_leaf(module: nn.Module = module, recorded: list[_Tensors] = recorded) -> None:
                        for item in recorded:
                            args, kwargs = item.tree
                            module(*args, **kwargs)

                    per_leaf[name].append(_seconds(run_leaf))
                    for item in recorded:
                        item.restore()
                if other is not None and not one_leaf:
                    other = _time_other_ops(model, example_inputs, calls, other)
                    for name, _ in called:
                        for item in calls[name].outputs:
                            item.restore()

    tracker = _LiveMemory()
    with torch.no_grad(), tracker:
        result = model(*example_inputs)
    del result

    layers = []
    for name, module in leaves:
        params, nbytes, dtypes = _tensor_bytes(module)
        median, p10, p90 = _spread(per_leaf[name]) if name in per_leaf else (0.0, 0.0, 0.0)
        outputs = [t for item in calls[name].outputs for t in item.tensors]
        layers.append(
            LayerProfile(
                name=name or root,
                type=_describe(module),
                params=params,
                bytes=nbytes,
                dtypes=dtypes,
                macs=flops_by_module.get(name, 0) // 2,
                latency_ms=median,
                latency_p10_ms=p10,
                latency_p90_ms=p90,
                calls=len(calls[name].inputs),
                output_bytes=sum(t.numel() * t.element_size() for t in outputs),
            )
        )
    params, nbytes, by_dtype = _tensor_bytes(model)
    latency, latency_p10, latency_p90 = _spread(whole)
    layers_ms = sum(layer.latency_ms for layer in layers)
    return Profile(
        model=root,
        input_shapes=[list(t.shape) for t in example_inputs],
        params=params,
        bytes=nbytes,
        bytes_by_dtype=by_dtype,
        macs=total_flops // 2,
        latency_ms=latency,
        latency_p10_ms=latency_p10,
        latency_p90_ms=latency_p90,
        layers_ms=layers_ms,
        unattributed_ms=latency - layers_ms,
        other_ops_ms=0.0 if one_leaf else None if other is None else _spread(other)[0],
        threads=used,
        warmup=warmup,
        repeats=repeats,
        peak_activation_bytes=tracker.peak,
        layers=layers,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.2f} GB"


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
