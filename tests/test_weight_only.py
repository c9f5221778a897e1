import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.techniques.quantized import QuantizedLayer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_all_kinds_quantized_and_close():
    model = _model()
    x = torch.randint(0, 50, (3, 7))
    small = mp.compress(model, [mp.WeightOnlyConfig()])
    assert all(isinstance(small[i], QuantizedLayer) for i in (0, 1, 3))
    assert small[1].qweight.dtype == torch.int8 and "weight" not in dict(small[1].inner.named_parameters())
    ref, out = model(x), small(x)
    cos = nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0)
    assert cos > 0.999
    # the user's model is untouched
    assert isinstance(model[1], nn.Linear) and model[1].weight.dtype == torch.float32


def test_targets_and_ignore():
    model = _model()
    small = mp.compress(model, [mp.WeightOnlyConfig(layers=("linear",), ignore=("3",))], allow_partial=True)
    assert isinstance(small[1], QuantizedLayer)
    assert isinstance(small[0], nn.Embedding) and isinstance(small[3], nn.Linear)
    small = mp.compress(model, [{"type": "weight_only", "targets": ["re:[13]"]}], allow_partial=True)
    assert isinstance(small[1], QuantizedLayer) and isinstance(small[3], QuantizedLayer)
    assert isinstance(small[0], nn.Embedding)


def test_unknown_target_is_named():
    with pytest.raises(mp.RecipeError, match="targets \\['decoder'\\] match no module"):
        mp.compress(_model(), [mp.WeightOnlyConfig(targets=("decoder",))])


def test_nan_weight_is_named():
    model = _model()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(mp.RecipeError, match="layer '1' has NaN or Inf"):
        mp.compress(model, [mp.WeightOnlyConfig()])


def test_conv_transpose_uses_output_axis():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3)).eval()
    small = mp.compress(model, [mp.WeightOnlyConfig()])
    assert small[0].axis == 1 and small[0].scale.shape == (6,)
    x = torch.randn(2, 4, 5, 5)
    assert (small(x) - model(x)).abs().max() < 0.05


def test_tied_weights_are_stored_once(tmp_path):
    import onnx

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(100, 16)
            self.head = nn.Linear(16, 100, bias=False)
            self.head.weight = self.embed.weight  # tied, as in most causal LMs

        def forward(self, ids):
            return self.head(self.embed(ids))

    torch.manual_seed(0)
    model = TinyLM().eval()
    small = mp.compress(model, "int8-weight-only")
    assert small.head.qweight is small.embed.qweight
    ids = torch.randint(0, 100, (2, 5))
    path = mp.export_onnx(small, (ids,), tmp_path / "lm.onnx")
    int8 = [
        i
        for i in onnx.load(str(path)).graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2 and i.dims[1] > 1
    ]  # the codes; the per-row zero points (100, 1) are bytes
    assert len(int8) == 1
    assert mp.check_parity(small, mp.open_session(path), [(ids,)]).passed


def test_compressed_layers_show_the_weight_they_compute_with():
    """Model code reads `layer.weight.dtype` (Hugging Face ViT does in forward): every compressed layer
    answers with the float weight it uses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    small = mp.compress(model, [mp.WeightOnlyConfig()])
    layer = small[0]
    assert layer.weight.dtype == torch.float32 and layer.weight.shape == (8, 16)
    torch.testing.assert_close(layer.weight, layer.dequantized_weight())
    torch.testing.assert_close(layer.weight, model[0].weight, atol=0.02, rtol=0)


def test_reuse_weights_decodes_once_and_sees_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpress.techniques.quantized import GroupQuantizedLinear, SparseLayer, reuse_weights

    torch.manual_seed(0)
    dense = nn.Linear(64, 16)
    mask = torch.rand(16, 64) > 0.5
    layers = [
        SparseLayer(nn.Linear(64, 16), mask),
        SparseLayer(nn.Linear(64, 16), mask, bits=8),
        GroupQuantizedLinear.from_linear(dense, bits=4, group_size=32, symmetric=False),
    ]
    x = torch.randn(3, 64)
    for layer in layers:
        expected = layer(x)
        builds = []
        original = type(layer).dequantized_weight
        monkeypatch.setattr(
            type(layer), "dequantized_weight", lambda self, f=original, b=builds: b.append(1) or f(self)
        )
        with reuse_weights():
            outs = [layer(x) for _ in range(3)]
            assert len(builds) == 1  # decoded once for three calls
            stored = layer.scales if isinstance(layer, GroupQuantizedLinear) else layer.scale
            stored = layer.values if stored is None else stored
            stored.mul_(2.0)  # an in-place change to a stored tensor is seen
            changed = layer(x)
            assert len(builds) == 2
            stored.div_(2.0)
        for out in outs:
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(changed, expected)
        layer(x)
        layer(x)
        if isinstance(layer, SparseLayer):  # (GroupQuantizedLinear runs matmul_nbits there)
            assert len(builds) == 4  # outside the context: rebuilt on every call
        monkeypatch.undo()


def test_export_inside_reuse_weights_keeps_the_stored_form() -> None:
    from modelpress.techniques.quantized import GroupQuantizedLinear, reuse_weights

    torch.manual_seed(0)
    layer = GroupQuantizedLinear.from_linear(nn.Linear(64, 16), bits=4, group_size=32)
    with reuse_weights():
        layer(torch.randn(2, 64))  # a cached float weight exists
        graph = torch.export.export(layer, (torch.randn(2, 64),)).graph
    assert any("matmul_nbits" in str(node.target) for node in graph.nodes)


@pytest.mark.parametrize("runtime", mp.available_runtimes())
def test_asymmetric_int8_is_finer_and_runs_in_the_runtimes(tmp_path, runtime):
    """Per-channel asymmetric int8 (NNCF's INT8_ASYM): each channel's [min, max] on all 256 codes with an
    int8 zero point. On lopsided channels it beats the symmetric grid, and the artifact agrees."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(40, 8)
            self.conv = nn.Conv1d(8, 12, 3, padding=1)
            self.up = nn.ConvTranspose1d(12, 6, 2, stride=2)
            self.fc = nn.Linear(6, 5)

        def forward(self, ids):
            h = self.conv(self.embed(ids).transpose(1, 2))
            return self.fc(self.up(h).transpose(1, 2))

    model = Net().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.abs_()  # all-positive weights: the symmetric grid wastes its negative half
    sym = mp.compress(model, [mp.WeightOnlyConfig()])
    asym = mp.compress(model, [mp.WeightOnlyConfig(symmetric=False)])
    for name in ("embed", "conv", "up", "fc"):
        layer, ref = asym.get_submodule(name), model.get_submodule(name).weight
        assert layer.scheme == "w8-asym" and layer.qweight.dtype == torch.int8
        assert layer.zero_point.dtype == torch.int8 and layer.zero_point.shape == layer.scale.shape
        err = (layer.dequantized_weight() - ref).abs().max()
        assert err < 0.6 * (sym.get_submodule(name).dequantized_weight() - ref).abs().max()
    ids = torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(asym(ids), model(ids), atol=0.02, rtol=0)
    path = mp.export_onnx(asym, (ids,), tmp_path / "asym.onnx")
    assert mp.check_parity(asym, mp.open_session(path, runtime), [(ids,)]).passed


def test_asymmetric_per_channel_needs_weight_only_int8():
    with pytest.raises(ValueError, match="symmetric=False is for int8 weight-only"):
        QuantizedLayer(nn.Linear(4, 4), bits=7, symmetric=False)
    with pytest.raises(ValueError, match="together"):
        QuantizedLayer(nn.Linear(4, 4), symmetric=False, weight_scale=torch.ones(4))
    with pytest.raises(ValueError, match="weight_zero_point needs symmetric=False"):
        QuantizedLayer(nn.Linear(4, 4), weight_zero_point=torch.zeros(4, dtype=torch.int32))
