import onnx
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.techniques.quantized import QuantizedLayer


def _cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 3, 12, 12, generator=gen) for _ in range(4)]
    return model, data


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse", "entropy"])
def test_every_observer_quantizes_close_to_fp32(observer):
    model, data = _cnn()
    small = mp.compress(model, [mp.StaticInt8Config(observer=observer)], data)
    assert all(isinstance(small[i], QuantizedLayer) and small[i].scheme == "w8a8" for i in (0, 2, 6))
    x = torch.randn(4, 3, 12, 12)
    cos = nn.functional.cosine_similarity(small(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.99


def test_export_has_qdq_on_inputs_and_matches_in_runtimes(tmp_path):
    model, data = _cnn()
    small = mp.compress(model, [mp.StaticInt8Config(observer="minmax")], data)
    path = mp.export_onnx(small, (data[0],), tmp_path / "s.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    for runtime in mp.available_runtimes():
        report = mp.check_parity(
            small, mp.open_session(path, runtime), [(d,) for d in data], min_cosine=0.999
        )
        assert report.passed


def test_needs_data_and_says_so():
    model, _ = _cnn()
    with pytest.raises(mp.DataError, match="static_int8 needs calibration data"):
        mp.compress(model, [mp.StaticInt8Config()])
    with pytest.raises(mp.DataError, match="calibration data is empty"):
        mp.compress(model, [mp.StaticInt8Config()], [])
    with pytest.raises(mp.DataError, match=r"fails on a calibration item of shapes \[\(2, 5, 12, 12\)\]"):
        mp.compress(model, [mp.StaticInt8Config()], [torch.randn(2, 5, 12, 12)])


def test_nan_activation_named():
    model, data = _cnn()
    bad = data[0].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(mp.DataError, match="input of layer '0' holds NaN or Inf"):
        mp.compress(model, [mp.StaticInt8Config()], [bad])


def test_config_validation():
    with pytest.raises(mp.RecipeError, match="observer='kl' is unknown"):
        mp.load_recipe([{"type": "static_int8", "observer": "kl"}])
    with pytest.raises(mp.RecipeError, match="calibration_batches=0 must be at least 1"):
        mp.load_recipe([{"type": "static_int8", "calibration_batches": 0}])


def test_calibration_uses_bounded_batches():
    model, data = _cnn()
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    mp.compress(model, [mp.StaticInt8Config(calibration_batches=2)], data)
    assert len(calls) == 2


def test_smoothquant_tames_outlier_features_and_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    gen = torch.Generator().manual_seed(2)
    data = []
    for _ in range(4):
        x = torch.randn(16, 32, generator=gen)
        x[:, 3] *= 60  # one outlier feature, as transformer activations have
        data.append(x)
    x_test = data[0]
    errs = {}
    for alpha in (None, 0.75):
        small = mp.compress(model, [mp.StaticInt8Config(smooth_alpha=alpha)], data)
        errs[alpha] = (small(x_test) - model(x_test)).pow(2).mean().item()
    assert errs[0.75] < errs[None] / 2
    assert small[0].scheme == "w8a8+smooth"
    path = mp.export_onnx(small, (x_test,), tmp_path / "s.onnx")
    for runtime in mp.available_runtimes():
        assert mp.check_parity(small, mp.open_session(path, runtime), [(x_test,)]).passed
