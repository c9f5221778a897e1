"""Which layer hurts: per-layer quantization error of a compressed model against the original.

For every quantized layer: SQNR of its weight, SQNR of its output when fed the original model's input to
that layer (the layer's own error, not accumulated), the calibrated input range and how much of the input
falls outside it (clipping).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from modelpress.loading import Inputs
from modelpress.ops.quant import sqnr_db


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


def explain_quantization(
    original: nn.Module, compressed: nn.Module, samples: list[Inputs]
) -> list[LayerError]:
    """Per-layer errors of every quantized layer of `compressed` (worst output SQNR first).

    >>> rows = explain_quantization(model, mp.compress(model, "int8-weight-only"), [example])  # doctest: +SKIP
    """
    quantized = {
        name: m
        for name, m in compressed.named_modules()
        if hasattr(m, "dequantized_weight") and hasattr(m, "inner")
    }
    originals = dict(original.named_modules())
    captured: dict[str, list[tuple[Any, torch.Tensor]]] = {
        name: [] for name in quantized if name in originals
    }
    handles = []
    for name in captured:

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                captured[name].append((args[0].detach(), out.detach()))

        handles.append(originals[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            for sample in samples:
                original(*sample)
    finally:
        for h in handles:
            h.remove()
    rows = []
    with torch.no_grad():
        for name, pairs in captured.items():
            layer = quantized[name]
            weight = getattr(originals[name], "weight", None)
            if not pairs or not isinstance(weight, torch.Tensor):
                continue
            w_sqnr = sqnr_db(weight.detach(), _effective_weight(layer))
            refs = torch.cat([o.reshape(-1) for _, o in pairs])
            outs = torch.cat([layer(x).reshape(-1) for x, _ in pairs])
            input_range = None
            clipped = None
            if getattr(layer, "input_scale", None) is not None:
                scale, zp = float(layer.input_scale), int(layer.input_zero_point)
                qmin, qmax = layer.input_code_range
                lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
                input_range = (lo, hi)
                xs = torch.cat([_smoothed(layer, x).reshape(-1) for x, _ in pairs])
                clipped = float(((xs < lo) | (xs > hi)).float().mean())
            rows.append(
                LayerError(name, str(layer.scheme), w_sqnr, sqnr_db(refs, outs), input_range, clipped)
            )
    return sorted(rows, key=lambda r: r.output_sqnr_db)


def _effective_weight(layer: Any) -> torch.Tensor:
    # Undo SmoothQuant's column scaling so the weight compares with the original's.
    w = layer.dequantized_weight()
    multiplier = getattr(layer, "input_multiplier", None)
    return w * multiplier[None, :] if multiplier is not None else w


def _smoothed(layer: Any, x: torch.Tensor) -> torch.Tensor:
    multiplier = getattr(layer, "input_multiplier", None)
    return x * multiplier if multiplier is not None else x
