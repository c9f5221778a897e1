"""Which layer hurts: per-layer quantization error of a compressed model against the original.

For every quantized layer: SQNR of its weight, SQNR of its output, the calibrated input range and how much
of the input falls outside it (clipping). Both SQNRs are against the layer the user gave, in the user's
model, never against a float copy the compressed model holds or a model a technique rewrote first:

- Each compressed layer is fed the ORIGINAL model's input to that layer (captured on the samples), not the
  input the compressed model gives it. A row is then that layer's own error, not the drift of every layer
  before it, which is what "which layer hurts" asks; the model's end-to-end fidelity to the original is the
  parity check's job.
- Its output is compared with the original layer's output. Where static_int8 folded a BatchNorm into the
  layer (the BatchNorm became `nn.Identity`), the reference is the original conv followed by its
  BatchNorm, and the weight reference is that pair folded in fp32.
- Float rewrites that rescale channels (SmoothQuant's per-input factors, its attention factors folded into
  V and the output projection, cross-layer equalization) are undone: the input is scaled into the
  compressed layer's coordinates, its output and weight scaled back (the gains are recorded on the layer,
  see `graph.equalize.note_gain`), so the unsmoothed, unequalized Linear is the reference.

Layers whose weight changed shape (structured pruning) are left out: the original layer has no
counterpart to compare them with channel by channel.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.graph.equalize import INPUT_GAIN, OUTPUT_GAIN, _fold
from modelpress.loading import Inputs
from modelpress.ops.quant import sqnr_db
from modelpress.techniques.quantized import output_axis
from modelpress.techniques.select import is_conv1d

log = logging.getLogger(__name__)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class LayerError:
    name: str
    scheme: str
    weight_sqnr_db: float
    output_sqnr_db: float
    input_range: tuple[float, float] | None  # calibrated activation range, static schemes only
    clipped_fraction: float | None  # share of input values outside that range

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Call:
    """One call of an original layer: its input, and the reference output (after any folded BatchNorm)."""

    x: torch.Tensor
    y: torch.Tensor
    folded: list[str] = field(default_factory=list)  # BatchNorms of the original folded into the layer


def _capture(
    original: nn.Module, names: list[str], folded: set[str], samples: list[Inputs]
) -> dict[str, list[_Call]]:
    """Run the original model on `samples`, keeping each named layer's input and output, where a folded
    BatchNorm reads that output, its output instead. Tensors are cloned: later in-place ops (ReLU(inplace),
    `x += skip`) must not change what was captured."""
    modules = dict(original.named_modules())
    captured: dict[str, list[_Call]] = {name: [] for name in names}
    # id of a tensor some layer produced (kept alive in `alive`, so ids are not reused) -> its call
    produced: dict[int, _Call] = {}
    alive: list[torch.Tensor] = []

    def layer_hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            call = _Call(args[0].detach().clone(), out.detach().clone())
            captured[name].append(call)
            produced[id(out)] = call
            alive.append(out)

    def folded_hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str) -> None:
        call = produced.get(id(args[0])) if args else None
        if call is not None and isinstance(out, torch.Tensor):
            call.y = out.detach().clone()
            call.folded.append(name)
            produced[id(out)] = call
            alive.append(out)

    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: layer_hook(m, a, o, n)) for n in names]
    handles += [
        modules[n].register_forward_hook(lambda m, a, o, n=n: folded_hook(m, a, o, n)) for n in folded
    ]
    try:
        with torch.no_grad():
            for sample in samples:
                original(*sample)
                produced.clear()
                alive.clear()
    finally:
        for h in handles:
            h.remove()
    return captured


def explain_quantization(
    original: nn.Module, compressed: nn.Module, samples: list[Inputs]
) -> list[LayerError]:
    """Per-layer errors of every quantized layer of `compressed` against the same layer of `original`
    (worst output SQNR first); see the module doc for what each row compares.

    >>> rows = explain_quantization(model, mp.compress(model, "int8-weight-only"), [example])  # doctest: +SKIP
    """
    quantized = {
        name: m
        for name, m in compressed.named_modules()
        if hasattr(m, "dequantized_weight") and hasattr(m, "inner")
    }
    originals = dict(original.named_modules())
    now = dict(compressed.named_modules())
    folded = {
        name
        for name, m in originals.items()
        if isinstance(m, _BATCHNORMS) and isinstance(now.get(name), nn.Identity)
    }
    names = [n for n in quantized if isinstance(getattr(originals.get(n), "weight", None), torch.Tensor)]
    captured = _capture(original, names, folded, samples)
    rows = []
    with torch.no_grad():
        for name, calls in captured.items():
            layer, user = quantized[name], originals[name]
            if not calls:
                continue
            weight = _user_weight(user, [originals[b] for b in calls[0].folded])
            inner = getattr(layer, "inner", layer)
            out_gain, in_gain = getattr(inner, OUTPUT_GAIN, None), getattr(inner, INPUT_GAIN, None)
            effective = _user_coordinates(_effective_weight(layer), inner, out_gain, in_gain)
            if effective.shape != weight.shape:
                log.info(
                    "explain: layer '%s' changed shape %s -> %s (pruned); its error is not compared",
                    name,
                    tuple(weight.shape),
                    tuple(effective.shape),
                )
                continue
            refs, outs, xs = [], [], []
            for call in calls:
                x = _scaled(call.x, inner, in_gain)  # the input in the layer's coordinates
                y = layer(x)
                if out_gain is not None:
                    y = _scaled(y, inner, 1.0 / out_gain)
                refs.append(call.y.reshape(-1))
                outs.append(y.reshape(-1))
                xs.append(_smoothed(layer, x).reshape(-1))
            input_range = None
            clipped = None
            if getattr(layer, "input_scale", None) is not None:
                scale, zp = float(layer.input_scale), int(layer.input_zero_point)
                qmin, qmax = layer.input_code_range
                lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
                input_range = (lo, hi)
                inputs = torch.cat(xs)
                clipped = float(((inputs < lo) | (inputs > hi)).float().mean())
            rows.append(
                LayerError(
                    name,
                    str(layer.scheme),
                    sqnr_db(weight, effective),
                    sqnr_db(torch.cat(refs), torch.cat(outs)),
                    input_range,
                    clipped,
                )
            )
    return sorted(rows, key=lambda r: r.output_sqnr_db)


def _user_weight(user: nn.Module, batchnorms: list[nn.Module]) -> torch.Tensor:
    """The user's layer weight as an (out, in, ...) weight, with the BatchNorms that follow it (and were
    folded) folded in fp32."""
    layer = copy.deepcopy(user) if batchnorms else user
    for bn in batchnorms:
        assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
        _fold(layer, bn)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    # GPT-2's Conv1D stores (in, out); the compressed model holds it as the nn.Linear it is, (out, in)
    return weight.detach().t() if is_conv1d(user) else weight.detach()


def _channel_dim(inner: nn.Module, ndim: int) -> int:
    """The activation dim holding channels: 1 for convolutions, the last for Linear / Embedding."""
    conv = isinstance(inner, nn.modules.conv._ConvNd)
    return 1 if conv and ndim > 1 else ndim - 1


def _scaled(t: torch.Tensor, inner: nn.Module, gain: torch.Tensor | None) -> torch.Tensor:
    """`t` times a per-channel `gain` along its channel dim."""
    if gain is None:
        return t
    dim = _channel_dim(inner, t.dim())
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * gain.reshape(shape).to(t.dtype)


def _user_coordinates(
    weight: torch.Tensor, inner: nn.Module, out_gain: torch.Tensor | None, in_gain: torch.Tensor | None
) -> torch.Tensor:
    """A rescaled layer's weight W' = diag(out_gain) W diag(1 / in_gain) mapped back to the user's W."""
    if out_gain is None and in_gain is None:
        return weight
    w = weight.double()
    if out_gain is not None:
        axis = output_axis(inner)
        shape = [1] * w.dim()
        shape[axis] = -1
        w = w / out_gain.reshape(shape)
    if in_gain is not None:
        if isinstance(inner, nn.modules.conv._ConvTransposeNd):
            per_element = in_gain  # (in, out / groups, *k): input channels are dim 0
            shape = [-1] + [1] * (w.dim() - 1)
        else:
            # (out, in / groups, *k): the input channel element (o, j) reads is its group's j-th
            groups = int(getattr(inner, "groups", 1))
            out, per_group = w.shape[0], w.shape[1]
            index = (torch.arange(out) // (out // groups))[:, None] * per_group + torch.arange(per_group)
            per_element = in_gain[index]
            shape = list(per_element.shape) + [1] * (w.dim() - 2)
        w = w * per_element.reshape(shape)
    return w.to(weight.dtype)


def _effective_weight(layer: Any) -> torch.Tensor:
    # Undo SmoothQuant's column scaling (the layer multiplies its input back) so the weight compares with
    # the original's.
    w = layer.dequantized_weight()
    multiplier = getattr(layer, "input_multiplier", None)
    return w * multiplier[None, :] if multiplier is not None else w


def _smoothed(layer: Any, x: torch.Tensor) -> torch.Tensor:
    multiplier = getattr(layer, "input_multiplier", None)
    return x * multiplier if multiplier is not None else x
