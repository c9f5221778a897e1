"""Attention heads as pruning units, for Hugging Face style attention modules.

The channel graph freezes the query/key/value projections (their outputs are reshaped into heads); this
module removes whole heads instead. Two layouts are recognised by their attributes:

- LLaMA-style (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `head_dim`, `num_key_value_groups`), with
  grouped-query attention: the unit is one key/value head together with the query heads that share it,
  so the grouping ratio is unchanged;
- BERT-style (`self.query`/`self.key`/`self.value` with `attention_head_size`, and `output.dense`).

Both Hugging Face forwards reshape with `-1` heads, so the sliced module runs as is. `update_hf_config`
then writes the new sizes into the model's config when every layer has the same ones, so that
`save_pretrained` / `from_pretrained` round-trip (LLaMA-style configs carry `head_dim`; a BERT config
derives the head size from `hidden_size / num_attention_heads`, so a head-pruned BERT cannot be
described by its config and the caller is told).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Attention:
    """One attention module's projections and head layout."""

    name: str
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    groups: int  # query heads per key/value head
    style: str  # "llama" or "bert"

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim


def find_attention(model: nn.Module) -> Iterator[Attention]:
    """The attention modules whose heads can be removed."""
    for name, m in model.named_modules():
        q, k, v, o = (getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj", "o_proj"))
        head_dim = getattr(m, "head_dim", None)
        groups = getattr(m, "num_key_value_groups", None)
        if all(isinstance(t, nn.Linear) for t in (q, k, v, o)) and isinstance(head_dim, int):
            assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear)
            assert isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
            yield Attention(name, m, q, k, v, o, head_dim, int(groups or 1), "llama")
            continue
        inner, output = getattr(m, "self", None), getattr(m, "output", None)
        dense = getattr(output, "dense", None)
        if inner is None or not isinstance(dense, nn.Linear):
            continue
        q, k, v = (getattr(inner, a, None) for a in ("query", "key", "value"))
        size = getattr(inner, "attention_head_size", None)
        if all(isinstance(t, nn.Linear) for t in (q, k, v)) and isinstance(size, int):
            assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
            yield Attention(name, m, q, k, v, dense, size, 1, "bert")


def head_importance(att: Attention, score: Callable[[nn.Linear], torch.Tensor]) -> torch.Tensor:
    """One score per key/value head: `score(layer)` (one value per weight element) summed over every weight
    that head removes (its query/key/value rows and its output-projection columns)."""
    d, g = att.head_dim, att.groups

    def rows(layer: nn.Linear, per: int) -> torch.Tensor:
        w = score(layer)
        return w.reshape(-1, per * d, w.shape[1]).sum(dim=(1, 2))

    cols = score(att.o)
    o = cols.reshape(cols.shape[0], -1, g * d).sum(dim=(0, 2))
    return rows(att.q, g) + rows(att.k, 1) + rows(att.v, 1) + o


@torch.no_grad()
def prune_heads(att: Attention, keep: torch.Tensor) -> None:
    """Keep the key/value heads where `keep` is True (with their query heads); slice in place."""
    d, g = att.head_dim, att.groups
    kv_rows = keep.repeat_interleave(d)
    q_rows = keep.repeat_interleave(g * d)
    for layer, mask in ((att.q, q_rows), (att.k, kv_rows), (att.v, kv_rows)):
        layer.weight = nn.Parameter(
            layer.weight.detach()[mask].clone(), requires_grad=layer.weight.requires_grad
        )
        if layer.bias is not None:
            layer.bias = nn.Parameter(
                layer.bias.detach()[mask].clone(), requires_grad=layer.bias.requires_grad
            )
        layer.out_features = int(mask.sum())
    att.o.weight = nn.Parameter(
        att.o.weight.detach()[:, q_rows].clone(), requires_grad=att.o.weight.requires_grad
    )
    att.o.in_features = int(q_rows.sum())
    if att.style == "bert":
        inner = getattr(att.module, "self")  # noqa: B009  (`self` is the submodule's name)
        assert isinstance(inner, nn.Module)
        setattr(inner, "num_attention_heads", int(keep.sum()))  # noqa: B010  (plain ints on an nn.Module)
        setattr(inner, "all_head_size", int(keep.sum()) * d)  # noqa: B010


def heads_to_keep(n: int, ratio: float) -> int:
    return min(n, max(1, math.ceil((1 - ratio) * n)))


def update_hf_config(model: nn.Module) -> list[str]:
    """Write uniform pruned sizes into each Hugging Face config found in `model`; returns what could not
    be written (per-layer sizes differ, or the config cannot express them)."""
    problems: list[str] = []
    for owner in model.modules():
        config = getattr(owner, "config", None)
        if config is None or not hasattr(owner, "save_pretrained"):
            continue
        attention = list(find_attention(owner))
        heads = {(a.q.out_features // a.head_dim, a.kv_heads, a.head_dim, a.style) for a in attention}
        if len(heads) > 1:
            problems.append(f"attention heads differ between layers: {sorted(heads)}")
        elif heads:
            q_heads, kv_heads, head_dim, style = next(iter(heads))
            if q_heads != getattr(config, "num_attention_heads", q_heads):
                if style == "llama":
                    config.head_dim = head_dim
                    config.num_attention_heads = q_heads
                    config.num_key_value_heads = kv_heads
                else:
                    problems.append(
                        f"{type(config).__name__} derives the head size from hidden_size / num_attention_heads, "
                        f"so {q_heads} heads of {head_dim} cannot be saved in it"
                    )
        widths = {
            m.out_features
            for n, m in owner.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(("mlp.gate_proj", "mlp.fc1", "intermediate.dense"))
        }
        if len(widths) > 1:
            problems.append(f"FFN widths differ between layers: {sorted(widths)}")
        elif widths and hasattr(config, "intermediate_size"):
            config.intermediate_size = next(iter(widths))
    return problems


__all__ = [
    "Attention",
    "find_attention",
    "head_importance",
    "heads_to_keep",
    "prune_heads",
    "update_hf_config",
]
