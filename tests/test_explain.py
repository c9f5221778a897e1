import torch
from torch import nn

import modelpress as mp
from modelpress.analyse.explain import explain_quantization


def test_explain_names_the_layer_that_hurts():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[2].weight[0, 0] = 40.0  # one huge weight: its per-channel scale crushes the rest of that row
    data = [torch.randn(8, 16) for _ in range(3)]
    small = mp.compress(model, [mp.StaticInt8Config()], data)
    rows = explain_quantization(model, small, [(d,) for d in data])
    assert rows[0].name == "2"
    assert rows[0].weight_sqnr_db < rows[1].weight_sqnr_db
    assert all(r.scheme == "w8a8" and r.input_range is not None for r in rows)
    # calibrated on these very inputs: only the extremes, moved by zero-point rounding, fall outside
    assert all(r.clipped_fraction is not None and r.clipped_fraction < 0.01 for r in rows)
    # unseen, wider inputs get clipped
    wide = explain_quantization(model, small, [(5 * data[0],)])
    assert max(r.clipped_fraction for r in wide) > 0.1


def _conv_bn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
    ).eval()
    with torch.no_grad():  # a BatchNorm far from identity: scale, shift and statistics of its own
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3)
        bn.weight.uniform_(0.3, 3)
        bn.bias.uniform_(-1, 1)
    return model


def test_folded_batchnorm_is_part_of_the_reference():
    # static_int8 folds the BatchNorm into the conv: the conv's row compares with the user's conv -> BN.
    model = _conv_bn()
    data = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    small = mp.compress(model, [mp.StaticInt8Config()], data)
    assert isinstance(small[1], nn.Identity)
    rows = {r.name: r for r in explain_quantization(model, small, [(d,) for d in data])}
    with torch.no_grad():
        expected = mp.ops.quant.sqnr_db(
            torch.cat([model[1](model[0](d)).reshape(-1) for d in data]),
            torch.cat([small[0](d).reshape(-1) for d in data]),
        )
        folded = (
            model[0].weight
            * (model[1].weight / (model[1].running_var + model[1].eps).sqrt())[:, None, None, None]
        )
    assert abs(rows["0"].output_sqnr_db - expected) < 1e-6
    assert rows["0"].output_sqnr_db > 35  # the conv alone as reference gave about -5 dB
    assert abs(rows["0"].weight_sqnr_db - mp.ops.quant.sqnr_db(folded, small[0].dequantized_weight())) < 0.01
    assert rows["0"].weight_sqnr_db > 40


def test_reference_is_captured_before_in_place_ops():
    # ReLU(inplace=True) rewrites the conv's output tensor after the hook saw it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 4, 3)).eval()
    small = mp.compress(model, [mp.WeightOnlyConfig()])
    rows = explain_quantization(model, small, [(torch.randn(2, 3, 10, 10),)])
    assert all(r.output_sqnr_db > 35 for r in rows)


def test_equalized_layers_compare_with_the_users_layers():
    # Cross-layer equalization rescales conv1's output channels by 1/s and conv2's input channels by s.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 1, 8)[:, None, None, None])  # channel ranges 1000x apart
    data = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    small = mp.compress(model, [mp.StaticInt8Config(equalize=True)], data)
    assert not torch.allclose(small[0].dequantized_weight(), model[0].weight, rtol=0.1)  # rescaled
    rows = {r.name: r for r in explain_quantization(model, small, [(d,) for d in data])}
    assert rows["0"].weight_sqnr_db > 30 and rows["0"].output_sqnr_db > 30
    # conv2 in the user's coordinates: its small input channels' columns come back coarser (weight), but
    # its output is better than without equalization (about 40 dB); against the rescaled layers both
    # rows read below 3 dB
    assert rows["2"].weight_sqnr_db > 20 and rows["2"].output_sqnr_db > 42


def test_smoothquant_layers_compare_with_the_unsmoothed_layers():
    # SmoothQuant divides inputs per feature and folds the attention output projection's factors into V:
    # each row is still against the user's Linear (V's row gave about -13 dB against the rescaled V).
    import zoo

    model, example = zoo.bert_encoder()
    small = mp.compress(model, "int8-static-smooth", [example] * 2)
    rows = {r.name: r for r in explain_quantization(model, small, [example])}
    value = "bert.encoder.layer.0.attention.self.value"
    output = "bert.encoder.layer.0.attention.output.dense"
    assert small.get_submodule(value).input_multiplier is not None  # smoothed, and its rows rescaled
    assert rows[value].output_sqnr_db > 30 and rows[value].weight_sqnr_db > 30
    assert rows[output].output_sqnr_db > 30 and rows[output].weight_sqnr_db > 25
    assert all(r.output_sqnr_db > 30 for r in rows.values())


def test_pruned_layers_are_left_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    small = mp.compress(
        model, [mp.StructuredPruningConfig(ratio=0.5), mp.WeightOnlyConfig()], [torch.randn(4, 16)]
    )
    rows = explain_quantization(model, small, [(torch.randn(4, 16),)])
    assert rows == []  # both Linears changed shape: no channel-by-channel counterpart


def test_gpt2_conv1d_compares_with_its_transposed_weight():
    # GPT-2's Conv1D stores (in, out); compressed, it is the nn.Linear it is, (out, in). c_proj is square,
    # where comparing the untransposed weights would not even fail on the shape.
    import zoo

    model, example = zoo.gpt2_lm()
    small = mp.compress(model, "int8-weight-only")
    rows = {r.name: r for r in explain_quantization(model, small, [example])}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"):
        assert rows[name].weight_sqnr_db > 35 and rows[name].output_sqnr_db > 35, name
