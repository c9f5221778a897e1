"""BatchNorm folding and cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction", ICCV 2019).

Both rewrite weights in place and keep the float function (up to rounding): folding merges an eval-mode
BatchNorm into the Conv/Linear that feeds it and replaces the BatchNorm by `nn.Identity`; equalization
rescales each output channel of a layer by 1/s and the matching input channel of the next layer by s,
through activations with f(x / s) = f(x) / s (ReLU, LeakyReLU, PReLU), so that both layers' per-channel
weight ranges become sqrt(r1 * r2). Per-tensor or per-channel int8 then loses less on the layer whose
channels had very different ranges (depthwise convolutions above all).

The graph comes from `torch.export` on example inputs (shape checks and other Python in `forward` are
fine); only its structure is read, the user's module tree is what is edited. A tensor that feeds anything
else (a residual addition, a second layer) is never rescaled, and a layer whose weight is used twice (tied,
or a module called twice) is left alone.

>>> folded = fold_batchnorm(model, (x,))  # doctest: +SKIP
>>> sweeps = equalize_pairs(model, find_pairs(model, (x,)))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from modelpress.graph.trace import export_program

log = logging.getLogger(__name__)

aten = torch.ops.aten
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# ATen ops of the exported graph; the weight is argument 1 of each.
_LAYER_OPS = {aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_TRANSPOSED_OPS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
_BATCHNORM_OPS = {aten.batch_norm.default}
# Positively homogeneous, per element or per channel: a channel scale s > 0 passes through them.
_HOMOGENEOUS_OPS = {
    aten.relu.default,
    aten.relu_.default,
    aten.leaky_relu.default,
    aten.leaky_relu_.default,
    aten.prelu.default,
    aten.alias.default,
    aten.clone.default,
    aten.contiguous.default,
}


# Channel gains a float rewrite leaves on the layer it rescales, so per-layer error analysis
# (analyse/explain.py) can still compare with the user's layer: where the user's layer maps x to y, the
# rewritten one maps `input_gain * x` to `output_gain * y` (per input / output channel). Plain attributes:
# not in the state dict, not exported.
OUTPUT_GAIN = "_modelpress_output_gain"
INPUT_GAIN = "_modelpress_input_gain"


def note_gain(module: nn.Module, attr: str, gain: torch.Tensor) -> None:
    """Multiply `module`'s recorded channel gain `attr` (OUTPUT_GAIN or INPUT_GAIN) by `gain`."""
    old = getattr(module, attr, None)
    gain = gain.detach().double()
    setattr(module, attr, gain if old is None else old * gain)


@dataclass(frozen=True)
class LayerPair:
    """`producer`'s output channel i is `consumer`'s input channel i, through `through` (activations)."""

    producer: str
    consumer: str
    through: tuple[str, ...] = ()


class LayerGraph:
    """The exported graph's nodes that are layers, BatchNorms or homogeneous activations, by module name."""

    def __init__(self, model: nn.Module, example_inputs: tuple[Any, ...], *, owner: str) -> None:
        program = export_program(model, example_inputs, owner=owner, fix="turn this option off")
        signature = program.graph_signature
        self.owner_of = {
            **{k: v.rpartition(".")[0] for k, v in signature.inputs_to_parameters.items()},
            **{k: v.rpartition(".")[0] for k, v in signature.inputs_to_buffers.items()},
        }
        self.graph: fx.Graph = program.graph_module.graph
        self.modules = dict(model.named_modules())
        self.module_of: dict[fx.Node, str] = {}
        self.kind_of: dict[fx.Node, str] = {}
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _LAYER_OPS | _TRANSPOSED_OPS:
                name = self._owner(node.args[1])
                expected = _LAYERS if node.target in _LAYER_OPS else _TRANSPOSED
                if name is not None and isinstance(self.modules.get(name), expected):
                    self.module_of[node], self.kind_of[node] = name, "layer"
            elif node.target in _BATCHNORM_OPS:
                # batch_norm(input, weight, bias, running_mean, running_var, training, ...)
                name = self._owner(node.args[3])
                if name is not None and not node.args[5] and isinstance(self.modules.get(name), _BATCHNORMS):
                    self.module_of[node], self.kind_of[node] = name, "batchnorm"
            elif node.target in _HOMOGENEOUS_OPS or (
                node.target == aten.dropout.default and not node.args[2]
            ):
                self.kind_of[node] = "homogeneous"
        # A module called twice, or whose parameters another node also reads (tied weights): never rewritten.
        calls = Counter(self.module_of.values())
        self.shared = {n for n, c in calls.items() if c > 1}
        for node, name in self.module_of.items():
            for arg in node.all_input_nodes:
                if arg.op == "placeholder" and arg.name in self.owner_of and len(arg.users) > 1:
                    self.shared.add(name)

    def _owner(self, arg: Any) -> str | None:
        if isinstance(arg, fx.Node) and arg.op == "placeholder":
            return self.owner_of.get(arg.name)
        return None

    def layer(self, node: fx.Node) -> str | None:
        """The module name when `node` is a usable layer call (an fp32 weight, not shared)."""
        name = self.module_of.get(node)
        if name is None or self.kind_of[node] != "layer" or name in self.shared:
            return None
        return name if _weight_layer(self.modules[name]) else None


def _weight_layer(module: nn.Module) -> bool:
    # Already-quantized layers hold no fp32 weight Parameter; leave them alone. Grouped transposed
    # convolutions are not folded (their output channels interleave with the groups in the weight).
    if isinstance(module, _TRANSPOSED) and module.groups != 1:
        return False
    return isinstance(module, _LAYERS + _TRANSPOSED) and isinstance(
        getattr(module, "weight", None), nn.Parameter
    )


def fold_batchnorm(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    ignore: Sequence[str] = (),
    owner: str = "fold_batchnorm",
) -> list[str]:
    """Fold every eval-mode BatchNorm whose only input is a Conv/Linear used nowhere else into that layer.

    The BatchNorm becomes `nn.Identity`; the layer gains a bias if it had none. Returns the folded
    BatchNorm names. Raises `GraphError` if the model cannot be exported.
    """
    # Imported here: modelpress.techniques imports this module (static_int8), so a module-level import of
    # it would make `import modelpress.graph` circular.
    from modelpress.techniques.select import set_submodule

    if not any(isinstance(m, _BATCHNORMS) and not m.training for m in model.modules()):
        return []
    graph = LayerGraph(model, example_inputs, owner=owner)
    folded = []
    for node, bn_name in list(graph.module_of.items()):
        if graph.kind_of[node] != "batchnorm" or bn_name in graph.shared:
            continue
        producer = node.args[0]
        if not isinstance(producer, fx.Node) or len(producer.users) != 1:
            continue
        layer_name = graph.layer(producer)
        if layer_name is None or any(_ignored(n, ignore) for n in (bn_name, layer_name)):
            continue
        bn, layer = graph.modules[bn_name], graph.modules[layer_name]
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        if bn.running_mean is None or bn.running_var is None or bn.num_features != _out_channels(layer):
            continue
        value = producer.meta.get("val")
        if isinstance(layer, nn.Linear) and getattr(value, "ndim", None) != 2:
            continue  # BatchNorm normalizes dim 1; a Linear's features are dim 1 only for (N, C) outputs
        _fold(layer, bn)
        set_submodule(model, bn_name, nn.Identity())
        folded.append(bn_name)
    if folded:
        log.info("%s: folded %d BatchNorm layer(s) into the layer before them", owner, len(folded))
    return folded


def _tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    assert value is None or isinstance(value, torch.Tensor)
    return value


def _weight(module: nn.Module) -> torch.Tensor:
    weight = _tensor(module, "weight")
    assert weight is not None
    return weight


def _out_channels(layer: nn.Module) -> int:
    weight = _weight(layer)
    if isinstance(layer, _TRANSPOSED):  # (in, out / groups, k...)
        return int(weight.shape[1] * layer.groups)
    return int(weight.shape[0])


def _ignored(name: str, ignore: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ignore)


@torch.no_grad()
def _fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    weight = _weight(layer)
    old_bias = _tensor(layer, "bias")
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_var)
    factor = (gamma.double() / torch.sqrt(bn.running_var.double() + bn.eps)).to(weight.dtype)
    bias = old_bias.detach() if old_bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + beta
    shape = [1] * weight.dim()
    shape[1 if isinstance(layer, _TRANSPOSED) else 0] = -1
    weight.mul_(factor.reshape(shape))
    if old_bias is None:
        layer.bias = nn.Parameter(new_bias.to(weight.dtype))
    else:
        old_bias.copy_(new_bias)


def find_pairs(
    model: nn.Module, example_inputs: tuple[Any, ...], *, ignore: Sequence[str] = (), owner: str = "equalize"
) -> list[LayerPair]:
    """Conv->Conv and Linear->Linear pairs joined only through homogeneous activations, whose channels
    can be rescaled against each other. Raises `GraphError` if the model cannot be exported."""
    graph = LayerGraph(model, example_inputs, owner=owner)
    pairs = []
    for node in graph.graph.nodes:
        producer = graph.layer(node)
        if producer is None:
            continue
        through: list[str] = []
        current = node
        while len(current.users) == 1:
            (user,) = current.users
            if user.args[:1] != (current,):
                break
            if graph.kind_of.get(user) == "homogeneous":
                through.append(user.name)
                current = user
                continue
            consumer = graph.layer(user)
            if (
                consumer is not None
                and _compatible(graph.modules[producer], graph.modules[consumer])
                and not any(_ignored(n, ignore) for n in (producer, consumer))
            ):
                pairs.append(LayerPair(producer, consumer, tuple(through)))
            break
    return pairs


def _compatible(producer: nn.Module, consumer: nn.Module) -> bool:
    if not (isinstance(producer, _LAYERS) and isinstance(consumer, _LAYERS)):
        return False
    if isinstance(producer, nn.Linear) != isinstance(consumer, nn.Linear):
        return False
    if not isinstance(producer, nn.Linear) and type(producer) is not type(consumer):
        return False
    out = _weight(producer).shape[0]
    return out == (consumer.in_features if isinstance(consumer, nn.Linear) else consumer.in_channels)


def _producer_range(layer: nn.Module) -> torch.Tensor:
    weight = _weight(layer).detach()
    return weight.abs().reshape(weight.shape[0], -1).amax(dim=1)


def _consumer_index(layer: nn.Module) -> tuple[torch.Tensor, int]:
    """For each weight element (out, in/groups), the input channel it reads; and the channel count."""
    weight = _weight(layer)
    groups = int(getattr(layer, "groups", 1))
    out, per_group = int(weight.shape[0]), int(weight.shape[1])
    rows = torch.arange(out) // (out // groups)
    index = rows[:, None] * per_group + torch.arange(per_group)[None, :]
    return index, groups * per_group


def _consumer_range(layer: nn.Module) -> torch.Tensor:
    weight = _weight(layer).detach()
    per_input = weight.abs().reshape(weight.shape[0], weight.shape[1], -1).amax(dim=2)
    index, channels = _consumer_index(layer)
    out = torch.zeros(channels, dtype=weight.dtype)
    return out.scatter_reduce(0, index.reshape(-1), per_input.reshape(-1), reduce="amax")


@torch.no_grad()
def _rescale(producer: nn.Module, consumer: nn.Module, s: torch.Tensor) -> None:
    """Producer output channel i divided by s_i, consumer input channel i multiplied by it (the
    activations between are homogeneous, per-channel PReLU slopes included)."""
    pw = _weight(producer)
    pw.div_(s.reshape((-1,) + (1,) * (pw.dim() - 1)).to(pw.dtype))
    bias = _tensor(producer, "bias")
    if bias is not None:
        bias.div_(s.to(bias.dtype))
    cw = _weight(consumer)
    index, _ = _consumer_index(consumer)
    factor = s[index].to(cw.dtype)
    cw.mul_(factor.reshape(factor.shape + (1,) * (cw.dim() - 2)))
    note_gain(producer, OUTPUT_GAIN, 1.0 / s)
    note_gain(consumer, INPUT_GAIN, 1.0 / s)


def equalize_pairs(
    model: nn.Module, pairs: Sequence[LayerPair], *, iterations: int = 20, tolerance: float = 1e-4
) -> int:
    """Rescale each pair until every channel's two ranges agree; returns the sweeps done.

    Chains (conv1 -> conv2 -> conv3) are swept repeatedly: equalizing (conv2, conv3) changes conv2's
    output ranges, which (conv1, conv2) then re-balances.
    """
    modules = dict(model.named_modules())
    for sweep in range(1, iterations + 1):
        worst = 0.0
        for pair in pairs:
            producer, consumer = modules[pair.producer], modules[pair.consumer]
            r1, r2 = _producer_range(producer).double(), _consumer_range(consumer).double()
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
            s = s.clamp(1e-4, 1e4)
            worst = max(worst, float(s.log().abs().max()) if s.numel() else 0.0)
            _rescale(producer, consumer, s.float())
        if worst < tolerance:
            return sweep
    return iterations


__all__ = ["LayerGraph", "LayerPair", "equalize_pairs", "find_pairs", "fold_batchnorm"]
