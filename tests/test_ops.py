import torch

from modelpress.ops.quant import dequantize_per_channel, qrange, quantize_symmetric, sqnr_db, symmetric_scale


def test_int8_round_trip_is_exact_on_grid_values():
    scale = torch.tensor([0.5, 0.25])
    codes = torch.tensor([[-127, 0, 5, 127], [3, -3, 100, -100]], dtype=torch.int8)
    w = codes.float() * scale[:, None]
    q = quantize_symmetric(w, scale, axis=0)
    assert torch.equal(q, codes)
    assert torch.equal(dequantize_per_channel(q, scale, axis=0), w)


def test_symmetric_scale_maps_channel_max_to_top_code():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    s = symmetric_scale(w, axis=0)
    assert torch.allclose(s, torch.tensor([2.0, 0.5]) / 127)
    q = quantize_symmetric(w, s, axis=0)
    assert q.abs().max() == 127 and q.min() >= -127


def test_error_bounded_by_half_step_and_zero_channel_safe():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[3] = 0  # a dead channel must not divide by zero
    s = symmetric_scale(w, axis=0)
    deq = dequantize_per_channel(quantize_symmetric(w, s, axis=0), s, axis=0)
    assert torch.all((deq - w).abs() <= s[:, None] / 2 + 1e-7)
    assert torch.all(deq[3] == 0)
    assert sqnr_db(w, deq) > 35


def test_axis_one_for_transposed_layouts():
    torch.manual_seed(0)
    w = torch.randn(4, 6, 3)
    s = symmetric_scale(w, axis=1)
    assert s.shape == (6,)
    deq = dequantize_per_channel(quantize_symmetric(w, s, axis=1), s, axis=1)
    assert torch.all((deq - w).abs() <= s[None, :, None] / 2 + 1e-7)


def test_qrange():
    assert qrange(8, symmetric=True) == (-127, 127)
    assert qrange(8, symmetric=False) == (-128, 127)
    assert qrange(4, symmetric=True) == (-7, 7)
