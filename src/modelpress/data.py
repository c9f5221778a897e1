"""The data contract: any iterable plus an optional transform (as NNCF's `Dataset`).

Each item, after the transform, is what the model's forward takes: a tensor or a tuple of tensors.
For evaluation with labels, items are `(inputs, target)` pairs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
            yield self.transform_fn(item) if self.transform_fn is not None else item

    def take(self, n: int) -> Iterator[Any]:
        """The first `n` items (after the transform)."""
        return itertools.islice(iter(self), n)


def as_dataset(data: Dataset | Iterable[Any] | None) -> Dataset | None:
    """Accept a `Dataset`, any iterable, or None."""
    if data is None or isinstance(data, Dataset):
        return data
    return Dataset(data)
