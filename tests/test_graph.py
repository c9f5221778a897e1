"""BatchNorm folding, cross-layer equalization and bias correction keep the float function."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import zoo
from torch import nn

import modelpress as mp
from modelpress.errors import GraphError
from modelpress.graph import equalize_pairs, find_pairs, fold_batchnorm
from modelpress.graph.equalize import _consumer_range, _producer_range


def _out(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


class Separable(nn.Module):
    """1x1 conv -> ReLU -> depthwise 3x3 -> LeakyReLU -> grouped 1x1 -> PReLU -> 1x1, no residual."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 8, 1)
        self.act1 = nn.ReLU()
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.act2 = nn.LeakyReLU(0.1)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.act3 = nn.PReLU(8)
        self.project = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.depthwise(self.act1(self.expand(x))))
        return self.project(self.act3(self.grouped(x)))


def _separable() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Separable().eval()
    with torch.no_grad():
        # Channel ranges spread over three orders of magnitude, as in real depthwise layers.
        model.depthwise.weight.mul_(torch.logspace(-2, 1, 8)[:, None, None, None])
    return model, torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def test_fold_batchnorm_keeps_the_output_and_removes_the_batchnorms():
    model, inputs = zoo.resnet_cnn()
    reference = _out(model, *inputs)
    folded = fold_batchnorm(model, inputs)
    assert len(folded) == 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(_out(model, *inputs), reference, atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_into_transposed_convolutions():
    model, inputs = zoo.dcgan_generator()
    reference = _out(model, *inputs)
    assert fold_batchnorm(model, inputs)
    torch.testing.assert_close(_out(model, *inputs), reference, atol=1e-5, rtol=1e-5)


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv output is used twice: folding would change the sum


def test_fold_batchnorm_leaves_a_shared_output_and_training_mode_alone():
    model = SharedOutput().eval()
    assert fold_batchnorm(model, (torch.randn(1, 3, 8, 8),)) == []
    model, inputs = zoo.resnet_cnn()
    model.train()
    assert fold_batchnorm(model, inputs) == []


def test_equalize_balances_ranges_through_relu_depthwise_and_groups():
    model, x = _separable()
    reference = _out(model, x)
    pairs = find_pairs(model, (x,))
    assert [(p.producer, p.consumer) for p in pairs] == [
        ("expand", "depthwise"),
        ("depthwise", "grouped"),
        ("grouped", "project"),
    ]
    spread_before = _producer_range(model.depthwise).max() / _producer_range(model.depthwise).min()
    equalize_pairs(model, pairs, iterations=100, tolerance=1e-6)
    torch.testing.assert_close(_out(model, x), reference, atol=1e-5, rtol=1e-4)
    modules = dict(model.named_modules())
    for pair in pairs:
        r1, r2 = _producer_range(modules[pair.producer]), _consumer_range(modules[pair.consumer])
        torch.testing.assert_close(r1, r2, rtol=1e-3, atol=1e-6)
    spread_after = _producer_range(model.depthwise).max() / _producer_range(model.depthwise).min()
    assert spread_after < spread_before / 10


def test_find_pairs_stops_at_residuals_relu6_and_ignored_layers():
    model, inputs = zoo.inverted_residual_cnn()  # ReLU6 everywhere: f(x/s) != f(x)/s
    fold_batchnorm(model, inputs)
    assert all("head" in p.consumer or "project" in p.producer for p in find_pairs(model, inputs))
    model, inputs = zoo.resnet_cnn()
    fold_batchnorm(model, inputs)
    pairs = find_pairs(model, inputs)
    # conv2's output meets the shortcut: it is never rescaled.
    assert {p.producer for p in pairs} == {"layer1.conv1", "layer2.conv1"}
    assert find_pairs(model, inputs, ignore=("layer1.conv2",)) == [
        p for p in pairs if p.consumer != "layer1.conv2"
    ]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x)  # depends on the values, not the shapes


def test_untraceable_model_names_the_problem():
    with pytest.raises(GraphError, match="torch.export cannot trace DataDependent"):
        find_pairs(DataDependent(), (torch.ones(1, 4),))


def test_static_int8_folds_by_default_and_equalize_must_trace():
    model, inputs = zoo.resnet_cnn()
    data = mp.parity_inputs(inputs, count=4, seed=1)
    small = mp.compress(model, [mp.StaticInt8Config(calibration_batches=4)], data)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in small.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the user's model is untouched
    llm, llm_inputs = zoo.gpt_decoder()  # exports fine; nothing to fold or equalize
    llm_data = mp.parity_inputs(llm_inputs, count=2, seed=1)
    mp.compress(llm, [mp.StaticInt8Config(calibration_batches=2, equalize=True)], llm_data)
    data_dependent = [(torch.ones(1, 4),), (torch.ones(1, 4),)]
    with pytest.raises(GraphError, match="static_int8 \\(equalize\\)"):
        mp.compress(
            DataDependent(), [mp.StaticInt8Config(calibration_batches=2, equalize=True)], data_dependent
        )


def test_static_int8_with_equalization_keeps_parity_and_accuracy_of_the_float_model():
    model, x = _separable()
    data = mp.parity_inputs((x,), count=8, seed=2)
    plain = mp.compress(model, [mp.StaticInt8Config(calibration_batches=8)], data)
    equalized = mp.compress(model, [mp.StaticInt8Config(calibration_batches=8, equalize=True)], data)
    reference = _out(model, x)

    def error(m: nn.Module) -> float:
        return float((_out(m, x) - reference).pow(2).mean() / reference.pow(2).mean())

    assert error(equalized) < error(plain)


def _channel_bias(
    model: nn.Module, reference: nn.Module, data: list[tuple[torch.Tensor, ...]]
) -> torch.Tensor:
    diff = torch.stack([(_out(reference, *b) - _out(model, *b)).mean(dim=(0, 2, 3)) for b in data])
    return diff.mean(0).abs()


def test_bias_correction_removes_the_mean_output_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    inputs = (torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)),)
    data = mp.parity_inputs(inputs, count=8, seed=4)
    config = mp.StaticInt8Config(calibration_batches=8, reduce_range=False)
    plain = mp.compress(model, [config], data)
    corrected = mp.compress(model, [dataclasses.replace(config, bias_correction=True)], data)
    batches = [b if isinstance(b, tuple) else (b,) for b in data]
    before, after = _channel_bias(plain, model, batches), _channel_bias(corrected, model, batches)
    assert after.mean() < 0.5 * before.mean()


# -- the channel graph (graph/channels.py) -------------------------------------------------------------


class _Gated(nn.Module):
    """A fused gate|up Linear split by chunk, an elementwise scale (NoNorm: x * w + b), a down Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(6, 16)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.shift = nn.Parameter(torch.linspace(-0.1, 0.1, 8))
        self.down = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(torch.nn.functional.silu(gate) * up * self.scale + self.shift)


def test_chunked_halves_and_elementwise_parameters_go_with_their_channels():
    from modelpress.graph.channels import ChannelGraph

    torch.manual_seed(0)
    model = _Gated().eval()
    x = torch.randn(3, 6)
    graph = ChannelGraph(model, (x,))
    groups = [g for g in graph.groups() if g.producers == ("gate_up",)]
    assert len(groups) == 8 and not any(g.frozen for g in groups)  # neuron i = gate row i + up row 8 + i
    assert all({"down", "scale", "shift"} <= set(g.consumers) for g in groups)
    with torch.no_grad():  # neurons 0, 2, 4, 6 are dead: removing them keeps the output exactly
        for rows in (slice(0, 8, 2), slice(8, 16, 2)):  # their gate and up rows
            model.gate_up.weight[rows] = 0
            model.gate_up.bias[rows] = 0
        model.shift[::2] = 0
        model.down.weight[:, ::2] = 0
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(x,)])
    assert small.gate_up.out_features == 8 and small.down.in_features == 4
    assert small.scale.shape == small.shift.shape == (4,)
    torch.testing.assert_close(_out(small, x), _out(model, x))


class _Untracked(nn.Module):
    """Hidden channels meet a tensor the graph does not follow (a table lookup) and a whole-dim reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.table = nn.Embedding(10, 8)
        self.mid = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)
        self.out2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        h = self.up(x) + self.table(ids)  # (B, T, 8): the lookup's 8 columns cannot be cut
        m = torch.relu(self.mid(x)).reshape(x.shape[0], 2, -1, 8)  # (B, 2, T/2, 8): channels stay whole
        return self.out(h) + self.out2(m.reshape(x.shape[0], -1, 8))


def test_channels_meeting_an_untracked_tensor_are_frozen_and_whole_reshapes_are_followed():
    from modelpress.graph.channels import ChannelGraph

    torch.manual_seed(0)
    x, ids = torch.randn(2, 4, 4), torch.randint(0, 10, (2, 4))
    graph = ChannelGraph(_Untracked().eval(), (x, ids))
    by = {g.producers: g for g in graph.groups()}
    assert "does not follow" in (by[("up",)].frozen or "")
    assert by[("mid",)].frozen is None and by[("mid",)].consumers == ("out2",)
