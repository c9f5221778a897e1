"""Dynamic int8: int8 weights in the artifact, activations quantized at run time, parity in each runtime."""

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.ops.dynamic import dynamic_qparams, dynamic_quant_linear
from modelpress.techniques.quantized import DynamicQuantizedLinear


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 5)
    ).eval()


def test_qparams_follow_onnx_dynamic_quantize_linear():
    scale, zp = dynamic_qparams(torch.tensor([-1.0, 0.5, 3.0]))
    assert torch.isclose(scale, torch.tensor(4.0 / 255)) and zp == 64
    scale, zp = dynamic_qparams(torch.tensor([0.5, 3.0]))  # the range always holds 0
    assert torch.isclose(scale, torch.tensor(3.0 / 255)) and zp == 0


def test_op_matches_fake_quantized_maths():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=g), torch.randn(4, 16, generator=g)
    layer = DynamicQuantizedLinear(nn.Linear(16, 4, bias=False).requires_grad_(False), bits=8)
    layer.qweight = torch.round(w / 0.02).clamp(-127, 127).to(torch.int8)
    layer.scale = torch.full((4,), 0.02)
    scale, zp = dynamic_qparams(x)
    xq = (torch.round(x / scale) + zp).clamp(0, 255)
    expected = ((xq - zp) * scale) @ (layer.qweight.float() * 0.02).T
    assert torch.allclose(dynamic_quant_linear(x, layer.qweight, layer.scale, None), expected, atol=1e-5)


def test_only_linears_are_quantized_and_stay_close():
    model = _model()
    small = mp.compress(model, [mp.DynamicInt8Config()])
    assert isinstance(small[3], DynamicQuantizedLinear) and isinstance(small[5], DynamicQuantizedLinear)
    assert type(small[0]) is nn.Conv2d
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cos = nn.functional.cosine_similarity(small(x).flatten(), model(x).flatten(), dim=0)
    assert cos > 0.999


def test_unknown_target_is_named():
    with pytest.raises(mp.RecipeError, match="nope"):
        mp.compress(_model(), [mp.DynamicInt8Config(targets=("nope",))])


def test_export_runs_integer_matmul_in_every_runtime(tmp_path):
    import onnx

    small = mp.compress(_model(), [mp.DynamicInt8Config()])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    path = mp.export_onnx(small, (x,), tmp_path / "d.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    samples = [(x,), (x[:1] * 3,)]
    for runtime in mp.available_runtimes():
        report = mp.check_parity(small, mp.open_session(path, runtime), samples)
        assert report.passed, (runtime, report.message)
