"""Low-rank factorization (truncated SVD of Linear/Embedding, spatial SVD / Tucker-2 of convolutions).

Work in progress (issue 27): this module is being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from modelpress.errors import RecipeError


@dataclass(frozen=True)
class LowRankConfig:
    """Low-rank factorization (truncated SVD of Linear/Embedding, spatial SVD / Tucker-2 of convolutions)."""

    type: ClassVar[str] = "lowrank"


def lowrank(model: nn.Module, config: LowRankConfig, data: Any = None) -> nn.Module:
    """Not written yet."""
    raise RecipeError("lowrank: not available yet.")
