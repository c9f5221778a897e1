"""Fine-tuning loops shared by the techniques that train: QAT and the recovery step of pruning.

The model trains in eval mode (BatchNorm keeps its running statistics, dropout is off, as in deployment)
with Adam, either matching a frozen teacher's outputs (`loss="distill"`, unlabeled inputs: relative MSE of
the outputs, or `distill="kl"`: KL divergence of the softmax over the last dim, for logits) or by
cross-entropy on `(inputs, labels)` items (`loss="task"`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.data import Dataset, is_pair
from modelpress.errors import DataError, ModelpressError, RecipeError
from modelpress.loading import as_inputs
from modelpress.outputs import output_tensors

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], torch.Tensor]  # (model outputs, labels or teacher outputs) -> scalar loss
LossKind = Literal["distill", "task"]
DistillKind = Literal["mse", "kl"]

_LOG_EVERY = 50  # steps between progress lines


# What `labeled` says when a recovery (a DistillConfig that trains on labels) gets items without them.
RECOVER_LABELS = {
    "why": "recover trains on hard labels (loss: task, or alpha > 0), so it needs",
    "instead": "set recover: {loss: kl} (logits) or {loss: mse} with alpha 0: the teacher alone needs no labels",
}


def labeled(
    item: Any,
    where: str,
    *,
    owner: str,
    why: str = "loss='task' needs",
    instead: str = "use loss='distill', which needs no labels",
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(inputs, labels) of a labeled data item; a DataError saying `why` labels are needed and what to do
    `instead` when it is not one (pass `**RECOVER_LABELS` for a recovery step)."""
    if not is_pair(item):
        kind = type(item).__name__
        kind = f"{kind} of {len(item)} elements" if isinstance(item, (tuple, list)) else kind
        raise DataError(
            f"{owner}: {why} (inputs, labels) items, but {where} is a {kind}. Pass labeled data "
            f"(a transform_fn can return (inputs, labels)), or {instead}."
        )
    return as_inputs(item[0], where=where), item[1]


def _float_leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in output_tensors(out) if t.is_floating_point()]


def distill_loss(out: Any, reference: Any, *, owner: str) -> torch.Tensor:
    """Relative MSE to the teacher's outputs, summed over float outputs: 0.01 is a 20 dB signal-to-noise ratio."""
    got, want = _float_leaves(out), _float_leaves(reference)
    if not want or len(got) != len(want):
        raise DataError(
            f"{owner}: loss='distill' needs the model to return floating-point outputs (tensors, or tuples/dicts "
            "of them); this model returns none. Use loss='task' or pass a loss_fn."
        )
    terms = [
        F.mse_loss(g.float(), w.float()) / w.float().pow(2).mean().clamp(min=1e-12)
        for g, w in zip(got, want, strict=True)
    ]
    return torch.stack(terms).sum()


_KL_ROWS = 64  # rows (tokens) per chunk in `_LogitKL`: a 64 x 49152 fp32 block is 12 MB


class _LogitKL(torch.autograd.Function):
    """KL(softmax(teacher) || softmax(student)) summed over the rows of (rows, classes) logits, computed in
    chunks of rows in fp32 and saving only the two logit tensors for the backward: the plain composition
    (upcast, log_softmax, kl_div) keeps several fp32 copies of the logits, ~0.5 GB for 512 tokens of a
    49k-token vocabulary. The gradient is softmax(student) - softmax(teacher) per row."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for start in range(0, student.shape[0], _KL_ROWS):
            log_p = F.log_softmax(student[start : start + _KL_ROWS].float(), dim=-1)
            log_q = F.log_softmax(teacher[start : start + _KL_ROWS].float(), dim=-1)
            total += (log_q.exp() * (log_q - log_p)).sum()
        ctx.save_for_backward(student, teacher)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        student, teacher = ctx.saved_tensors
        out = torch.empty_like(student)
        for start in range(0, student.shape[0], _KL_ROWS):
            rows = slice(start, start + _KL_ROWS)
            diff = F.softmax(student[rows].float(), dim=-1) - F.softmax(teacher[rows].float(), dim=-1)
            out[rows] = (diff * grad).to(out.dtype)
        return out, None


def kl_loss(out: Any, reference: Any, *, owner: str) -> torch.Tensor:
    """KL(teacher || model) of the softmax over the last dim of the first float output (the logits of a
    classifier or a language model), averaged over the other positions (rows, tokens).

    For logits this is what matters downstream; relative MSE of the logits weighs the many unlikely classes
    as much as the likely ones (a pruned SmolLM2 fitted by it got worse: NOTES.md, 2026-12-03)."""
    got, want = _float_leaves(out), _float_leaves(reference)
    if not got or not want or got[0].shape != want[0].shape:
        raise DataError(
            f"{owner}: distill 'kl' compares the first floating-point outputs (logits) of the model and the "
            f"teacher, but they are {[tuple(t.shape) for t in got[:1]]} and {[tuple(t.shape) for t in want[:1]]}. "
            "Use distill 'mse' for other outputs."
        )
    classes = got[0].shape[-1] if got[0].ndim else 1
    student = got[0].reshape(-1, classes)
    total = _LogitKL.apply(student, want[0].detach().reshape(-1, classes).to(student.dtype))
    return total / student.shape[0]


def task_loss(out: Any, labels: torch.Tensor, *, owner: str) -> torch.Tensor:
    """Cross-entropy of the first float output (the logits) against class ids or class probabilities."""
    leaves = _float_leaves(out)
    if not leaves:
        raise DataError(
            f"{owner}: loss='task' needs a floating-point output (logits); this model returns none."
        )
    logits = leaves[0]
    if labels.is_floating_point() and labels.shape == logits.shape:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten(0, -2).to(logits.dtype))
    if not labels.is_floating_point() and logits.ndim == labels.ndim + 1:
        if logits.shape[:-1] == labels.shape:  # (..., classes): classifiers, language models
            return F.cross_entropy(logits.flatten(0, -2), labels.flatten().long())
        if logits.shape[:1] + logits.shape[2:] == labels.shape:  # (N, classes, ...): segmentation
            return F.cross_entropy(logits, labels.long())
    raise DataError(
        f"{owner}: loss='task' cannot pair logits of shape {tuple(logits.shape)} with labels of shape "
        f"{tuple(labels.shape)} ({labels.dtype}); labels must be class ids shaped like the logits without the "
        "class dim, or probabilities shaped like the logits. Pass a loss_fn for other targets."
    )


def check_recover(owner: str, config: Any) -> None:
    """Validate a pruning config's recovery fields (`recover`, `recover_epochs`, `recover_steps`,
    `recover_lr`, `recover_distill`), shared by sparsity, structured and depth pruning."""
    if config.recover not in ("none", "distill", "task"):
        raise RecipeError(
            f"{owner}: recover={config.recover!r} is unknown; choose 'none', 'distill' or 'task'."
        )
    if config.recover_distill not in ("mse", "kl"):
        raise RecipeError(
            f"{owner}: recover_distill={config.recover_distill!r} is unknown; choose 'mse' (any outputs) or "
            "'kl' (logits)."
        )
    epochs, steps, lr = config.recover_epochs, config.recover_steps, config.recover_lr
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise RecipeError(f"{owner}: recover_epochs={epochs} must be a whole number, at least 1.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise RecipeError(
            f"{owner}: recover_steps={steps} must be a whole number, at least 1, or null (whole epochs); use "
            "recover: none for no recovery."
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
        raise RecipeError(f"{owner}: recover_lr={lr} must be positive and below 1; 1e-4 is a start.")


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], index: int, owner: str) -> Any:
    try:
        return model(*inputs)
    except ModelpressError:
        raise
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            f"{owner}: the model fails on training item {index} of shapes [{shapes}] with {type(exc).__name__}: "
            f"{first}. Items must be model inputs, or (inputs, labels) pairs for loss='task'."
        ) from exc


def _steps(data: Dataset, epochs: int, steps: int | None, owner: str) -> Iterator[tuple[int, int, Any]]:
    """(epoch, index in epoch, item), stopping after `steps` items when set."""
    done = 0
    for epoch in range(epochs):
        seen = 0
        for index, item in enumerate(data):
            yield epoch, index, item
            seen += 1
            done += 1
            if steps is not None and done >= steps:
                return
        if seen == 0:
            raise DataError(f"{owner}: the training data is empty; pass at least one batch.")


def finetune(
    model: nn.Module,
    data: Dataset,
    param_groups: list[dict[str, Any]],
    *,
    loss: LossKind,
    epochs: int,
    steps: int | None,
    teacher: nn.Module | None,
    loss_fn: LossFn | None = None,
    owner: str,
    hint: str | None = None,
    logger: logging.Logger = log,
    distill: DistillKind = "mse",
    autocast: bool = False,
    step_in_backward: bool = False,
) -> float:
    """Train `param_groups` (Adam groups with their lr) of `model` on `data`; returns the mean loss.

    `autocast`: the forward passes (model and teacher) run under bf16 autocast, the loss in fp32.
    `step_in_backward`: each parameter has its own Adam, stepped as soon as its gradient is complete, so the
    whole model's gradients never exist at once (same updates; ~0.4 GB less for a 135M-parameter model).
    Raises `DataError` on a non-finite loss before any update (bad data), `RecipeError` when training
    diverges, ending with `hint` (default: lower the learning rates). Progress goes to `logger`.
    """
    handles: list[Any] = []
    optimizer: torch.optim.Optimizer | None = None
    if step_in_backward:
        for group in param_groups:
            for p in group["params"]:
                own = torch.optim.Adam([{**group, "params": [p]}], fused=True)
                handles.append(p.register_post_accumulate_grad_hook(partial(_step_now, own)))
    else:  # fused: one kernel per step, not one op per moment
        optimizer = torch.optim.Adam(param_groups, fused=True)
    try:
        return _train(
            model,
            data,
            optimizer,
            loss=loss,
            epochs=epochs,
            steps=steps,
            teacher=teacher,
            loss_fn=loss_fn,
            owner=owner,
            hint=hint or _hint(param_groups),
            logger=logger,
            distill=distill,
            autocast=autocast,
        )
    finally:
        for handle in handles:
            handle.remove()


def _step_now(optimizer: torch.optim.Optimizer, _param: torch.Tensor) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _hint(param_groups: list[dict[str, Any]]) -> str:
    return f"Lower the learning rate(s) (now {', '.join(str(g['lr']) for g in param_groups)})."


def _train(
    model: nn.Module,
    data: Dataset,
    optimizer: torch.optim.Optimizer | None,
    *,
    loss: LossKind,
    epochs: int,
    steps: int | None,
    teacher: nn.Module | None,
    loss_fn: LossFn | None,
    owner: str,
    hint: str,
    logger: logging.Logger,
    distill: DistillKind,
    autocast: bool,
) -> float:
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    step = 0
    running = 0.0
    every = (
        max(1, min(_LOG_EVERY, steps // 8)) if steps is not None else _LOG_EVERY
    )  # ~8 lines for short runs
    start = time.perf_counter()
    for epoch, index, item in _steps(data, epochs, steps, owner):
        if loss == "task":
            inputs, target = labeled(item, f"training item {index}", owner=owner)
        else:
            inputs = as_inputs(item, where=f"training item {index}")
            assert teacher is not None
            with torch.no_grad(), precision():
                target = teacher(*inputs)
        if any(t.numel() == 0 for t in inputs):
            raise DataError(
                f"{owner}: training item {index} (epoch {epoch + 1}) is empty (shapes "
                f"{[tuple(t.shape) for t in inputs]}); drop empty batches from the data."
            )
        with precision():
            out = _run(model, inputs, index, owner)
        if loss_fn is not None:
            value = loss_fn(out, target)
        elif loss == "task":
            value = task_loss(out, target, owner=owner)
        elif distill == "kl":
            value = kl_loss(out, target, owner=owner)
        else:
            value = distill_loss(out, target, owner=owner)
        if not torch.isfinite(value):
            if step == 0 or not all(torch.isfinite(t).all() for t in inputs if t.is_floating_point()):
                raise DataError(
                    f"{owner}: the loss is {float(value.detach())} on training item {index} (epoch {epoch + 1}) "
                    f"{'before any update' if step == 0 else 'whose inputs hold NaN or Inf'}; check the data, "
                    "the labels and the model's fp32 outputs on it."
                )
            raise RecipeError(
                f"{owner}: training diverged: the loss became {float(value.detach())} at step {step + 1} "
                f"(epoch {epoch + 1}). {hint}"
            )
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        value.backward()  # with step_in_backward, each parameter's Adam steps in here
        if optimizer is not None:
            optimizer.step()
        step += 1
        running += float(value.detach())
        if step % every == 0 or step == 1:
            log.info(
                "%s: epoch %d/%d step %d%s loss %.4g (%.0f s)",
                owner,
                epoch + 1,
                epochs,
                step,
                f"/{steps}" if steps is not None else "",
                float(value.detach()),
                time.perf_counter() - start,
            )
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    mean = running / max(step, 1)
    logger.info("%s: %d steps, mean loss %.4g", owner, step, mean)
    return mean


def recover(
    model: nn.Module,
    data: Dataset,
    *,
    loss: LossKind,
    lr: float,
    epochs: int,
    steps: int | None,
    teacher: nn.Module | None,
    owner: str,
    logger: logging.Logger = log,
    distill: DistillKind = "mse",
    autocast: bool = False,
    step_in_backward: bool = False,
) -> float:
    """The recovery step after pruning: fine-tune every trainable parameter of `model` (eval mode) by
    distillation from `teacher` (`distill`: "mse" or "kl", see `finetune`) or by the task loss; returns
    the mean loss."""
    model.eval()
    with torch.enable_grad():
        return finetune(
            model,
            data,
            [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}],
            loss=loss,
            epochs=epochs,
            steps=steps,
            teacher=teacher,
            owner=owner,
            hint=f"Lower recover_lr (now {lr}).",
            logger=logger,
            distill=distill,
            autocast=autocast,
            step_in_backward=step_in_backward,
        )


__all__ = [
    "DistillKind",
    "LossFn",
    "LossKind",
    "check_recover",
    "distill_loss",
    "finetune",
    "kl_loss",
    "labeled",
    "recover",
    "task_loss",
]
