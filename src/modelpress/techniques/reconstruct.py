"""Local reconstruction: after a block's layers are pruned, train their remaining weights so that the block
gives what the unmodified model gives there.

One-shot pruning (Wanda, SparseGPT) fits each layer alone to its own input. Reconstruction then fits the
whole block, with its pruning masks fixed, on the calibration set: the block runs on the pruned model's
inputs (what it will see) and is pulled towards the unmodified model's block output (`BlockStep.targets`,
carried along the blocks beside the pruned chain), so it also absorbs what the earlier blocks got wrong.
Adam over the kept weights (gradients masked, pruned weights stay exactly zero), relative MSE, a few
epochs over the cached inputs in a seeded order. On CPUs with native bf16 matrix units the forward runs
under bf16 autocast (the weights and the loss stay fp32).

This is the "local reconstruction" of Wagner et al. 2025 (A Free Lunch in LLM Compression: Revisiting
Retraining after Pruning) at block granularity; memory is the block's weights, their Adam moments and
one item's activations.

>>> new = reconstruct(step, {"block.fc": (weight, mask)}, epochs=1, lr=1e-3)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.errors import DataError
from modelpress.techniques.blockwise import BlockStep
from modelpress.techniques.finetune import distill_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReconstructionResult:
    weights: dict[str, torch.Tensor]  # by layer name, in the module's weight shape
    # Mean relative MSE to the targets on the first few calibration inputs, before and after training.
    error_before: float
    error_after: float


def bf16_supported() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return distill_loss(out.float(), target, owner="reconstruction")  # relative MSE


_PROBE_ITEMS = 4  # inputs whose error is logged before and after


def _error(step: BlockStep, calls: list[Any], items: list[int]) -> float:
    assert step.targets is not None
    with torch.no_grad():
        return sum(float(_loss(step.forward(calls[i]), step.targets[i])) for i in items) / max(len(items), 1)


def reconstruct(
    step: BlockStep,
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    lr: float,
    owner: str = "sparsity",
    seed: int = 0,
) -> ReconstructionResult:
    """Train `layers` (name -> (pruned weight, keep-mask), both in the module's weight shape) inside
    `step.module` towards `step.targets`. The modules' weights are left set to the result.
    """
    assert step.targets is not None, "reconstruct needs calibrate_blockwise(..., targets=True)"
    calls = step.inputs()
    if len(calls) != len(step.targets):
        raise ValueError(f"{owner}: {len(calls)} inputs but {len(step.targets)} reconstruction targets.")
    start = time.perf_counter()
    frozen = [p for p in step.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    handles = []
    for name, (weight, mask) in layers.items():
        module = step.layers[name]
        param = nn.Parameter(weight.detach().float().clone() * mask)
        module.weight = param
        handles.append(param.register_hook(lambda g, m=mask: g * m))
        params.append(param)
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # one kernel per step, not one op per moment
    generator = torch.Generator().manual_seed(seed)
    autocast = bf16_supported()
    probe = list(range(min(_PROBE_ITEMS, len(calls))))
    before = _error(step, calls, probe)
    was_training = step.module.training
    step.module.eval()
    # Adam's second moments of tiny gradients are denormal floats, which x86 computes with ~10x slower
    # microcode (the optimizer's sqrt was 15% of the time on SmolLM2): flushed to zero while training.
    flushed = torch.set_flush_denormal(True)
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                for index in torch.randperm(len(calls), generator=generator).tolist():
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        out = step.forward(calls[index])
                    loss = _loss(out, step.targets[index])
                    if not torch.isfinite(loss):
                        raise DataError(
                            f"{owner}: the reconstruction of '{step.name or 'the model'}' diverged (loss "
                            f"{float(loss)}); lower reconstruct_lr (now {lr:g}) or set reconstruct_epochs: 0."
                        )
                    loss.backward()
                    optimizer.step()
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        step.module.train(was_training)
    weights = {}
    for (name, (_, mask)), param in zip(layers.items(), params, strict=True):
        weight = param.detach() * mask
        step.layers[name].weight = nn.Parameter(weight, requires_grad=False)
        weights[name] = weight
    after = _error(step, calls, probe)
    log.info(
        "%s: reconstructed '%s' in %.1f s (%d epochs%s): relative error to the unmodified block on %d calibration inputs %.4g -> %.4g",
        owner,
        step.name or "model",
        time.perf_counter() - start,
        epochs,
        ", bf16 autocast" if autocast else "",
        len(probe),
        before,
        after,
    )
    return ReconstructionResult(weights, before, after)


__all__ = ["ReconstructionResult", "bf16_supported", "reconstruct"]
