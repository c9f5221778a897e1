from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # the workers share the cores

TINY_MODEL = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            return self.fc(x.mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return Tiny().eval(), (torch.randn(2, 3, 8, 8),)

    def broken():
        raise RuntimeError("weights server unreachable")

    def wrong_inputs():
        torch.manual_seed(0)
        return Tiny().eval(), (torch.randn(2, 5, 8, 8),)

    def no_pair():
        return Tiny()

    def calib():
        return [torch.randn(2, 3, 8, 8) for _ in range(2)]

    def labeled():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]
    """
)


@pytest.fixture()
def tiny_model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY_MODEL)
    return path


@pytest.fixture()
def tiny(tiny_model_file: Path) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    from modelpress.loading import load_model

    return load_model(f"{tiny_model_file}:build")
