import contextlib
import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modelpress.ops.quant import (
    affine_params,
    code_range,
    dequantize,
    dequantize_grouped,
    dequantize_per_channel,
    fake_quantize,
    group_params,
    pack_int4,
    qrange,
    quantize,
    quantize_dequantize_per_tensor,
    quantize_grouped,
    quantize_symmetric,
    sqnr_db,
    symmetric_scale,
    unpack_int4,
)


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


# --- affine quantization ------------------------------------------------------------------------------


def _grid_values(scale: torch.Tensor, zero_point: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return (codes.to(torch.int32) - zero_point).float() * scale


@pytest.mark.parametrize(
    ("symmetric", "signed", "qmin", "qmax"),
    [(True, True, -127, 127), (False, False, 0, 255), (False, True, -128, 127), (True, False, 1, 255)],
)
def test_affine_params_map_the_range_onto_the_codes(symmetric, signed, qmin, qmax):
    lo, hi = torch.tensor(-1.5), torch.tensor(4.0)
    scale, zp = affine_params(lo, hi, symmetric=symmetric, signed=signed)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32 and scale.ndim == 0
    q = quantize(torch.stack([lo, hi]), scale, zp, axis=None, signed=signed)
    assert q.dtype == (torch.int8 if signed else torch.uint8)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert int(q.max()) == qmax  # hi reaches the top code
    if symmetric:
        assert torch.allclose(scale, torch.tensor(4.0 / 127))
        assert int(zp) == (0 if signed else 128)
    else:
        assert torch.allclose(scale, torch.tensor(5.5 / 255))


def test_unsigned_symmetric_is_the_signed_grid_shifted():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    s_signed, z_signed = affine_params(x.min(), x.max(), symmetric=True, signed=True)
    s_unsigned, z_unsigned = affine_params(x.min(), x.max(), symmetric=True, signed=False)
    q_signed = quantize(x, s_signed, z_signed, axis=None, signed=True)
    q_unsigned = quantize(x, s_unsigned, z_unsigned, axis=None, signed=False)
    assert torch.equal(q_unsigned.int(), q_signed.int() + 128)


@pytest.mark.parametrize(("lo", "hi"), [(-0.3, 7.1), (2.0, 5.0), (-5.0, -2.0), (-1e-3, 1e3), (-0.01, 0.0)])
@pytest.mark.parametrize("signed", [True, False])
def test_zero_is_exactly_representable_for_asymmetric_ranges(lo, hi, signed):
    scale, zp = affine_params(torch.tensor(lo), torch.tensor(hi), symmetric=False, signed=signed)
    qmin, qmax = code_range(8, signed=signed)
    assert qmin <= int(zp) <= qmax
    zero = torch.zeros(3)
    assert torch.equal(fake_quantize(zero, scale, zp, axis=None, signed=signed), zero)
    # the range is widened to contain 0, so both ends are still covered within half a step
    ends = torch.tensor([min(lo, 0.0), max(hi, 0.0)])
    err = (fake_quantize(ends, scale, zp, axis=None, signed=signed) - ends).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-5))


def test_zero_range_gets_a_tiny_positive_scale():
    for symmetric, signed in [(True, True), (False, False)]:
        scale, zp = affine_params(torch.tensor(0.0), torch.tensor(0.0), symmetric=symmetric, signed=signed)
        assert scale > 0 and torch.isfinite(scale)
        out = fake_quantize(torch.zeros(4), scale, zp, axis=None, signed=signed)
        assert torch.equal(out, torch.zeros(4))
    scale, _ = affine_params(torch.zeros(3), torch.tensor([0.0, 1.0, 2.0]), symmetric=True, signed=True)
    assert scale.shape == (3,) and torch.all(scale > 0)


def test_affine_params_reject_bad_ranges():
    with pytest.raises(ValueError, match="lo must be <= hi"):
        affine_params(torch.tensor(1.0), torch.tensor(-1.0), symmetric=False, signed=False)
    with pytest.raises(ValueError, match="finite"):
        affine_params(torch.tensor(float("-inf")), torch.tensor(1.0), symmetric=False, signed=False)
    with pytest.raises(ValueError, match="bits=1"):
        affine_params(torch.tensor(-1.0), torch.tensor(1.0), bits=1, symmetric=True, signed=True)


@pytest.mark.parametrize(("bits", "signed"), [(8, True), (8, False), (4, True), (4, False)])
def test_quantize_dequantize_round_trip_is_exact_on_grid_values(bits, signed):
    g = torch.Generator().manual_seed(0)
    qmin, qmax = code_range(bits, signed=signed)
    # per tensor
    scale, zp = torch.tensor(0.125), torch.tensor(qmin + 3, dtype=torch.int32)
    codes = torch.randint(qmin, qmax + 1, (5, 7), generator=g).to(torch.int8 if signed else torch.uint8)
    x = _grid_values(scale, zp, codes)
    q = quantize(x, scale, zp, axis=None, bits=bits, signed=signed)
    assert torch.equal(q, codes)
    assert torch.equal(dequantize(q, scale, zp, axis=None), x)
    # per channel along a middle axis
    scale = torch.tensor([0.5, 0.03, 2.0])
    zp = torch.tensor([qmin, (qmin + qmax) // 2, qmax], dtype=torch.int32)
    codes = torch.randint(qmin, qmax + 1, (2, 3, 4), generator=g).to(torch.int8 if signed else torch.uint8)
    x = (codes.to(torch.int32) - zp[None, :, None]).float() * scale[None, :, None]
    q = quantize(x, scale, zp, axis=1, bits=bits, signed=signed)
    assert torch.equal(q, codes)
    assert torch.equal(dequantize(q, scale, zp, axis=1), x)
    assert torch.equal(fake_quantize(x, scale, zp, axis=-2, bits=bits, signed=signed), x)


def test_quantize_rounds_half_to_even_and_saturates():
    scale, zp = torch.tensor(0.5), torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, 1e6, -1e6])
    q = quantize(x, scale, zp, axis=None, signed=True)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]  # ties to even, then the int8 storage range
    assert quantize(x, scale, zp, axis=None, bits=4, signed=False).tolist() == [0, 2, 2, 0, 0, 15, 0]


@pytest.mark.parametrize(
    ("bits", "symmetric", "signed"), [(8, True, True), (8, False, False), (4, False, True), (4, True, True)]
)
def test_fake_quantize_error_is_at_most_half_a_step_inside_the_range(bits, symmetric, signed):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 500, generator=g) * torch.tensor([0.01, 1.0, 3.0, 50.0, 1.0, 0.0])[:, None] + 0.3
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    scale, zp = affine_params(lo, hi, bits=bits, symmetric=symmetric, signed=signed)
    err = (fake_quantize(x, scale, zp, axis=0, bits=bits, signed=signed) - x).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5))
    s0, z0 = affine_params(x.min(), x.max(), bits=bits, symmetric=symmetric, signed=signed)
    assert torch.all(
        (fake_quantize(x, s0, z0, axis=None, bits=bits, signed=signed) - x).abs() <= s0 / 2 * (1 + 1e-5)
    )


def test_quantize_checks_parameter_shapes():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="per-channel parameters need shape"):
        quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), axis=1, signed=True)
    with pytest.raises(ValueError, match="pass axis="):
        quantize(x, torch.ones(4), torch.zeros(4, dtype=torch.int32), axis=None, signed=True)


# --- group-wise ---------------------------------------------------------------------------------------


def test_group_params_shapes_and_divisibility_error():
    w = torch.randn(8, 96)
    scale, zp = group_params(w, group_size=32, bits=4, symmetric=True)
    assert scale.shape == zp.shape == (8, 3)
    assert torch.all(zp == 0)
    with pytest.raises(ValueError, match=r"in_features=96 is not divisible by group_size=64"):
        group_params(w, group_size=64, bits=4, symmetric=True)
    with pytest.raises(ValueError, match="2-D weight"):
        group_params(torch.randn(2, 3, 4), group_size=2, symmetric=True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_grouped_round_trip_exact_on_grid_and_error_bounded(symmetric):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 128, generator=g)
    scale, zp = group_params(w, group_size=32, bits=4, symmetric=symmetric)
    q = quantize_grouped(w, scale, zp, bits=4, symmetric=symmetric)
    assert q.shape == w.shape and q.dtype == (torch.int8 if symmetric else torch.uint8)
    lo, hi = code_range(4, signed=symmetric)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    deq = dequantize_grouped(q, scale, zp)
    step = scale.repeat_interleave(32, dim=1)
    assert torch.all((deq - w).abs() <= step / 2 * (1 + 1e-5))
    # dequantized values are grid values: quantizing them again gives the same codes and values
    assert torch.equal(quantize_grouped(deq, scale, zp, bits=4, symmetric=symmetric), q)
    assert torch.equal(dequantize_grouped(q, scale, zp), deq)


def test_int4_group32_beats_per_channel_int4():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    scale, zp = group_params(w, group_size=32, bits=4, symmetric=True)
    grouped = dequantize_grouped(quantize_grouped(w, scale, zp, bits=4, symmetric=True), scale, zp)
    s_ch, z_ch = affine_params(w.amin(dim=1), w.amax(dim=1), bits=4, symmetric=True, signed=True)
    per_channel = fake_quantize(w, s_ch, z_ch, axis=0, bits=4, signed=True)
    assert sqnr_db(w, grouped) > sqnr_db(w, per_channel) + 1.0


# --- int4 packing -------------------------------------------------------------------------------------


def test_pack_int4_layout_low_nibble_first():
    q = torch.tensor([[1, 2, 15]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x0F]]  # odd length: padded with a zero code
    s = torch.tensor([-8, 7, -1, 0], dtype=torch.int8)
    assert pack_int4(s).tolist() == [0x78, 0x0F]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_pack_unpack_int4_round_trip(signed, n):
    lo, hi = (-8, 7) if signed else (0, 15)
    q = torch.randint(lo, hi + 1, (3, 2, n), generator=torch.Generator().manual_seed(n)).to(
        torch.int8 if signed else torch.uint8
    )
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, (n + 1) // 2)
    out = unpack_int4(packed, signed=signed, last_dim=n)
    assert out.dtype == q.dtype and torch.equal(out, q)


def test_pack_int4_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="last_dim"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), signed=True, last_dim=5)


# --- export-facing QDQ --------------------------------------------------------------------------------


class _QDQ(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uint8 = quantize_dequantize_per_tensor(x, 0.03125, 131, qmin=0, qmax=255, dtype=torch.uint8)
        narrow = quantize_dequantize_per_tensor(x, 0.0625, 0, qmin=-7, qmax=7, dtype=torch.int8)
        return uint8, narrow


def test_quantize_dequantize_per_tensor_matches_fake_quantize_and_clamps():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4)) * 3
    got = quantize_dequantize_per_tensor(x, 0.03125, 131, qmin=0, qmax=255, dtype=torch.uint8)
    ref = fake_quantize(x, torch.tensor(0.03125), torch.tensor(131), axis=None, signed=False)
    assert torch.equal(got, ref)
    narrow = quantize_dequantize_per_tensor(
        x, torch.tensor(0.0625), torch.tensor(0), qmin=-7, qmax=7, dtype=torch.int8
    )
    assert narrow.abs().max() == 7 * 0.0625
    with pytest.raises(ValueError, match="qmin"):
        quantize_dequantize_per_tensor(x, 0.1, 0, qmin=0, qmax=300, dtype=torch.uint8)


def test_quantize_dequantize_per_tensor_exports_to_qdq_and_matches_onnxruntime():
    model = _QDQ().eval()
    x = torch.randn(4, 257, generator=torch.Generator().manual_seed(5)) * 4
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True)
    assert program is not None
    ops = [node.op_type for node in program.model_proto.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 2
    assert "Clip" in ops  # the narrow [-7, 7] range survives export
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for got, expected in zip(outputs, model(x), strict=True):
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
