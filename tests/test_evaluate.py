import math

import pytest
import torch
from torch import nn

import modelpress as mp


def test_accuracy_same_on_torch_and_artifact(tiny, tmp_path):
    model, inputs = tiny
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)) for _ in range(3)
    ]
    path = mp.export_onnx(model, inputs, tmp_path / "m.onnx")
    acc_torch = mp.accuracy(model, data)
    assert 0 <= acc_torch <= 1
    for runtime in mp.available_runtimes():
        assert mp.accuracy(mp.open_session(path, runtime), data) == pytest.approx(acc_torch)
    # labels from the model itself give 100%
    assert mp.accuracy(model, [(x, model(x).argmax(-1)) for x, _ in data]) == 1.0


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 7)

    assert mp.perplexity(Uniform(), [torch.randint(0, 7, (2, 9))]) == pytest.approx(7.0)


def test_fidelity_and_custom_metric(tiny):
    model, inputs = tiny
    small = mp.compress(model, "int8-weight-only")
    fid = mp.output_fidelity(small, model, [inputs[0], torch.randn(3, 3, 8, 8)])
    assert fid["mean_cosine"] > 0.999 and fid["top1_agreement"] == 1.0
    assert mp.evaluate(model, [inputs], lambda predict, data: float(predict(data[0]).shape[0])) == 2.0


def test_metric_errors():
    with pytest.raises(mp.DataError, match=r"needs items of the form \(inputs, target\)"):
        mp.accuracy(nn.Linear(3, 2), [torch.randn(2, 3)])
    with pytest.raises(mp.DataError, match="the data is empty"):
        mp.accuracy(nn.Linear(3, 2), [])
    with pytest.raises(mp.DataError, match="Unknown metric 'bleu'"):
        mp.evaluate(nn.Linear(3, 2), [], "bleu")
    with pytest.raises(mp.DataError, match="2 predictions for 3 labels"):
        mp.accuracy(nn.Linear(3, 2), [(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))])
    assert math.isfinite(mp.perplexity(nn.Sequential(nn.Embedding(5, 5)), [torch.randint(0, 5, (1, 4))]))


def test_dataset_transform_and_one_shot_iterators():
    ds = mp.Dataset(iter([1, 2, 3]), transform_fn=lambda v: v * 10)
    assert list(ds) == [10, 20, 30] and list(ds) == [10, 20, 30]
    assert list(ds.take(2)) == [10, 20]
    with pytest.raises(mp.DataError, match="is not iterable"):
        mp.Dataset(5)  # type: ignore[arg-type]
