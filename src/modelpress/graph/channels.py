"""Which channels of which layers must be removed together: a channel dependency graph from torch.export.

Every tensor of the exported graph gets, along its channel dimension (dim 1 of a convolution's tensors,
the last dim of a Linear's), an array of channel ids. A Conv/Linear output starts new ids; ops that keep
channels in place (BatchNorm, activations, pooling, dropout) pass them on; an elementwise op between two
tensors (a residual addition, SwiGLU's gate * up) declares their channels the same (union-find); a
concatenation along the channel dim concatenates the arrays; `flatten` into a Linear repeats each id over
the spatial positions; a depthwise convolution keeps its input's ids; `chunk(n)` along channels (a fused
gate|up projection) ties position i of every part together, since the forward splits whatever width it
gets; a parameter applied elementwise along channels (`x * weight + bias`, a layer scale) is sliced with
them. Channels that reach an op not known here, a slice or split with constant bounds, a graph output, a
protected layer, or an elementwise op with a tensor the graph does not follow are frozen: the graph never
cuts through what it does not understand.

A `ChannelGroup` is a set of channel ids that are one channel everywhere: removing it slices the output
rows of every producing layer, the input columns of every consumer, and the BatchNorm entries between.

>>> graph = ChannelGraph(model, (x,))  # doctest: +SKIP
>>> [g.producers for g in graph.groups()][:2]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from modelpress.graph.trace import export_program

log = logging.getLogger(__name__)

aten = torch.ops.aten

# Ops whose output has the input's channels in the same place (first tensor argument).
_PASS_THROUGH = {
    aten.relu.default,
    aten.relu_.default,
    aten.hardtanh.default,
    aten.hardtanh_.default,
    aten.gelu.default,
    aten.silu.default,
    aten.silu_.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.mish.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.max_pool1d.default,
    aten.max_pool2d.default,
    aten.max_pool3d.default,
    aten.avg_pool1d.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default,
    aten.adaptive_avg_pool3d.default,
    aten.adaptive_max_pool2d.default,
    aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec,
    # elementwise functions of one tensor (GPT-2's tanh GELU is written with pow, tanh and scalar mul/add)
    aten.pow.Tensor_Scalar,
    aten.neg.default,
    aten.abs.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.erf.default,
    aten.square.default,
    aten.reciprocal.default,
    aten.softplus.default,
    aten.relu6.default,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.clamp_max.default,
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.rsub.Scalar,
    # dtype and memory-format casts
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.type_as.default,
    aten.detach.default,
}
# Elementwise ops of two tensors (broadcasting): tensors that both carry channels share them.
_ELEMENTWISE = {
    aten.add.Tensor,
    aten.add_.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.mul_.Tensor,
    aten.div.Tensor,
}
_CONV = {
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv_transpose1d.default,
    aten.conv_transpose2d.input,
    aten.conv_transpose3d.input,
}
_RNN = {aten.lstm.input: 4, aten.gru.input: 3}  # gates per hidden unit
# Reshapes: channels survive one that keeps their dim whole.
_RESHAPES = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
}
# Casts: a parameter seen through one is still that parameter.
_CASTS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.detach.default,
}
# Nodes that read nothing of the data (shape checks).
_IGNORED = {aten._assert_tensor_metadata.default}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Channels:
    ids: np.ndarray  # one id per position of the channel dim
    axis: int  # the channel dim of the tensor (non-negative)
    ndim: int

    @property
    def from_end(self) -> int:
        return self.axis - self.ndim  # the same for broadcast partners


@dataclass
class LayerUse:
    """How one module uses channel ids: `out` along its output rows, `inp` along its input columns."""

    name: str
    module: nn.Module
    out: np.ndarray | None = None  # ids of output channels (weight dim 0), or None
    inp: np.ndarray | None = None  # ids of input features (weight dim 1, flattened per group)


@dataclass
class AffineUse:
    """A parameter applied elementwise along channels (`x * weight + bias` of MobileBERT's NoNorm, a layer
    scale): entry `ids[i]` of its dim `dim` goes with channel `ids[i]`, and is sliced with it."""

    qualname: str  # "encoder.layer.0.norm.weight"
    module: str  # the module that holds it
    attr: str  # its attribute name there
    dim: int
    ids: np.ndarray


@dataclass
class _ParamRef:
    """A parameter or buffer, or a view of one: `dims[d]` is the parameter dim that dim d of this tensor
    is, or None for a size-1 dim that a view inserted."""

    qualname: str
    dims: tuple[int | None, ...]


@dataclass
class ChannelGroup:
    """Channel ids that are one channel everywhere; `size` positions per producer row set."""

    root: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    frozen: str | None = None  # why it cannot be removed, or None
    members: list[int] = field(default_factory=list)


def _shape(node: Any) -> tuple[int, ...] | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if isinstance(value, torch.Tensor):
        try:
            return tuple(int(d) for d in value.shape)
        except TypeError:  # symbolic sizes
            return None
    return None


class ChannelGraph:
    """The channel ids of every layer of `model`, traced on `example_inputs` with torch.export."""

    def __init__(self, model: nn.Module, example_inputs: Sequence[Any], *, owner: str = "prune") -> None:
        self.owner = owner
        program = export_program(model, example_inputs, owner=owner, fix="prune a traceable submodule")
        signature = program.graph_signature
        self._params = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
        self.modules = dict(model.named_modules())
        self.uf = _UnionFind()
        self.uses: dict[str, LayerUse] = {}
        self.frozen: dict[int, str] = {}  # id -> reason (first one found)
        self._tuples: dict[fx.Node, list[_Channels | None]] = {}  # multi-output ops (RNNs, chunk)
        self.affine: dict[str, AffineUse] = {}  # parameter name -> its per-channel elementwise use
        self._refs: dict[fx.Node, _ParamRef] = {}  # parameters and views of them
        self._opaque: set[str] = set()  # parameters read by anything but an elementwise op along channels
        self._trace(program.graph_module.graph)

    # -- building -------------------------------------------------------------------------------------

    def _owner_of(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "placeholder" and arg.name in self._params:
            return self._params[arg.name].rpartition(".")[0]
        return None

    def _freeze(self, channels: _Channels | None, reason: str) -> None:
        if channels is None:
            return
        for i in channels.ids.tolist():
            self.frozen.setdefault(int(i), reason)

    def _use(self, name: str, *, out: np.ndarray | None = None, inp: np.ndarray | None = None) -> None:
        if name in self.uses:  # a module called twice: its channels are tied to both call sites
            use = self.uses[name]
            for old, new in ((use.out, out), (use.inp, inp)):
                if old is not None and new is not None and len(old) == len(new):
                    for a, b in zip(old.tolist(), new.tolist(), strict=True):
                        self.uf.union(a, b)
                else:
                    if new is not None:
                        self._freeze(_Channels(new, 0, 1), f"'{name}' is called twice")
            return
        self.uses[name] = LayerUse(name, self.modules[name], out, inp)

    def _trace(self, graph: fx.Graph) -> None:
        chans: dict[fx.Node, _Channels] = {}
        for node in graph.nodes:
            if node.op == "placeholder":
                shape = _shape(node)
                if node.name in self._params and shape is not None:
                    self._refs[node] = _ParamRef(self._params[node.name], tuple(range(len(shape))))
                if node.name not in self._params and shape is not None and len(shape) >= 2:
                    # Model inputs: their channels are fixed by the caller.
                    axis = 1 if len(shape) > 2 else len(shape) - 1
                    chans[node] = _Channels(self.uf.new(shape[axis]), axis, len(shape))
                    self._freeze(chans[node], "a model input")
                continue
            if node.op == "output":
                for arg in _flat_nodes(node.args):
                    self._freeze(chans.get(arg), "a model output")
                continue
            if node.op != "call_function":
                continue
            refs = [a for a in node.all_input_nodes if a in self._refs]
            if refs:
                derived = self._view_of_param(node)
                if derived is not None:
                    self._refs[node] = derived
                    continue
                if node.target not in _ELEMENTWISE:  # a weight, or something the graph does not follow
                    self._opaque.update(self._refs[a].qualname for a in refs)
            out = self._visit(node, chans)
            if out is not None:
                chans[node] = out

    def _visit(self, node: fx.Node, chans: dict[fx.Node, _Channels]) -> _Channels | None:
        target = node.target
        inputs = [a for a in node.all_input_nodes if a in chans]
        shape = _shape(node)
        ndim = len(shape) if shape is not None else None
        if target in _IGNORED:
            return None
        if target == aten.linear.default or target in _CONV:
            return self._layer(node, chans)
        if target in _RNN:
            self._rnn(node, chans)
            return None
        if target is operator.getitem and node.args[0] in self._tuples:
            parts = self._tuples[node.args[0]]  # type: ignore[index]
            index = int(node.args[1])  # type: ignore[arg-type]
            return parts[index] if index < len(parts) else None
        if target == aten.select.int:
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            dim = int(node.args[1])  # type: ignore[arg-type]
            if x is None:
                return None
            dim %= x.ndim
            if dim == x.axis:
                self._freeze(x, f"a select along channels ({node.name})")
                return None
            return _Channels(x.ids, x.axis - (dim < x.axis), x.ndim - 1)
        if target == aten.batch_norm.default:
            name = self._owner_of(node.args[3]) or self._owner_of(node.args[1])
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            if x is None:
                return None
            if name is None or x.axis != 1:
                self._freeze(x, f"an unsupported batch_norm ({node.name})")
            else:
                self._use(name, out=x.ids)
            return _Channels(x.ids, x.axis, x.ndim)
        if target in _PASS_THROUGH:
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            if x is None or ndim != x.ndim:
                self._freeze(x, f"{target} ({node.name}) changes the rank")
                return None
            return _Channels(x.ids, x.axis, x.ndim)
        if target in _ELEMENTWISE:
            return self._elementwise(node, chans)
        if target == aten.chunk.default:
            self._chunk(node, chans)
            return None
        if target == aten.slice.Tensor:
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            dim = int(node.args[1]) if len(node.args) > 1 else 0  # type: ignore[arg-type]
            if x is None or ndim != x.ndim:
                self._freeze(x, f"a slice ({node.name})")
                return None
            if dim % x.ndim == x.axis:  # its bounds are constants of the forward: they would not follow a cut
                self._freeze(x, f"a slice along channels ({node.name})")
                return None
            return _Channels(x.ids, x.axis, x.ndim)
        if target in (aten.transpose.int, aten.permute.default):
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            if x is None:
                return None
            if target == aten.transpose.int:
                d0, d1 = (int(d) % x.ndim for d in node.args[1:3])  # type: ignore[arg-type]
                axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
            else:
                order = [int(d) % x.ndim for d in node.args[1]]  # type: ignore[arg-type, union-attr]
                axis = order.index(x.axis)
            return _Channels(x.ids, axis, x.ndim)
        if target == aten.cat.default:
            tensors = list(node.args[0])  # type: ignore[arg-type]
            dim = int(node.args[1]) if len(node.args) > 1 else 0  # type: ignore[arg-type]
            parts = [chans.get(t) for t in tensors]
            if ndim is not None:
                dim %= ndim
            if ndim is not None and all(p is not None and p.axis == dim and p.ndim == ndim for p in parts):
                return _Channels(np.concatenate([p.ids for p in parts if p is not None]), dim, ndim)
            for p in parts:
                self._freeze(p, f"a concatenation that is not along channels ({node.name})")
            return None
        if target in _RESHAPES:
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            in_shape = _shape(node.args[0])
            if x is None:
                return None
            kept = _kept_axis(in_shape, shape, x.axis)
            if (
                kept is not None and shape is not None
            ):  # the channel dim survives whole: (B, N, C) <-> (B, H, W, C)
                return _Channels(x.ids, kept, len(shape))
            if (
                in_shape is not None
                and shape is not None
                and x.axis == 1
                and len(shape) == 2
                and shape[0] == in_shape[0]
                and shape[1] == math.prod(in_shape[1:])
            ):  # (N, C, H, W) -> (N, C*H*W), as flatten
                return _Channels(np.repeat(x.ids, math.prod(in_shape[2:])), 1, 2)
            self._freeze(x, f"a reshape that moves channels ({node.name})")
            return None
        if target == aten.mean.dim:
            x = chans.get(node.args[0])  # type: ignore[arg-type]
            dims = node.args[1] if len(node.args) > 1 else None
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            in_shape = _shape(node.args[0])
            if x is not None and in_shape is not None and isinstance(dims, (list, tuple)):
                reduced = {int(d) % len(in_shape) for d in dims}
                if x.axis not in reduced:
                    axis = x.axis if keep else x.axis - sum(d < x.axis for d in reduced)
                    return _Channels(x.ids, axis, x.ndim if keep else x.ndim - len(reduced))
            self._freeze(x, f"a reduction over channels ({node.name})")
            return None
        # Anything else: the channels it reads are frozen; its output carries no channels, and an
        # elementwise op that meets it along channels freezes those (see _elementwise).
        for a in inputs:
            self._freeze(chans[a], f"{target} ({node.name}), which the graph does not cut through")
        return None

    def _view_of_param(self, node: fx.Node) -> _ParamRef | None:
        """The parameter view `node` is (a cast, unsqueeze, or a reshape that only adds or drops size-1
        dims), or None."""
        target = node.target
        source = node.args[0] if node.args else None
        ref = self._refs.get(source) if isinstance(source, fx.Node) else None
        if ref is None:
            return None
        if target in _CASTS:
            return ref
        shape, in_shape = _shape(node), _shape(source)
        if shape is None or in_shape is None:
            return None
        if target == aten.unsqueeze.default:
            dim = int(node.args[1]) % len(shape)  # type: ignore[arg-type]
            return _ParamRef(ref.qualname, (*ref.dims[:dim], None, *ref.dims[dim:]))
        if target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            kept = [(n, d) for n, d in zip(in_shape, ref.dims, strict=True) if n != 1]
            if [n for n in shape if n != 1] != [n for n, _ in kept]:
                return None
            sources = iter(d for _, d in kept)
            return _ParamRef(ref.qualname, tuple(None if n == 1 else next(sources) for n in shape))
        return None

    def _elementwise(self, node: fx.Node, chans: dict[fx.Node, _Channels]) -> _Channels | None:
        """Tensors that both carry channels share them; a parameter along the channels (`x * weight`) is
        sliced with them; any other tensor that spans the channel dim freezes them."""
        target, shape = node.target, _shape(node)
        carried = [chans[a] for a in node.all_input_nodes if a in chans]
        others = [a for a in node.all_input_nodes if a not in chans]
        if not carried or shape is None:
            for c in carried:
                self._freeze(c, f"{target} ({node.name})")
            self._opaque.update(self._refs[a].qualname for a in others if a in self._refs)
            return None
        ndim = len(shape)
        first = carried[0]
        for other in carried[1:]:
            if len(other.ids) == len(first.ids) and other.from_end == first.from_end:
                for a, b in zip(first.ids.tolist(), other.ids.tolist(), strict=True):
                    self.uf.union(a, b)
            else:
                self._freeze(first, f"a broadcast {target} ({node.name})")
                self._freeze(other, f"a broadcast {target} ({node.name})")
        if shape[ndim + first.from_end] != len(first.ids):
            self._freeze(first, f"a broadcast {target} ({node.name})")  # (N, 1) * (N, C): C is new
            self._opaque.update(self._refs[a].qualname for a in others if a in self._refs)
            return None
        for arg in others:
            arg_shape = _shape(arg)
            ref = self._refs.get(arg)
            dim = None if arg_shape is None else len(arg_shape) + first.from_end
            size = 1 if dim is None or dim < 0 or arg_shape is None else arg_shape[dim]
            if size == 1:  # broadcast along the channels: nothing to slice
                if ref is not None:
                    self._opaque.add(ref.qualname)
                continue
            source = ref.dims[dim] if ref is not None and dim is not None else None
            if ref is not None and source is not None and size == len(first.ids):
                self._affine(ref.qualname, source, first.ids)
                continue
            if ref is not None:
                self._opaque.add(ref.qualname)
            self._freeze(first, f"{target} ({node.name}) with a tensor the graph does not follow")
        return _Channels(first.ids, ndim + first.from_end, ndim)

    def _affine(self, qualname: str, dim: int, ids: np.ndarray) -> None:
        use = self.affine.get(qualname)
        if use is None:
            module, _, attr = qualname.rpartition(".")
            self.affine[qualname] = AffineUse(qualname, module, attr, dim, ids)
        elif use.dim == dim and len(use.ids) == len(ids):  # one parameter on two tensors: one channel
            for a, b in zip(use.ids.tolist(), ids.tolist(), strict=True):
                self.uf.union(a, b)
        else:
            self._opaque.add(qualname)
            self._freeze(_Channels(ids, 0, 1), f"'{qualname}' is applied along different dims")

    def _chunk(self, node: fx.Node, chans: dict[fx.Node, _Channels]) -> None:
        """`chunk(n)` along channels (SwiGLU's fused gate|up): the forward splits whatever width it gets in
        n equal parts, so position i of every part is removed together (one channel)."""
        x = chans.get(node.args[0])  # type: ignore[arg-type]
        if x is None:
            return
        n = int(node.args[1])  # type: ignore[arg-type]
        dim = int(node.args[2]) % x.ndim if len(node.args) > 2 else 0  # type: ignore[arg-type]
        if dim != x.axis:
            self._tuples[node] = [_Channels(x.ids, x.axis, x.ndim)] * n
            return
        if n < 1 or len(x.ids) % n:
            self._freeze(x, f"a chunk into unequal parts ({node.name})")
            return
        parts = x.ids.reshape(n, -1)
        for part in parts[1:]:
            for a, b in zip(parts[0].tolist(), part.tolist(), strict=True):
                self.uf.union(a, b)
        self._tuples[node] = [_Channels(part, x.axis, x.ndim) for part in parts]

    def _layer(self, node: fx.Node, chans: dict[fx.Node, _Channels]) -> _Channels | None:
        name = self._owner_of(node.args[1])
        x = chans.get(node.args[0])  # type: ignore[arg-type]
        shape = _shape(node)
        module = self.modules.get(name) if name is not None else None
        if name is None or module is None or shape is None:
            self._freeze(x, f"a layer whose weight is not a parameter ({node.name})")
            return None
        if isinstance(module, nn.Linear):
            axis = len(shape) - 1
            if x is not None and x.axis != axis:
                self._freeze(x, f"'{name}' reads a tensor whose channels are not its features")
                x = None
            out = self.uf.new(module.out_features)
            self._use(name, out=out, inp=None if x is None else x.ids)
            return _Channels(out, axis, len(shape))
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # weight (in, out / groups, k...): rows are inputs here; only groups == 1 is cut.
            out = self.uf.new(module.out_channels)
            if module.groups != 1:
                self._freeze(x, f"grouped transposed convolution '{name}'")
                self._freeze(_Channels(out, 1, len(shape)), f"grouped transposed convolution '{name}'")
                x = None
            self._use(name, out=out, inp=None if x is None else x.ids)
            return _Channels(out, 1, len(shape))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            groups = module.groups
            if groups == 1:
                out = self.uf.new(module.out_channels)
                self._use(name, out=out, inp=None if x is None else x.ids)
                return _Channels(out, 1, len(shape))
            if groups == module.in_channels == module.out_channels and x is not None:
                # Depthwise: channel i in, channel i out.
                self._use(name, out=x.ids, inp=None)
                return _Channels(x.ids, 1, len(shape))
            self._freeze(x, f"grouped convolution '{name}'")
            out = self.uf.new(module.out_channels)
            self._freeze(_Channels(out, 1, len(shape)), f"grouped convolution '{name}'")
            self._use(name, out=out, inp=None)
            return _Channels(out, 1, len(shape))
        self._freeze(x, f"'{name}' ({type(module).__name__})")
        return None

    def _rnn(self, node: fx.Node, chans: dict[fx.Node, _Channels]) -> None:
        """LSTM/GRU: its hidden units are channels (of the output, h_n, c_n). Every layer and direction has
        `hidden_size` units, so unit i of all of them is one channel; a bidirectional output (forward |
        backward) carries the ids twice."""
        x = chans.get(node.args[0])  # type: ignore[arg-type]
        params = node.args[2]
        name = self._owner_of(params[0]) if isinstance(params, (list, tuple)) and params else None
        module = self.modules.get(name) if name is not None else None
        value = node.meta.get("val")
        hx = node.args[1]
        for h in _flat_nodes(hx):
            self._freeze(chans.get(h), f"an initial RNN state ({node.name})")
        if name is None or not isinstance(module, (nn.LSTM, nn.GRU)) or bool(getattr(module, "proj_size", 0)):
            self._freeze(x, f"a projected RNN, or one whose weights are not its own ({node.name})")
            return
        if x is not None and x.axis != x.ndim - 1:
            self._freeze(x, f"'{name}' reads a tensor whose channels are not its features")
            x = None
        hidden = self.uf.new(module.hidden_size)
        self._use(name, out=hidden, inp=None if x is None else x.ids)
        shapes = [tuple(int(d) for d in t.shape) for t in value] if isinstance(value, (tuple, list)) else []
        self._tuples[node] = [
            _Channels(np.tile(hidden, shape[-1] // module.hidden_size), len(shape) - 1, len(shape))
            for shape in shapes
        ]

    # -- groups ---------------------------------------------------------------------------------------

    def groups(self, *, protect: Iterable[str] = ()) -> list[ChannelGroup]:
        """The removable (and frozen) channel groups; channels of `protect` layers are frozen."""
        protected = set(protect)
        members: dict[int, list[int]] = defaultdict(list)
        producers: dict[int, set[str]] = defaultdict(set)
        consumers: dict[int, set[str]] = defaultdict(set)
        frozen: dict[int, str] = {}
        for i, reason in self.frozen.items():
            frozen.setdefault(self.uf.find(i), reason)
        for use in self.uses.values():
            for ids, side in ((use.out, producers), (use.inp, consumers)):
                if ids is None:
                    continue
                for i in set(ids.tolist()):
                    root = self.uf.find(int(i))
                    side[root].add(use.name)
                    if use.name in protected:
                        frozen.setdefault(root, f"'{use.name}' is protected (ignore)")
        for affine in self.affine.values():
            held = (
                f"'{affine.qualname}' is also read by an op the graph does not cut through"
                if affine.qualname in self._opaque
                else f"'{affine.module}' is protected (ignore)"
                if affine.module in protected
                else None
            )
            for i in set(affine.ids.tolist()):
                root = self.uf.find(int(i))
                consumers[root].add(affine.qualname)
                if held is not None:
                    frozen.setdefault(root, held)
        for i in range(len(self.uf.parent)):
            members[self.uf.find(i)].append(i)
        out = []
        for root in sorted(set(producers) | set(consumers)):
            why: str | None = frozen.get(root)
            if why is None and not any(
                isinstance(self.modules[p], (nn.Linear, nn.modules.conv._ConvNd, nn.LSTM, nn.GRU))
                for p in producers[root]
            ):
                why = "no layer produces it"
            out.append(
                ChannelGroup(
                    root,
                    tuple(sorted(producers[root])),
                    tuple(sorted(consumers[root])),
                    why,
                    members[root],
                )
            )
        return out


def _kept_axis(before: tuple[int, ...] | None, after: tuple[int, ...] | None, axis: int) -> int | None:
    """Where dim `axis` of a tensor shaped `before` is after a reshape to `after`, when it stays one whole
    dim there (the same size, with as many elements before it), else None."""
    if before is None or after is None:
        return None
    prefix = math.prod(before[:axis])
    for i, size in enumerate(after):
        if size == before[axis] and math.prod(after[:i]) == prefix:
            return i
    return None


def _flat_nodes(args: Any) -> list[fx.Node]:
    out: list[fx.Node] = []

    def collect(n: fx.Node) -> fx.Node:
        out.append(n)
        return n

    fx.node.map_arg(args, collect)
    return out


__all__ = ["AffineUse", "ChannelGraph", "ChannelGroup", "LayerUse"]
