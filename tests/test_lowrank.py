"""Low-rank factorization: the replaced modules, rank choice, whitening, convolutions, skips, bad input,
export with parity."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.analyse.coverage import _reason
from modelpress.ops.lowrank import energy_rank, spatial_svd, spatial_weight, tucker2, tucker2_weight
from modelpress.techniques.lowrank import (
    FactorizedEmbedding,
    LowRankLinear,
    PointwiseConv2d,
    SpatialConv2d,
    Tucker2Conv2d,
    Tucker2ConvTranspose2d,
    factorize,
    lowrank,
    skip_reason,
)


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight"))


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    return mp.profile(model, (x,), repeats=1, warmup=0).macs


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.point = nn.Conv2d(64, 64, 1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.depthwise(torch.relu(self.point(x)))
        return self.head(x.mean((2, 3)))


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN().eval()


def test_linear_becomes_two_smaller_linears():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    small = lowrank(model, mp.LowRankConfig(rank=6))
    layer = small[0]
    assert isinstance(layer, LowRankLinear) and layer.rank == 6
    assert layer.first.weight.shape == (6, 64) and layer.first.bias is None
    assert layer.second.weight.shape == (48, 6) and layer.second.bias is not None
    assert _weights(layer) == 6 * (64 + 48) < 64 * 48
    assert isinstance(small[2], LowRankLinear)  # 48 -> 8 at rank 6: 336 weights, fewer than 384


def test_ratio_sets_the_share_of_weights_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128)).eval()
    small = lowrank(model, mp.LowRankConfig(ratio=0.25))
    rank = small[0].rank
    assert rank == int(0.25 * 256 * 128 / (256 + 128))
    assert _weights(small[0]) <= 0.25 * 256 * 128


def test_rank_by_energy():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40))
    v, _ = torch.linalg.qr(torch.randn(30, 30))
    values = torch.tensor([10.0, 6.0, 3.0, 1.0] + [0.01] * 26)
    weight = (u[:, :30] * values) @ v.T  # (40, 30), singular values `values`
    assert energy_rank(values, 0.95) == 3  # 100 + 36 + 9 = 145 of 146 squared
    assert energy_rank(values, 0.999) == 4
    layer = nn.Linear(30, 40)
    with torch.no_grad():
        layer.weight.copy_(weight)
    small = lowrank(nn.Sequential(layer), mp.LowRankConfig(energy=0.95))
    assert small[0].rank == 3
    x = torch.randn(16, 30)
    rel = (small(x) - layer(x)).norm() / (layer(x) - layer.bias).norm()
    assert rel < 0.15


def test_whitened_svd_has_lower_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    mixing = torch.randn(32, 32) * torch.logspace(0, -2, 32)[:, None]  # strongly anisotropic inputs

    def inputs(n: int) -> torch.Tensor:
        return torch.randn(n, 32) @ mixing

    model = nn.Sequential(nn.Linear(32, 32)).eval()
    data = [(inputs(64),) for _ in range(8)]
    x = inputs(512)
    errors = {}
    for whiten in (False, True):
        small = lowrank(copy.deepcopy(model), mp.LowRankConfig(rank=4, whiten=whiten), data)
        signal = (model(x) - model[0].bias).pow(2).sum()
        errors[whiten] = float((small(x) - model(x)).pow(2).sum().detach() / signal.detach())
    assert errors[True] < 0.5 * errors[False]


def test_whiten_and_sensitivity_need_data():
    with pytest.raises(mp.DataError, match="whiten: true needs calibration data"):
        lowrank(_cnn(), mp.LowRankConfig(whiten=True))
    with pytest.raises(mp.DataError, match="method: sensitivity needs calibration data"):
        lowrank(_cnn(), mp.LowRankConfig(method="sensitivity", ratio=0.5))
    with pytest.raises(mp.DataError, match="recover trains on data"):
        lowrank(_cnn(), mp.LowRankConfig(recover=mp.DistillConfig(loss="task")))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ratio": 0.5, "rank": 4}, "set one of ratio, energy or rank"),
        ({"ratio": 1.5}, "ratio=1.5 must be in"),
        ({"energy": 0.0}, "energy=0.0 must be in"),
        ({"rank": 0}, "rank=0 must be a whole number"),
        ({"method": "sensitivity", "energy": 0.9}, "set ratio"),
        ({"conv": "cp"}, "conv='cp' is unknown"),
        ({"layers": ("rnn",)}, "layers=\\['rnn'\\] is invalid"),
        ({"recover": {"loss": "huber"}}, "loss='huber' is unknown"),
    ],
)
def test_bad_config_is_refused(fields, message):
    with pytest.raises(mp.RecipeError, match=message):
        mp.LowRankConfig(**fields)


def test_rank_larger_than_a_layer_names_it_and_its_max_rank():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    with pytest.raises(mp.RecipeError, match=r"layer '1' \(Linear 8 -> 4\) has rank at most 4; rank=6"):
        lowrank(model, mp.LowRankConfig(rank=6))
    with pytest.raises(mp.RecipeError, match=r"targets \['nope'\] match no module"):
        lowrank(model, mp.LowRankConfig(targets=("nope",)))
    with pytest.raises(mp.RecipeError, match="do not fit Linear 16 -> 8"):
        factorize(model[0], (9,))


def test_rank_larger_than_a_conv_or_embedding_in_a_yaml_recipe_is_named_and_nothing_is_lost(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(16, 4)).eval()
    before = copy.deepcopy(model.state_dict())
    path = tmp_path / "recipe.yaml"
    path.write_text("- {type: lowrank, rank: 9, layers: [embedding]}\n")
    with pytest.raises(mp.RecipeError, match=r"layer '0' \(Embedding 50 x 8\) has rank at most 8; rank=9"):
        mp.compress(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    conv = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    for kind, most in [("tucker2", 8), ("spatial", 9)]:
        with pytest.raises(mp.RecipeError, match=rf"\(Conv2d 3 -> 8, 3x3\) has rank at most {most}; rank=50"):
            mp.compress(conv, [mp.LowRankConfig(rank=50, conv=kind, layers=("conv",))])


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(6, 8, 3, padding=1),
        nn.Conv2d(6, 8, (3, 5), stride=2, padding=(1, 2), dilation=(1, 2)),
        nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect", bias=False),
        nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"),
    ],
    ids=["plain", "strided-dilated", "same-reflect", "circular"],
)
def test_convolutions_are_exact_at_full_rank(conv):
    torch.manual_seed(0)
    conv.eval()
    x = torch.randn(2, 6, 12, 14)
    tucker = factorize(conv, (6, 8), conv="tucker2")
    spatial = factorize(conv, (min(6 * conv.kernel_size[0], 8 * conv.kernel_size[1]),), conv="spatial")
    assert isinstance(tucker, Tucker2Conv2d) and isinstance(spatial, SpatialConv2d)
    for new in (tucker, spatial):
        torch.testing.assert_close(new(x), conv(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(new.weight, conv.weight.detach(), atol=1e-5, rtol=1e-5)
    point = factorize(nn.Conv2d(6, 8, 1, stride=2), (6,))
    assert isinstance(point, PointwiseConv2d)


@pytest.mark.parametrize(
    "conv",
    [
        nn.ConvTranspose2d(6, 8, 4, stride=2, padding=1),
        nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1, dilation=2, bias=False),
    ],
    ids=["dcgan", "odd"],
)
def test_a_transposed_convolution_is_exact_at_full_rank_and_cut_by_ratio(conv):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5)
    full = factorize(conv, (6, 8))
    assert isinstance(full, Tucker2ConvTranspose2d) and isinstance(full.core, nn.ConvTranspose2d)
    torch.testing.assert_close(full(x), conv(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.weight, conv.weight, atol=1e-5, rtol=1e-5)  # (in, out, kh, kw)
    small = lowrank(nn.Sequential(copy.deepcopy(conv)), mp.LowRankConfig(ratio=0.5, layers=("conv",)))
    assert isinstance(small[0], Tucker2ConvTranspose2d)
    assert _weights(small[0]) <= 0.5 * conv.weight.numel()


def test_transposed_convolutions_left_alone_say_why():
    for conv, fields, why in [
        (nn.ConvTranspose2d(8, 8, 4, groups=2), {}, "grouped transposed convolution"),
        (nn.ConvTranspose2d(8, 8, 1), {}, "1x1 transposed convolution"),
        (nn.ConvTranspose2d(8, 8, 4), {"conv": "spatial"}, "conv: tucker2"),
        (nn.ConvTranspose2d(8, 8, 4), {"method": "sensitivity"}, "method: layer"),
    ]:
        assert why in (skip_reason(conv, mp.LowRankConfig(ratio=0.5, layers=("conv",), **fields)) or "")


def test_tucker2_and_spatial_svd_maths():
    torch.manual_seed(0)
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    reduce, core, expand = tucker2(w, 6, 8)
    torch.testing.assert_close(tucker2_weight(reduce, core, expand), w)
    vertical, horizontal = spatial_svd(w, 18)
    assert vertical.shape == (18, 6, 3, 1) and horizontal.shape == (8, 18, 1, 3)
    torch.testing.assert_close(spatial_weight(vertical, horizontal), w)
    # truncated: HOOI does at least as well as the first HOSVD step on a low-multilinear-rank kernel + noise
    low = torch.einsum("srkl,os,ri->oikl", torch.randn(3, 2, 3, 3), torch.randn(8, 3), torch.randn(2, 6))
    noisy = (low + 0.01 * torch.randn_like(low)).double()
    approx = tucker2_weight(*tucker2(noisy, 2, 3))
    assert float((approx - noisy).norm() / noisy.norm()) < 0.02


@pytest.mark.parametrize("kind", ["tucker2", "spatial"])
def test_conv_factorization_cuts_macs_and_stays_close(kind):
    model = _cnn()
    x = torch.randn(2, 3, 16, 16)
    small = lowrank(copy.deepcopy(model), mp.LowRankConfig(ratio=0.5, conv=kind, layers=("conv",)))
    assert isinstance(small.conv2, Tucker2Conv2d if kind == "tucker2" else SpatialConv2d)
    assert isinstance(small.point, PointwiseConv2d)
    assert _macs(small, x) < 0.75 * _macs(model, x)
    # at energy 1 nothing is smaller, so nothing changes; close at 0.999
    fine = lowrank(_cnn(), mp.LowRankConfig(energy=0.999, conv=kind, layers=("conv",)))
    rel = (fine(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.05


def test_layers_not_worth_factorizing_are_left_and_named(caplog):
    with caplog.at_level(logging.WARNING, logger="modelpress.techniques.lowrank"):
        small = lowrank(_cnn(), mp.LowRankConfig(rank=9, layers=("linear", "conv")))
    assert type(small.depthwise) is nn.Conv2d  # grouped: left
    assert type(small.head) is nn.Linear  # 64 -> 10 at rank 9: 666 weights, not fewer than 640
    assert isinstance(small.conv2, Tucker2Conv2d) and isinstance(small.point, PointwiseConv2d)
    assert "'depthwise': grouped convolution (groups=64" in caplog.text
    assert "'head': at rank 9 its factorized form holds 666 weights, not fewer than its 640" in caplog.text
    # the coverage report gives the same reasons
    reason = _reason("head", _cnn().head, [mp.LowRankConfig(rank=9)])
    assert "not fewer than its 640" in reason
    assert "grouped convolution" in _reason("depthwise", _cnn().depthwise, [mp.LowRankConfig(rank=9)])


def test_tied_embedding_is_left_and_untied_embedding_factorized(caplog):
    torch.manual_seed(0)

    class LM(nn.Module):
        def __init__(self, tie: bool) -> None:
            super().__init__()
            self.embed = nn.Embedding(200, 32, padding_idx=0)
            self.head = nn.Linear(32, 200, bias=False)
            if tie:
                self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    with caplog.at_level(logging.WARNING, logger="modelpress.techniques.lowrank"):
        tied = lowrank(LM(tie=True), mp.LowRankConfig(rank=8, layers=("linear", "embedding")))
    assert type(tied.embed) is nn.Embedding and type(tied.head) is nn.Linear
    assert "shared with" in caplog.text
    model = LM(tie=False).eval()
    small = lowrank(model, mp.LowRankConfig(energy=1.0, layers=("embedding",)))  # full rank 32: not smaller
    assert type(small.embed) is nn.Embedding
    small = lowrank(LM(tie=False).eval(), mp.LowRankConfig(rank=8, layers=("embedding",)))
    assert isinstance(small.embed, FactorizedEmbedding) and small.embed.padding_idx == 0
    assert small.embed.table.weight.shape == (200, 8) and small.embed.project.weight.shape == (32, 8)
    assert _weights(small.embed) == 8 * (200 + 32)
    assert torch.allclose(small.embed(torch.tensor([0])), torch.zeros(1, 32), atol=1e-5)  # padding row


def test_sensitivity_keeps_the_budget_and_cuts_the_easy_layer_most():
    torch.manual_seed(0)
    easy = nn.Linear(64, 64)  # rank 4 plus a little noise: cheap to factorize
    hard = nn.Linear(64, 64)  # full rank
    with torch.no_grad():
        easy.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8 + 0.001 * torch.randn(64, 64))
    model = nn.Sequential(easy, nn.ReLU(), hard).eval()
    data = [(torch.randn(32, 64),) for _ in range(4)]
    config = mp.LowRankConfig(method="sensitivity", ratio=0.5)
    small = lowrank(model, config, data)
    kept = sum(_weights(m) for m in (small[0], small[2]))
    assert kept <= 0.5 * 2 * 64 * 64
    assert isinstance(small[0], LowRankLinear) and small[0].rank <= 8
    hard_weights = _weights(small[2])
    assert hard_weights > _weights(small[0])


def test_recovery_trains_the_factorized_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    items = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    config = mp.LowRankConfig(rank=3, recover=mp.DistillConfig(loss="task", steps=4, lr=1e-2))
    plain = lowrank(copy.deepcopy(model), mp.LowRankConfig(rank=3))
    trained = lowrank(copy.deepcopy(model), config, items)
    assert isinstance(trained[0], LowRankLinear)
    assert not torch.equal(trained[0].first.weight, plain[0].first.weight)
    config = mp.LowRankConfig(rank=3, recover={"loss": "mse", "steps": 2, "lr": 1e-2})
    distilled = lowrank(copy.deepcopy(model), config, [(x,) for x, _ in items])
    assert not torch.equal(distilled[0].first.weight, plain[0].first.weight)


@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_factorized_models_export_with_parity(arch, tmp_path):
    torch.manual_seed(0)
    if arch == "cnn":
        model, x = _cnn(), torch.randn(2, 3, 16, 16)
        recipe = [mp.LowRankConfig(ratio=0.4, layers=("conv",))]
    else:
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 10)).eval()
        x = torch.randn(3, 64)
        recipe = [mp.LowRankConfig(ratio=0.5, whiten=True)]
    data = [(torch.randn_like(x),) for _ in range(4)]
    small = mp.compress(model, recipe, data, allow_partial=True)
    assert any(isinstance(m, (Tucker2Conv2d, LowRankLinear)) for m in small.modules())
    dense_path = mp.export_onnx(model, (x,), tmp_path / "dense.onnx", dynamic=False)
    path = mp.export_onnx(small, (x,), tmp_path / "small.onnx", dynamic=False)  # static: 1/3 of the time
    assert path.stat().st_size < dense_path.stat().st_size
    for runtime in mp.available_runtimes():
        report = mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], max_abs=1e-4)
        assert report.passed


def test_spatial_cnn_exports_with_parity(tmp_path):
    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    small = mp.compress(
        model, [mp.LowRankConfig(ratio=0.5, conv="spatial", layers=("conv",))], allow_partial=True
    )
    assert isinstance(small.conv2, SpatialConv2d)
    path = mp.export_onnx(small, (x,), tmp_path / "small.onnx", dynamic=False)
    for runtime in mp.available_runtimes():
        assert mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], max_abs=1e-4).passed


def test_a_few_colour_channels_keep_their_full_rank():
    """A generator's 3 output colours (or a first conv's 3 input ones) are not cut to rank 1: that side keeps
    its channels and the other side takes the weight budget."""
    from modelpress.ops.lowrank import tucker2_ranks

    for in_ch, out_ch, taps in ((64, 3, 16), (3, 64, 9)):
        r_in, r_out = tucker2_ranks(in_ch, out_ch, taps, 0.5)
        assert (r_out == 3) if out_ch == 3 else (r_in == 3)
        weights = in_ch * r_in + r_in * r_out * taps + r_out * out_ch
        assert 0.4 * in_ch * out_ch * taps < weights <= 0.5 * in_ch * out_ch * taps
    assert tucker2_ranks(64, 128, 9, 0.5) == (37, 74)  # wide layers: proportional, as before
