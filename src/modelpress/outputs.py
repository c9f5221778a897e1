"""A model's outputs as named tensors, whatever the model returns, and the switch that keeps caches out.

Models return a tensor, a tuple, a dict or a Hugging Face `ModelOutput` (an ordered dict whose keys are
`logits`, `last_hidden_state`, ...); causal LMs also return their key/value cache unless `use_cache` is
off. Everything that compares outputs (parity, metrics, distillation, calibration) and the ONNX export
see the same list: the tensors in the order the model returns them, caches and `None` left out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

# Keys of key/value caches in Hugging Face outputs: state for the next call, not a result.
CACHE_KEYS = frozenset({"past_key_values", "cache", "present_key_values", "mems"})


def named_outputs(out: Any, name: str = "output") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor in `out`, in order: a tensor is `name`; a tuple gives `name_0`,
    `name_1`, ...; a mapping (a `ModelOutput` too) gives its keys (`logits`, `hidden_states_0`, ...).

    >>> [n for n, _ in named_outputs({"logits": torch.zeros(1), "cache": object()})]
    ['logits']
    """
    if isinstance(out, torch.Tensor):
        return [(name, out)]
    if isinstance(out, Mapping):
        found: list[tuple[str, torch.Tensor]] = []
        for key, value in out.items():
            if str(key) not in CACHE_KEYS and value is not None:
                found += named_outputs(value, str(key))
        return found
    if isinstance(out, (tuple, list)):
        found = []
        for i, value in enumerate(out):
            found += named_outputs(value, f"{name}_{i}")
        return found
    return []  # None, caches and other state objects


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of `out` in order (see `named_outputs`)."""
    return [t for _, t in named_outputs(out)]


def first_output(out: Any) -> torch.Tensor | None:
    """The model's main result: its first tensor (logits, last_hidden_state, or the only output)."""
    tensors = output_tensors(out)
    return tensors[0] if tensors else None


def _configs(model: nn.Module) -> Iterator[Any]:
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "use_cache") and id(config) not in seen:
            seen.add(id(config))
            yield config


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context every Hugging Face config inside `model` has `use_cache=False`, so forwards
    return results only (no key/value cache to trace or carry); the settings are restored afterwards.

    >>> with no_cache(model):  # doctest: +SKIP
    ...     logits = model(input_ids).logits
    """
    configs = list(_configs(model))
    before = [c.use_cache for c in configs]
    for c in configs:
        c.use_cache = False
    try:
        yield model
    finally:
        for c, value in zip(configs, before, strict=True):
            c.use_cache = value


class FlatOutputs(nn.Module):
    """Runs `model` with caches off and returns its output tensors as a tuple (see `named_outputs`):
    what the ONNX exporter and the runtimes take. The model's layer names are kept under `model.`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return tuple(output_tensors(self.model(*args)))
