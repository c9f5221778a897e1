"""Contract tests for the tiny model zoo in ``tests/zoo.py``.

For every entry: the factory is deterministic, the forward pass is finite, and the model exports to
ONNX (dynamo exporter) with a dynamic batch dim (plus a dynamic sequence dim for token models) whose
onnxruntime outputs match torch on the example inputs and on inputs of another batch size.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim
from zoo import TOKEN_INPUT_MODELS, ZOO

ATOL = 1e-4
NEW_BATCH = 3
NEW_SEQ = 20  # token models are also re-run at another sequence length (BERT allows up to 128)

names = pytest.mark.parametrize("name", sorted(ZOO))


def _forward(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    assert isinstance(out, torch.Tensor), f"zoo models must return a plain tensor, got {type(out)}"
    return out


def _dynamic_shapes(name: str, inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Dim], ...]:
    """One dict per positional input; Dim objects are shared so all inputs agree on batch/seq."""
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=2, max=128)
    if name in TOKEN_INPUT_MODELS:
        return tuple({0: batch, 1: seq} for _ in inputs)
    return tuple({0: batch} for _ in inputs)


def _other_inputs(name: str, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Fresh inputs like ``inputs`` but with batch NEW_BATCH (and seq NEW_SEQ for token models)."""
    g = torch.Generator().manual_seed(123)
    out = []
    for t in inputs:
        shape = list(t.shape)
        shape[0] = NEW_BATCH
        if name in TOKEN_INPUT_MODELS:
            shape[1] = NEW_SEQ
        if t.is_floating_point():
            new = torch.randn(shape, generator=g, dtype=t.dtype)
        elif set(t.unique().tolist()) <= {0, 1}:
            # attention mask: right padding, a different valid length per row, row 0 unpadded
            lengths = [max(1, shape[1] - 4 * i) for i in range(shape[0])]
            new = torch.zeros(shape, dtype=t.dtype)
            for i, n in enumerate(lengths):
                new[i, :n] = 1
        else:
            new = torch.randint(int(t.min()), int(t.max()) + 1, shape, generator=g, dtype=t.dtype)
        out.append(new)
    return tuple(out)


@names
def test_factory_is_deterministic(name: str) -> None:
    m1, x1 = ZOO[name]()
    m2, x2 = ZOO[name]()
    assert not m1.training and not m2.training
    assert len(x1) == len(x2)
    for a, b in zip(x1, x2, strict=True):
        assert torch.equal(a, b)
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(_forward(m1, x1), _forward(m2, x2))


@names
def test_forward_is_finite_and_tiny(name: str) -> None:
    model, inputs = ZOO[name]()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    if name in TOKEN_INPUT_MODELS:
        assert all(t.dtype == torch.int64 and t.dim() == 2 for t in inputs)
    out = _forward(model, inputs)
    assert out.shape[0] == inputs[0].shape[0]
    assert torch.isfinite(out).all()


@names
def test_onnx_export_dynamic_matches_torch(name: str, tmp_path) -> None:
    model, inputs = ZOO[name]()
    path = tmp_path / f"{name}.onnx"
    program = torch.onnx.export(
        model,
        inputs,
        dynamo=True,
        dynamic_shapes=_dynamic_shapes(name, inputs),
        verbose=False,
    )
    program.save(str(path))

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in sess.get_inputs()]
    assert len(input_names) == len(inputs)
    # the exported graph really has a symbolic batch dim (not the example's 2)
    assert all(not isinstance(i.shape[0], int) for i in sess.get_inputs())

    for feed in (inputs, _other_inputs(name, inputs)):
        expected = _forward(model, feed).numpy()
        (got,) = sess.run(None, {n: t.numpy() for n, t in zip(input_names, feed, strict=True)})
        assert got.shape == expected.shape
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
