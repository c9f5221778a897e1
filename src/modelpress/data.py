"""The data contract: any iterable plus an optional transform (as NNCF's `Dataset`).

Each item, after the transform, is what the model's forward takes: a tensor or a tuple of tensors.
For evaluation with labels, items are `(inputs, target)` pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from modelpress.errors import DataError


class Dataset:
    """Wrap any re-iterable source; `transform_fn` maps a raw item to model inputs.

    >>> import torch
    >>> ds = Dataset([torch.zeros(1, 4)] * 3)
    >>> len(list(ds.take(2)))
    2
    """

    def __init__(self, source: Iterable[Any], transform_fn: Callable[[Any], Any] | None = None) -> None:
        if isinstance(source, Iterator):
            # A one-shot iterator would be empty on the second pass; keep its items.
            source = list(source)
        try:
            iter(source)
        except TypeError as exc:
            raise DataError(
                f"Data of type {type(source).__name__} is not iterable. Pass a list, a DataLoader or any "
                "iterable of model inputs."
            ) from exc
        self.source = source
        self.transform_fn = transform_fn

    def __iter__(self) -> Iterator[Any]:
        for item in self.source:
            yield _ordinary(self.transform_fn(item) if self.transform_fn is not None else item)

    def take(self, n: int) -> Iterator[Any]:
        """The first `n` items (after the transform)."""
        return itertools.islice(iter(self), n)


def _ordinary(item: Any) -> Any:
    """The item with tensors made under `torch.inference_mode()` copied to ordinary ones: calibration that
    saves tensors for backward (QAT, equalization, reconstruction) cannot use inference tensors."""
    if isinstance(item, torch.Tensor):
        return item.clone() if item.is_inference() else item
    if isinstance(item, (tuple, list)):
        return type(item)(_ordinary(x) for x in item)
    if isinstance(item, dict):
        return {k: _ordinary(v) for k, v in item.items()}
    return item


def is_pair(item: Any) -> bool:
    """Whether a data item has the (inputs, labels) shape: two elements, the labels a tensor."""
    return isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor)


def pair_inputs(item: Any) -> Any:
    """The inputs of an (inputs, labels) item; any other item as it is (its consumer names what is wrong).

    >>> pair_inputs((torch.zeros(2, 4), torch.tensor([0, 1]))).shape
    torch.Size([2, 4])
    """
    return item[0] if is_pair(item) else item


def as_dataset(data: Dataset | Iterable[Any] | None) -> Dataset | None:
    """Accept a `Dataset`, any iterable, or None."""
    if data is None or isinstance(data, Dataset):
        return data
    return Dataset(data)


def text_windows(
    text: str, tokenizer: Any, window: int = 512, max_windows: int = 128
) -> list[tuple[torch.Tensor]]:
    """Calibration items for a causal LM from plain text: consecutive `window`-token pieces of it, as
    `(input_ids,)` of shape (1, window), at most `max_windows` (GPTQ's and NNCF's usual 128 x 512 tokens).
    Text shorter than one window gives one shorter item.

    >>> class Tok:
    ...     def __call__(self, text, add_special_tokens=False): return {"input_ids": list(range(len(text)))}
    >>> [tuple(t.shape) for (t,) in text_windows("x" * 10, Tok(), window=4)]
    [(1, 4), (1, 4)]
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(
            "The calibration text has no tokens. Give a file of typical text (~250 KB: 128 x 512 tokens)."
        )
    if len(ids) < window:
        return [(torch.tensor([ids]),)]
    n = min(len(ids) // window, max_windows)
    return [(torch.tensor([ids[i * window : (i + 1) * window]]),) for i in range(n)]
