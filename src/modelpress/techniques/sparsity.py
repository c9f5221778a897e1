"""Unstructured and N:M sparsity: magnitude (per layer or global), Wanda and SparseGPT (one shot, block by
block on calibration data), stored as a bitmask plus the kept values (optionally int8).

The artifact really shrinks (50% sparse fp32: ~0.53x; with int8 values: ~0.16x of fp32), but no runtime
here has a sparse kernel for these layers: ONNX Runtime and OpenVINO rebuild the dense weight when they
load the model, so sparsity alone buys no speed. The report says so.

>>> small = compress(model, [SparsityConfig(method="sparsegpt", pattern="2:4")], batches)  # doctest: +SKIP
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
from modelpress.ops.sparse import lowest_mask, nm_mask, parse_pattern, sparsegpt_prune, wanda_scores
from modelpress.techniques.blockwise import BlockStep, calibrate_blockwise
from modelpress.techniques.gptq import collect_hessians
from modelpress.techniques.quantized import QUANTIZABLE_TYPES, QuantizedLayer, SparseLayer
from modelpress.techniques.reconstruct import SparseFit, check_reconstruct, reconstruct
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

SparsityMethod = Literal["magnitude", "wanda", "sparsegpt"]
_TYPES = {"linear": (nn.Linear,), "conv": (nn.Conv1d, nn.Conv2d)}


@dataclass(frozen=True)
class SparsityConfig:
    """Set `ratio` of the selected layers' weights to zero (or keep N of every M), and store them sparse.

    `method`: magnitude (no data), wanda (|W| * input norm, per output row) or sparsegpt (pruning with
    the Hessian-based weight update). `scope: global` ranks all layers' magnitudes together (magnitude
    only). `bits: 8` stores the kept values as int8 per output channel.

    >>> SparsityConfig(method="wanda", pattern="2:4").density
    0.5
    """

    type: ClassVar[str] = "sparsity"
    method: SparsityMethod = "sparsegpt"
    ratio: float | None = None  # fraction of weights set to zero; None: 0.5, or what the N:M pattern gives
    pattern: str = "unstructured"  # or "N:M", e.g. "2:4"
    scope: Literal["layer", "global"] = "layer"
    bits: Literal[8] | None = None
    calibration_batches: int = 128
    damp: float = 0.01  # sparsegpt: added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # sparsegpt: columns whose mask is chosen together
    # Local reconstruction after each block is pruned: epochs of Adam on the kept weights, pulling the block
    # towards the unmodified model's output there (0: off). Needs calibration data, also for magnitude.
    reconstruct_epochs: int = 0
    reconstruct_lr: float = 1e-3
    layers: tuple[Literal["linear", "conv"], ...] = ("linear",)
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise RecipeError(
                f"sparsity: method={self.method!r} is unknown; choose from ['magnitude', 'sparsegpt', 'wanda']."
            )
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as exc:
            raise RecipeError(f"sparsity: {exc}") from exc
        if self.ratio is not None:
            if nm is not None:
                raise RecipeError(
                    f"sparsity: pattern {self.pattern} fixes the ratio ({1 - nm[0] / nm[1]:g}); leave ratio unset."
                )
            if not 0 <= self.ratio < 1:
                raise RecipeError(
                    f"sparsity: ratio={self.ratio} must be in [0, 1): the fraction of weights set to zero."
                )
        if self.scope not in ("layer", "global"):
            raise RecipeError(f"sparsity: scope={self.scope!r} is invalid; choose 'layer' or 'global'.")
        if self.scope == "global" and (self.method != "magnitude" or nm is not None):
            raise RecipeError(
                "sparsity: scope: global ranks weight magnitudes across layers; it needs method: magnitude "
                "and pattern: unstructured."
            )
        if self.bits not in (None, 8):
            raise RecipeError(f"sparsity: bits={self.bits} is not supported; use 8 or null (fp32 values).")
        if self.calibration_batches < 1 or self.block_size < 1 or not 0 <= self.damp < 10:
            raise RecipeError(
                "sparsity: calibration_batches and block_size must be at least 1, damp in [0, 10)."
            )
        check_reconstruct("sparsity", self.reconstruct_epochs, self.reconstruct_lr, "1 epoch at 1e-3")
        if self.reconstruct_epochs and self.scope == "global":
            raise RecipeError("sparsity: reconstruct_epochs works block by block; use scope: layer with it.")
        bad = [k for k in self.layers if k not in _TYPES]
        if bad or not self.layers:
            raise RecipeError(
                f"sparsity: layers={list(self.layers)} is invalid; choose from ['conv', 'linear']."
            )

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def density(self) -> float:
        """The fraction of weights kept."""
        nm = self.nm
        if nm is not None:
            return nm[0] / nm[1]
        return 1.0 - (0.5 if self.ratio is None else self.ratio)


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _flat(module: nn.Module) -> torch.Tensor:
    weight = _weight(module).detach().float()
    return weight.reshape(weight.shape[0], -1)


def layer_mask(module: nn.Module, config: SparsityConfig, scores: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask (out, in * kernel) of one layer from `scores` (default |W|)."""
    scores = _flat(module).abs() if scores is None else scores
    nm = config.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    return lowest_mask(scores, 1.0 - config.density, per_row=config.method == "wanda")


# Below this many weights the bitmask-decoding graph (~1.5 KB per layer) costs more than it saves: such
# layers keep their zeros in a dense weight (int8 per channel with bits=8).
MIN_SPARSE_ELEMENTS = 4096


def _install(module: nn.Module, weight2d: torch.Tensor, mask2d: torch.Tensor, bits: int | None) -> nn.Module:
    weight = _weight(module)
    module.weight = nn.Parameter(weight2d.reshape(weight.shape).to(weight.dtype), requires_grad=False)
    if weight.numel() < MIN_SPARSE_ELEMENTS:
        return QuantizedLayer(module, bits=bits) if bits else module
    return SparseLayer(module, mask2d.reshape(weight.shape), bits=bits)


def _process(config: SparsityConfig, step: BlockStep) -> dict[str, nn.Module]:
    reconstructing = bool(config.reconstruct_epochs) and step.carry_targets
    pruned = _prune(config, step, reconstructing)
    if reconstructing:
        fits = {
            name: SparseFit(
                w.reshape(_weight(step.layers[name]).shape), m.reshape(_weight(step.layers[name]).shape)
            )
            for name, (w, m) in pruned.items()
        }
        reconstruct(step, fits, epochs=config.reconstruct_epochs, lr=config.reconstruct_lr, owner="sparsity")
        pruned = {name: (fits[name].weight.reshape(w.shape), m) for name, (w, m) in pruned.items()}
    elif config.reconstruct_epochs:
        log.info(
            "sparsity: %d layers outside the repeated blocks are pruned without reconstruction.", len(pruned)
        )
    return {
        name: _install(step.layers[name], weight, mask, config.bits)
        for name, (weight, mask) in pruned.items()
    }


def _prune(
    config: SparsityConfig, step: BlockStep, reconstructing: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The pruned weight and keep-mask (both 2-D) of each of the step's layers. When reconstructing, the
    statistics come from the unmodified model's inputs (the reference), and that pass records the targets
    (the reconstruction then fits the pruned chain to them; one pass less than calibrating on both)."""
    if config.method == "magnitude":
        if reconstructing:
            step.compute_targets()
        return {
            name: (_flat(module) * mask, mask)
            for name, module in step.layers.items()
            for mask in [layer_mask(module, config)]
        }
    accumulators = collect_hessians(step, record_targets=reconstructing)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in step.layers.items():
        if name not in accumulators:
            log.warning("sparsity: layer '%s' did not run during calibration; magnitude pruning it.", name)
            mask = layer_mask(module, config)
            out[name] = (_flat(module) * mask, mask)
            continue
        hessian = accumulators[name].hessian()
        weight = _flat(module)
        if config.method == "wanda":
            mask = layer_mask(module, config, wanda_scores(weight, torch.diagonal(hessian).float()))
            out[name] = (weight * mask, mask)
            continue
        try:
            pruned = sparsegpt_prune(
                weight,
                hessian,
                ratio=1.0 - config.density,
                nm=config.nm,
                damp=config.damp,
                block_size=config.block_size,
            )
        except ValueError as exc:
            raise DataError(
                f"sparsity: layer '{name}': {exc} Add the layer to ignore if this persists."
            ) from exc
        out[name] = (pruned, pruned != 0)
    return out


def _select(model: nn.Module, config: SparsityConfig) -> dict[str, nn.Module]:
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(
            f"sparsity: targets {missing} match no module of the model. Check the names (see `modelpress "
            "profile` for the layer list), or use a type name such as 'Linear' or a 're:' regex."
        )
    wide = tuple(t for kind in config.layers for t in QUANTIZABLE_TYPES[kind])
    chosen: dict[str, nn.Module] = {}
    nm = config.nm
    for name, module in select_modules(model, types=wide, targets=config.targets, ignore=config.ignore):
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        supported = isinstance(module, tuple(t for kind in config.layers for t in _TYPES[kind]))
        if supported and isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            supported = config.method == "magnitude"
        why = None if supported else f"{type(module).__name__} is not supported by {config.method}"
        if why is None and nm is not None and _flat(module).shape[1] % nm[1]:
            why = f"its {_flat(module).shape[1]} inputs per output do not split into groups of {nm[1]}"
        if why is not None:
            if config.targets is not None and name in config.targets:
                raise RecipeError(f"sparsity: layer '{name}': {why}; remove it from targets.")
            log.warning("sparsity: layer '%s' is left dense: %s.", name, why)
            continue
        if not torch.isfinite(_weight(module)).all():
            raise RecipeError(
                f"sparsity: layer '{name}' has NaN or Inf in its weight; fix the checkpoint, or add it to ignore."
            )
        chosen[name] = module
    return chosen


def sparsity(model: nn.Module, config: SparsityConfig, data: Dataset | Any = None) -> nn.Module:
    """Prune the selected layers to `config.density` and store them as `SparseLayer`s.

    >>> small = sparsity(model, SparsityConfig(method="wanda"), Dataset(batches))  # doctest: +SKIP
    """
    chosen = _select(model, config)
    if not chosen:
        log.warning("sparsity: no layer matched (layers=%s); the model is unchanged.", list(config.layers))
        return model
    if config.method == "magnitude" and not config.reconstruct_epochs:
        threshold = None
        if config.scope == "global":
            everything = torch.cat([_flat(m).abs().reshape(-1) for m in chosen.values()])
            prune = int(everything.numel() * (1.0 - config.density))
            threshold = float(everything.kthvalue(prune).values) if prune else None
            del everything
        for name, module in chosen.items():
            mask = _flat(module).abs() > threshold if threshold is not None else layer_mask(module, config)
            set_submodule(model, name, _install(module, _flat(module) * mask, mask, config.bits))
    else:
        dataset = as_dataset(data)
        if dataset is None:
            needs = f"method {config.method}" if config.method != "magnitude" else "reconstruct_epochs"
            raise DataError(
                f"sparsity: {needs} needs calibration data: pass `data=` to compress (about 128 "
                "samples of typical inputs), or --data file.py:fn on the command line. Without data use "
                "method: magnitude with reconstruct_epochs: 0."
            )
        model = calibrate_blockwise(
            model,
            dataset,
            layers=chosen,
            batches=config.calibration_batches,
            process=partial(_process, config),
            rerun=True,
            owner="sparsity",
            targets=config.reconstruct_epochs > 0,
        )
    stored = [m for m in model.modules() if isinstance(m, SparseLayer)]
    kept = sum(int(m.values.numel()) for m in stored)
    log.info(
        "sparsity: %d layers pruned (%s, %s), %d stored as bitmask + values at %.1f%% zeros (layers under %d "
        "weights keep dense zeros). No runtime here runs them with a sparse kernel: expect a smaller file, "
        "not a faster one.",
        len(chosen),
        config.method,
        config.pattern,
        len(stored),
        100.0 * (1 - kept / max(sum(m.numel for m in stored), 1)),
        MIN_SPARSE_ELEMENTS,
    )
    return model


__all__ = ["SparsityConfig", "layer_mask", "sparsity"]
