import json

import torch
from torch import nn

from modelpress.analyse.profile import profile


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
