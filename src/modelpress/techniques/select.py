"""Choosing modules: `targets` and `ignore` are names, type names or `re:` regexes, matched once here."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern == type(module).__name__:
        return True
    return name == pattern or name.startswith(pattern + ".")


def matches_any(patterns: Sequence[str], name: str, module: nn.Module) -> bool:
    """Whether any of `patterns` (names, type names, `re:` regexes) selects the module."""
    return any(_matches(p, name, module) for p in patterns)


def select_modules(
    model: nn.Module,
    *,
    types: tuple[type[nn.Module], ...],
    targets: Sequence[str] | None,
    ignore: Sequence[str],
) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) of the given `types` that match `targets` (all when None) and not `ignore`."""
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if targets is not None and not any(_matches(p, name, module) for p in targets):
            continue
        if any(_matches(p, name, module) for p in ignore):
            continue
        yield name, module


def unmatched_patterns(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Patterns that match no module at all (usually a typo the user wants to hear about)."""
    if not patterns:
        return []
    named = list(model.named_modules())
    return [p for p in patterns if not any(_matches(p, n, m) for n, m in named)]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2, GPT-J's ancestors): a Linear with its weight stored (in, out).
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def conv1d_as_linear(model: nn.Module) -> list[str]:
    """Replace every GPT-2-style `Conv1D` (y = x @ W + b, W stored (in, out)) by the `nn.Linear` it is (the
    weight transposed), in place, so techniques that compress Linear layers compress it; returns the names."""
    names = [name for name, module in model.named_modules() if name and is_conv1d(module)]
    for name in names:
        old = model.get_submodule(name)
        weight: torch.Tensor = old.weight.detach()  # type: ignore[operator]  # (in, out)
        bias = getattr(old, "bias", None)
        new = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight.t())
            if bias is not None:
                new.bias.copy_(bias.detach())
        set_submodule(model, name, new)
    return names
