"""The torch.export program every graph analysis here starts from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from modelpress.errors import GraphError


def export_program(model: nn.Module, example_inputs: Sequence[Any], *, owner: str, fix: str) -> Any:
    """`torch.export.export(model, example_inputs)`, or a `GraphError` naming the model, the failure and
    `fix` (what the user can do instead)."""
    try:
        return torch.export.export(model, tuple(example_inputs), strict=False)
    except Exception as exc:  # export raises many types (UserError, Unsupported, RuntimeError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(
            f"{owner}: torch.export cannot trace {type(model).__name__} on the example inputs: "
            f"{type(exc).__name__}: {first}. Data-dependent control flow in forward is the usual cause; "
            f"rewrite it with torch.cond, or {fix}."
        ) from exc
