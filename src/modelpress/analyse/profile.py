"""Profile a model: parameters and bytes (total, per layer, by dtype), MACs from PyTorch's own FLOP counter,
per-layer CPU latency, and peak activation memory.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from modelpress.loading import Inputs


@dataclass
class LayerProfile:
    name: str
    type: str
    params: int
    bytes: int  # parameters and buffers as stored
    dtypes: dict[str, int]  # bytes by dtype
    macs: int  # multiply-accumulates counted by torch.utils.flop_counter (flops / 2)
    latency_ms: float  # median CPU time of this layer's forward
    output_bytes: int  # activation bytes this layer produces


@dataclass
class Profile:
    model: str
    input_shapes: list[list[int]]
    params: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    macs: int
    latency_ms: float  # median whole-forward CPU latency (torch, this process's thread count)
    threads: int
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


def profile(model: nn.Module, example_inputs: Inputs, *, repeats: int = 10) -> Profile:
    """Measure the model on `example_inputs`.

    >>> import torch
    >>> p = profile(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
    >>> p.params, p.macs
    (36, 64)
    """
    model = model.eval()
    leaves = _leaf_modules(model)
    root = type(model).__name__

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    flops_by_module = {_strip_root(k, root): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    total_flops = counter.get_total_flops()

    # Per-layer latency and output size from forward hooks; the whole forward timed separately, without hooks.
    starts: dict[str, float] = {}
    times: dict[str, list[float]] = defaultdict(list)
    out_bytes: dict[str, int] = {}
    handles = []
    for name, module in leaves:

        def pre(_m: nn.Module, _a: Any, name: str = name) -> None:
            starts[name] = time.perf_counter()

        def post(_m: nn.Module, _a: Any, out: Any, name: str = name) -> None:
            times[name].append(time.perf_counter() - starts[name])
            tensors = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
            out_bytes[name] = sum(t.numel() * t.element_size() for t in tensors)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(*example_inputs)  # warm-up
            times.clear()
            for _ in range(repeats):
                model(*example_inputs)
    finally:
        for h in handles:
            h.remove()

    whole = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(*example_inputs)
            whole.append(time.perf_counter() - start)

    tracker = _LiveMemory()
    with torch.no_grad(), tracker:
        result = model(*example_inputs)
    del result

    layers = []
    for name, module in leaves:
        params, nbytes, dtypes = _tensor_bytes(module)
        layers.append(
            LayerProfile(
                name=name or root,
                type=_describe(module),
                params=params,
                bytes=nbytes,
                dtypes=dtypes,
                macs=flops_by_module.get(name, 0) // 2,
                latency_ms=statistics.median(times[name]) * 1e3 if times.get(name) else 0.0,
                output_bytes=out_bytes.get(name, 0),
            )
        )
    params, nbytes, by_dtype = _tensor_bytes(model)
    return Profile(
        model=root,
        input_shapes=[list(t.shape) for t in example_inputs],
        params=params,
        bytes=nbytes,
        bytes_by_dtype=by_dtype,
        macs=total_flops // 2,
        latency_ms=statistics.median(whole) * 1e3,
        threads=torch.get_num_threads(),
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
