import copy

import onnx
import pytest
import torch
import zoo
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
    # Two convs in QDQ (input and weight DQ each); the Linear reads its int8 codes in MatMulIntegerToFloat.
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 4
    assert ops.count("MatMulIntegerToFloat") == 1
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


@pytest.mark.parametrize("reduce_range", [False, True])
def test_gptq_rounding_lowers_output_error_and_exports(tmp_path, reduce_range):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 8)).eval()
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(48, 48, generator=gen)  # correlated inputs: where GPTQ's compensation pays
    data = []
    for _ in range(8):
        x = torch.randn(32, 48, generator=gen) @ base
        x[:, 5] *= 20  # an outlier feature, for SmoothQuant
        data.append(x)
    x_test = torch.randn(64, 48, generator=torch.Generator().manual_seed(4)) @ base
    errs, built = {}, {}
    for rounding in ("nearest", "gptq"):
        config = mp.StaticInt8Config(smooth_alpha=0.75, rounding=rounding, reduce_range=reduce_range)
        built[rounding] = mp.compress(model, [config], data)
        errs[rounding] = (built[rounding](x_test) - model(x_test)).pow(2).mean().item()
    assert errs["gptq"] < 0.8 * errs["nearest"]
    small = built["gptq"]
    limit = 63 if reduce_range else 127
    assert all(int(small[i].qweight.abs().max()) <= limit for i in (0, 2))
    assert small[0].scheme == "w8a8+smooth"
    path = mp.export_onnx(small, (x_test,), tmp_path / "g.onnx")
    for runtime in mp.available_runtimes():
        assert mp.check_parity(small, mp.open_session(path, runtime), [(x_test,)], min_cosine=0.999).passed


def test_gptq_rounding_on_convs_and_unknown_rounding_refused():
    model, data = _cnn()
    small = mp.compress(model, [mp.StaticInt8Config(rounding="gptq")], data)
    assert all(isinstance(small[i], QuantizedLayer) for i in (0, 2, 6))
    x = torch.randn(4, 3, 12, 12)
    assert nn.functional.cosine_similarity(small(x).flatten(), model(x).flatten(), dim=0) > 0.99
    with pytest.raises(mp.RecipeError, match="rounding='adaround' is unknown"):
        mp.load_recipe([{"type": "static_int8", "rounding": "adaround"}])


def test_export_moves_quantizers_above_maxpool(tmp_path):
    # Conv -> ReLU -> MaxPool -> Flatten -> Linear: the Linear's input quantizer is written after Flatten;
    # the exported graph has it right after the ReLU, where runtimes fuse it into the conv (exact).
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 5 * 5, 4)
    ).eval()
    data = [torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    small = mp.compress(model, [mp.StaticInt8Config()], data)
    path = mp.export_onnx(small, (data[0],), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 2
    assert {producer[q.input[0]].op_type for q in quantizers if q.input[0] in producer} == {"Relu"}
    for runtime in mp.available_runtimes():
        report = mp.check_parity(
            small, mp.open_session(path, runtime), [(d,) for d in data], min_cosine=0.9999
        )
        assert report.passed


def test_symmetric_activations_are_int8_where_the_range_goes_below_zero(tmp_path):
    model, data = _cnn()  # the first conv reads signed inputs, the others ReLU outputs
    small = mp.compress(model, [mp.StaticInt8Config(activations="symmetric")], data)
    assert small[0].input_signed and small[0].input_zero_point == 0
    assert not small[2].input_signed and small[2].input_zero_point == 0  # uint8 from 0 either way
    path = mp.export_onnx(small, (data[0],), tmp_path / "s.onnx")
    graph = onnx.load(str(path)).graph
    assert "Clip" not in {n.op_type for n in graph.node}
    zero_points = {i.name: i.data_type for i in graph.initializer}
    first_q = next(n for n in graph.node if n.op_type == "QuantizeLinear")
    assert zero_points[first_q.input[2]] == onnx.TensorProto.INT8
    for runtime in mp.available_runtimes():
        report = mp.check_parity(
            small, mp.open_session(path, runtime), [(d,) for d in data], min_cosine=0.999
        )
        assert report.passed
    with pytest.raises(mp.RecipeError, match="activations='signed' is unknown"):
        mp.load_recipe([{"type": "static_int8", "activations": "signed"}])


class _SharedInput(nn.Module):
    """q/k/v-style Linears reading one normalised tensor, and one Linear reading their product."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.q, self.k, self.v, self.o = (
            nn.Linear(32, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 32),
            nn.Linear(32, 8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return self.o(self.q(h) * self.k(h) + self.v(h))


def test_smoothing_is_shared_by_layers_reading_one_tensor(tmp_path):
    torch.manual_seed(0)
    model = _SharedInput().eval()
    gen = torch.Generator().manual_seed(5)
    data = [torch.randn(16, 32, generator=gen) * torch.linspace(0.1, 30, 32) for _ in range(4)]
    small = mp.compress(model, [mp.StaticInt8Config(smooth_alpha=0.75)], data)
    assert small.q.input_multiplier is small.k.input_multiplier is small.v.input_multiplier
    assert small.o.input_multiplier is not small.q.input_multiplier
    path = mp.export_onnx(small, (data[0],), tmp_path / "s.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Mul") == 3 and ops.count("QuantizeLinear") == 2  # q*k, and one divide per input
    for runtime in mp.available_runtimes():
        assert mp.check_parity(small, mp.open_session(path, runtime), [(d,) for d in data]).passed


@pytest.mark.parametrize("factory", ["bert_encoder", "gpt_decoder"])
def test_attention_output_smoothing_folds_into_values(tmp_path, factory):
    # BERT and a grouped-query LLaMA: the output projection's smoothing lives in V's weights, so the graph
    # has no Mul before it, and the float model still computes the same thing.
    from modelpress.graph.heads import find_attention
    from modelpress.techniques.static_int8 import StaticInt8Config, prepare

    model, example = getattr(zoo, factory)()
    names = {id(m): n for n, m in model.named_modules()}
    outs = {names[id(a.o)] for a in find_attention(model)}
    before = model(*example)
    config = StaticInt8Config(smooth_alpha=0.75, fold_batchnorm=False)
    folded = prepare(copy.deepcopy(model), config, mp.Dataset([example] * 2))
    torch.testing.assert_close(folded(*example), before, rtol=1e-4, atol=1e-5)
    values = {names[id(a.v)] for a in find_attention(model)}
    assert all(not torch.equal(folded.get_submodule(n).weight, model.get_submodule(n).weight) for n in values)

    small = mp.compress(model, "int8-static-smooth", [example] * 2)
    assert outs and all(small.get_submodule(n).input_multiplier is None for n in outs)
    path = mp.export_onnx(small, example, tmp_path / "m.onnx")
    for runtime in mp.available_runtimes():
        assert mp.check_parity(small, mp.open_session(path, runtime), [example]).passed


def test_balanced_activations_keep_lopsided_ranges_unsigned():
    layer = QuantizedLayer(nn.Linear(4, 4), input_range=None)
    layer.set_input_range(-1.0, 1.2, symmetric_up_to=1.5)  # balanced: int8 symmetric
    assert layer.input_signed and layer.input_zero_point == 0
    layer.set_input_range(-0.17, 9.0, symmetric_up_to=1.5)  # a GELU output: uint8 with a zero point
    assert not layer.input_signed and layer.input_zero_point > 0
    layer.set_input_range(-0.17, 9.0, symmetric_up_to=float("inf"))
    assert layer.input_signed
    layer.set_input_range(-1.0, 1.0)  # the default: asymmetric
    assert not layer.input_signed
