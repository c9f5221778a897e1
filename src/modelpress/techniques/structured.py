"""Structured pruning: whole channels, filters and FFN neurons removed from the tensors.

The channel dependency graph (`graph/channels.py`) says which output rows, input columns and BatchNorm
entries are one channel; each group of channels produced by the same layers loses `ratio` of its
channels, the least important first, keeping a multiple of `round_to`. Importance is the L1 or L2 norm
of everything the channel removes (its producers' rows and consumers' columns). Channels the graph cannot
cut safely (model outputs, residual streams read by LayerNorm, attention reshapes, protected layers) are
kept, and the log says why for each group.

The pruned model is an ordinary smaller model: it runs and exports like the original, and ONNX Runtime
and OpenVINO run it faster because there is less to compute.

>>> small = compress(model, [StructuredPruningConfig(ratio=0.5, round_to=8)], batches)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.graph.channels import ChannelGraph, ChannelGroup, LayerUse
from modelpress.graph.heads import (
    find_attention,
    head_importance,
    heads_to_keep,
    prune_heads,
    update_hf_config,
)
from modelpress.loading import as_inputs
from modelpress.techniques.finetune import finetune, labeled
from modelpress.techniques.quantized import QUANTIZABLE_TYPES
from modelpress.techniques.select import matches_any, select_modules, unmatched_patterns

log = logging.getLogger(__name__)

# Layer kinds whose output channels (RNN: hidden units) may be cut.
_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    **QUANTIZABLE_TYPES,
    "rnn": (nn.LSTM, nn.GRU),
}


@dataclass(frozen=True)
class StructuredPruningConfig:
    """Remove `ratio` of the channels of each group of coupled channels (output channels of the selected
    layers, with everything that reads them).

    >>> StructuredPruningConfig(ratio=0.5, round_to=8).importance
    'l2'
    """

    type: ClassVar[str] = "structured"
    ratio: float = 0.5
    importance: Literal["l1", "l2"] = "l2"
    round_to: int = 1  # channels kept per group: a multiple of this (8 suits int8 and SIMD kernels)
    # Also remove `ratio` of the attention heads of each Hugging Face style attention module (whole
    # key/value heads with their query heads under grouped-query attention).
    heads: bool = True
    layers: tuple[Literal["linear", "conv", "rnn"], ...] = ("linear", "conv", "rnn")
    targets: tuple[str, ...] | None = None  # layers whose output channels may be cut (default: all)
    ignore: tuple[str, ...] = ()  # layers never cut, nor any channel they read or write
    # Recovery after the cut: "distill" trains the pruned model to match the unpruned one on the data's
    # inputs (no labels); "task" trains on (inputs, labels) items by cross-entropy; "none" skips it.
    recover: Literal["none", "distill", "task"] = "none"
    recover_epochs: int = 1
    recover_steps: int | None = None  # stop after this many steps (batches) when set
    recover_lr: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 <= self.ratio < 1:
            raise RecipeError(
                f"structured: ratio={self.ratio} must be in [0, 1): the fraction of each group's channels removed."
            )
        if self.importance not in ("l1", "l2"):
            raise RecipeError(f"structured: importance={self.importance!r} is unknown; choose 'l1' or 'l2'.")
        if self.round_to < 1:
            raise RecipeError(f"structured: round_to={self.round_to} must be at least 1.")
        bad = [k for k in self.layers if k not in _KINDS]
        if bad or not self.layers:
            raise RecipeError(
                f"structured: layers={list(self.layers)} is invalid; choose from ['conv', 'linear', 'rnn']."
            )


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _param(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach()


def _gates(module: nn.Module) -> int:
    return 4 if isinstance(module, nn.LSTM) else 3


def _rnn_norms(use: LayerUse, power: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    module = use.module
    assert isinstance(module, (nn.LSTM, nn.GRU))
    h, g = module.hidden_size, _gates(module)
    ih = _param(module, "weight_ih_l0").abs().float().pow(power)  # (g*H, in)
    hh = _param(module, "weight_hh_l0").abs().float().pow(power)  # (g*H, H)
    units = ih.reshape(g, h, -1).sum(dim=(0, 2)) + hh.reshape(g, h, -1).sum(dim=(0, 2)) + hh.sum(dim=0)
    cols = ih.sum(dim=0)
    return units.numpy(), (cols.numpy() if use.inp is not None else None)


def _norms(use: LayerUse, power: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per output row and per input column (for `use.inp` ids) sums of |w|^power."""
    module = use.module
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return _rnn_norms(use, power)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None, None
    w = weight.detach().abs().float().pow(power)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (w.numpy() if use.out is not None else None), None
    by_dim0: np.ndarray | None = w.reshape(w.shape[0], -1).sum(1).numpy()
    by_dim1: np.ndarray | None = (
        w.transpose(0, 1).reshape(w.shape[1], -1).sum(1).numpy() if w.dim() >= 2 else None
    )
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight (in, out, k...)
        by_dim0, by_dim1 = by_dim1, by_dim0
    return (by_dim0 if use.out is not None else None), (by_dim1 if use.inp is not None else None)


def _importance(graph: ChannelGraph, power: int) -> dict[int, float]:
    score: dict[int, float] = defaultdict(float)
    for use in graph.uses.values():
        rows, cols = _norms(use, power)
        for ids, values in ((use.out, rows), (use.inp, cols)):
            if ids is None or values is None or len(values) != len(ids):
                continue
            for i, v in zip(ids.tolist(), values.tolist(), strict=True):
                score[graph.uf.find(int(i))] += float(v)
    return score


def plan(
    graph: ChannelGraph, config: StructuredPruningConfig, cuttable: set[str]
) -> tuple[set[int], list[tuple[tuple[str, ...], int, int, str | None]]]:
    """The channel roots to remove, and per producer set: (producers, channels, removed, why kept)."""
    power = 1 if config.importance == "l1" else 2
    score = _importance(graph, power)
    by_producers: dict[tuple[str, ...], list[ChannelGroup]] = defaultdict(list)
    for group in graph.groups(protect=config.ignore):
        if group.producers:
            by_producers[group.producers].append(group)
    remove: set[int] = set()
    summary = []
    for producers, groups in by_producers.items():
        frozen = next((g.frozen for g in groups if g.frozen), None)
        outside = [p for p in producers if p not in cuttable and not _is_batchnorm(graph, p)]
        if frozen is None and outside:
            frozen = f"{outside[0]} is not selected (targets/layers)"
        n = len(groups)
        if frozen is not None or config.ratio == 0:
            summary.append((producers, n, 0, frozen))
            continue
        keep = math.ceil((1 - config.ratio) * n / config.round_to) * config.round_to
        keep = min(n, max(keep, config.round_to, 1))
        ranked = sorted(groups, key=lambda g: (score.get(g.root, 0.0), g.root))
        removed = ranked[: n - keep]
        remove.update(g.root for g in removed)
        summary.append((producers, n, len(removed), None))
    return remove, summary


def _is_batchnorm(graph: ChannelGraph, name: str) -> bool:
    return isinstance(graph.modules.get(name), nn.modules.batchnorm._BatchNorm)


def _keep(graph: ChannelGraph, ids: np.ndarray, remove: set[int]) -> torch.Tensor:
    return torch.tensor([graph.uf.find(int(i)) not in remove for i in ids.tolist()], dtype=torch.bool)


@torch.no_grad()
def _slice_rnn(module: nn.LSTM | nn.GRU, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    h, g = module.hidden_size, _gates(module)
    unit = out_keep if out_keep is not None else torch.ones(h, dtype=torch.bool)
    rows = unit.repeat(g)  # the gates are stacked [i, f, g, o] (LSTM) / [r, z, n] (GRU)
    cols = in_keep if in_keep is not None else torch.ones(module.input_size, dtype=torch.bool)

    def put(name: str, value: torch.Tensor) -> None:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))

    put("weight_ih_l0", _param(module, "weight_ih_l0")[rows][:, cols])
    put("weight_hh_l0", _param(module, "weight_hh_l0")[rows][:, unit])
    if module.bias:
        put("bias_ih_l0", _param(module, "bias_ih_l0")[rows])
        put("bias_hh_l0", _param(module, "bias_hh_l0")[rows])
    module.hidden_size, module.input_size = int(unit.sum()), int(cols.sum())


@torch.no_grad()
def _slice(use: LayerUse, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> None:
    module = use.module
    if isinstance(module, (nn.LSTM, nn.GRU)):
        _slice_rnn(module, out_keep, in_keep)
        return
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        assert out_keep is not None
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, name)
            if t is None:
                continue
            if isinstance(t, nn.Parameter):
                setattr(
                    module, name, nn.Parameter(t.detach()[out_keep].clone(), requires_grad=t.requires_grad)
                )
            else:
                setattr(module, name, t[out_keep].clone())
        module.num_features = int(out_keep.sum())
        return
    weight = _weight(module)
    w = weight.detach()
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)  # weight (in, out, k...)
    rows, cols = (in_keep, out_keep) if transposed else (out_keep, in_keep)
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    module.weight = nn.Parameter(w.clone(), requires_grad=weight.requires_grad)
    bias = module.bias
    if isinstance(bias, torch.Tensor) and out_keep is not None:
        module.bias = nn.Parameter(bias.detach()[out_keep].clone(), requires_grad=bias.requires_grad)
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
    elif transposed:
        assert isinstance(module, nn.modules.conv._ConvTransposeNd)
        module.in_channels, module.out_channels = int(w.shape[0]), int(w.shape[1])
    else:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if module.groups > 1:  # depthwise: one channel in, one out
            module.groups = module.in_channels = module.out_channels = int(w.shape[0])
        else:
            module.out_channels, module.in_channels = int(w.shape[0]), int(w.shape[1])


def apply_plan(graph: ChannelGraph, remove: set[int]) -> None:
    """Slice every layer the removed channels touch, in place."""
    for use in graph.uses.values():
        out_keep = None if use.out is None else _keep(graph, use.out, remove)
        in_keep = None if use.inp is None else _keep(graph, use.inp, remove)
        if out_keep is not None and bool(out_keep.all()):
            out_keep = None
        if in_keep is not None and bool(in_keep.all()):
            in_keep = None
        if out_keep is None and in_keep is None:
            continue
        if (out_keep is not None and not bool(out_keep.any())) or (
            in_keep is not None and not bool(in_keep.any())
        ):
            raise AssertionError(f"structured: the plan removes every channel of '{use.name}'")
        _slice(use, out_keep, in_keep)


def _prune_heads(
    model: nn.Module, config: StructuredPruningConfig, cuttable: set[str], protected: set[str]
) -> int:
    """Remove `ratio` of the key/value heads (with their query heads) of each attention module whose
    projections are all selected and none protected; returns the heads removed."""
    power = 1 if config.importance == "l1" else 2
    names = {id(m): n for n, m in model.named_modules()}
    removed = 0
    for att in find_attention(model):
        layers = [names[id(t)] for t in (att.q, att.k, att.v, att.o)]
        if any(n not in cuttable or n in protected for n in layers) or matches_any(
            config.ignore, att.name, att.module
        ):
            log.info(
                "structured: kept every head of '%s' (a projection is protected or not selected)", att.name
            )
            continue
        n = att.kv_heads
        keep_n = heads_to_keep(n, config.ratio)
        if keep_n == n:
            continue
        order = torch.argsort(head_importance(att, power), descending=True, stable=True)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:keep_n]] = True
        prune_heads(att, keep)
        removed += n - keep_n
        log.info(
            "structured: removed %d of %d %sheads of '%s'",
            n - keep_n,
            n,
            "key/value " if att.groups > 1 else "",
            att.name,
        )
    return removed


def structured(model: nn.Module, config: StructuredPruningConfig, data: Dataset | Any = None) -> nn.Module:
    """Remove channels as `config` says, optionally recover by fine-tuning, and return the smaller model
    (the same object, sliced in place).

    Needs one example batch (`data`) to trace the model, and the training data for `recover`.
    """
    dataset = as_dataset(data)
    first = next(iter(dataset.take(1)), None) if dataset is not None else None
    if first is None or dataset is None:
        raise DataError(
            "structured: tracing the model's channels needs one batch of example inputs: pass `data=` to "
            "compress, or --data file.py:fn on the command line."
        )
    if config.recover == "task":
        first = labeled(first, "the first data item", owner="structured")[0]
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(f"structured: targets {missing} match no module of the model.")
    unmatched_ignore = unmatched_patterns(model, config.ignore)
    if unmatched_ignore:
        raise RecipeError(f"structured: ignore {unmatched_ignore} match no module of the model.")
    example = as_inputs(first, where="calibration item")
    types = tuple(t for kind in config.layers for t in _KINDS[kind])
    cuttable = {
        n for n, _ in select_modules(model, types=types, targets=config.targets, ignore=config.ignore)
    }
    with torch.no_grad():
        before = model(*example)
    params_before = sum(p.numel() for p in model.parameters())
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if config.recover == "distill" else None
    graph = ChannelGraph(model, example, owner="structured")
    protected = {n for n, m in graph.modules.items() if n in graph.uses and matches_any(config.ignore, n, m)}
    remove, summary = plan(graph, dataclasses.replace(config, ignore=tuple(sorted(protected))), cuttable)
    apply_plan(graph, remove)
    cut_heads = _prune_heads(model, config, cuttable, protected) if config.heads and config.ratio > 0 else 0
    for producers, n, removed, why in summary:
        label = ", ".join(producers[:3]) + (f" +{len(producers) - 3}" if len(producers) > 3 else "")
        if why:
            log.info("structured: kept all %d channels of [%s]: %s", n, label, why)
        else:
            log.info("structured: removed %d of %d channels of [%s]", removed, n, label)
    with torch.no_grad():
        after = model(*example)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor) and before.shape != after.shape:
        raise AssertionError(
            f"structured: output shape changed {tuple(before.shape)} -> {tuple(after.shape)}"
        )
    params_after = sum(p.numel() for p in model.parameters())
    log.info(
        "structured: %d channel groups cut; parameters %d -> %d (%.2fx)",
        sum(1 for s in summary if s[2]),
        params_before,
        params_after,
        params_after / max(params_before, 1),
    )
    problems = update_hf_config(model)
    for problem in problems:
        log.warning(
            "structured: the Hugging Face config cannot describe the pruned model (%s); "
            "save it with torch.save or export it, not save_pretrained.",
            problem,
        )
    if not remove and not cut_heads:
        log.warning(
            "structured: no channel could be removed; the model is unchanged (see the log lines above)."
        )
    elif config.recover != "none":
        model.eval()
        with torch.enable_grad():
            finetune(
                model,
                dataset,
                [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.recover_lr}],
                loss=config.recover,
                epochs=config.recover_epochs,
                steps=config.recover_steps,
                teacher=teacher,
                owner="structured",
                hint=f"Lower recover_lr (now {config.recover_lr}).",
                logger=log,
            )
    return model


__all__ = ["StructuredPruningConfig", "apply_plan", "plan", "structured"]
