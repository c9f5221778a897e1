"""Unstructured and N:M sparsity: magnitude (per layer or global), Wanda and SparseGPT (one shot, block by
block on calibration data), stored as a bitmask plus the kept values (optionally int8).

The artifact really shrinks (50% sparse fp32: ~0.53x; with int8 values: ~0.16x of fp32), but no runtime
here has a sparse kernel for these layers: ONNX Runtime and OpenVINO rebuild the dense weight when they
load the model, so sparsity alone buys no speed. The report says so.

>>> small = compress(model, [SparsityConfig(method="sparsegpt", pattern="2:4")], batches)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.ops.sparse import (
    damped_hessian,
    lowest_mask,
    nm_mask,
    parse_pattern,
    sparsegpt_prune,
    unpack_mask,
    wanda_scores,
)
from modelpress.techniques.blockwise import BlockStep, bf16_supported, calibrate_blockwise
from modelpress.techniques.distill import DistillConfig, as_recover, train
from modelpress.techniques.finetune import RECOVER_LABELS, labeled
from modelpress.techniques.gptq import collect_hessians
from modelpress.techniques.quantized import QUANTIZABLE_TYPES, QuantizedLayer, SparseLayer, call_with_weight
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
    # How the ratio is spread over the layers: "uniform" (each layer pruned to `ratio`) or "sensitivity"
    # (wanda/sparsegpt, unstructured: within each block the layers' weights are ranked together by the
    # error their removal adds to the block's output, so robust layers give more; each layer's ratio stays
    # within `ratio` +- `allocation_range` and each block's total is exactly `ratio`; `_allocate`).
    allocation: Literal["uniform", "sensitivity"] = "uniform"
    allocation_range: float = 0.35
    # Recovery once the whole model is pruned, the masks fixed (pruned weights stay 0): the kept weights of
    # the sparse layers trained by distillation from the unpruned model (a DistillConfig; YAML
    # `recover: {loss: kl, steps: 32, lr: 1e-4}`: `kl` for logits of classifiers and language models, `mse`
    # for other outputs, `task` for cross-entropy on (inputs, labels) items); null skips it. It runs under
    # bf16 autocast where the CPU has bf16 units.
    recover: DistillConfig | None = None
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
        if self.allocation not in ("uniform", "sensitivity"):
            raise RecipeError(
                f"sparsity: allocation={self.allocation!r} is unknown; choose 'uniform' or 'sensitivity'."
            )
        if self.allocation == "sensitivity":
            if self.method == "magnitude" or nm is not None:
                raise RecipeError(
                    "sparsity: allocation: sensitivity ranks weights by their effect on each block's output "
                    "on calibration data; it needs method wanda or sparsegpt and pattern: unstructured (N:M "
                    "fixes every layer's density)."
                )
            target = 1.0 - self.density
            bound = self.allocation_range
            if (
                not isinstance(bound, (int, float))
                or isinstance(bound, bool)
                or not 0 < bound <= min(target, 1.0 - target)
            ):
                raise RecipeError(
                    f"sparsity: allocation_range={self.allocation_range} must be in (0, "
                    f"{min(target, 1.0 - target):g}]: each layer's ratio stays within ratio +- this, inside [0, 1]."
                )
        object.__setattr__(self, "recover", as_recover("sparsity", self.recover))
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


def layer_mask(
    module: nn.Module,
    config: SparsityConfig,
    scores: torch.Tensor | None = None,
    ratio: float | None = None,
) -> torch.Tensor:
    """The keep-mask (out, in * kernel) of one layer from `scores` (default |W|), pruning `ratio` (default
    the config's)."""
    scores = _flat(module).abs() if scores is None else scores
    nm = config.nm
    if nm is not None:
        return nm_mask(scores, *nm)
    ratio = 1.0 - config.density if ratio is None else ratio
    return lowest_mask(scores, ratio, per_row=config.method == "wanda")


_GAIN_ITEMS = 4  # calibration items the output gains are measured on
_GAIN_NOISE = 0.05  # relative size of the weight perturbation that measures them


def _output_gains(step: BlockStep) -> dict[str, float]:
    """For each of the step's layers: how much squared error the block's output gets per unit of squared
    error in that layer's output, measured by perturbing the layer's weight (seeded noise of 5% of each
    weight) on a few calibration items of the unmodified block."""
    calls = (step.reference or step.inputs())[:_GAIN_ITEMS]
    generator = torch.Generator().manual_seed(0)
    gains: dict[str, float] = {}
    with torch.no_grad():
        base = [step.forward(c).float() for c in calls]
        for name, module in step.layers.items():
            weight = _weight(module).detach()
            noisy = weight + _GAIN_NOISE * weight * torch.randn(weight.shape, generator=generator).to(weight)
            layer_error = [0.0]

            def perturb(
                m: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                out: torch.Tensor,
                noisy: torch.Tensor = noisy,
                layer_error: list[float] = layer_error,
            ) -> torch.Tensor:
                new = call_with_weight(m, noisy, args, kwargs)
                layer_error[0] += float((new - out).float().pow(2).sum())
                return new

            handle = module.register_forward_hook(perturb, with_kwargs=True)
            try:
                block_error = sum(
                    float((step.forward(c).float() - b).pow(2).sum())
                    for c, b in zip(calls, base, strict=True)
                )
            finally:
                handle.remove()
            gains[name] = block_error / layer_error[0] if layer_error[0] > 0 else 0.0
    return gains


def _allocate(config: SparsityConfig, step: BlockStep, hessians: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer pruning ratios for `allocation: sensitivity`.

    Each weight's saliency is the squared error its removal adds to its layer's output (SparseGPT: w^2 /
    [H^-1]_jj, the OBS cost with the other weights compensating; Wanda: w^2 H_jj, without) times the
    layer's output gain (`_output_gains`), which puts every layer in units of the block's output error.
    The block's weights are ranked together and its lowest `ratio` are the ones to prune; each layer's
    share, clamped to `ratio` +- `allocation_range`, is its ratio (the threshold is found by bisection so
    that the block's total stays `ratio`). On SmolLM2 (first 10 blocks pruned, SparseGPT + reconstruction,
    perplexity over 8k tokens, fp32 21.05) uniform 50% gave 24.74; this gave 24.27 with ratios within
    0.5 +- 0.2 and 24.09 within 0.5 +- 0.35 (it pruned q/k hardest and v least), where fixed splits were
    worse (attention 70% / MLP 43%: 24.89; 30% / 57%: 26.00). The whole model (range 0.35, 128 windows,
    32k tokens in ONNX Runtime, separate runs): 31.40 uniform, 30.66 with this (fp32 20.72).
    """
    target = 1.0 - config.density
    low, high = target - config.allocation_range, target + config.allocation_range
    gains = _output_gains(step)
    sorted_scores: dict[str, torch.Tensor] = {}
    for name, module in step.layers.items():
        if name not in hessians:
            continue
        if config.method == "sparsegpt":
            inverse, info = torch.linalg.inv_ex(damped_hessian(hessians[name], config.damp))
            if int(info) == 0:
                cost = inverse.diagonal().reciprocal()
            else:  # singular even when damped (SparseGPT will say so): rank it without compensation
                log.warning("sparsity: layer '%s': Hessian not invertible; ranked by w^2 H_jj.", name)
                cost = torch.diagonal(hessians[name]).double()
        else:  # Wanda: no compensation; a dead input (H_jj = 0) costs nothing to prune
            cost = torch.diagonal(hessians[name]).double()
        scores = _flat(module).double().pow(2) * cost.clamp_min(0)[None, :] * gains[name]
        sorted_scores[name] = scores.flatten().sort().values
    if not sorted_scores:
        return {}
    sizes = {name: v.numel() for name, v in sorted_scores.items()}
    total = sum(sizes.values())

    def ratios(threshold: float) -> dict[str, float]:
        return {
            name: min(max(float(torch.searchsorted(v, threshold)) / sizes[name], low), high)
            for name, v in sorted_scores.items()
        }

    def pruned(threshold: float) -> float:
        r = ratios(threshold)
        return sum(r[n] * sizes[n] for n in r) / total

    # Bisection on the log threshold: the pruned fraction grows with it.
    everything = torch.cat(list(sorted_scores.values()))
    positive = everything[everything > 0]
    lo = math.log(float(positive.min())) - 1.0 if positive.numel() else -700.0
    hi = math.log(float(everything.max()) + 1e-300) + 1.0
    for _ in range(64):
        mid = (lo + hi) / 2
        if pruned(math.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    out = ratios(math.exp(hi))
    # Rounding of the clamps can leave the total a hair off: spread the rest over the unclamped layers.
    free = [n for n, r in out.items() if low < r < high] or list(out)
    rest = (target * total - sum(out[n] * sizes[n] for n in out)) / sum(sizes[n] for n in free)
    out = {n: min(max(r + (rest if n in free else 0.0), 0.0), 1.0) for n, r in out.items()}
    log.info(
        "sparsity: '%s' ratios by sensitivity: %s",
        step.name or "model",
        ", ".join(f"{n.rsplit('.', 1)[-1]} {r:.2f}" for n, r in out.items()),
    )
    return out


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
    hessians = {name: acc.hessian() for name, acc in accumulators.items()}
    ratios = _allocate(config, step, hessians) if config.allocation == "sensitivity" else {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in step.layers.items():
        if name not in accumulators:
            log.warning("sparsity: layer '%s' did not run during calibration; magnitude pruning it.", name)
            mask = layer_mask(module, config)
            out[name] = (_flat(module) * mask, mask)
            continue
        hessian = hessians[name]
        weight = _flat(module)
        ratio = ratios.get(name, 1.0 - config.density)
        if config.method == "wanda":
            mask = layer_mask(module, config, wanda_scores(weight, torch.diagonal(hessian).float()), ratio)
            out[name] = (weight * mask, mask)
            continue
        try:
            pruned = sparsegpt_prune(
                weight,
                hessian,
                ratio=ratio,
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


class _Teacher(nn.Module):
    """The unpruned model for distillation without a second copy of it: `model` run with the pruned
    layers' original weights put back (torch.func.functional_call). Everything else is shared, and frozen
    while recovering. The weights are kept in bf16 where the recovery runs under bf16 autocast (which casts
    them to bf16 anyway): for SmolLM2 0.2 GB instead of a 0.54 GB copy."""

    def __init__(self, model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = [model]  # a list: not a submodule, so not a second set of parameters
        self.originals = originals

    def forward(self, *args: Any) -> Any:
        return torch.func.functional_call(self.model[0], self.originals, args, strict=False)


class _KeptValues(nn.Module):
    """A sparse layer being recovered: only its kept values are a parameter (Adam's moments and the fp32
    master copy cover the kept half, not the dense tensor: for SmolLM2 at 50% ~0.6 GB less than training
    the dense weight with its gradient masked), scattered into a dense weight on each forward. A pruned
    position has no parameter, so it stays exactly 0. The `weight` buffer is None; the teacher sets it to
    the original weight for its pass (`_Teacher`, by name `<layer>.weight`)."""

    index: torch.Tensor
    weight: torch.Tensor | None

    def __init__(self, layer: SparseLayer) -> None:
        super().__init__()
        mask = unpack_mask(layer.bitmask, layer.numel)
        # int32 flat positions of the kept values: index_add / index_select take them and run ~10x faster
        # than masked_scatter / masked_select (SmolLM2 1536 x 576: 0.7 ms and 0.34 ms vs 4.5 and 3.5 ms).
        self.register_buffer("index", mask.nonzero().squeeze(1).to(torch.int32))
        self.register_buffer("weight", None)
        self.values = nn.Parameter(layer.dense_weight().reshape(-1)[mask])
        self.shape = layer.weight_shape
        self.inner = layer.inner
        self.bits = layer.bits

    def dense(self) -> torch.Tensor:
        """The weight with the kept values in place and zeros elsewhere (positions are unique: add = copy)."""
        return (
            self.values.new_zeros(math.prod(self.shape))
            .index_add(0, self.index, self.values)
            .reshape(self.shape)
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weight = self.dense() if self.weight is None else self.weight
        return call_with_weight(self.inner, weight, args, kwargs)

    def stored(self) -> SparseLayer:
        """The trained layer stored sparse again (int8 codes again when it held them)."""
        mask = torch.zeros(math.prod(self.shape), dtype=torch.bool)
        mask[self.index.long()] = True
        with torch.no_grad():
            self.inner.weight = nn.Parameter(self.dense(), requires_grad=False)
        return SparseLayer(self.inner, mask.reshape(self.shape), bits=self.bits)


def _originals(chosen: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    dtype = torch.bfloat16 if bf16_supported() else None
    return {f"{name}.weight": _weight(m).detach().to(dtype=dtype, copy=True) for name, m in chosen.items()}


def _teacher(
    model: nn.Module, names: list[str], originals: dict[str, torch.Tensor], *, separate: bool
) -> nn.Module:
    """`model` before pruning: a `_Teacher` when every pruned layer will have a float weight to swap (sparse
    layers, and small layers keeping dense zeros), else (int8 small layers, or `separate`: features or
    attention are matched block by block, which needs the teacher's own modules) a copy with the weights put
    back."""
    if not separate and all(
        isinstance(m, SparseLayer) or isinstance(m._parameters.get("weight"), torch.Tensor)
        for m in (model.get_submodule(n) for n in names)
    ):
        return _Teacher(model, originals)
    teacher = copy.deepcopy(model)
    for name in names:
        layer = teacher.get_submodule(name)
        if isinstance(layer, (QuantizedLayer, SparseLayer)):
            layer = layer.inner
            set_submodule(teacher, name, layer)
        layer.weight = nn.Parameter(originals[f"{name}.weight"], requires_grad=False)
    return teacher.eval().requires_grad_(False)


def _recover(
    model: nn.Module,
    names: list[str],
    data: Dataset,
    config: SparsityConfig,
    originals: dict[str, torch.Tensor] | None,
) -> None:
    """Fine-tune the kept weights of the sparse layers among `names`, masks fixed, and store them again.

    Each `SparseLayer` becomes a `_KeptValues` for the duration: its kept values are the only trainable
    tensors, so a pruned weight stays exactly 0; every other parameter is frozen. `originals` (distill):
    the unpruned weights of the layers in `names`, for the teacher."""
    recovery = config.recover
    assert recovery is not None
    separate = recovery.features is not None or recovery.attention
    teacher = _teacher(model, names, originals, separate=separate) if originals is not None else None
    swapped: dict[str, _KeptValues] = {}
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, SparseLayer):  # small layers keep their zeros dense: left as they are
            continue
        swapped[name] = _KeptValues(layer)
        set_submodule(model, name, swapped[name])
    if not swapped:
        log.warning("sparsity: no layer is stored sparse, so recovery has nothing to train; skipped.")
        return
    trainable = {id(kept.values) for kept in swapped.values()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    start = time.perf_counter()
    try:
        train(
            model,
            teacher,
            data,
            recovery,
            owner="sparsity",
            tag="sparsity-recover",
            autocast=bf16_supported(),
            lean=True,  # the gradients of all the layers never exist at once; snapshots on disk
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for name, kept in swapped.items():
            set_submodule(model, name, kept.stored())
    log.info(
        "sparsity: recovery (%s) trained %d sparse layers, masks fixed, in %.1f s",
        recovery.loss,
        len(swapped),
        time.perf_counter() - start,
    )


def sparsity(model: nn.Module, config: SparsityConfig, data: Dataset | Any = None) -> nn.Module:
    """Prune the selected layers to `config.density` and store them as `SparseLayer`s; with `recover`,
    then fine-tune the kept weights (masks fixed) on `data`.

    >>> small = sparsity(model, SparsityConfig(method="wanda"), Dataset(batches))  # doctest: +SKIP
    """
    chosen = _select(model, config)
    if not chosen:
        log.warning("sparsity: no layer matched (layers=%s); this step changes nothing.", list(config.layers))
        return model
    training = as_dataset(data)
    recovery = config.recover
    if recovery is not None and training is None:
        raise DataError(
            "sparsity: recover trains on data: pass `data=` to compress, or --data file.py:fn on the command "
            "line; or drop recover."
        )
    originals = _originals(chosen) if recovery is not None and recovery.needs_teacher else None
    if recovery is not None and recovery.labeled and training is not None:  # the items are (inputs, labels)
        data = Dataset(
            training, lambda item: labeled(item, "a data item", owner="sparsity", **RECOVER_LABELS)[0]
        )
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
            # bf16 reference and rerun passes where the CPU has bf16 units: 10 SmolLM2 blocks pruned with
            # reconstruction, perplexity 24.0948 in fp32 and 24.0957 this way; a block forward takes 0.64x
            # the time (median of 7 interleaved rounds, 32 x 512 tokens).
            fast_rerun=config.reconstruct_epochs > 0,
            fast_reference=config.reconstruct_epochs > 0,
        )
    if recovery is not None:
        assert training is not None
        _recover(model, list(chosen), training, config, originals)
        del originals
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
