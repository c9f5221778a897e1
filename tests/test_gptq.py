import copy
import logging

import pytest
import torch
import yaml
import zoo
from torch import nn

import modelpress as mp
from modelpress.ops.gptq import (
    HessianAccumulator,
    WeightGrid,
    conv_input_rows,
    dequantize_weight,
    gptq_quantize,
    refit_scales,
)
from modelpress.techniques.blockwise import BlockStep, calibrate_blockwise, find_blocks
from modelpress.techniques.gptq import GPTQConfig, gptq
from modelpress.techniques.quantized import GroupQuantizedLinear, QuantizedLayer
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only

# ---------------------------------------------------------------------------------------------------------
# The maths on an 8x6 Linear


def _problem(k: int = 6, n: int = 8, rows: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.4 * torch.randn(k, k, generator=g)  # correlated inputs: GPTQ has work to do
    x = (torch.randn(rows, k, generator=g) * torch.linspace(0.2, 3.0, k)) @ mix
    w = torch.randn(n, k, generator=g)
    acc = HessianAccumulator(k)
    acc.update(x[: rows // 2])
    acc.update(x[rows // 2 :].reshape(2, rows // 4, k))  # any leading shape
    return x, w, acc.hessian()


def _out_err(x, w, w_hat):
    return float(((x @ (w - w_hat).T) ** 2).mean())


SCHEMES = [(8, None, True), (4, None, True), (4, 2, True), (4, 4, True), (4, 2, False), (3, 3, False)]


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), SCHEMES)
def test_refit_scales_never_raises_the_output_error(bits, group_size, symmetric):
    x, w, h = _problem(k=12)
    grid = WeightGrid(bits, group_size, symmetric)
    scale, zp = grid.params(w)
    codes = grid.quantize(w, scale, zp)
    refit = refit_scales(w, codes, scale, zp, h, group_size=group_size)
    before = _out_err(x, w, dequantize_weight(codes, scale, zp, group_size=group_size))
    after = _out_err(x, w, dequantize_weight(codes, refit, zp, group_size=group_size))
    assert after <= before + 1e-9
    assert after < before  # round-to-nearest scales are not optimal for correlated inputs


def test_refit_scales_recovers_the_scales_of_a_weight_on_the_grid():
    _, _, h = _problem(k=8)
    codes = torch.randint(-8, 8, (5, 8), dtype=torch.int8)
    true = torch.rand(5, 2) + 0.5
    w = dequantize_weight(codes, true, None, group_size=4)
    refit = refit_scales(w, codes, torch.ones(5, 2), None, h, group_size=4)
    assert torch.allclose(refit, true, atol=1e-5)


@pytest.mark.parametrize("refit", [False, True])
@pytest.mark.parametrize("clip_search", [False, True])
def test_gptq_options_keep_error_at_most_rtn(clip_search, refit):
    x, w, h = _problem(k=16)
    kwargs = {"bits": 4, "group_size": 4, "symmetric": True, "act_order": True}
    codes, scale, zp = gptq_quantize(w, h, clip_search=clip_search, refit=refit, **kwargs)
    err = _out_err(x, w, dequantize_weight(codes, scale, zp, group_size=4))
    assert err <= _out_err(x, w, WeightGrid(4, 4, True).fake_quantize(w))


def test_hessian_accumulator_is_mean_gram():
    x, _, h = _problem()
    assert torch.allclose(h, x.T @ x / len(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group_size", "symmetric"), SCHEMES)
def test_gptq_output_error_at_most_rtn(bits, group_size, symmetric, act_order):
    x, w, h = _problem()
    grid = WeightGrid(bits, group_size, symmetric)
    codes, scale, zp = gptq_quantize(
        w, h, bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order
    )
    gptq_err = _out_err(x, w, dequantize_weight(codes, scale, zp, group_size=group_size))
    rtn_err = _out_err(x, w, grid.fake_quantize(w))
    assert gptq_err <= rtn_err


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), SCHEMES)
def test_codes_round_trip_and_ranges(bits, group_size, symmetric):
    _, w, h = _problem()
    codes, scale, zp = gptq_quantize(w, h, bits=bits, group_size=group_size, symmetric=symmetric)
    n_groups = 1 if group_size is None else -(-6 // group_size)
    assert codes.shape == (8, 6) and scale.shape == (8, n_groups)
    assert codes.dtype == (torch.int8 if symmetric else torch.uint8)
    assert (zp is None) == symmetric
    if zp is not None:
        assert zp.dtype == torch.uint8 and zp.shape == scale.shape
    qmin, qmax = WeightGrid(bits, group_size, symmetric).code_range
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    # The dequantized weight lies exactly on the grid: rounding it again gives the same codes.
    grid = WeightGrid(bits, group_size, symmetric)
    w_hat = dequantize_weight(codes, scale, zp, group_size=group_size)
    zp32 = None if zp is None else zp.to(torch.int32)
    assert torch.equal(grid.quantize(w_hat, scale, zp32), codes)


def test_act_order_keeps_static_groups_in_original_order():
    _, w, h = _problem(k=8)
    h = h * torch.linspace(3.0, 0.1, 8)[:, None].sqrt() * torch.linspace(3.0, 0.1, 8)[None, :].sqrt()
    h = h.flip(0, 1)  # the most active inputs last: act_order solves them first
    codes, scale, zp = gptq_quantize(w, h, bits=4, group_size=4, symmetric=False, act_order=True)
    static_scale, static_zp = WeightGrid(4, 4, False).params(w)
    assert torch.equal(scale, static_scale) and torch.equal(zp.to(torch.int32), static_zp)
    w_hat = dequantize_weight(codes, scale, zp, group_size=4)
    # each column's values are on the grid of its own (original-order) group
    assert torch.allclose(w_hat[:, :4] / scale[:, :1], torch.round(w_hat[:, :4] / scale[:, :1]), atol=1e-4)


def test_identity_hessian_is_round_to_nearest():
    _, w, _ = _problem()
    for group_size in (None, 2):
        grid = WeightGrid(4, group_size, True)
        codes, scale, _ = gptq_quantize(w, torch.eye(6), bits=4, group_size=group_size, symmetric=True)
        s, _ = grid.params(w)
        assert torch.equal(codes, grid.quantize(w, s, None)) and torch.allclose(scale, s)


def test_lazy_blocks_change_nothing():
    _, w, h = _problem(k=16, n=32)
    a = gptq_quantize(w, h, bits=4, group_size=4, symmetric=True, block_size=1)
    b = gptq_quantize(w, h, bits=4, group_size=4, symmetric=True, block_size=128)
    assert (a[0] != b[0]).float().mean() < 0.01 and torch.allclose(a[1], b[1], rtol=1e-4)


def test_dead_inputs_keep_their_weight():
    x, w, _ = _problem()
    x[:, 2] = 0
    codes, scale, _ = gptq_quantize(w, x.T @ x / len(x), bits=8, group_size=None, symmetric=True)
    w_hat = dequantize_weight(codes, scale, None, group_size=None)
    assert torch.allclose(w_hat[:, 2], w[:, 2], atol=float(scale.max()))


def test_grouped_hessian_solves_each_group_apart():
    _, w, h = _problem()
    _, _, h2 = _problem(seed=1)
    together = gptq_quantize(w, torch.stack([h, h2]), bits=8, group_size=None, symmetric=True)
    first = gptq_quantize(w[:4], h, bits=8, group_size=None, symmetric=True)
    second = gptq_quantize(w[4:], h2, bits=8, group_size=None, symmetric=True)
    assert torch.equal(together[0], torch.cat([first[0], second[0]]))


def test_bad_inputs_are_explained():
    _, w, h = _problem()
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, h * float("nan"), bits=4, group_size=2, symmetric=True)
    with pytest.raises(ValueError, match=r"needs \(6, 6\)"):
        gptq_quantize(w, h[:5, :5], bits=4, group_size=2, symmetric=True)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(6), bits=4, group_size=2, symmetric=True, damp=0.0)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(3, 4, (3, 2), padding=(2, 0), dilation=2),
        nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"),
        nn.Conv1d(3, 4, 5, stride=2, padding=2),
    ],
)
def test_conv_rows_reproduce_the_convolution(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 11)
    explicit = None
    mode = "constant"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        explicit, mode = tuple(conv._reversed_padding_repeated_twice), conv.padding_mode
    rows = conv_input_rows(
        x,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        explicit_pad=explicit,
        pad_mode=mode,
    )
    ref = conv(x) - conv.bias.view(1, -1, *([1] * (x.ndim - 2)))
    out = rows @ conv.weight.flatten(1).T  # (B * L, out)
    assert torch.allclose(out, ref.flatten(2).transpose(1, 2).reshape(-1, 4), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Block-wise calibration


def _lm_data(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 1000, (2, 16), generator=g),) for _ in range(n)]


def _bert_data(n=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(1, 1000, (2, 16), generator=g)
        mask = torch.ones(2, 16, dtype=torch.int64)
        mask[1, 10:] = 0
        items.append((ids, mask))
    return items


def _inputs_seen(model, layers, data):
    """Each layer's inputs over a plain forward of every item."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0].clone()))
        for n in layers
    ]
    with torch.no_grad():
        for item in data:
            model(*item)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize(
    ("factory", "data", "blocks"),
    [
        (zoo.gpt_decoder, _lm_data(), ["lm.model.layers.0", "lm.model.layers.1"]),
        (zoo.bert_encoder, _bert_data(), ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
    ],
)
def test_blockwise_feeds_each_layer_its_real_inputs(factory, data, blocks, caplog):
    model, _ = factory()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert find_blocks(model, layers) == blocks
    expected = _inputs_seen(model, layers, data)
    got: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    steps: list[str] = []

    def process(step: BlockStep) -> dict[str, nn.Module]:
        steps.append(step.name)
        step.run(lambda name, x: got[name].append(x.clone()))
        return {}

    with caplog.at_level(logging.WARNING):
        calibrate_blockwise(
            model, mp.Dataset(data), layers=layers, batches=10, process=process, rerun=True, owner="t"
        )
    assert not [r for r in caplog.records if r.name.startswith("modelpress")]  # the blocks chain
    assert steps == [*blocks, ""][: len(steps)] and steps[: len(blocks)] == blocks
    for name in layers:
        assert len(got[name]) == len(expected[name]) == len(data)
        for a, b in zip(got[name], expected[name], strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def _calibrate_recording_targets(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Block-wise calibration with targets whose process only records them; the names of the steps."""
    steps: list[str] = []

    def process(step: BlockStep) -> dict[str, nn.Module]:
        steps.append(step.name)
        step.compute_targets()
        return {}

    calibrate_blockwise(
        model,
        mp.Dataset(_lm_data()),
        layers=layers,
        batches=10,
        process=process,
        rerun=True,
        owner="t",
        targets=True,
    )
    return steps


def test_blocks_after_the_last_selected_layer_are_not_run():
    model, _ = zoo.gpt_decoder()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers.0." in n}
    calls: list[str] = []
    handles = [
        model.get_submodule(b).register_forward_pre_hook(lambda *_a, b=b: calls.append(b))
        for b in ("lm.model.layers.0", "lm.model.layers.1")
    ]
    steps = _calibrate_recording_targets(model, layers)
    for h in handles:
        h.remove()
    assert steps == ["lm.model.layers.0"]
    # One forward to check the blocks chain runs both; after it, only the first block runs.
    assert calls.count("lm.model.layers.1") == 1


def test_blocks_that_do_not_chain_fall_back_to_one_pass(caplog):
    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

        def forward(self, x):
            return sum(b(x) for b in self.branches)

    torch.manual_seed(0)
    model = Parallel().eval()
    data = [torch.randn(8, 4) for _ in range(3)]
    with caplog.at_level(logging.WARNING):
        small = gptq(copy.deepcopy(model), GPTQConfig(bits=8, group_size=None), data)
    assert "does not take the output" in caplog.text
    assert all(isinstance(b, QuantizedLayer) for b in small.branches)
    assert torch.allclose(small(data[0]), model(data[0]), atol=0.05)


# ---------------------------------------------------------------------------------------------------------
# The technique


def _rel_err(model, small, inputs):
    with torch.no_grad():
        ref, out = model(*inputs), small(*inputs)
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize(
    ("factory", "data"), [(zoo.gpt_decoder, _lm_data(8)), (zoo.bert_encoder, _bert_data(8))]
)
def test_gptq_int4_is_closer_to_fp32_than_rtn(factory, data):
    model, example = factory()
    small = gptq(copy.deepcopy(model), GPTQConfig(bits=4, group_size=32), data)
    rtn = weight_only(copy.deepcopy(model), WeightOnlyConfig(bits=4, group_size=32, layers=("linear",)))
    linears = [m for m in small.modules() if isinstance(m, GroupQuantizedLinear)]
    assert linears and not any(isinstance(getattr(m, "weight", None), nn.Parameter) for m in linears)
    assert not any(type(m) is nn.Linear and hasattr(m, "weight") for m in small.modules())
    assert _rel_err(model, small, example) < _rel_err(model, rtn, example)


@pytest.mark.parametrize("factory", [zoo.resnet_cnn, zoo.inverted_residual_cnn])
def test_gptq_int8_convolutions_beat_rtn(factory):
    model, example = factory()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    small = gptq(copy.deepcopy(model), GPTQConfig(bits=8, group_size=None), data)
    rtn = weight_only(copy.deepcopy(model), WeightOnlyConfig(bits=8, layers=("linear", "conv")))
    wrapped = [m for m in small.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert wrapped and not any(isinstance(getattr(m, "weight", None), nn.Parameter) for m in wrapped)
    assert sum(isinstance(m, QuantizedLayer) for m in small.modules()) == sum(
        isinstance(m, QuantizedLayer) for m in rtn.modules()
    )
    assert _rel_err(model, small, example) < 0.5 * _rel_err(model, rtn, example)


def test_int8_per_channel_and_partial_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    data = [torch.randn(16, 48) for _ in range(4)]
    small = gptq(copy.deepcopy(model), GPTQConfig(bits=4, group_size=32), data)  # 48 = 32 + 16
    assert isinstance(small[0], GroupQuantizedLinear) and small[0].group_size == 32
    assert torch.allclose(small(data[0]), model(data[0]), atol=0.2)
    small8 = gptq(copy.deepcopy(model), GPTQConfig(bits=8, group_size=None), data)
    assert isinstance(small8[0], QuantizedLayer) and small8[0].qweight.dtype == torch.int8
    assert torch.allclose(small8(data[0]), model(data[0]), atol=0.02)


@pytest.mark.parametrize("technique", ["gptq", "awq"])
@pytest.mark.parametrize("runtime", mp.available_runtimes())
def test_int8_per_channel_asymmetric(technique, runtime, tmp_path):
    # Lopsided rows (all positive): the asymmetric grid spends all 256 codes on [0, max], half of the
    # symmetric one's step, and the artifact holds int8 codes with an int8 zero point per channel.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
    data = [torch.randn(16, 48) for _ in range(4)]
    config = {"gptq": GPTQConfig, "awq": mp.AWQConfig}[technique]
    asym = mp.compress(model, [config(bits=8, group_size=None, symmetric=False)], data)
    sym = mp.compress(model, [config(bits=8, group_size=None)], data)
    layer = asym[0]
    assert isinstance(layer, QuantizedLayer) and layer.qweight.dtype == torch.int8
    assert layer.zero_point is not None and layer.zero_point.dtype == torch.int8
    assert isinstance(asym[2], QuantizedLayer) and asym[2].zero_point is not None
    x = torch.cat(data)
    ref = model(x)
    assert (asym(x) - ref).pow(2).mean() < 0.6 * (sym(x) - ref).pow(2).mean()
    path = mp.export_onnx(asym, (data[0],), tmp_path / "m.onnx")
    assert mp.check_parity(asym, mp.open_session(path, runtime), [(data[0],)]).passed


def test_config_checks_and_yaml():
    config = GPTQConfig(bits=4, group_size=64, act_order=False, ignore=("lm_head",))
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}
    loaded = yaml.safe_load(yaml.safe_dump(fields))
    assert GPTQConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in loaded.items()}) == config
    with pytest.raises(mp.RecipeError, match="bits=4 needs a group_size"):
        GPTQConfig(bits=4, group_size=None)
    with pytest.raises(mp.RecipeError, match="power of two"):
        GPTQConfig(group_size=48)
    with pytest.raises(mp.RecipeError, match="layers="):
        GPTQConfig(layers=("embedding",))  # type: ignore[arg-type]
    with pytest.raises(mp.RecipeError, match="reconstruct_batches=0"):
        GPTQConfig(reconstruct_epochs=1, reconstruct_batches=0)


def test_errors_name_the_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.raises(mp.DataError, match="gptq needs calibration data"):
        gptq(model, GPTQConfig())
    with pytest.raises(mp.DataError, match="calibration data is empty"):
        gptq(model, GPTQConfig(), [])
    with pytest.raises(mp.DataError, match=r"fails on a calibration item of shapes \[\(2, 5\)\]"):
        gptq(model, GPTQConfig(), [torch.randn(2, 5)])
    with pytest.raises(mp.DataError, match="input of layer '0' holds NaN"):
        gptq(copy.deepcopy(model), GPTQConfig(), [torch.full((2, 32), float("nan"))])
    with pytest.raises(mp.RecipeError, match=r"targets \['decoder'\] match no module"):
        gptq(model, GPTQConfig(targets=("decoder",)), [torch.randn(2, 32)])
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[2].weight[0, 0] = float("inf")
    with pytest.raises(mp.RecipeError, match="layer '2' has NaN or Inf"):
        gptq(broken, GPTQConfig(), [torch.randn(2, 32)])


def test_unsupported_convolutions_are_rounded_to_nearest(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 3, 3)).eval()
    data = [torch.randn(2, 3, 8, 8)]
    with caplog.at_level(logging.INFO):
        small = gptq(copy.deepcopy(model), GPTQConfig(bits=8, group_size=None, targets=("0", "1")), data)
    assert "layer '1' (ConvTranspose2d) is int8 per channel, rounded to nearest" in caplog.text
    assert isinstance(small[0], QuantizedLayer) and isinstance(small[1], QuantizedLayer)
    expected = QuantizedLayer(copy.deepcopy(model[1]), bits=8)
    assert torch.equal(small[1].qweight, expected.qweight)


def test_residuals_say_where_each_code_was_rounded_from():
    _, w, h = _problem(k=8)
    residual = torch.zeros(8, 8)
    codes, _, _ = gptq_quantize(
        w, h, bits=4, group_size=4, symmetric=False, act_order=True, residual_out=residual
    )
    again, _, _ = gptq_quantize(w, h, bits=4, group_size=4, symmetric=False, act_order=True)
    assert torch.equal(codes, again)  # asking for them changes nothing
    assert residual.abs().max() <= 0.5 and residual.abs().mean() > 0.05
    with pytest.raises(ValueError, match="residual_out"):
        gptq_quantize(w, h, bits=4, group_size=4, symmetric=False, residual_out=torch.zeros(2, 2))


def test_reconstruction_after_gptq_lowers_the_held_out_error():
    model, inputs = zoo.gpt_decoder()
    data = mp.parity_inputs(inputs, count=16, seed=1)
    held_out = mp.parity_inputs(inputs, count=4, seed=7)
    base = {"bits": 4, "group_size": 32, "symmetric": False, "calibration_batches": 16}

    def error(small: nn.Module) -> float:
        return sum(_rel_err(model, small, x) for x in held_out) / len(held_out)

    plain = gptq(copy.deepcopy(model), GPTQConfig(**base), data)
    rebuilt = gptq(copy.deepcopy(model), GPTQConfig(**base, reconstruct_epochs=4, reconstruct_lr=1e-2), data)
    assert error(rebuilt) < 0.9 * error(plain)
    layers = [m for m in rebuilt.modules() if isinstance(m, GroupQuantizedLinear)]
    assert len(layers) == sum(isinstance(m, GroupQuantizedLinear) for m in plain.modules()) > 0
    assert not any(hasattr(m, "parametrizations") for m in rebuilt.modules())  # no training state left
    assert all(not p.requires_grad or p.grad is None for p in rebuilt.parameters())
    with pytest.raises(mp.RecipeError, match="reconstruct_lr"):
        GPTQConfig(reconstruct_epochs=1, reconstruct_lr=0.0)


def test_blocks_before_the_first_selected_layer_run_once_per_item():
    model, _ = zoo.gpt_decoder()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers.1." in n}
    calls: list[str] = []
    block = model.get_submodule("lm.model.layers.0")
    handle = block.register_forward_hook(lambda *_a: calls.append("0"))  # runs that complete
    _calibrate_recording_targets(model, layers)
    handle.remove()
    # The chain check runs it once; then each of the 4 items once: its output is both chains' next input.
    assert len(calls) == 1 + 4
