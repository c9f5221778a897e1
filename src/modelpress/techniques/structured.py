"""Structured pruning: whole channels, filters and FFN neurons removed from the tensors.

The channel dependency graph (`graph/channels.py`) says which output rows, input columns and BatchNorm
entries are one channel; each group of channels produced by the same layers loses `ratio` of its
channels, the least important first, keeping a multiple of `round_to`. Importance is the L1 or L2 norm
of everything the channel removes (its producers' rows and consumers' columns). Channels the graph cannot
cut safely (model outputs, residual streams read by LayerNorm, attention reshapes, protected layers) are
kept, and the log says why for each group. Attention heads (separate or fused q|k|v projections, GQA)
and the FFN neurons of MoE experts held as 3D parameters are cut as units of their own (`graph/heads.py`).

The pruned model must run: after the cuts it is run on the example batch, and when that fails (a width
checked or read in Python, which the trace cannot see) each cut is tried alone and the ones that break
the forward are undone, with a warning naming them; cuts that only fail together are a GraphError.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, GraphError, RecipeError
from modelpress.graph.channels import ChannelGraph, ChannelGroup, LayerUse
from modelpress.graph.heads import (
    Attention,
    Experts,
    expert_importance,
    find_attention,
    find_experts,
    head_importance,
    head_rows,
    heads_to_keep,
    prune_experts,
    prune_heads,
    update_hf_config,
)
from modelpress.loading import as_inputs
from modelpress.ops.refit import refit_columns
from modelpress.outputs import named_outputs, output_tensors
from modelpress.techniques.distill import DistillConfig, as_recover
from modelpress.techniques.distill import train as distill_train
from modelpress.techniques.finetune import RECOVER_LABELS, labeled, task_loss
from modelpress.techniques.quantized import QUANTIZABLE_TYPES
from modelpress.techniques.select import conv1d_as_linear, matches_any, select_modules, unmatched_patterns

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
    # How a channel's importance is measured: "l1"/"l2" weight magnitude; "taylor" |w * dL/dw| (first-order
    # Taylor, needs labeled data or token ids for a language model); "activation" the output energy the
    # channel carries on the data (E[x^2] * |w|^2 over everything it feeds), which needs no labels.
    importance: Literal["l1", "l2", "taylor", "activation"] = "l2"
    importance_batches: int = 8  # data batches that "taylor" and "activation" score on
    # False: every group loses `ratio` of its channels. True: `ratio` of all cuttable channels go, the least
    # important across groups first (scores normalised by each group's mean), no group losing more than
    # `max_ratio` of its channels.
    global_ranking: bool = False
    max_ratio: float = 0.9
    round_to: int = 1  # channels kept per group: a multiple of this (8 suits int8 and SIMD kernels)
    # Also remove `ratio` of the attention heads of each Hugging Face style attention module (whole
    # key/value heads with their query heads under grouped-query attention).
    heads: bool = True
    layers: tuple[Literal["linear", "conv", "rnn"], ...] = ("linear", "conv", "rnn")
    targets: tuple[str, ...] | None = None  # layers whose output channels may be cut (default: all)
    ignore: tuple[str, ...] = ()  # layers never cut, nor any channel they read or write
    # Refit, by least squares on the data, the Linear layers that read removed channels or heads: the kept
    # input columns (and the bias) take over what the removed ones did on average (ops/refit.py).
    reconstruct: bool = False
    # Pruning rounds: the ratio is reached gradually on the cubic (AGP) schedule, recovering after each.
    schedule_steps: int = 1
    # Recovery after each cut (round): distillation from the unpruned model (a DistillConfig; YAML
    # `recover: {loss: kl, steps: 200, lr: 1e-4}`; `loss: kl` for logits, `mse` for other outputs, `task`
    # for cross-entropy on (inputs, labels) items); null skips it.
    recover: DistillConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "recover", as_recover("structured", self.recover))
        if not 0 <= self.ratio < 1:
            raise RecipeError(
                f"structured: ratio={self.ratio} must be in [0, 1): the fraction of each group's channels removed."
            )
        if self.importance not in ("l1", "l2", "taylor", "activation"):
            raise RecipeError(
                f"structured: importance={self.importance!r} is unknown; choose 'l1', 'l2', 'taylor' or "
                "'activation'."
            )
        if self.round_to < 1:
            raise RecipeError(f"structured: round_to={self.round_to} must be at least 1.")
        if self.importance_batches < 1:
            raise RecipeError(f"structured: importance_batches={self.importance_batches} must be at least 1.")
        if self.schedule_steps < 1:
            raise RecipeError(
                f"structured: schedule_steps={self.schedule_steps} must be at least 1 (1 prunes in one shot)."
            )
        if not 0 < self.max_ratio < 1:
            raise RecipeError(f"structured: max_ratio={self.max_ratio} must be in (0, 1).")
        bad = [k for k in self.layers if k not in _KINDS]
        if bad or not self.layers:
            raise RecipeError(
                f"structured: layers={list(self.layers)} is invalid; choose from ['conv', 'linear', 'rnn']."
            )


def _param(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach()


def _gates(module: nn.Module) -> int:
    return 4 if isinstance(module, nn.LSTM) else 3


def agp_ratio(final: float, step: int, steps: int) -> float:
    """The ratio reached after `step` of `steps` rounds on the cubic schedule of Zhu & Gupta (AGP): fast
    at first, while there is redundancy to spare, slow at the end.

    >>> [round(agp_ratio(0.5, k, 4), 3) for k in range(1, 5)]
    [0.289, 0.438, 0.492, 0.5]
    """
    return final * (1 - (1 - step / steps) ** 3)


# Per-weight-element scores: (module, parameter name) -> a tensor shaped like the parameter.
Elementwise = Callable[[nn.Module, str], torch.Tensor]


def _magnitude(power: int) -> Elementwise:
    return lambda module, name: _param(module, name).abs().float().pow(power)


def _taylor(module: nn.Module, name: str) -> torch.Tensor:
    p = getattr(module, name)
    grad = p.grad if isinstance(p, torch.Tensor) else None
    if grad is None:
        return torch.zeros_like(p, dtype=torch.float32)
    return (p.detach() * grad).abs().float()


def _activation(energy: dict[int, torch.Tensor]) -> Elementwise:
    """w^2 * E[x_in^2] per element: summed over a row, the output energy of that output channel; over a
    column, the energy that input channel carries through this layer."""

    def score(module: nn.Module, name: str) -> torch.Tensor:
        w = _param(module, name).float().pow(2)
        e = energy.get(id(module))
        if name.startswith("weight_hh") or w.dim() < 2:
            # BatchNorm, the recurrent weights: their channels are scored elsewhere
            return torch.zeros_like(w)
        if e is None or (name.startswith("weight_ih") and not name.startswith("weight_ih_l0")):
            return w  # not reached by the data (or an upper RNN layer, which reads the one below): plain L2
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        grouped = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
        dim = 0 if transposed or grouped else 1  # (in, out, k...) / depthwise (C, 1, k...) / (out, in, k...)
        if e.numel() != w.shape[dim]:
            return w
        shape = [1] * w.dim()
        shape[dim] = -1
        return w * e.reshape(shape)

    return score


def _rnn_weights(module: nn.LSTM | nn.GRU) -> list[tuple[int, str]]:
    """(layer, suffix) of every layer and direction: weight_ih_l{layer}{suffix}."""
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    return [(layer, sfx) for layer in range(module.num_layers) for sfx in suffixes]


def _rnn_norms(use: LayerUse, elem: Elementwise) -> tuple[np.ndarray | None, np.ndarray | None]:
    module = use.module
    assert isinstance(module, (nn.LSTM, nn.GRU))
    h, g = module.hidden_size, _gates(module)
    units = torch.zeros(h)
    cols = torch.zeros(module.input_size)
    for layer, sfx in _rnn_weights(module):
        ih = elem(module, f"weight_ih_l{layer}{sfx}")  # (g*H, in): in = input_size, or H * directions
        hh = elem(module, f"weight_hh_l{layer}{sfx}")  # (g*H, H)
        units += ih.reshape(g, h, -1).sum(dim=(0, 2)) + hh.reshape(g, h, -1).sum(dim=(0, 2)) + hh.sum(dim=0)
        if layer == 0:
            cols += ih.sum(dim=0)
        else:  # the columns reading the layer below's units (forward | backward)
            units += ih.sum(dim=0).reshape(-1, h).sum(dim=0)
    return units.numpy(), (cols.numpy() if use.inp is not None else None)


def _norms(use: LayerUse, elem: Elementwise) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per output row and per input column (for `use.inp` ids) sums of the elementwise scores."""
    module = use.module
    if isinstance(module, (nn.LSTM, nn.GRU)):
        return _rnn_norms(use, elem)
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return None, None
    w = elem(module, "weight")
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (w.numpy() if use.out is not None else None), None
    by_dim0: np.ndarray | None = w.reshape(w.shape[0], -1).sum(1).numpy()
    by_dim1: np.ndarray | None = (
        w.transpose(0, 1).reshape(w.shape[1], -1).sum(1).numpy() if w.dim() >= 2 else None
    )
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight (in, out, k...)
        by_dim0, by_dim1 = by_dim1, by_dim0
    return (by_dim0 if use.out is not None else None), (by_dim1 if use.inp is not None else None)


def _importance(graph: ChannelGraph, elem: Elementwise) -> dict[int, float]:
    score: dict[int, float] = defaultdict(float)
    for use in graph.uses.values():
        rows, cols = _norms(use, elem)
        for ids, values in ((use.out, rows), (use.inp, cols)):
            if ids is None or values is None or len(values) != len(ids):
                continue
            for i, v in zip(ids.tolist(), values.tolist(), strict=True):
                score[graph.uf.find(int(i))] += float(v)
    return score


def _next_token_loss(out: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Next-token cross-entropy when the model reads token ids (B, T) and returns logits (B, T, vocab)."""
    leaves = [(n, t) for n, t in named_outputs(out) if t.is_floating_point()]
    ids = inputs[0] if inputs else None
    if not leaves or ids is None or ids.is_floating_point() or ids.dim() != 2:
        return None
    logits = next((t for n, t in leaves if n == "logits"), leaves[0][1])
    if logits.dim() != 3 or logits.shape[:2] != ids.shape or ids.shape[1] < 2:
        return None
    if int(ids.max()) >= logits.shape[-1] or int(ids.min()) < 0:  # hidden states, not a vocabulary
        return None
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().long())


def _taylor_gradients(model: nn.Module, batches: list[Any], *, with_labels: bool) -> None:
    """Accumulate dL/dw over `batches` into each parameter's .grad: task loss on (inputs, labels) items,
    next-token loss for a language model fed token ids."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for index, item in enumerate(batches):
            if with_labels:
                inputs, labels = labeled(item, f"data item {index}", owner="structured", **RECOVER_LABELS)
                loss = task_loss(model(*inputs), labels, owner="structured")
            else:
                inputs = as_inputs(item, where=f"data item {index}")
                found = _next_token_loss(model(*inputs), inputs)
                if found is None:
                    raise DataError(
                        "structured: importance='taylor' needs a loss: with recover: {loss: task} the items are "
                        "(inputs, labels); otherwise the model must read token ids (batch, sequence) and return "
                        "logits (batch, sequence, vocab) (next-token loss). Use importance='activation', which "
                        "needs no labels."
                    )
                loss = found
            if not torch.isfinite(loss):
                raise DataError(
                    f"structured: the loss on data item {index} is {float(loss)}; check the data."
                )
            loss.backward()


@torch.no_grad()
def _input_energy(
    model: nn.Module, modules: Sequence[nn.Module], batches: list[Any], *, with_labels: bool
) -> dict[int, torch.Tensor]:
    """E[x^2] per input channel of each module (channel dim 1 for convolutions, last otherwise)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = defaultdict(int)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        x = x.detach().float()
        if isinstance(module, nn.modules.conv._ConvNd):
            x = x.transpose(0, 1) if x.dim() > 1 else x
            flat = x.reshape(x.shape[0], -1)  # (C, N * spatial)
            total, n = flat.pow(2).sum(1), flat.shape[1]
        else:
            flat = x.reshape(-1, x.shape[-1])  # (N * positions, C)
            total, n = flat.pow(2).sum(0), flat.shape[0]
        key = id(module)
        sums[key] = sums[key] + total if key in sums else total
        counts[key] += n

    _run_hooked(model, modules, hook, batches, with_labels=with_labels)
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


def _run_hooked(
    model: nn.Module,
    modules: Sequence[nn.Module],
    hook: Callable[[nn.Module, tuple[Any, ...]], None],
    batches: list[Any],
    *,
    with_labels: bool,
) -> None:
    """Run `model` over `batches` with `hook` seeing the inputs of each of `modules`."""
    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        for index, item in enumerate(batches):
            if with_labels:
                item = labeled(item, f"data item {index}", owner="structured", **RECOVER_LABELS)[0]
            model(*as_inputs(item, where=f"data item {index}"))
    finally:
        for handle in handles:
            handle.remove()


def _scorer(model: nn.Module, config: StructuredPruningConfig, dataset: Dataset) -> Elementwise:
    if config.importance in ("l1", "l2"):
        return _magnitude(1 if config.importance == "l1" else 2)
    batches = list(dataset.take(config.importance_batches))
    if config.importance == "taylor":
        _taylor_gradients(model, batches, with_labels=_labeled(config))
        return _taylor
    layers = [
        m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.LSTM, nn.GRU))
    ]
    return _activation(_input_energy(model, layers, batches, with_labels=_labeled(config)))


def _labeled(config: StructuredPruningConfig) -> bool:
    """Whether the data items are (inputs, labels): the recovery trains on labels."""
    return config.recover is not None and config.recover.labeled


@dataclass
class _Original:
    """Sizes before the first round, so every round's target is a fraction of the original model."""

    channels: dict[tuple[str, ...], int] = dataclasses.field(default_factory=dict)
    heads: dict[str, int] = dataclasses.field(default_factory=dict)


def _keep_count(n_now: int, n_original: int, ratio: float, round_to: int) -> int:
    keep = math.ceil((1 - ratio) * n_original / round_to) * round_to
    return min(n_now, max(keep, round_to, 1))


@dataclass
class GroupPlan:
    """What the plan does with the channels of one set of producer layers."""

    producers: tuple[str, ...]
    channels: int
    removed: list[int]  # roots of the channel groups removed
    why_kept: str | None = None  # why none can be removed, or None


def plan(
    graph: ChannelGraph,
    config: StructuredPruningConfig,
    cuttable: set[str],
    score: dict[int, float],
    original: _Original | None = None,
) -> tuple[set[int], list[GroupPlan]]:
    """The channel roots to remove, and what happens to the channels of each set of producers."""
    original = original if original is not None else _Original()
    by_producers: dict[tuple[str, ...], list[ChannelGroup]] = defaultdict(list)
    for group in graph.groups(protect=config.ignore):
        if group.producers:
            by_producers[group.producers].append(group)
    summary: list[GroupPlan] = []
    ranked: dict[tuple[str, ...], list[ChannelGroup]] = {}
    for producers, groups in by_producers.items():
        frozen = next((g.frozen for g in groups if g.frozen), None)
        outside = [p for p in producers if p not in cuttable and not _is_batchnorm(graph, p)]
        if frozen is None and outside:
            frozen = f"{outside[0]} is not selected (targets/layers)"
        original.channels.setdefault(producers, len(groups))
        if frozen is not None or config.ratio == 0:
            summary.append(GroupPlan(producers, len(groups), [], frozen))
            continue
        ranked[producers] = sorted(groups, key=lambda g: (score.get(g.root, 0.0), g.root))
    counts = (
        _global_counts(ranked, config, score, original)
        if config.global_ranking
        else {
            p: len(gs) - _keep_count(len(gs), original.channels[p], config.ratio, config.round_to)
            for p, gs in ranked.items()
        }
    )
    remove: set[int] = set()
    for producers, groups in ranked.items():
        removed = [g.root for g in groups[: counts[producers]]]
        remove.update(removed)
        summary.append(GroupPlan(producers, len(groups), removed))
    return remove, summary


def _global_counts(
    ranked: dict[tuple[str, ...], list[ChannelGroup]],
    config: StructuredPruningConfig,
    score: dict[int, float],
    original: _Original,
) -> dict[tuple[str, ...], int]:
    """How many channels each group loses when `ratio` of all of them go, least important first."""
    total = sum(original.channels[p] for p in ranked)
    now = sum(len(gs) for gs in ranked.values())
    budget = now - math.ceil((1 - config.ratio) * total)
    candidates: list[tuple[float, int, tuple[str, ...]]] = []
    for producers, groups in ranked.items():
        values = np.array([score.get(g.root, 0.0) for g in groups], dtype=np.float64)
        mean = float(values.mean()) if len(values) else 0.0
        floor = _keep_count(len(groups), original.channels[producers], config.max_ratio, config.round_to)
        for rank, value in enumerate(values[: len(groups) - floor].tolist()):
            candidates.append((value / mean if mean > 0 else 0.0, rank, producers))
    counts = dict.fromkeys(ranked, 0)
    for _, _, producers in sorted(candidates)[: max(budget, 0)]:
        counts[producers] += 1
    for producers, groups in ranked.items():  # keep a multiple of round_to: give back the excess
        n, keep = len(groups), len(groups) - counts[producers]
        keep = min(n, math.ceil(keep / config.round_to) * config.round_to)
        counts[producers] = n - keep
    return counts


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
    below = unit.repeat(2 if module.bidirectional else 1)  # a layer above reads forward | backward units

    def put(name: str, value: torch.Tensor) -> None:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))

    for layer, sfx in _rnn_weights(module):
        ih, hh = f"weight_ih_l{layer}{sfx}", f"weight_hh_l{layer}{sfx}"
        put(ih, _param(module, ih)[rows][:, cols if layer == 0 else below])
        put(hh, _param(module, hh)[rows][:, unit])
        if module.bias:
            for b in (f"bias_ih_l{layer}{sfx}", f"bias_hh_l{layer}{sfx}"):
                put(b, _param(module, b)[rows])
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
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
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
    for affine in graph.affine.values():
        keep = _keep(graph, affine.ids, remove)
        if bool(keep.all()):
            continue
        module = graph.modules[affine.module]
        value = getattr(module, affine.attr)
        sliced = value.detach().index_select(affine.dim, keep.nonzero().flatten()).clone()
        if isinstance(value, nn.Parameter):
            setattr(module, affine.attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
        else:
            setattr(module, affine.attr, sliced)


def _plan_heads(
    model: nn.Module,
    config: StructuredPruningConfig,
    selected: tuple[set[str], set[str]],
    elem: Elementwise,
    original: _Original,
) -> list[_Unit]:
    """The key/value heads to keep (with their query heads) of each attention module whose projections are
    all selected and none protected: `ratio` of the original heads go, the least important first. Phi-3's
    forward reads its head counts from the config all layers share: their heads go together or not at all."""
    cuttable, protected = selected
    names = {id(m): n for n, m in model.named_modules()}
    units: list[_Unit] = []
    shared: dict[int, list[tuple[Attention, torch.Tensor]]] = defaultdict(list)
    blocked: dict[int, str] = {}
    for att in find_attention(model, fused=True):
        layers = [names[id(t)] for t in (att.q, att.k, att.v, att.o)]
        why = att.refused
        if why is None and (
            any(n not in cuttable or n in protected for n in layers)
            or matches_any(config.ignore, att.name, att.module)
        ):
            why = "a projection is protected or not selected"
        n = att.kv_heads
        keep_n = min(n, heads_to_keep(original.heads.setdefault(att.name, n), config.ratio))
        key = id(getattr(att.module, "config", None))
        if why is not None:
            log.info("structured: kept every head of '%s': %s", att.name, why)
            if att.style == "phi3":
                blocked[key] = f"'{att.name}' keeps its heads ({why})"
            continue
        if keep_n == n:
            continue
        order = torch.argsort(
            head_importance(att, lambda layer: elem(layer, "weight")), descending=True, stable=True
        )
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:keep_n]] = True
        if att.style == "phi3":
            shared[key].append((att, keep))
        else:
            units.append(_Unit(f"the heads of '{att.name}'", heads=[(att, keep)]))
    for key, plans in shared.items():
        counts = {int(keep.sum()) for _, keep in plans}
        every = sum(
            1 for a in find_attention(model, fused=True) if id(getattr(a.module, "config", None)) == key
        )
        if key in blocked or len(counts) > 1 or len(plans) != every:
            log.info(
                "structured: kept every head of %d attention modules that read their head counts from one "
                "config: %s",
                len(plans),
                blocked.get(key, "their head counts would differ"),
            )
            continue
        units.append(
            _Unit(f"the heads of {len(plans)} attention modules ({plans[0][0].name}, ...)", heads=plans)
        )
    return units


def _plan_experts(
    model: nn.Module, config: StructuredPruningConfig, elem: Elementwise, original: _Original
) -> list[_Unit]:
    """The FFN neurons each expert of each MoE block keeps: `ratio` of the original width goes, the least
    important of each expert first, the same count in every expert."""
    units: list[_Unit] = []
    for ex in find_experts(model):
        selected = (
            "linear" in config.layers
            and (config.targets is None or matches_any(config.targets, ex.name, ex.module))
            and not matches_any(config.ignore, ex.name, ex.module)
        )
        if ex.refused is not None or not selected:
            log.info(
                "structured: kept every expert neuron of '%s': %s",
                ex.name,
                ex.refused or "not selected (layers/targets/ignore)",
            )
            continue
        n = ex.intermediate
        keep_n = _keep_count(n, original.channels.setdefault((ex.name,), n), config.ratio, config.round_to)
        if keep_n >= n:
            continue
        order = torch.argsort(expert_importance(ex, elem), dim=1, descending=True, stable=True)  # (E, I)
        keep = torch.zeros_like(order, dtype=torch.bool)
        keep.scatter_(1, order[:, :keep_n], True)
        units.append(_Unit(f"the expert neurons of '{ex.name}'", experts=[(ex, keep)]))
    return units


@dataclass
class _Unit:
    """One part of the plan that can be cut, or kept, on its own: the channels of one producer set, the
    heads of one attention module (of every module sharing a Phi-3 config), one MoE block's neurons."""

    label: str
    roots: set[int] = dataclasses.field(default_factory=set)
    heads: list[tuple[Attention, torch.Tensor]] = dataclasses.field(default_factory=list)
    experts: list[tuple[Experts, torch.Tensor]] = dataclasses.field(default_factory=list)

    @property
    def removed(self) -> int:
        return (
            len(self.roots)
            + sum(len(k) - int(k.sum()) for _, k in self.heads)
            + sum(k.numel() - int(k.sum()) for _, k in self.experts)
        )


def _apply(graph: ChannelGraph, units: list[_Unit]) -> None:
    """Cut every unit of `units`: channels first (their masks index the traced shapes), then heads and experts."""
    apply_plan(graph, set().union(*(u.roots for u in units)) if units else set())
    for unit in units:
        for att, keep in unit.heads:
            prune_heads(att, keep)
        for ex, neurons in unit.experts:
            prune_experts(ex, neurons)


def _copied(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in attrs.items()}


class _Snapshot:
    """Every module's parameters, buffers and attributes, and every config's fields, as they are now: the
    cuts replace tensors and set attributes rather than write into them, so this restores them."""

    def __init__(self, model: nn.Module) -> None:
        # Lists (an RNN's _flat_weights) are updated in place by the cuts: copied too.
        self.modules = [
            (m, _copied(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules))
            for m in model.modules()
        ]
        configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "__dict__")}
        self.configs = [(c, dict(c.__dict__)) for c in configs.values()]

    def restore(self) -> None:
        for m, attrs, params, buffers, children in self.modules:
            m.__dict__.clear()
            m.__dict__.update(_copied(attrs))
            m.__dict__.update(_parameters=dict(params), _buffers=dict(buffers), _modules=dict(children))
        for c, fields in self.configs:
            c.__dict__.clear()
            c.__dict__.update(fields)


def _fails(model: nn.Module, example: tuple[torch.Tensor, ...], shapes: list[tuple[int, ...]]) -> str | None:
    """Why `model` no longer runs `example` with outputs of `shapes`, or None when it does."""
    try:
        with torch.no_grad():
            out = model(*example)
    except Exception as exc:  # whatever the user's forward raises: the cut that caused it is undone
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}"
    now = [tuple(t.shape) for t in output_tensors(out)]
    return None if now == shapes else f"the outputs' shapes change from {shapes} to {now}"


def _cut_what_runs(
    model: nn.Module,
    graph: ChannelGraph,
    units: list[_Unit],
    example: tuple[torch.Tensor, ...],
    shapes: list[tuple[int, ...]],
) -> list[_Unit]:
    """Apply `units`; when the pruned model fails its forward, keep (with a warning) each unit that fails
    alone and cut the rest. Returns the units cut; a combination that fails when each part runs alone is a
    GraphError, with the model as it was."""
    snapshot = _Snapshot(model)
    _apply(graph, units)
    problem = _fails(model, example, shapes)
    if problem is None:
        return units
    snapshot.restore()
    log.warning("structured: the pruned model fails its forward (%s); trying each cut alone", problem)
    good = []
    for unit in units:
        _apply(graph, [unit])
        alone = _fails(model, example, shapes)
        snapshot.restore()
        if alone is None:
            good.append(unit)
        else:
            log.warning(
                "structured: kept %s: cutting them breaks the model's forward (%s)", unit.label, alone
            )
    _apply(graph, good)
    problem = _fails(model, example, shapes)
    if problem is not None:
        snapshot.restore()
        raise GraphError(
            f"structured: {len(good)} cuts that each leave {type(model).__name__} runnable break it together "
            f"({problem}); first of them: {good[0].label if good else '-'}. Prune fewer layers (targets/ignore) "
            "or report the architecture."
        )
    return good


@dataclass
class _Refit:
    module: nn.Linear | nn.Conv2d
    in_keep: torch.Tensor  # per input feature / channel
    out_keep: torch.Tensor | None
    weight: torch.Tensor  # the original (out, in) / (out, in, kh, kw)
    bias: torch.Tensor | None


def _refittable(module: nn.Module) -> bool:
    """Linear, and ordinary convolutions whose input patches `F.unfold` can rebuild."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of what one output position reads: (N * positions, in [* kh * kw])."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        assert not isinstance(padding, str)  # _refittable
        cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # (N, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _refits(
    graph: ChannelGraph, remove: set[int], heads: list[tuple[Attention, torch.Tensor]]
) -> dict[int, _Refit]:
    """The Linear/Conv2d layers that lose input columns, with their original weights and masks."""
    found: dict[int, _Refit] = {}

    def add(module: nn.Linear | nn.Conv2d, in_keep: torch.Tensor, out_keep: torch.Tensor | None) -> None:
        entry = found.get(id(module))
        if entry is None:
            bias = module.bias.detach().clone() if module.bias is not None else None
            entry = found[id(module)] = _Refit(
                module, in_keep, out_keep, module.weight.detach().clone(), bias
            )
        else:
            entry.in_keep = entry.in_keep & in_keep
            entry.out_keep = out_keep if entry.out_keep is None else entry.out_keep

    for use in graph.uses.values():
        if not _refittable(use.module) or use.inp is None:
            continue
        assert isinstance(use.module, (nn.Linear, nn.Conv2d))
        in_keep = _keep(graph, use.inp, remove)
        if bool(in_keep.all()):
            continue
        add(use.module, in_keep, None if use.out is None else _keep(graph, use.out, remove))
    for att, keep in heads:
        add(att.o, keep.repeat_interleave(att.groups * att.head_dim), None)
    for use in graph.uses.values():  # rows of a refit layer cut by the channel plan
        entry = found.get(id(use.module))
        if entry is not None and use.out is not None:
            out_keep = _keep(graph, use.out, remove)
            entry.out_keep = None if bool(out_keep.all()) else out_keep
    for att, keep in heads:  # and by the heads (a query projection whose inputs were cut too)
        for layer, rows in head_rows(att, keep):
            entry = found.get(id(layer))
            if entry is not None:
                entry.out_keep = rows if entry.out_keep is None else entry.out_keep & rows
    return found


@torch.no_grad()
def _input_grams(
    model: nn.Module, refits: dict[int, _Refit], batches: list[Any], *, with_labels: bool
) -> dict[int, torch.Tensor]:
    """E[x~ x~^T] of each refit layer's input (x~ = [x; 1] when the layer has a bias), in float64."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = defaultdict(int)

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        flat = _patches(module, args[0].detach().double())  # (N * positions, in [* kh * kw])
        if refits[id(module)].bias is not None:
            flat = torch.cat([flat, torch.ones(len(flat), 1, dtype=flat.dtype)], dim=1)
        key = id(module)
        gram = flat.T @ flat
        sums[key] = sums[key] + gram if key in sums else gram
        counts[key] += len(flat)

    _run_hooked(model, [r.module for r in refits.values()], hook, batches, with_labels=with_labels)
    return {k: v / max(counts[k], 1) for k, v in sums.items()}


@torch.no_grad()
def _apply_refits(refits: dict[int, _Refit], grams: dict[int, torch.Tensor]) -> None:
    for key, r in refits.items():
        if key not in grams:
            continue
        rows = r.out_keep if r.out_keep is not None else torch.ones(len(r.weight), dtype=torch.bool)
        bias = r.bias[rows] if r.bias is not None else None
        per_channel = r.weight[0, 0].numel()  # kh * kw for a convolution, 1 for a Linear
        weight, bias = refit_columns(
            r.weight[rows].flatten(1), bias, grams[key], r.in_keep.repeat_interleave(per_channel)
        )
        weight = weight.reshape(len(weight), -1, *r.weight.shape[2:])
        if weight.shape != r.module.weight.shape:
            raise AssertionError(
                f"structured: refit shape {tuple(weight.shape)} != {tuple(r.module.weight.shape)}"
            )
        r.module.weight.copy_(weight)
        if bias is not None and r.module.bias is not None:
            r.module.bias.copy_(bias)


def _label(producers: tuple[str, ...]) -> str:
    return ", ".join(producers[:3]) + (f" +{len(producers) - 3}" if len(producers) > 3 else "")


def _report(summary: list[GroupPlan], units: list[_Unit], cut: list[_Unit]) -> None:
    done = {id(u) for u in cut}
    for group in summary:
        label = _label(group.producers)
        if group.why_kept:
            log.info("structured: kept all %d channels of [%s]: %s", group.channels, label, group.why_kept)
        elif group.removed:
            unit = next(u for u in units if u.roots == set(group.removed))
            if id(unit) in done:
                log.info(
                    "structured: removed %d of %d channels of [%s]", len(group.removed), group.channels, label
                )
    for unit in cut:
        for att, keep in unit.heads:
            log.info(
                "structured: removed %d of %d %sheads of '%s'",
                len(keep) - int(keep.sum()),
                len(keep),
                "key/value " if att.groups > 1 else "",
                att.name,
            )
        for ex, neurons in unit.experts:
            log.info(
                "structured: removed %d of %d FFN neurons of each of the %d experts of '%s'",
                neurons.shape[1] - int(neurons[0].sum()),
                neurons.shape[1],
                neurons.shape[0],
                ex.name,
            )


def _prune_once(
    model: nn.Module,
    config: StructuredPruningConfig,
    dataset: Dataset,
    example: tuple[torch.Tensor, ...],
    original: _Original,
) -> bool:
    """One cut to `config.ratio` of the original sizes; returns whether anything was removed."""
    types = tuple(t for kind in config.layers for t in _KINDS[kind])
    cuttable = {
        n for n, _ in select_modules(model, types=types, targets=config.targets, ignore=config.ignore)
    }
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in output_tensors(model(*example))]
    params_before = sum(p.numel() for p in model.parameters())
    graph = ChannelGraph(model, example, owner="structured")
    protected = {n for n, m in graph.modules.items() if n in graph.uses and matches_any(config.ignore, n, m)}
    elem = _scorer(model, config, dataset)
    _, summary = plan(
        graph,
        dataclasses.replace(config, ignore=tuple(sorted(protected))),
        cuttable,
        _importance(graph, elem),
        original,
    )
    units = [_Unit(f"[{_label(g.producers)}]", roots=set(g.removed)) for g in summary if g.removed]
    if config.heads:
        units += _plan_heads(model, config, (cuttable, protected), elem, original)
    units += _plan_experts(model, config, elem, original)
    model.zero_grad(set_to_none=True)  # the Taylor scores' gradients
    before = _Snapshot(model) if config.reconstruct else None
    cut = _cut_what_runs(model, graph, units, example, shapes)
    if before is not None and cut:
        # Least squares on the unpruned layers' inputs: back to the unpruned model, measure, cut again.
        before.restore()
        remove: set[int] = set().union(*(u.roots for u in cut))
        refits = _refits(graph, remove, [h for u in cut for h in u.heads])
        grams = (
            _input_grams(
                model,
                refits,
                list(dataset.take(config.importance_batches)),
                with_labels=_labeled(config),
            )
            if refits
            else {}
        )
        _apply(graph, cut)
        _apply_refits(refits, grams)
        if refits:
            log.info("structured: refit %d layers that read removed channels (least squares)", len(grams))
    _report(summary, units, cut)
    params_after = sum(p.numel() for p in model.parameters())
    log.info(
        "structured: %d cuts; parameters %d -> %d (%.2fx)",
        len(cut),
        params_before,
        params_after,
        params_after / max(params_before, 1),
    )
    return bool(cut)


def prune_gradually(
    model: nn.Module,
    config: StructuredPruningConfig,
    data: Dataset | Any = None,
    *,
    train: Callable[[nn.Module, int], None] | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    floor: float | None = None,
    ratios: Sequence[float] | None = None,
) -> nn.Module:
    """Prune to `config.ratio` in `config.schedule_steps` rounds (cubic AGP schedule), recovering after each
    round and watching quality; `ratios` (increasing, each a share of the original channels) replaces the
    schedule with those rounds (`optimize.progressive` steps through them).

    `train(model, round)` is your own training loop, called after each round instead of the built-in
    `recover`; `evaluate(model)` returns a score where higher is better (accuracy, -perplexity), logged
    after each round. With `floor`, pruning stops at the last round whose score is at least `floor`, and
    that model is returned (the original one, unpruned, with a warning, if even the first round misses it).

    >>> small = prune_gradually(model, StructuredPruningConfig(ratio=0.5, schedule_steps=4), batches,
    ...                         train=my_epoch, evaluate=my_accuracy, floor=0.98)  # doctest: +SKIP
    """
    dataset = as_dataset(data)
    first = next(iter(dataset.take(1)), None) if dataset is not None else None
    if first is None or dataset is None:
        raise DataError(
            "structured: tracing the model's channels needs one batch of example inputs: pass `data=` to "
            "compress, or --data file.py:fn on the command line."
        )
    if floor is not None and evaluate is None:
        raise RecipeError("structured: a quality floor needs `evaluate`, the function that scores the model.")
    if _labeled(config):  # the items are (inputs, labels)
        first = labeled(first, "the first data item", owner="structured", **RECOVER_LABELS)[0]
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(f"structured: targets {missing} match no module of the model.")
    unmatched_ignore = unmatched_patterns(model, config.ignore)
    if unmatched_ignore:
        raise RecipeError(f"structured: ignore {unmatched_ignore} match no module of the model.")
    example = as_inputs(first, where="calibration item")
    if conv1d_as_linear(model):  # GPT-2's Conv1D: its rows are the Linear's (compress has done this already)
        log.info("structured: GPT-2 Conv1D layers taken as the Linear layers they are")
    recovery = config.recover
    teacher = (
        copy.deepcopy(model).eval().requires_grad_(False)
        if recovery is not None and recovery.needs_teacher and train is None
        else None
    )
    last_good = copy.deepcopy(model) if floor is not None else None
    original = _Original()
    changed = False
    schedule = (
        list(ratios)
        if ratios is not None
        else [
            agp_ratio(config.ratio, step, config.schedule_steps)
            for step in range(1, config.schedule_steps + 1)
        ]
    )
    steps = len(schedule)
    for step in range(1, steps + 1):
        ratio = schedule[step - 1]
        if steps > 1:
            log.info("structured: round %d/%d, ratio %.3f of the original channels", step, steps, ratio)
        changed = (
            _prune_once(model, dataclasses.replace(config, ratio=ratio), dataset, example, original)
            or changed
        )
        if train is not None:
            model.eval()
            train(model, step)
            model.eval()
        elif recovery is not None and changed:
            tag = "structured-recover" if steps == 1 else f"structured-recover-round{step}"
            distill_train(model, teacher, dataset, recovery, owner="structured", tag=tag)
        if evaluate is None:
            continue
        with torch.no_grad():
            value = float(evaluate(model))
        log.info("structured: round %d/%d (ratio %.3f): score %.6g", step, steps, ratio, value)
        if floor is None:
            continue
        if value < floor:
            log.warning(
                "structured: round %d (ratio %.3f) scores %.6g, below the floor %.6g; returning %s.",
                step,
                ratio,
                value,
                floor,
                f"round {step - 1} (ratio {schedule[step - 2]:.3f})" if step > 1 else "the unpruned model",
            )
            assert last_good is not None
            return last_good
        last_good = copy.deepcopy(model)
    problems = update_hf_config(model)
    if problems:
        log.warning(
            "structured: the Hugging Face config cannot describe the pruned model (%s); "
            "save it with torch.save or export it, not save_pretrained.",
            "; ".join(problems),
        )
    if not changed:
        log.warning(
            "structured: no channel could be removed; the model is unchanged (see the log lines above)."
        )
    return model


def structured(model: nn.Module, config: StructuredPruningConfig, data: Dataset | Any = None) -> nn.Module:
    """Remove channels as `config` says (in `schedule_steps` rounds), recovering after each round when
    `recover` is set, and return the smaller model (the same object, sliced in place).

    Needs one example batch (`data`) to trace the model, and the training data for `recover`.
    """
    return prune_gradually(model, config, data)


__all__ = [
    "GroupPlan",
    "StructuredPruningConfig",
    "agp_ratio",
    "apply_plan",
    "plan",
    "prune_gradually",
    "structured",
]
