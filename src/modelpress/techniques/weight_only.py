"""Weight-only quantization: int8 or int4 codes and their scales are what is stored.

- int8 per output channel (`group_size: null`): the ONNX export holds int8 initializers (~4x smaller)
  decompressed by `Cast -> Sub -> Mul` (`ops.quant.decompress_per_channel`), which a default ONNX Runtime
  session folds once at load, so the artifact runs at fp32 speed with no session option, and OpenVINO
  keeps as int8 weights (its weight-decompression pattern). Symmetric (zero point 0), or with
  `symmetric: false` each channel's [min, max] mapped onto all 256 codes with an int8 zero point per
  channel (NNCF's INT8_ASYM; SmolLM2 perplexity 20.72 vs 20.80 symmetric). Embeddings gather int8 rows,
  then scale them.
- int4 (or int8) per group of `group_size` input features: int4 Linear layers export as `MatMulNBits`
  (int8 groups decompressed like the per-channel layers: `ops.nbits.decompress_blocks` says why) and
  Embeddings as `GatherBlockQuantized` with packed codes (~7x smaller at int4). Convolutions have no
  block-quantized kernel in the runtimes, so they stay int8 per channel (and the log says so).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.errors import RecipeError
from modelpress.ops.nbits import check_block_size
from modelpress.techniques.quantized import (
    QUANTIZABLE_TYPES,
    GroupQuantizedEmbedding,
    GroupQuantizedLinear,
    QuantizedLayer,
    QuantizedMatrices,
    QuantizedRNN,
    own_matrices,
)
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

# "other": the matrices (>= 2-D parameters) a module of any other type holds itself, such as a mixture of
# experts' stacked expert weights; int8 per row.
LayerKind = Literal["linear", "conv", "embedding", "rnn", "other"]

_KIND_TYPES = QUANTIZABLE_TYPES


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Round-to-nearest weight quantization: int8 per output channel, or int4/int8 per group.

    >>> WeightOnlyConfig(bits=4, group_size=64, ignore=("classifier",))  # doctest: +ELLIPSIS
    WeightOnlyConfig(bits=4, group_size=64, symmetric=True, ...)
    """

    type: ClassVar[str] = "weight_only"
    bits: Literal[4, 8] = 8
    # Input features sharing one scale; None = one scale per output channel (int8 only).
    group_size: int | None = None
    symmetric: bool = True
    # Groups only: shrink each group's range to the least weight error. Off by default: it clips the large
    # weights that matter most (SmolLM2 int4 g128 perplexity 31.8 with it, 29.7 without).
    clip_search: bool = False
    layers: tuple[LayerKind, ...] = ("linear", "conv", "embedding", "rnn", "other")
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise RecipeError(
                f"weight_only: bits={self.bits} is not supported; use 8, or 4 with a group_size."
            )
        if self.bits == 4 and self.group_size is None:
            raise RecipeError(
                "weight_only: bits=4 needs a group_size (32, 64 or 128): one scale per output channel is too "
                "coarse for 16 levels."
            )
        if self.group_size is not None:
            try:
                check_block_size(self.group_size, self.bits)
            except ValueError as exc:
                raise RecipeError(f"weight_only: {exc}") from exc
        bad = [k for k in self.layers if k not in _KIND_TYPES and k != "other"]
        if bad or not self.layers:
            raise RecipeError(
                f"weight_only: layers={list(self.layers)} is invalid; choose from {[*sorted(_KIND_TYPES), 'other']}."
            )


def weight_only(model: nn.Module, config: WeightOnlyConfig, data: Any = None) -> nn.Module:
    """Quantize the weights of the selected layers in place and return the model.

    >>> m = weight_only(nn.Sequential(nn.Linear(8, 4)), WeightOnlyConfig())
    >>> m[0].qweight.dtype
    torch.int8
    """
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(
            f"weight_only: targets {missing} match no module of the model. Check the names "
            "(see `modelpress profile` for the layer list), or use a type name such as 'Linear' or a 're:' regex."
        )
    types = tuple(t for kind in config.layers for t in _KIND_TYPES.get(kind, ()))
    selected = list(select_modules(model, types=types, targets=config.targets, ignore=config.ignore))
    others = (
        [
            (name, m)
            for name, m in select_modules(
                model, types=(nn.Module,), targets=config.targets, ignore=config.ignore
            )
            if own_matrices(m)
        ]
        if "other" in config.layers
        else []
    )
    recurrent = [(name, m) for name, m in selected if isinstance(m, nn.RNNBase)]
    chosen = [(name, m) for name, m in selected if isinstance(getattr(m, "weight", None), nn.Parameter)]
    for name, module in chosen:
        weight = module.weight
        if isinstance(weight, torch.Tensor) and not torch.isfinite(weight).all():
            raise RecipeError(
                f"weight_only: layer '{name}' has NaN or Inf in its weight; fix the checkpoint, or add "
                f"'{name}' to ignore."
            )
    if not chosen and not recurrent and not others:
        log.warning(
            "weight_only: no layer matched (layers=%s, targets=%s, ignore=%s); this step changes nothing.",
            list(config.layers),
            None if config.targets is None else list(config.targets),
            list(config.ignore),
        )
    for name, module in recurrent:
        # The runtimes' LSTM/GRU ops take whole matrices: int8 per row whatever the group size.
        model = _replace(model, name, QuantizedRNN(module, bits=8))
    if recurrent and config.group_size is not None:
        log.info(
            "weight_only: recurrent layers stay int8 per row (no grouped kernel): %s",
            [n for n, _ in recurrent],
        )
    # Tied weights (an LM's embedding and head share one Parameter) are quantized once and the codes
    # shared, so the artifact stores them once, as the fp32 model did.
    first_user: dict[int, QuantizedLayer] = {}
    users = Counter(id(m.weight) for _, m in chosen)
    kept_int8: list[str] = []
    for name, module in chosen:
        weight = module.weight
        source = first_user.get(id(weight))
        grouped = _grouped(name, module, config)
        if grouped is not None:
            if users[id(weight)] > 1:
                log.warning(
                    "weight_only: '%s' shares its weight with another layer; its int4 codes are stored twice.",
                    name,
                )
            model = _replace(model, name, grouped)
            continue
        if config.group_size is not None:
            kept_int8.append(name)
        # `symmetric` names the groups' scheme where there are groups; the int8 layers kept per channel
        # beside them stay symmetric.
        wrapped = QuantizedLayer(module, bits=8, symmetric=config.symmetric or config.group_size is not None)
        if (
            source is not None
            and source.axis == wrapped.axis
            and source.qweight.shape == wrapped.qweight.shape
        ):
            wrapped.qweight, wrapped.scale = source.qweight, source.scale
            wrapped.zero_point = source.zero_point
        else:
            first_user[id(weight)] = wrapped
        model = _replace(model, name, wrapped)
    for name, module in others:
        # Last: wrapping a module does not rename anything below it (it holds no parameterised child).
        model = _replace(model, name, QuantizedMatrices(module, bits=8))
    if kept_int8:
        log.info(
            "weight_only: %d layers have no block-quantized kernel and stay int8 per channel: %s",
            len(kept_int8),
            kept_int8,
        )
    log.info(
        "weight_only: quantized %d layers (int%d, group %s)",
        len(chosen) + len(recurrent) + len(others),
        config.bits,
        config.group_size,
    )
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    set_submodule(model, name, new)
    return model


def _grouped(name: str, module: nn.Module, config: WeightOnlyConfig) -> nn.Module | None:
    """The block-quantized replacement of `module`, or None where only int8 per channel applies."""
    if config.group_size is None:
        return None
    if type(module) is nn.Linear:
        return GroupQuantizedLinear.from_linear(
            module,
            bits=config.bits,
            group_size=config.group_size,
            symmetric=config.symmetric,
            clip_search=config.clip_search,
        )
    if type(module) is nn.Embedding:
        dim = module.weight.shape[1]
        if dim % config.group_size == 0 and module.max_norm is None:
            # Symmetric always: OpenVINO 2026.4 fails to compile GatherBlockQuantized with zero points
            # for a single block per row.
            return GroupQuantizedEmbedding(
                module, bits=config.bits, group_size=config.group_size, clip_search=config.clip_search
            )
        log.warning(
            "weight_only: embedding '%s' (dim %d) cannot be split into groups of %d; it stays int8 per channel.",
            name,
            dim,
            config.group_size,
        )
    return None
