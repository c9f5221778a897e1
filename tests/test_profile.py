import json

import pytest
import torch
from torch import nn

from modelpress.analyse.profile import AGREEMENT, profile


def test_linear_counts():
    p = profile(nn.Linear(8, 4), (torch.randn(2, 8),))
    assert p.params == 36
    assert p.macs == 2 * 8 * 4
    assert p.bytes == 36 * 4


def test_conv_macs_and_layers(tiny):
    model, inputs = tiny
    p = profile(model, inputs)
    by_name = {layer.name: layer for layer in p.layers}
    # conv: out 8 x 8 x 8 positions x (3 * 3 * 3) per output, batch 2
    assert by_name["conv"].macs == 2 * 8 * 8 * 8 * 27
    assert by_name["fc"].macs == 2 * 8 * 4
    assert p.macs == by_name["conv"].macs + by_name["fc"].macs
    assert p.params == sum(t.numel() for t in model.parameters())
    assert by_name["conv"].output_bytes == 2 * 8 * 8 * 8 * 4
    assert p.latency_ms > 0 and all(layer.latency_ms >= 0 for layer in p.layers)
    # Peak activations: at least the largest single activation, at most everything produced.
    assert by_name["conv"].output_bytes <= p.peak_activation_bytes <= 10 * 2 * 8 * 8 * 8 * 4
    json.dumps(p.to_dict())


def test_quantized_bytes_shrink(tiny):
    from modelpress import WeightOnlyConfig, compress

    model, inputs = tiny
    before = profile(model, inputs)
    after = profile(compress(model, [WeightOnlyConfig()]), inputs)
    assert after.bytes_by_dtype["int8"] == 8 * 3 * 9 + 4 * 8
    assert after.bytes < before.bytes
    assert after.macs == before.macs
    assert any("QuantizedLayer" in layer.type for layer in after.layers)


class _SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks with a residual add: leaf modules do nearly all the work."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(h + self.block(h))


class _Block(nn.Module):
    """Pre-norm transformer block whose attention is functional code (no leaf module computes it)."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v  # (B, h, T, d/h)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class _TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])
        self.head = nn.Linear(64, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


def test_layers_add_up_to_the_whole_forward_on_a_cnn():
    torch.manual_seed(0)
    lo, hi = AGREEMENT
    before = torch.get_num_threads()
    p = profile(_SmallCNN().eval(), (torch.randn(8, 3, 16, 16),), repeats=30, threads=1)
    assert p.threads == 1 and torch.get_num_threads() == before  # pinned while timing, then restored
    assert lo <= p.layers_ms / p.latency_ms <= hi
    assert p.other_ops_ms is not None and lo <= (p.layers_ms + p.other_ops_ms) / p.latency_ms <= hi
    assert p.unattributed_ms == p.latency_ms - p.layers_ms
    assert p.latency_p10_ms <= p.latency_ms <= p.latency_p90_ms
    convs = [layer for layer in p.layers if layer.type == "Conv2d"]
    assert convs and all(0 < c.latency_p10_ms <= c.latency_ms <= c.latency_p90_ms for c in convs)
    d = p.to_dict()
    for key in ("latency_ms", "layers_ms", "unattributed_ms", "other_ops_ms", "threads", "warmup", "repeats"):
        assert key in d
    assert "latency_p90_ms" in d["layers"][0]


def test_time_outside_leaf_layers_is_measured_on_a_transformer():
    # The attention matmuls and softmax run outside every leaf: the layers alone fall short of the whole
    # forward, and the measured other-ops time makes up the difference.
    torch.manual_seed(0)
    lo, hi = AGREEMENT
    p = profile(_TinyTransformer().eval(), (torch.randint(0, 100, (4, 32)),), repeats=30, threads=1)
    assert p.other_ops_ms is not None and p.other_ops_ms > 0
    assert p.layers_ms / p.latency_ms <= hi
    assert lo <= (p.layers_ms + p.other_ops_ms) / p.latency_ms <= hi
    assert p.unattributed_ms > 0


def test_a_module_called_twice_is_timed_for_both_calls():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.fc(x)))

    p = profile(Twice().eval(), (torch.randn(4, 16),), repeats=3)
    (fc,) = p.layers
    assert fc.calls == 2 and fc.output_bytes == 2 * 4 * 16 * 4


def test_bad_timing_arguments_are_refused():
    from modelpress.errors import ModelpressError

    with pytest.raises(ModelpressError, match="threads=0"):
        profile(nn.Linear(2, 2), (torch.randn(1, 2),), threads=0)


def test_recurrent_layers_count_their_gates_macs():
    # torch's FLOP counter skips LSTM/GRU: each step, item, layer and direction runs every gate's input and
    # hidden matmul; an int8 LSTM does the same work.
    from torch import nn

    import modelpress as mp

    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True).eval()
    x = (torch.randn(3, 5, 8),)
    expected = 5 * 3 * (2 * 4 * 16 * (8 + 16) + 2 * 4 * 16 * (32 + 16))
    assert mp.profile(lstm, x).macs == expected
    gru = nn.GRU(8, 16).eval()
    assert mp.profile(gru, (torch.randn(5, 3, 8),)).macs == 5 * 3 * 3 * 16 * (8 + 16)
    small = mp.compress(nn.Sequential(lstm), [mp.WeightOnlyConfig(layers=("rnn",))])
    assert mp.profile(small, x).macs == expected
