"""Pruning units the channel graph cannot see: attention heads, and the neurons of MoE experts.

The channel graph freezes the query/key/value projections (their outputs are reshaped into heads); this
module removes whole heads instead. Layouts are recognised by their attributes:

- LLaMA-style (`q_proj`, `k_proj`, `v_proj`, `o_proj` (or `out_proj`), `head_dim`, `num_key_value_groups`),
  with grouped-query attention: the unit is one key/value head together with the query heads that share
  it, so the grouping ratio is unchanged;
- BERT-style (`self.query`/`self.key`/`self.value` with `attention_head_size`, and `output.dense`);
- fused projections (`fused=True`): GPT-2's `c_attn` = q|k|v split at `split_size`, and Phi-3's
  `qkv_proj` = q|k|v with grouped-query attention, sliced at offsets read from `config.num_attention_heads`
  and `num_key_value_heads`. A head is then coupled rows of one Linear: its rows in the q, k and v parts.

The Hugging Face forwards reshape with `-1` heads; the attributes they do read (GPT-2's `split_size` and
`num_heads`, Whisper's `num_heads`, Phi-3's config) are updated with the weights. Per-head parameters
(Swin's relative position bias table) are sliced too; an attention module holding another parameter
with a dim of one entry per head keeps its heads.

MoE experts stored as 3D parameters (`gate_up_proj` (E, 2I, H) whose first half is the gate, and
`down_proj` (E, H, I), Mixtral and its kin) lose FFN neurons: each expert its own least important ones,
the same count in every expert so the tensors stay rectangular.

`update_hf_config` then writes the new sizes into the model's config when every layer has the same ones,
and checks, by building the model from the config on the meta device, that `from_pretrained` would
rebuild the pruned shapes; when it would not, the caller is told what differs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

# Per-head parameters this module knows how to slice: name suffix -> the dim with one entry per head.
_PER_HEAD = {"relative_position_bias_table": -1}


@dataclass
class Attention:
    """One attention module's projections and head layout. In a fused layout q, k and v are one Linear and
    `offsets` say where each part's rows start."""

    name: str
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int
    groups: int  # query heads per key/value head
    style: str  # "llama", "bert", "gpt2" (fused c_attn) or "phi3" (fused qkv_proj)
    kv_heads: int
    offsets: tuple[int, int, int] = (0, 0, 0)  # first row of q, k, v in their Linear
    per_head: list[str] = field(default_factory=list)  # parameters with one entry per query head
    refused: str | None = None  # why its heads cannot be removed, or None

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.groups


def _linears(*layers: Any) -> bool:
    return all(isinstance(t, nn.Linear) for t in layers)


def _int(module: Any, name: str) -> int | None:
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _separate(name: str, m: nn.Module, *, fused: bool) -> Attention | None:
    q, k, v = (getattr(m, a, None) for a in ("q_proj", "k_proj", "v_proj"))
    o = getattr(m, "o_proj", None)
    if o is None and fused:
        o = getattr(m, "out_proj", None)  # Whisper, wav2vec2, BART
    head_dim = _int(m, "head_dim")
    if not _linears(q, k, v, o) or head_dim is None or head_dim < 1:
        return None
    assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear)
    assert isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
    groups = _int(m, "num_key_value_groups") or 1
    kv = k.out_features // head_dim
    if (
        k.out_features % head_dim
        or v.out_features != k.out_features
        or q.out_features != kv * groups * head_dim
    ):
        return None
    return Attention(name, m, q, k, v, o, head_dim, groups, "llama", kv)


def _bert(name: str, m: nn.Module) -> Attention | None:
    inner, output = getattr(m, "self", None), getattr(m, "output", None)
    dense = getattr(output, "dense", None)
    if inner is None or not isinstance(dense, nn.Linear):
        return None
    q, k, v = (getattr(inner, a, None) for a in ("query", "key", "value"))
    size = _int(inner, "attention_head_size")
    if not _linears(q, k, v) or size is None or size < 1:
        return None
    assert isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
    if q.out_features % size or k.out_features != q.out_features or v.out_features != q.out_features:
        return None
    return Attention(name, m, q, k, v, dense, size, 1, "bert", q.out_features // size)


def _gpt2(name: str, m: nn.Module) -> Attention | None:
    c_attn, c_proj = getattr(m, "c_attn", None), getattr(m, "c_proj", None)
    heads, d, split = _int(m, "num_heads"), _int(m, "head_dim"), _int(m, "split_size")
    if not _linears(c_attn, c_proj) or heads is None or d is None or split is None or hasattr(m, "q_attn"):
        return None  # cross-attention (q_attn) reads q elsewhere
    assert isinstance(c_attn, nn.Linear) and isinstance(c_proj, nn.Linear)
    if split != heads * d or c_attn.out_features != 3 * split or c_proj.in_features != split:
        return None
    return Attention(name, m, c_attn, c_attn, c_attn, c_proj, d, 1, "gpt2", heads, (0, split, 2 * split))


def _phi3(name: str, m: nn.Module) -> Attention | None:
    qkv, o = getattr(m, "qkv_proj", None), getattr(m, "o_proj", None)
    d, kv, groups = _int(m, "head_dim"), _int(m, "num_key_value_heads"), _int(m, "num_key_value_groups")
    heads = _int(getattr(m, "config", None), "num_attention_heads")
    if not _linears(qkv, o) or d is None or kv is None or groups is None or heads is None:
        return None
    assert isinstance(qkv, nn.Linear) and isinstance(o, nn.Linear)
    if heads != kv * groups or qkv.out_features != (heads + 2 * kv) * d or o.in_features != heads * d:
        return None
    q_rows = heads * d
    return Attention(name, m, qkv, qkv, qkv, o, d, groups, "phi3", kv, (0, q_rows, q_rows + kv * d))


def _check_per_head(att: Attention) -> Attention:
    """Find the per-head parameters of `att` outside its projections; refuse one it cannot slice."""
    projections = {id(t) for t in (att.q, att.k, att.v, att.o)}
    skip = {prefix for prefix, sub in att.module.named_modules() if id(sub) in projections and prefix}
    n = att.q_heads
    # Parameters and saved buffers; a non-persistent buffer (rotary inv_freq) is recomputed from the config.
    saved = [
        (f"{prefix}.{b}" if prefix else b, tensor)
        for prefix, sub in att.module.named_modules()
        for b, tensor in sub.named_buffers(recurse=False)
        if b not in sub._non_persistent_buffers_set
    ]
    for pname, tensor in [*att.module.named_parameters(), *saved]:
        if any(pname.startswith(prefix + ".") for prefix in skip):
            continue
        dim = next((d for suffix, d in _PER_HEAD.items() if pname.endswith(suffix)), None)
        if dim is not None and tensor.shape[dim] == n:
            att.per_head.append(pname)
        elif n > 1 and n in tuple(tensor.shape):
            att.refused = (
                f"'{att.name}.{pname}' {tuple(tensor.shape)} may hold one entry per head, and modelpress "
                "does not know how to slice it"
            )
    return att


def find_attention(model: nn.Module, *, fused: bool = False) -> Iterator[Attention]:
    """The attention modules with separate q/k/v projections (and, with `fused`, those with fused ones and
    `out_proj` output projections: the layouts structured pruning knows how to cut)."""
    for name, m in model.named_modules():
        found = _separate(name, m, fused=fused) or _bert(name, m)
        if found is None and fused:
            found = _gpt2(name, m) or _phi3(name, m)
        if found is not None:
            yield _check_per_head(found) if fused else found


def head_importance(att: Attention, score: Callable[[nn.Linear], torch.Tensor]) -> torch.Tensor:
    """One score per key/value head: `score(layer)` (one value per weight element) summed over every weight
    that head removes (its query/key/value rows and its output-projection columns)."""
    d, g, kv = att.head_dim, att.groups, att.kv_heads

    def rows(layer: nn.Linear, start: int, per: int) -> torch.Tensor:
        w = score(layer)[start : start + kv * per * d]
        return w.reshape(kv, per * d, w.shape[1]).sum(dim=(1, 2))

    q0, k0, v0 = att.offsets
    cols = score(att.o)
    o = cols.reshape(cols.shape[0], kv, g * d).sum(dim=(0, 2))
    return rows(att.q, q0, g) + rows(att.k, k0, 1) + rows(att.v, v0, 1) + o


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        setattr(module, name, value.clone())


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor)
    return value.detach()


def _set_int(obj: Any, name: str, old: int, new: int) -> None:
    if _int(obj, name) == old:
        setattr(obj, name, new)


def head_rows(att: Attention, keep: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
    """The output rows of the q/k/v Linear(s) that keeping the key/value heads `keep` keeps (one mask per
    Linear: a fused one gets its q, k and v parts in one)."""
    d, g = att.head_dim, att.groups
    kv_rows = keep.repeat_interleave(d)
    q_rows = keep.repeat_interleave(g * d)
    masks: dict[int, tuple[nn.Linear, torch.Tensor]] = {}
    parts = (
        (att.q, att.offsets[0], q_rows),
        (att.k, att.offsets[1], kv_rows),
        (att.v, att.offsets[2], kv_rows),
    )
    for layer, start, rows in parts:
        _, mask = masks.setdefault(id(layer), (layer, torch.ones(layer.out_features, dtype=torch.bool)))
        mask[start : start + len(rows)] = rows
    return list(masks.values())


@torch.no_grad()
def prune_heads(att: Attention, keep: torch.Tensor) -> None:
    """Keep the key/value heads where `keep` is True (with their query heads); slice in place, and update
    the attributes (and, for Phi-3, the config) the forward reads. `att` itself describes the module as it
    was: find it again to see the new layout."""
    d, g = att.head_dim, att.groups
    q_heads, kv_heads = att.q_heads, att.kv_heads
    q_rows = keep.repeat_interleave(g * d)
    masks = head_rows(att, keep)
    for layer, mask in masks:
        _replace(layer, "weight", layer.weight.detach()[mask])
        if layer.bias is not None:
            _replace(layer, "bias", layer.bias.detach()[mask])
        layer.out_features = int(mask.sum())
    _replace(att.o, "weight", att.o.weight.detach()[:, q_rows])
    att.o.in_features = int(q_rows.sum())
    per_query_head = keep.repeat_interleave(g)
    for pname in att.per_head:
        owner_name, _, attr = pname.rpartition(".")
        owner = att.module.get_submodule(owner_name)
        value = getattr(owner, attr).detach()
        dim = _PER_HEAD[next(s for s in _PER_HEAD if pname.endswith(s))] % value.dim()
        _replace(owner, attr, value.index_select(dim, per_query_head.nonzero().flatten()))
    new_kv = int(keep.sum())
    new_q = new_kv * g
    m = att.module
    if att.style == "bert":
        inner = getattr(m, "self")  # noqa: B009  (`self` is the submodule's name)
        assert isinstance(inner, nn.Module)
        setattr(inner, "num_attention_heads", new_q)  # noqa: B010  (plain ints on an nn.Module)
        setattr(inner, "all_head_size", new_q * d)  # noqa: B010
    elif att.style == "gpt2":
        _set_int(m, "num_heads", q_heads, new_q)
        _set_int(m, "split_size", q_heads * d, new_q * d)
    else:
        for name in ("num_heads", "num_attention_heads"):
            _set_int(m, name, q_heads, new_q)
        _set_int(m, "num_key_value_heads", kv_heads, new_kv)
        for owner_name, sub in m.named_modules():  # Swin's relative position bias module
            if owner_name:
                _set_int(sub, "num_heads", q_heads, new_q)
        if att.style == "phi3":  # its forward slices qkv at offsets read from the (shared) config
            config = getattr(m, "config")  # noqa: B009
            config.num_attention_heads = new_q
            config.num_key_value_heads = new_kv


def heads_to_keep(n: int, ratio: float) -> int:
    return min(n, max(1, math.ceil((1 - ratio) * n)))


# -- MoE experts ------------------------------------------------------------------------------------------


@dataclass
class Experts:
    """A block of MoE experts held as 3D parameters: `gate_up_proj` (E, 2I, H), gate first, and `down_proj`
    (E, H, I); `transposed`: (E, H, 2I) and (E, I, H)."""

    name: str
    module: nn.Module
    transposed: bool
    refused: str | None = None  # why its neurons cannot be removed, or None

    @property
    def intermediate(self) -> int:
        down = getattr(self.module, "down_proj")  # noqa: B009
        return int(down.shape[1] if self.transposed else down.shape[2])


def find_experts(model: nn.Module) -> Iterator[Experts]:
    """Every module holding 3D `gate_up_proj` and `down_proj` parameters; `refused` says why one whose
    layout is not the known one is left alone."""
    for name, m in model.named_modules():
        gate_up, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
        if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
            continue
        if gate_up.dim() != 3 or down.dim() != 3:
            continue
        transposed = bool(getattr(m, "is_transposed", False))
        found = Experts(name, m, transposed)
        n, two_i, h = (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1]) if transposed else gate_up.shape
        expected_down = (n, two_i // 2, h) if transposed else (n, h, two_i // 2)
        apply_gate = getattr(getattr(type(m), "_apply_gate", None), "__name__", None)
        if not hasattr(m, "is_concatenated") or apply_gate != "_default_apply_gate":
            found.refused = (
                f"{type(m).__name__} does not say how its gate and up halves are laid out (a transformers "
                "experts class with the default gate)"
            )
        elif not getattr(m, "is_concatenated") or not getattr(m, "has_gate", True):  # noqa: B009
            found.refused = f"{type(m).__name__} interleaves gate and up rows or has no gate"
        elif two_i % 2 or tuple(down.shape) != expected_down:
            found.refused = (
                f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} are not "
                "(E, 2I, H) and (E, H, I)"
            )
        yield found


def expert_importance(ex: Experts, score: Callable[[nn.Module, str], torch.Tensor]) -> torch.Tensor:
    """(E, I): per expert and neuron, `score` summed over its gate and up rows and its down column."""
    i = ex.intermediate
    gate_up = score(ex.module, "gate_up_proj")
    down = score(ex.module, "down_proj")
    rows = gate_up.sum(dim=1) if ex.transposed else gate_up.sum(dim=2)  # (E, 2I)
    cols = down.sum(dim=2) if ex.transposed else down.sum(dim=1)  # (E, I)
    return rows[:, :i] + rows[:, i:] + cols


@torch.no_grad()
def prune_experts(ex: Experts, keep: torch.Tensor) -> None:
    """Keep, in each expert e, the neurons where `keep[e]` is True (the same count in every expert)."""
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise AssertionError(f"'{ex.name}': experts would keep different neuron counts {counts.tolist()}")
    i = ex.intermediate
    index = torch.stack([row.nonzero().flatten() for row in keep])  # (E, k)
    both = torch.cat([index, index + i], dim=1)  # gate rows, then up rows
    m = ex.module
    gate_up, down = _tensor(m, "gate_up_proj"), _tensor(m, "down_proj")
    pick = torch.stack
    if ex.transposed:  # (E, H, 2I), (E, I, H)
        _replace(m, "gate_up_proj", pick([gate_up[e][:, both[e]] for e in range(len(keep))]))
        _replace(m, "down_proj", pick([down[e][index[e]] for e in range(len(keep))]))
    else:  # (E, 2I, H), (E, H, I)
        _replace(m, "gate_up_proj", pick([gate_up[e][both[e]] for e in range(len(keep))]))
        _replace(m, "down_proj", pick([down[e][:, index[e]] for e in range(len(keep))]))
    bias = getattr(m, "gate_up_proj_bias", None)
    if isinstance(bias, torch.Tensor) and bias.dim() == 2:  # (E, 2I)
        _replace(m, "gate_up_proj_bias", pick([bias.detach()[e][both[e]] for e in range(len(keep))]))
    _set_int(m, "intermediate_dim", i, int(counts[0]))
    _set_int(m, "intermediate_size", i, int(counts[0]))


# -- the Hugging Face config ---------------------------------------------------------------------------


_FFN_FIELDS = {  # name suffix of an FFN's first layer -> (config field, outputs per neuron)
    "mlp.gate_proj": ("intermediate_size", 1),
    "mlp.fc1": ("intermediate_size", 1),
    "intermediate.dense": ("intermediate_size", 1),
    "mlp.c_fc": ("n_inner", 1),
    "mlp.gate_up_proj": ("intermediate_size", 2),
}


_HEAD_FIELDS = ("num_attention_heads", "num_key_value_heads", "head_dim")


def _wanted(owner: nn.Module, config: Any) -> tuple[dict[str, int], list[str]]:
    """The config fields the pruned `owner` has uniform new values for, and what is not uniform."""
    problems: list[str] = []
    wanted: dict[str, int] = {}
    attention = list(find_attention(owner, fused=True))
    heads = {(a.q_heads, a.kv_heads, a.head_dim) for a in attention}
    if len(heads) > 1:
        problems.append(f"attention heads differ between layers: {sorted(heads)}")
    elif heads:
        q_heads, kv_heads, head_dim = next(iter(heads))
        n, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
        implied = _int(config, "head_dim") or (hidden // n if n and hidden else None)
        if n is not None and (q_heads, head_dim) != (n, implied):
            wanted.update(num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    for suffix, (name, per) in _FFN_FIELDS.items():
        widths = {
            m.out_features // per
            for n, m in owner.named_modules()
            if isinstance(m, nn.Linear) and n.endswith(suffix)
        }
        if len(widths) > 1:
            problems.append(f"FFN widths differ between layers: {sorted(widths)}")
        elif widths:
            wanted[name] = next(iter(widths))
    experts = {e.intermediate for e in find_experts(owner) if e.refused is None}
    if len(experts) > 1:
        problems.append(f"expert widths differ between layers: {sorted(experts)}")
    elif experts:
        name = "moe_intermediate_size" if _int(config, "moe_intermediate_size") else "intermediate_size"
        wanted[name] = next(iter(experts))
    return wanted, problems


def _mismatch(owner: nn.Module, config: Any) -> str | None:
    """None when `type(owner)(config)` has the pruned model's tensor shapes, else the first difference."""
    try:
        with torch.device("meta"):
            fresh = type(owner)(config)
    except Exception as exc:  # any constructor failure means the config does not describe the model
        return f"{type(owner).__name__}(config) fails: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    ours = {n: tuple(t.shape) for n, t in owner.state_dict().items()}
    for n, t in fresh.state_dict().items():
        if n in ours and tuple(t.shape) != ours[n]:
            return f"'{n}' is {ours[n]} in the pruned model but {tuple(t.shape)} from the config"
    return None


def update_hf_config(model: nn.Module) -> list[str]:
    """Write uniform pruned sizes into each Hugging Face config found in `model`; returns what could not
    be written (per-layer sizes differ, or a model built from the config would not have the pruned
    shapes, so `from_pretrained` could not load it: then head counts are left as they were, FFN widths
    are still written)."""
    problems: list[str] = []
    seen: set[int] = set()
    for owner in model.modules():
        config = getattr(owner, "config", None)
        if config is None or not hasattr(owner, "save_pretrained") or id(config) in seen:
            continue
        seen.add(id(config))
        wanted, found = _wanted(owner, config)
        problems += found
        written: dict[str, tuple[bool, Any]] = {}  # field -> (it existed, its old value)
        for name, value in wanted.items():
            had, old = hasattr(config, name), getattr(config, name, None)
            if old == value or not (old is None or _int(config, name) is not None):
                continue  # unchanged, or not a plain int field (a per-stage list)
            try:
                setattr(config, name, value)
            except Exception as exc:  # strict configs validate on assignment
                problems.append(f"{type(config).__name__}.{name} = {value} is refused: {exc}")
                continue
            written[name] = (had, old)
        mismatch = _mismatch(owner, config)
        if mismatch is not None:
            # Widths are facts of the pruned model; head counts may be read differently (GPT-2 and BERT derive
            # the head size from hidden_size / heads): those go back to what they were.
            for name, (had, old) in written.items():
                if name not in _HEAD_FIELDS:
                    continue
                if had:
                    setattr(config, name, old)
                else:
                    delattr(config, name)
            problems.append(
                f"{type(config).__name__} cannot describe the pruned {type(owner).__name__}: {mismatch}"
            )
    return problems


__all__ = [
    "Attention",
    "Experts",
    "expert_importance",
    "find_attention",
    "find_experts",
    "head_importance",
    "head_rows",
    "heads_to_keep",
    "prune_experts",
    "prune_heads",
    "update_hf_config",
]
