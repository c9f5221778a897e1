"""AWQ weight-only quantization: per-input-channel scales chosen on calibration activations and folded
into the op that produces the layer's input, then a per-group clipping search, then rounding.

Calibration runs block by block (`techniques.blockwise`). Within a block, layers that read the same tensor
(q/k/v, gate/up) share one scale. A scale needs somewhere to go: the op that produces the input must be a
norm (RMSNorm, LayerNorm: its weight and bias are divided) or a Linear (its output rows are divided), and
the fold must leave the block's output unchanged. That is checked numerically on the first calibration
item for each candidate op, so no architecture table is needed: in a Llama block q/k/v fold into
`input_layernorm`, gate/up into `post_attention_layernorm` and down_proj into up_proj; in a BERT layer only
the attention output projection (into value) qualifies. Layers without a foldable producer get the
clipping search only; nothing is added to the exported graph.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.ops.awq import ActivationStats, search_scales
from modelpress.ops.gptq import WeightGrid, gptq_quantize, search_clip
from modelpress.techniques.blockwise import BlockStep, calibrate_blockwise
from modelpress.techniques.gptq import _install, _weight, check_scheme, layer_scheme, select_layers

log = logging.getLogger(__name__)

_FOLD_TOLERANCE = 1e-3  # relative change of the block output that still counts as "unchanged"
_FOLD_CANDIDATES = 4  # nearest producers tried per layer group
_SEED = 0


@dataclass(frozen=True)
class AWQConfig:
    """Activation-aware weight quantization of Linear layers, calibrated on data block by block.

    >>> AWQConfig(bits=4, group_size=128, ignore=("lm_head",))  # doctest: +ELLIPSIS
    AWQConfig(bits=4, group_size=128, symmetric=True, grid=20, clip_search=True, ...)
    """

    type: ClassVar[str] = "awq"
    bits: Literal[4, 8] = 4
    group_size: int | None = 128  # None = one scale per output channel (int8 only)
    symmetric: bool = True
    grid: int = 20  # exponents tried for the scales (and ratios for the clipping search)
    clip_search: bool = True
    # How the scaled weight is rounded: to nearest, or with GPTQ's error compensation on the sampled
    # inputs (AWQ's scales, then GPTQ's rounding).
    rounding: Literal["nearest", "gptq"] = "nearest"
    search_tokens: int = 4096  # input rows (spread over the calibration set) the searches evaluate
    calibration_batches: int = 128
    layers: tuple[Literal["linear"], ...] = ("linear",)
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_scheme("awq", self.bits, self.group_size, self.symmetric)
        if not 1 <= self.grid <= 1000:
            raise RecipeError(f"awq: grid={self.grid} must be between 1 and 1000 (20 is usual).")
        if self.rounding not in ("nearest", "gptq"):
            raise RecipeError(f"awq: rounding={self.rounding!r} is invalid; choose 'nearest' or 'gptq'.")
        if self.search_tokens < 2:
            raise RecipeError(f"awq: search_tokens={self.search_tokens} must be at least 2.")
        if self.calibration_batches < 1:
            raise RecipeError(f"awq: calibration_batches={self.calibration_batches} must be at least 1.")
        if list(self.layers) != ["linear"]:
            raise RecipeError(
                f"awq: layers={list(self.layers)} is invalid; AWQ quantizes Linear layers only (use gptq for "
                "convolutions)."
            )


# ---------------------------------------------------------------------------------------------------------
# Folding a scale into the producer of a layer's input


def _is_norm(module: nn.Module, k: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        "Norm" in type(module).__name__
        and not list(module.children())
        and isinstance(weight, nn.Parameter)
        and weight.shape == (k,)
    )


def _can_produce(module: nn.Module, k: int) -> bool:
    if isinstance(module, nn.Linear):
        return type(module) is nn.Linear and module.out_features == k
    return _is_norm(module, k)


def _divide_output(module: nn.Module, s: torch.Tensor) -> None:
    """Divide a producer's output channels by s (K,), with new Parameters (a tied tensor stays intact)."""
    weight, bias = module.weight, getattr(module, "bias", None)
    assert isinstance(weight, torch.Tensor)
    d = s.to(weight.dtype)
    module.weight = nn.Parameter(
        weight.detach() / (d[:, None] if weight.ndim == 2 else d), requires_grad=False
    )
    if isinstance(bias, torch.Tensor):
        module.bias = nn.Parameter(bias.detach() / d, requires_grad=False)


def _multiply_input(module: nn.Module, s: torch.Tensor) -> None:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    module.weight = nn.Parameter(weight.detach() * s.to(weight.dtype)[None, :], requires_grad=False)


def _snapshot(modules: list[nn.Module]) -> list[tuple[nn.Module, Any, Any]]:
    return [(m, m.weight, getattr(m, "bias", None)) for m in modules]


def _restore(saved: list[tuple[nn.Module, Any, Any]]) -> None:
    for module, weight, bias in saved:
        module.weight = weight
        if bias is not None:
            module.bias = bias


def _submodule(step: BlockStep, name: str) -> nn.Module:
    """A module of the step's block by its name in the model."""
    return step.module.get_submodule(name[len(step.name) + 1 :] if step.name else name)


def _first_inputs(step: BlockStep) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The block output and each selected layer's first input, for the step's first item."""
    inputs: dict[str, torch.Tensor] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        inputs.setdefault(name, x.detach().float())

    out = step.forward_first(observe)
    return out.detach().float(), inputs


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def _find_producer(
    step: BlockStep,
    group: list[str],
    order: list[str],
    reference: tuple[torch.Tensor, dict[str, torch.Tensor]],
) -> str | None:
    """The nearest op before `group` whose output channels can absorb a scale. With its output divided by
    a random r (K,) and the group's input columns multiplied by r, the group's input must become x / r and
    the block output must not change (no other reader of that output, such as a residual, is affected)."""
    k = _weight(step.layers[group[0]]).shape[1]
    ref_out, ref_inputs = reference
    first = min(order.index(n) for n in group)
    tried: set[str] = set()
    gen = torch.Generator().manual_seed(_SEED)
    for name in reversed(order[:first]):
        if name in tried or name in group:
            continue
        module = _submodule(step, name)
        if not _can_produce(module, k):
            continue
        tried.add(name)
        r = torch.empty(k).uniform_(0.5, 2.0, generator=gen).to(ref_out.device)
        layers = [step.layers[n] for n in group]
        saved = _snapshot([module, *layers])
        try:
            _divide_output(module, r)
            for layer in layers:
                _multiply_input(layer, r)
            out, inputs = _first_inputs(step)
        finally:
            _restore(saved)
        x_ref = ref_inputs[group[0]]
        if (
            _relative_change(inputs[group[0]] * r.float(), x_ref) < _FOLD_TOLERANCE
            and _relative_change(out, ref_out) < _FOLD_TOLERANCE
        ):
            return name
        if len(tried) >= _FOLD_CANDIDATES:
            break
    return None


# ---------------------------------------------------------------------------------------------------------
# The technique


def _collect(step: BlockStep, max_rows: int) -> tuple[list[list[str]], dict[str, ActivationStats]]:
    """Groups of layers reading the same tensor (in call order) and each group's input statistics."""
    groups: list[list[str]] = []
    group_of: dict[str, list[str]] = {}
    stats: dict[str, ActivationStats] = {}
    last: dict[str, Any] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        if name not in group_of:
            if last.get("x") is x:
                group_of[name] = last["group"]
                last["group"].append(name)
            else:
                group_of[name] = [name]
                groups.append(group_of[name])
        group = group_of[name]
        last.update(x=x, group=group)
        if group[0] != name:
            return  # the group's first layer records the shared input
        if not torch.isfinite(x).all():
            raise DataError(
                f"awq: the input of layer '{name}' holds NaN or Inf during calibration; check the data and the "
                "model, or add the layer to ignore."
            )
        if name not in stats:
            stats[name] = ActivationStats(x.shape[-1], max_rows=max_rows)
        stats[name].update(x)

    step.run(observe)
    return groups, stats


def _process(config: AWQConfig, step: BlockStep) -> dict[str, nn.Module]:
    groups, stats = _collect(step, max(config.search_tokens // 2, 1))
    grid = WeightGrid(config.bits, config.group_size, config.symmetric)
    order = step.execution_order()
    reference = _first_inputs(step)
    hessians = {leader: stats[leader].hessian() for leader in stats}  # (K, K) of the sampled inputs
    input_scale: dict[str, torch.Tensor] = {}
    for group in groups:
        producer = _find_producer(step, group, order, reference)
        if producer is None:
            log.info("awq: %s: no op to fold a scale into; clipping search only", group)
            continue
        weights = torch.cat([_weight(step.layers[n]).detach().float() for n in group])
        s, alpha = search_scales(
            hessians[group[0]], stats[group[0]].mean_abs(), weights, grid, n_grid=config.grid
        )
        if s is None:
            log.info("awq: %s: no scale beats plain rounding", group)
            continue
        _divide_output(_submodule(step, producer), s)
        for name in group:
            _multiply_input(step.layers[name], s)
            input_scale[name] = s
        log.info("awq: %s: scale folded into '%s' (alpha %.2f)", group, producer, alpha)

    out: dict[str, nn.Module] = {}
    for group in groups:
        h = hessians[group[0]]
        if group[0] in input_scale:  # the group now reads x / s
            s = input_scale[group[0]]
            h = h / s[:, None] / s[None, :]
        for name in group:
            out[name] = _quantize(step.layers[name], h if config.clip_search else None, grid, config)
    for name in step.layers.keys() - out.keys():
        log.warning("awq: layer '%s' did not run during calibration; its weight is rounded to nearest.", name)
        out[name] = _quantize(step.layers[name], None, grid, config)
    return out


def _quantize(
    module: nn.Module, hessian: torch.Tensor | None, grid: WeightGrid, config: AWQConfig
) -> nn.Module:
    """Round the (scaled) weight, with group ranges from the clipping search for inputs with Gram matrix
    `hessian` if given."""
    w = _weight(module).detach().float()
    scheme = layer_scheme(module, config.bits, config.group_size, config.symmetric)
    if config.rounding == "gptq" and hessian is not None:
        codes, scale, zp = gptq_quantize(
            w,
            hessian,
            bits=grid.bits,
            group_size=grid.group_size,
            symmetric=grid.symmetric,
            act_order=True,
            clip_search=config.clip_search,
            refit=True,
        )
        return _install(module, codes, scale, zp, scheme)
    ratio: torch.Tensor | float = (
        1.0 if hessian is None else search_clip(hessian, w, grid, n_grid=config.grid)
    )
    scale, zp = grid.params(w, ratio)
    codes = grid.quantize(w, scale, zp)
    return _install(module, codes, scale, None if zp is None else zp.to(torch.uint8), scheme)


def awq(model: nn.Module, config: AWQConfig, data: Dataset | Any = None) -> nn.Module:
    """Quantize the selected Linear layers with AWQ, calibrated on `data`, and return the model.

    >>> small = awq(model, AWQConfig(bits=4, group_size=128, ignore=("lm_head",)), Dataset(batches))  # doctest: +SKIP
    """
    dataset = as_dataset(data)
    if dataset is None:
        raise DataError(
            "awq needs calibration data: pass `data=` to compress (about 128 samples of typical inputs), or "
            "--data file.py:fn on the command line. Without data use weight_only."
        )
    chosen = select_layers(
        model, owner="awq", kinds=config.layers, targets=config.targets, ignore=config.ignore
    )
    if not chosen:
        return model
    model = calibrate_blockwise(
        model,
        dataset,
        layers=chosen,
        batches=config.calibration_batches,
        process=partial(_process, config),
        rerun=False,
        owner="awq",
    )
    log.info("awq: quantized %d layers (int%d, group %s)", len(chosen), config.bits, config.group_size)
    return model
