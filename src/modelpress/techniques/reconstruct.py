"""Local reconstruction: after a block's layers are pruned or quantized, train what is left free in them so
that the block gives what the unmodified model gives there.

One-shot pruning (Wanda, SparseGPT) and GPTQ fit each layer alone to its own input. Reconstruction then fits
the whole block on the calibration set: the block runs on the compressed model's inputs (what it will see)
and is pulled towards the unmodified model's block output (`BlockStep.targets`, carried along the blocks
beside the compressed chain), so it also absorbs what the earlier blocks got wrong. What is trained is each
layer's `LayerFit`:

- `SparseFit`: the kept weights (gradients masked: pruned weights stay exactly zero, density unchanged);
- `QuantFit`: a float weight seen through its quantization grid with a straight-through rounding, and the
  grid's scales (LSQ-style); the zero points stay. It starts from the given codes (GPTQ's), so the first
  step reproduces them exactly, and ends with the codes and scales the trained weight rounds to (block-wise
  quantization-aware reconstruction, as EfficientQAT's Block-AP).

Adam, relative MSE (of the whole output, or per token), a few epochs over the cached inputs in a seeded
order. On CPUs with native bf16 matrix units the forward runs under bf16 autocast (the weights, the fake
quantization and the loss stay fp32).

This is the "local reconstruction" of Wagner et al. 2025 (A Free Lunch in LLM Compression: Revisiting
Retraining after Pruning) at block granularity; memory is the block's weights, their Adam moments and
one item's activations.

>>> new = reconstruct(step, {"block.fc": SparseFit(weight, mask)}, epochs=1, lr=1e-3)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from modelpress.errors import DataError, RecipeError
from modelpress.ops.gptq import WeightGrid
from modelpress.techniques.blockwise import BlockStep, bf16_supported
from modelpress.techniques.finetune import distill_loss

log = logging.getLogger(__name__)


class LayerFit(Protocol):
    """What reconstruction trains in one layer."""

    def attach(self, module: nn.Module) -> list[dict[str, Any]]:
        """Make the module's weight trainable; return Adam parameter groups ("lr" is a factor of the base lr)."""
        ...

    def project(self, module: nn.Module) -> None:
        """After each optimizer step: bring the parameters back into their allowed set."""
        ...

    def detach(self, module: nn.Module) -> None:
        """Fix the result (kept on the fit) and leave the module with a plain, frozen weight."""
        ...


@dataclass
class SparseFit:
    """The kept weights of a pruned layer; `weight` and `mask` in the module's weight shape."""

    weight: torch.Tensor
    mask: torch.Tensor
    _param: nn.Parameter | None = field(default=None, init=False, repr=False)
    _hook: Any = field(default=None, init=False, repr=False)

    def attach(self, module: nn.Module) -> list[dict[str, Any]]:
        self._param = nn.Parameter(self.weight.detach().float().clone() * self.mask)
        module.weight = self._param
        self._hook = self._param.register_hook(lambda g: g * self.mask)
        return [{"params": [self._param], "lr": 1.0}]

    def project(self, module: nn.Module) -> None:
        pass  # the gradient hook keeps pruned weights at zero

    def detach(self, module: nn.Module) -> None:
        assert self._param is not None
        self._hook.remove()
        self.weight = self._param.detach() * self.mask
        module.weight = nn.Parameter(self.weight, requires_grad=False)
        self._param = None


def _per_column(values: torch.Tensor, grid: WeightGrid, k: int) -> torch.Tensor:
    """Per-group values (N, G) repeated over each group's columns: (N, K)."""
    return values.repeat_interleave(grid.width(k), dim=1)[:, :k]


class _FakeQuantFn(torch.autograd.Function):
    """weight = clamp(round(start + shift), lo, hi) * scale, with scale (N, G) repeated over each group's
    columns: the rounding is straight-through and the clamp passes no gradient where it bites (as autograd
    through clamp does). One fused pass each way instead of autograd's ~25 elementwise kernels over the
    weight, which were a third of a SmolLM2 block's reconstruction step."""

    @staticmethod
    def forward(
        ctx: Any,
        shift: torch.Tensor,
        start: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        scale: torch.Tensor,
        grid: WeightGrid,
    ) -> torch.Tensor:
        rounded = torch.round(start + shift)
        q = torch.clamp(rounded, lo, hi)
        inside = rounded == q
        full = _per_column(scale, grid, shift.shape[1])
        ctx.save_for_backward(q, inside, full)
        ctx.grid = grid
        return q * full

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, inside, full = ctx.saved_tensors
        grad = grad.float()
        grad_shift = torch.where(inside, grad * full, 0.0)
        grad_scale = ctx.grid.grouped(grad * q).sum(-1)  # zero padding adds nothing
        return grad_shift, None, None, None, grad_scale, None


class _FakeQuant(nn.Module):
    """A parametrization: a shift (N, K) in [-0.5, 0.5] grid steps on top of each weight's position on its
    grid (`start`, codes relative to the zero point), rounded straight-through, as the module's weight
    `(round(start + shift) + zp clamped - zp) * scale` per group, with the scales (N, G) trained as factors.

    Trained in grid units (not as a float weight), every layer and group gets the same step per code; the
    bound lets each code only round the other way (AutoRound's signed rounding)."""

    start: torch.Tensor
    base: torch.Tensor
    zero_point: torch.Tensor
    zp_full: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(
        self,
        grid: WeightGrid,
        start: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        shape: torch.Size,
    ) -> None:
        super().__init__()
        self.grid = grid
        self.shape = shape
        k = start.shape[1]
        self.register_buffer("start", start)
        self.register_buffer("base", scale.detach().float().clone())
        self.factor = nn.Parameter(torch.zeros_like(self.base))  # scale = base * (1 + factor)
        zp = torch.zeros_like(scale, dtype=torch.float32) if zero_point is None else zero_point.float()
        self.register_buffer("zero_point", zp)
        # The codes' range relative to each weight's zero point: round(start + shift) is clamped into it.
        qmin, qmax = grid.code_range
        self.register_buffer("zp_full", _per_column(zp, grid, k))
        self.register_buffer("lo", qmin - self.zp_full)
        self.register_buffer("hi", qmax - self.zp_full)

    def scale(self) -> torch.Tensor:
        return self.base * (1 + self.factor)

    def codes(self, shift: torch.Tensor) -> torch.Tensor:
        """The stored codes (N, K) for a shift."""
        return torch.clamp(torch.round(self.start + shift), self.lo, self.hi) + self.zp_full

    def forward(self, shift: torch.Tensor) -> torch.Tensor:
        weight = _FakeQuantFn.apply(shift, self.start, self.lo, self.hi, self.scale(), self.grid)
        return cast(torch.Tensor, weight).reshape(self.shape)


@dataclass
class QuantFit:
    """A quantized layer: codes (N, K), scale (N, G), zero point (N, G) or None on `grid`, and where each
    weight lay between grid points before rounding (`offset`, position - code in [-0.5, 0.5]; None: 0).
    After `detach` they hold the trained result. The rounding shifts train in grid units (lr: steps per
    update) and the scales as factors of the given ones, at `scale_lr` times that lr."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    grid: WeightGrid
    offset: torch.Tensor | None = None
    scale_lr: float = 1.0
    _quant: _FakeQuant | None = field(default=None, init=False, repr=False)

    def attach(self, module: nn.Module) -> list[dict[str, Any]]:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        n, k = self.codes.shape
        relative = self.grid.grouped(self.codes.float())
        if self.zero_point is not None:
            relative = relative - self.zero_point.float()[..., None]
        start = relative.reshape(n, -1)[:, :k].contiguous()
        if self.offset is not None:
            start = start + self.offset.float()
        module.weight = nn.Parameter(torch.zeros(n, k))
        self._quant = _FakeQuant(self.grid, start, self.scale, self.zero_point, weight.shape)
        parametrize.register_parametrization(module, "weight", self._quant, unsafe=True)
        # The relative-MSE gradients are tiny (1e-9 on a scale factor): Adam's eps must not drown them.
        return [
            {"params": [self._shift(module)], "lr": 1.0, "eps": 1e-16},
            {"params": [self._quant.factor], "lr": self.scale_lr, "eps": 1e-16},
        ]

    @staticmethod
    def _shift(module: nn.Module) -> nn.Parameter:
        original = cast(Any, module).parametrizations.weight.original
        assert isinstance(original, nn.Parameter)
        return original

    def project(self, module: nn.Module) -> None:
        with torch.no_grad():
            self._shift(module).clamp_(-0.5, 0.5)

    def detach(self, module: nn.Module) -> None:
        quant = self._quant
        assert quant is not None
        with torch.no_grad():
            shift = self._shift(module).detach()
            scale = quant.scale().detach()
            # A scale trained through zero would flip its group's sign: keep the given one there.
            scale = torch.where(scale.abs() > 1e-8, scale, self.scale.float())
            self.codes = quant.codes(shift).to(self.grid.code_dtype)
            self.scale = scale.to(self.scale.dtype)
            final = self.grid.dequantize(self.codes, self.scale, self.zero_point).reshape(quant.shape)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight = nn.Parameter(final, requires_grad=False)
        self._quant = None


@dataclass(frozen=True)
class ReconstructionResult:
    fits: Mapping[str, LayerFit]  # by layer name, holding the trained results
    # Training loss (relative MSE to the targets): the first step, before any update, and the mean of the
    # last few steps of the last epoch (no extra forward passes are spent on measuring).
    loss_first: float
    loss_last: float


def check_reconstruct(owner: str, epochs: object, lr: object, start: str) -> None:
    """A recipe's reconstruct_epochs / reconstruct_lr; `start` names a good setting for the message."""
    if (
        not isinstance(epochs, int)
        or isinstance(epochs, bool)
        or epochs < 0
        or not isinstance(lr, (int, float))
        or isinstance(lr, bool)
        or not 0 < lr < 1
    ):
        raise RecipeError(
            f"{owner}: reconstruct_epochs={epochs!r} must be a whole number >= 0 (0: off) and "
            f"reconstruct_lr={lr!r} a number in (0, 1); {start} is a good start."
        )


ReconstructionLoss = Literal["tensor", "token"]


def _loss(out: torch.Tensor, target: torch.Tensor, kind: ReconstructionLoss) -> torch.Tensor:
    """Relative MSE of the whole output ("tensor"); "token": for (batch, tokens, features) outputs, per
    token, averaged over the tokens (other shapes: as "tensor").

    A transformer's residual stream carries a few "massive activations" (the first token of a SmolLM2
    block holds 96-98% of the hidden state's energy in blocks 12-20): a global relative MSE fits that
    one token and ignores the others. The next block and the final norm see each token RMS-normalised, so
    each token's error counts relative to its own size. Measured on SmolLM2 (ONNX Runtime perplexity):
    int4 GPTQ + reconstruction gains from "token" (with lr 2e-3 and 72 windows, 22.96 -> 22.85), but 2:4
    SparseGPT + reconstruction loses (49.29 -> 56.39): pruning half the weights disturbs the massive
    activations themselves, and fitting them matters most there.
    """
    if kind not in ("tensor", "token"):
        raise ValueError(f"reconstruction loss {kind!r} is unknown; use 'tensor' or 'token'.")
    out = out.float()
    if kind == "tensor" or out.ndim != 3 or out.shape != target.shape:
        return distill_loss(out, target, owner="reconstruction")
    target = target.float()
    energy = target.pow(2).sum(-1)
    floor = energy.mean().clamp(min=1e-12) * 1e-6  # all-zero tokens (padding) count as absolute error
    return ((out - target).pow(2).sum(-1) / (energy + floor)).mean()


_LAST_STEPS = 4  # training losses averaged for the logged "after"


def reconstruct(
    step: BlockStep,
    fits: Mapping[str, LayerFit],
    *,
    epochs: int,
    lr: float,
    owner: str = "sparsity",
    seed: int = 0,
    decay: bool = False,
    loss: ReconstructionLoss = "tensor",
    batches: int | None = None,
) -> ReconstructionResult:
    """Train each layer's fit (by layer name) inside `step.module` towards `step.targets`; the modules are
    left with plain frozen weights set to the result, which the fits hold. `decay`: the lr falls linearly
    to 0 over the run (else constant). `loss`: relative MSE of the whole output or per token (`_loss`).
    """
    assert step.targets is not None, "reconstruct needs calibrate_blockwise(..., targets=True)"
    calls = step.inputs()
    if len(calls) != len(step.targets):
        raise ValueError(f"{owner}: {len(calls)} inputs but {len(step.targets)} reconstruction targets.")
    targets = step.targets[:batches]
    calls = calls[:batches]
    start = time.perf_counter()
    frozen = [p for p in step.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups: list[dict[str, Any]] = []
    attached: list[str] = []
    was_training = step.module.training
    # Adam's second moments of tiny gradients are denormal floats, which x86 computes with ~10x slower
    # microcode (the optimizer's sqrt was 15% of the time on SmolLM2): flushed to zero while training.
    flushed = torch.set_flush_denormal(True)
    losses: list[float] = []
    try:
        for name, fit in fits.items():
            for group in fit.attach(step.layers[name]):
                groups.append({**group, "lr": lr * group["lr"]})
            attached.append(name)
        optimizer = torch.optim.Adam(groups, lr=lr, fused=True)  # one kernel per step, not one op per moment
        generator = torch.Generator().manual_seed(seed)
        total = max(epochs * len(calls), 1)
        schedule = (
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(1.0 - i / total, 0.0))
            if decay
            else None
        )
        autocast = bf16_supported()
        step.module.eval()
        with torch.enable_grad():
            for _ in range(epochs):
                for index in torch.randperm(len(calls), generator=generator).tolist():
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        out = step.forward(calls[index])
                    error = _loss(out, targets[index], loss)
                    if not torch.isfinite(error):
                        raise DataError(
                            f"{owner}: the reconstruction of '{step.name or 'the model'}' diverged (loss "
                            f"{float(error)}); lower reconstruct_lr (now {lr:g}) or set reconstruct_epochs: 0."
                        )
                    error.backward()
                    optimizer.step()
                    for name in attached:
                        fits[name].project(step.layers[name])
                    if schedule is not None:
                        schedule.step()
                    losses.append(float(error.detach()))
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        for name in attached:
            fits[name].detach(step.layers[name])
        for p in frozen:
            p.requires_grad_(True)
        step.module.train(was_training)
    first = losses[0] if losses else float("nan")
    last = sum(losses[-_LAST_STEPS:]) / max(len(losses[-_LAST_STEPS:]), 1)
    log.info(
        "%s: reconstructed '%s' in %.1f s (%d epochs%s): training loss (relative error to the unmodified "
        "block) %.4g at the first step, %.4g over the last %d",
        owner,
        step.name or "model",
        time.perf_counter() - start,
        epochs,
        ", bf16 autocast" if autocast else "",
        first,
        last,
        min(_LAST_STEPS, len(losses)),
    )
    return ReconstructionResult(fits, first, last)


__all__ = [
    "LayerFit",
    "QuantFit",
    "ReconstructionResult",
    "SparseFit",
    "bf16_supported",
    "check_reconstruct",
    "reconstruct",
]
