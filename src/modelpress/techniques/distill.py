"""Knowledge distillation from the model before the recipe (or a given teacher) into the current model.

Work in progress (issue 27): this module is being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from modelpress.errors import RecipeError


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from the model before the recipe (or a given teacher) into the current model."""

    type: ClassVar[str] = "distill"


def distill(model: nn.Module, config: DistillConfig, data: Any = None) -> nn.Module:
    """Not written yet."""
    raise RecipeError("distill: not available yet.")
