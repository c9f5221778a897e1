"""One evaluation contract: a *predictor* maps model inputs to outputs, whatever runs it.

`as_predictor` turns a torch model or a runtime session into one; each metric takes a predictor and an
iterable of items, so the same number is computed on the original, the compressed torch model and the
exported artifact in each runtime.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.deploy.runtime import Session
from modelpress.errors import DataError
from modelpress.loading import Inputs, as_inputs
from modelpress.outputs import output_tensors

Predictor = Callable[[Inputs], torch.Tensor]


def as_predictor(target: nn.Module | Session | Predictor) -> Predictor:
    """A function from input tensors to the first output (as a float torch tensor)."""
    if isinstance(target, nn.Module):
        model = target.eval()

        def run_torch(inputs: Inputs) -> torch.Tensor:
            with torch.no_grad():
                out = model(*inputs)
            return output_tensors(out)[0].float()

        return run_torch
    if hasattr(target, "run") and hasattr(target, "input_names"):
        session = target

        def run_session(inputs: Inputs) -> torch.Tensor:
            return torch.from_numpy(np.asarray(session.run([t.numpy() for t in inputs])[0])).float()

        return run_session
    if callable(target):
        return target
    raise DataError(f"Cannot evaluate a {type(target).__name__}; pass an nn.Module, a session or a callable.")


def _split(item: Any, metric: str) -> tuple[Inputs, torch.Tensor]:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataError(
            f"{metric} needs items of the form (inputs, target); got {type(item).__name__}. Use a transform_fn "
            "that returns (inputs, labels)."
        )
    return as_inputs(item[0], where=f"{metric} inputs"), torch.as_tensor(item[1])


def accuracy(target: nn.Module | Session | Predictor, data: Iterable[Any]) -> float:
    """Top-1 accuracy over `(inputs, labels)` items, in [0, 1]."""
    predict = as_predictor(target)
    correct = total = 0
    for item in data:
        inputs, labels = _split(item, "accuracy")
        logits = predict(inputs)
        if logits.shape[0] != labels.shape[0]:
            raise DataError(
                f"accuracy: the model gave {logits.shape[0]} predictions for {labels.shape[0]} labels; items "
                "must pair a batch of inputs with a batch of labels."
            )
        correct += int((logits.argmax(-1) == labels).sum())
        total += int(labels.numel())
    if total == 0:
        raise DataError("accuracy: the data is empty; pass at least one (inputs, labels) batch.")
    return correct / total


def perplexity(target: nn.Module | Session | Predictor, data: Iterable[Any]) -> float:
    """exp(mean next-token negative log-likelihood) over items that are token-id batches (B, T)."""
    predict = as_predictor(target)
    nll = 0.0
    count = 0
    for item in data:
        inputs = as_inputs(item, where="perplexity inputs")
        ids = inputs[0]
        logits = predict(inputs)  # (B, T, V)
        if logits.ndim != 3 or logits.shape[:2] != ids.shape[:2]:
            raise DataError(
                f"perplexity: expected logits (batch, seq, vocab) for ids {tuple(ids.shape)}, got "
                f"{tuple(logits.shape)}. The first output must be next-token logits."
            )
        vocab = logits.shape[-1]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    if count == 0:
        raise DataError("perplexity: the data holds no tokens.")
    return math.exp(nll / count)


def output_fidelity(
    target: nn.Module | Session | Predictor,
    reference: nn.Module | Session | Predictor,
    data: Iterable[Any],
    *,
    labeled: bool = False,
) -> dict[str, float]:
    """Agreement of `target` with `reference` on the first output: mean/min cosine per item, top-1 agreement.

    Items are model inputs, or `(inputs, labels)` pairs when `labeled` (the labels are ignored).
    """
    predict, ref_predict = as_predictor(target), as_predictor(reference)
    cosines: list[torch.Tensor] = []
    agree: list[torch.Tensor] = []
    for item in data:
        inputs = _split(item, "fidelity")[0] if labeled else as_inputs(item, where="fidelity inputs")
        a, b = predict(inputs), ref_predict(inputs)
        flat_a, flat_b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
        cosines.append(F.cosine_similarity(flat_a, flat_b, dim=1))
        if a.ndim >= 2 and a.shape[-1] > 1:
            agree.append((a.argmax(-1) == b.argmax(-1)).reshape(-1))
    if not cosines:
        raise DataError("fidelity: the data is empty.")
    cos = torch.cat(cosines)
    out = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if agree:
        out["top1_agreement"] = float(torch.cat(agree).float().mean())
    return out


def evaluate(
    target: nn.Module | Session | Predictor,
    data: Iterable[Any],
    metric: str | Callable[[Predictor, Iterable[Any]], float] = "accuracy",
) -> float:
    """Evaluate with a named metric ('accuracy', 'perplexity') or any callable `(predictor, data) -> float`."""
    if callable(metric):
        return float(metric(as_predictor(target), data))
    metrics: dict[str, Callable[[Any, Iterable[Any]], float]] = {
        "accuracy": accuracy,
        "perplexity": perplexity,
    }
    if metric not in metrics:
        raise DataError(f"Unknown metric '{metric}'. Choose from {sorted(metrics)} or pass a callable.")
    return metrics[metric](target, data)
