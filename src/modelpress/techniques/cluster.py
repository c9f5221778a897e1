"""Weight sharing: k-means clusters per layer or group of rows, stored as a codebook plus packed indices.

Work in progress (issue 27): this module is being written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from modelpress.errors import RecipeError


@dataclass(frozen=True)
class ClusterConfig:
    """Weight sharing: k-means clusters per layer or group of rows, stored as a codebook plus packed indices."""

    type: ClassVar[str] = "cluster"


def cluster(model: nn.Module, config: ClusterConfig, data: Any = None) -> nn.Module:
    """Not written yet."""
    raise RecipeError("cluster: not available yet.")
