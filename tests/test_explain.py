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
