"""The real assets as `modelpress` model factories, for the command line.

modelpress profile benchmarks/factories.py:minilm
modelpress profile benchmarks/factories.py:mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets


def mnist() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ccexam's MNIST CNN and one test image (1, 1, 28, 28)."""
    x, _ = assets.mnist_data("test")
    return assets.mnist_model(), (x[:1],)


def minilm() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """all-MiniLM-L6-v2 (mean-pooled, normalised embedding) at batch 1, sequence 128."""
    model, tokenizer = assets.minilm()
    enc = tokenizer(
        assets.lee_corpus()[:1], padding="max_length", truncation=True, max_length=128, return_tensors="pt"
    )
    return model, (enc["input_ids"], enc["attention_mask"])
