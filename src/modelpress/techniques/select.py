"""Choosing modules: `targets` and `ignore` are names, type names, `re:` regexes or `role:` names (a layer's
part in its block, found from the shapes of its siblings: `role:mlp_out`), matched once here."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from modelpress.errors import RecipeError

log = logging.getLogger(__name__)


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern == type(module).__name__:
        return True
    return name == pattern or name.startswith(pattern + ".")


def matches_any(patterns: Sequence[str], name: str, module: nn.Module) -> bool:
    """Whether any of `patterns` (names, type names, `re:` regexes) selects the module."""
    return any(_matches(p, name, module) for p in patterns)


#: role -> what it selects (`role:NAME` in targets / ignore).
ROLES = {
    "mlp_out": "each MLP's output projection: the Linear with its block's widest input, mapping it back to the "
    "width its sibling Linears read (Llama's down_proj, GPT-2's mlp.c_proj, OPT's fc2, GPT-J's fc_out, an "
    "expert's w2); Linear layers of one parent module only",
}


def role_names(model: nn.Module, role: str) -> list[str]:
    """Names of the modules of `model` that play `role` (see ROLES)."""
    if role not in ROLES:
        raise RecipeError(
            f"'role:{role}' is no role; the roles are: {', '.join(f'role:{r}' for r in ROLES)}."
        )
    found = []
    for parent_name, parent in model.named_modules():
        linears = [(n, m) for n, m in parent.named_children() if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            continue
        widest = max(m.in_features for _, m in linears)
        for name, m in linears:
            others = [o for _, o in linears if o is not m]
            if (
                m.in_features == widest
                and m.out_features < m.in_features
                and all(o.in_features == m.out_features for o in others)
                and any(o.out_features % m.in_features == 0 for o in others)  # the expansion (gate_up: 2x)
            ):
                found.append(f"{parent_name}.{name}" if parent_name else name)
    return found


def expand_roles(model: nn.Module, patterns: Sequence[str] | None) -> list[str] | None:
    """`patterns` with each `role:` one replaced by the names it selects in `model` (kept as written where
    it selects none, so that the unmatched-pattern checks name it)."""
    if patterns is None:
        return None
    out: list[str] = []
    for pattern in patterns:
        names = role_names(model, pattern[5:]) if pattern.startswith("role:") else []
        out.extend([f"re:{re.escape(n)}" for n in names] or [pattern])
    return out


def select_modules(
    model: nn.Module,
    *,
    types: tuple[type[nn.Module], ...],
    targets: Sequence[str] | None,
    ignore: Sequence[str],
) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) of the given `types` that match `targets` (all when None) and not `ignore`."""
    targets, ignore = expand_roles(model, targets), expand_roles(model, ignore) or []
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if targets is not None and not any(_matches(p, name, module) for p in targets):
            continue
        if any(_matches(p, name, module) for p in ignore):
            continue
        yield name, module


def unmatched_patterns(model: nn.Module, patterns: Sequence[str] | None) -> list[str]:
    """Patterns that match no module at all (usually a typo the user wants to hear about). A `role:` that
    this architecture does not have is logged instead: a recipe written for many families (the MLP output
    of an LM) still applies its other targets to a model whose MLP has no such Linear (fused experts)."""
    if not patterns:
        return []
    named = list(model.named_modules())
    missing = []
    for p in patterns:
        if any(_matches(q, n, m) for q in expand_roles(model, [p]) or [] for n, m in named):
            continue
        if p.startswith("role:"):
            log.warning(
                "%s selects no layer of this model (%s); the step applies to its other targets.",
                p,
                ROLES.get(p[5:], "?"),
            )
        else:
            missing.append(p)
    return missing


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
