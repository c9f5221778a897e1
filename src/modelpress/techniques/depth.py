"""Depth pruning: whole repeated blocks (transformer layers, residual blocks) removed from a model.

The blocks are the entries of one stack, the `nn.ModuleList` or `nn.Sequential` that holds the most
blocks of one class (LLaMA's `model.layers`, BERT's `encoder.layer`, GPT-2's `transformer.h`, a ResNet
stage), or the one named by `stack`. A block can go only if its output has the shape of its input on the
example data (a strided or widening block cannot). The blocks that change their input least go first:
Block Influence (ShortGPT, Men et al. 2024) is 1 - the mean cosine similarity between a block's input and
output hidden states, per token for sequences and per sample for feature maps.

Hugging Face models keep a consistent config (`num_hidden_layers` / `n_layer`, `layer_types`) and
renumbered attention `layer_idx`, so `save_pretrained`, `from_pretrained` and `generate` with a KV cache
work on the pruned model.

>>> small = compress(model, [DepthPruningConfig(ratio=0.25)], batches)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, GraphError, RecipeError
from modelpress.loading import as_inputs
from modelpress.ops.similarity import block_similarity
from modelpress.techniques.distill import DistillConfig, as_recover, train
from modelpress.techniques.finetune import RECOVER_LABELS, labeled
from modelpress.techniques.select import matches_any, unmatched_patterns

log = logging.getLogger(__name__)

_BATCHES = 4  # calibration batches for the shape check and the influence
_STACKS = (nn.ModuleList, nn.Sequential)


@dataclass(frozen=True)
class DepthPruningConfig:
    """Remove `blocks` (or `ratio` of the) repeated blocks of the model's stack, the least influential first.

    >>> DepthPruningConfig(blocks=2).importance
    'influence'
    """

    type: ClassVar[str] = "depth"
    blocks: int | None = None  # how many blocks to remove; when None, `ratio` of the stack's blocks
    ratio: float = 0.25  # fraction of the stack's blocks removed (rounded down) when `blocks` is None
    # "influence": lowest Block Influence first (needs calibration data); "last": the last removable blocks.
    importance: Literal["influence", "last"] = "influence"
    stack: str | None = None  # module name of the ModuleList/Sequential of blocks (default: found)
    ignore: tuple[str, ...] = ()  # blocks never removed (names, type names, `re:` regexes)
    # Recovery after the cut: distillation from the unpruned model (a DistillConfig; YAML
    # `recover: {loss: kl, steps: 200, lr: 1e-4}`, `loss: task` for cross-entropy on (inputs, labels) items);
    # null skips it.
    recover: DistillConfig | None = None

    def __post_init__(self) -> None:
        if self.blocks is not None and (isinstance(self.blocks, bool) or not isinstance(self.blocks, int)):
            raise RecipeError(f"depth: blocks={self.blocks!r} must be a whole number of blocks, or null.")
        if self.blocks is not None and self.blocks < 0:
            raise RecipeError(
                f"depth: blocks={self.blocks} must be 0 or more (the number of blocks removed)."
            )
        if not 0 <= self.ratio < 1:
            raise RecipeError(
                f"depth: ratio={self.ratio} must be in [0, 1): the fraction of the stack's blocks removed "
                "(at least one block stays). Use blocks: N to name a count."
            )
        if self.importance not in ("influence", "last"):
            raise RecipeError(
                f"depth: importance={self.importance!r} is unknown; choose 'influence' or 'last'."
            )
        if self.stack is not None and not isinstance(self.stack, str):
            raise RecipeError(
                f"depth: stack={self.stack!r} must be a module name such as 'model.layers', or null."
            )
        object.__setattr__(self, "recover", as_recover("depth", self.recover))


@dataclass
class Block:
    """One entry of the stack and what calibration found about it."""

    position: int  # index in the stack
    name: str
    module: nn.Module
    why_kept: str | None = None  # why it cannot be removed; None when it can
    similarity: float = 0.0  # sum of cosine similarities of input and output over `count` vectors
    count: int = 0

    @property
    def influence(self) -> float:
        return 1.0 - self.similarity / self.count if self.count else math.nan


def _composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _entries(stack: nn.Module) -> list[tuple[str, nn.Module]]:
    # Not named_children(): it skips a module that sits at two positions, which still counts twice here.
    return [(key, m) for key, m in stack._modules.items() if m is not None]


def _repeated(stack: nn.Module, *, composite_only: bool) -> tuple[type[nn.Module], int] | None:
    """The most common class among the stack's entries (ties: the first seen) and its count."""
    kinds = Counter(type(m) for _, m in _entries(stack) if not composite_only or _composite(m))
    if not kinds:
        return None
    return kinds.most_common(1)[0]


def find_stack(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The `nn.ModuleList` / `nn.Sequential` named `name`, or else the one holding the most blocks
    (entries with submodules) of one class, at least 2; the first such in module order on a tie.

    >>> blocks = nn.Sequential(*[nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(3)])
    >>> find_stack(nn.Sequential(nn.Linear(2, 2), blocks))[0]
    '1'
    """
    if name is not None:
        try:
            stack = model.get_submodule(name)
        except AttributeError as exc:
            found = [n for n, _ in _candidates(model)]
            raise RecipeError(
                f"depth: stack={name!r} is not a module of the model. Stacks of repeated blocks found: "
                f"{found[:5] or 'none'}."
            ) from exc
        if not isinstance(stack, _STACKS):
            raise RecipeError(
                f"depth: stack={name!r} is a {type(stack).__name__}, not an nn.ModuleList or nn.Sequential; "
                "name the container that holds the blocks, such as 'model.layers' in a LLaMA model."
            )
        return name, stack
    candidates = _candidates(model)
    if not candidates:
        containers = [n or "<model>" for n, m in model.named_modules() if isinstance(m, _STACKS)]
        raise GraphError(
            f"depth: found no stack of repeated blocks in {type(model).__name__}: looked for an nn.ModuleList "
            "or nn.Sequential holding at least 2 blocks (modules with submodules) of one class, such as "
            "LLaMA's model.layers or BERT's encoder.layer. Name the container with `stack:` (containers "
            f"in this model: {containers[:8] or 'none'})."
        )
    return max(candidates, key=lambda c: _count(c[1]))  # max() keeps the first of equals


def _count(stack: nn.Module) -> int:
    found = _repeated(stack, composite_only=True)
    return found[1] if found else 0


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _STACKS) and _count(m) >= 2]


def _blocks(stack_name: str, stack: nn.Module, *, auto: bool) -> list[Block]:
    """The stack's entries of its repeated class (a found stack counts only entries with submodules)."""
    found = _repeated(stack, composite_only=auto)
    if found is None:
        return []
    kind = found[0]
    prefix = f"{stack_name}." if stack_name else ""
    return [
        Block(position=i, name=prefix + key, module=m)
        for i, (key, m) in enumerate(_entries(stack))
        if type(m) is kind
    ]


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a tensor, tuple/list or mapping (Hugging Face layers return tuples or tensors)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@torch.no_grad()
def _calibrate(model: nn.Module, blocks: list[Block], batches: list[tuple[torch.Tensor, ...]]) -> None:
    """Run the batches, checking each block keeps its input's shape and summing its input/output cosine."""
    calls = [0] * len(blocks)

    def hook(index: int) -> Any:
        block = blocks[index]

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            calls[index] += 1
            if block.why_kept is not None:
                return
            hidden = kwargs.get("hidden_states")
            x = hidden if isinstance(hidden, torch.Tensor) else _first_tensor(args)
            x = x if x is not None else _first_tensor(kwargs)
            y = _first_tensor(output)
            if x is None or y is None:
                block.why_kept = "its input or output holds no tensor"
            elif _shape(x) != _shape(y):
                block.why_kept = f"its output {_shape(y)} differs in shape from its input {_shape(x)}"
            elif not x.is_floating_point() or not y.is_floating_point() or x.dim() == 0:
                block.why_kept = "its input and output are not floating-point hidden states"
            else:
                similarity, count = block_similarity(x, y)
                block.similarity += similarity
                block.count += count

        return record

    handles = [b.module.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for inputs in batches:
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for block, n in zip(blocks, calls, strict=True):
        if n == 0 and block.why_kept is None:
            block.why_kept = "it did not run on the example data"


def _hf_configs(model: nn.Module, stack: nn.Module) -> list[Any]:
    """The Hugging Face configs of the models that hold `stack` (one object may serve several modules)."""
    configs: dict[int, Any] = {}
    for owner in model.modules():
        config = getattr(owner, "config", None)
        if config is None or not hasattr(owner, "save_pretrained"):
            continue
        if any(m is stack for m in owner.modules()):
            configs[id(config)] = config
    return list(configs.values())


def _layer_attr(config: Any) -> str | None:
    return next(
        (a for a in ("num_hidden_layers", "n_layer") if isinstance(getattr(config, a, None), int)), None
    )


def _update_configs(configs: list[Any], total: int, kept: list[int]) -> list[str]:
    """Write the new depth into each config and slice its `layer_types`; returns what could not be written."""
    problems: list[str] = []
    for config in configs:
        kind = type(config).__name__
        attr = _layer_attr(config)
        if attr is None:
            problems.append(f"{kind} has no num_hidden_layers or n_layer")
            continue
        if getattr(config, attr) != total:
            problems.append(f"{kind}.{attr}={getattr(config, attr)} does not count the {total} stack entries")
            continue
        setattr(config, attr, len(kept))
        types = getattr(config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == total:
            config.layer_types = [types[i] for i in kept]
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            problems.append(
                f"{kind} scales attention by 1 / layer_idx, which a reload recomputes from new indices"
            )
        to_dict = getattr(config, "to_dict", None)
        raw = to_dict() if callable(to_dict) else {}
        per_layer = sorted(
            k
            for k, v in raw.items()
            if k != "layer_types" and isinstance(v, (list, tuple)) and len(v) == total
        )
        if per_layer:
            problems.append(f"{kind} fields {per_layer} may hold one entry per layer and were not sliced")
    return problems


def _layer_indices(module: nn.Module) -> list[tuple[nn.Module, int]]:
    """(submodule, its int `layer_idx`) for the block and everything in it."""
    found = ((m, getattr(m, "layer_idx", None)) for m in module.modules())
    return [(m, i) for m, i in found if type(i) is int]


def _renumber(blocks: list[Block], removed: list[Block]) -> None:
    """Shift each kept block's `layer_idx` (attention modules: their slot in the KV cache) down by the
    number of removed layers below it, so the indices stay 0..n-1 without gaps."""
    gone = {i for b in removed for _, i in _layer_indices(b.module)}
    for block in blocks:
        for m, i in _layer_indices(block.module):
            setattr(m, "layer_idx", i - sum(1 for g in gone if g < i))  # noqa: B010 (nn.Module typing)


def _drop(stack: nn.Module, positions: set[int]) -> list[int]:
    """Delete the entries at `positions` from the stack in place (numeric keys renumbered, as HF state dicts
    expect); returns the old positions kept."""
    entries = _entries(stack)
    numbered = all(key.isdigit() for key, _ in entries)
    kept = [(i, key, m) for i, (key, m) in enumerate(entries) if i not in positions]
    for key, _ in entries:
        delattr(stack, key)
    for new, (_, key, m) in enumerate(kept):
        stack.add_module(str(new) if numbered else key, m)
    return [i for i, _, _ in kept]


def _count_to_remove(config: DepthPruningConfig, n: int) -> int:
    if config.blocks is not None:
        return config.blocks
    keep = math.ceil(round((1 - config.ratio) * n, 9))  # round: 0.7 * 10 is 7.000000000000001
    return n - keep


def _request(config: DepthPruningConfig) -> str:
    return f"blocks={config.blocks}" if config.blocks is not None else f"ratio={config.ratio}"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def depth(model: nn.Module, config: DepthPruningConfig, data: Dataset | Any = None) -> nn.Module:
    """Remove whole blocks as `config` says, optionally recover by fine-tuning, and return the shallower
    model (the same object, changed in place).

    Needs example batches (`data`): the first few check which blocks keep their input's shape and score
    their influence; recovery trains on all of it.
    """
    if config.blocks == 0 or (config.blocks is None and config.ratio == 0):
        log.info("depth: %s removes no block; the model is unchanged.", _request(config))
        return model
    unmatched_ignore = unmatched_patterns(model, config.ignore)
    if unmatched_ignore:
        raise RecipeError(f"depth: ignore {unmatched_ignore} match no module of the model.")
    stack_name, stack = find_stack(model, config.stack)
    blocks = _blocks(stack_name, stack, auto=config.stack is None)
    label = stack_name or "<model>"
    kind = type(blocks[0].module).__name__ if blocks else "?"
    n = len(blocks)
    want = _count_to_remove(config, n)
    if want == 0:
        log.info(
            "depth: %s of %d %s blocks of '%s' removes none; the model is unchanged.",
            _request(config),
            n,
            kind,
            label,
        )
        return model

    dataset = as_dataset(data)
    items = list(dataset.take(_BATCHES)) if dataset is not None else []
    if not items or dataset is None:
        raise DataError(
            "depth: checking which blocks can be removed needs example inputs: pass `data=` to compress, "
            "or --data file.py:fn on the command line."
        )
    batches = [
        labeled(item, f"data item {i}", owner="depth", **RECOVER_LABELS)[0]
        if config.recover is not None and config.recover.labeled
        else as_inputs(item, where="calibration item")
        for i, item in enumerate(items)
    ]
    with torch.no_grad():
        before = model(*batches[0])
    _calibrate(model, blocks, batches)
    for block in blocks:
        if block.why_kept is None and matches_any(config.ignore, block.name, block.module):
            block.why_kept = "it matches `ignore`"
    for block in blocks:
        if block.why_kept is None:
            log.info("depth: block influence of '%s': %.6f", block.name, block.influence)
        else:
            log.info("depth: '%s' cannot be removed: %s", block.name, block.why_kept)

    removable = [b for b in blocks if b.why_kept is None]
    if want >= n or want > len(removable):
        most = min(len(removable), n - 1)
        reasons = "; ".join(f"'{b.name}': {b.why_kept}" for b in blocks if b.why_kept)
        raise RecipeError(
            f"depth: {_request(config)} asks to remove {want} of the {n} {kind} blocks of '{label}', but "
            f"{len(removable)} of them can be removed and at least one must stay"
            + (f" ({reasons})" if reasons else "")
            + f". Ask for at most blocks: {most}."
        )
    if config.importance == "influence":
        ranked = sorted(removable, key=lambda b: (b.influence, b.position))
    else:
        ranked = sorted(removable, key=lambda b: -b.position)
    removed = sorted(ranked[:want], key=lambda b: b.position)

    configs = _hf_configs(model, stack)
    for hf in configs:
        if getattr(hf, "is_heterogeneous", False):
            raise GraphError(
                f"depth: {type(hf).__name__} sets per-layer options (per_layer_config), which depth pruning "
                "cannot renumber yet; prune a model with a uniform config."
            )
    recovery = config.recover
    teacher = (
        copy.deepcopy(model).eval().requires_grad_(False)
        if recovery is not None and recovery.needs_teacher
        else None
    )
    params_before = _params(model)
    total = len(_entries(stack))
    gone = {b.position for b in removed}
    _renumber([b for b in blocks if b.position not in gone], removed)
    kept = _drop(stack, gone)
    for problem in _update_configs(configs, total, kept):
        log.warning(
            "depth: the Hugging Face config may not describe the pruned model (%s); check it before "
            "save_pretrained, or save with torch.save or export it.",
            problem,
        )
    with torch.no_grad():
        after = model(*batches[0])
    old, new = _first_tensor(before), _first_tensor(after)
    if old is not None and new is not None and old.shape != new.shape:
        raise AssertionError(f"depth: output shape changed {_shape(old)} -> {_shape(new)}")
    params_after = _params(model)
    log.info(
        "depth: removed %d of %d %s blocks of '%s' (%s): %s; parameters %d -> %d (%.2fx)",
        len(removed),
        n,
        kind,
        label,
        "lowest influence" if config.importance == "influence" else "last",
        [b.name for b in removed],
        params_before,
        params_after,
        params_after / max(params_before, 1),
    )
    if recovery is not None:
        train(model, teacher, dataset, recovery, owner="depth", tag="depth-recover")
    return model


__all__ = ["Block", "DepthPruningConfig", "depth", "find_stack"]
