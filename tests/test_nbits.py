"""Block-quantized n-bit weights: packing, round-to-nearest with range search, the torch ops and their
ONNX export (MatMulNBits / GatherBlockQuantized) in every installed runtime."""

import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.ops.nbits import (
    block_quantize,
    dequantize_blocks,
    gather_nbits,
    matmul_nbits,
    n_blocks,
    pack_blocks,
    unpack_blocks,
)
from modelpress.techniques.quantized import GroupQuantizedEmbedding, GroupQuantizedLinear


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [64, 40])  # 40: a partial last block
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_round_trip(bits, k, symmetric):
    g = torch.Generator().manual_seed(0)
    top = 2**bits - 1
    codes = torch.randint(0, top + 1, (6, k), generator=g, dtype=torch.int32).to(torch.uint8)
    blocks = n_blocks(k, 16)
    zp = None if symmetric else torch.randint(0, top + 1, (6, blocks), generator=g).to(torch.uint8)
    packed, zpp = pack_blocks(codes, zp, bits=bits, block_size=16)
    assert packed.shape == (6, blocks, 16 * bits // 8) and packed.dtype == torch.uint8
    u, z = unpack_blocks(packed, zpp, k=k, bits=bits, block_size=16)
    assert torch.equal(u, codes.to(torch.int32))
    assert torch.equal(z, zp.to(torch.int32) if zp is not None else torch.full((6, blocks), 2 ** (bits - 1)))


def test_block_quantize_symmetric_uses_all_codes_and_keeps_the_extreme():
    w = torch.tensor([[0.1, -0.8, 0.3, 0.05] * 4])  # one block of 16, extreme -0.8
    codes, scale, zp = block_quantize(w, bits=4, block_size=16, clip_search=False)
    assert zp is None and (codes.min() == 0 or codes.max() == 15)
    packed, _ = pack_blocks(codes, None, bits=4, block_size=16)
    deq = dequantize_blocks(packed, scale, None, k=16, bits=4, block_size=16)
    assert torch.isclose(deq[0, 1], torch.tensor(-0.8))  # the largest magnitude is exact


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_quantize_error_bound_and_clip_search(symmetric):
    w = torch.randn(32, 200, generator=torch.Generator().manual_seed(1))
    w[0, 3] = 12.0  # an outlier in one block

    def error(clip: bool) -> float:
        codes, scale, zp = block_quantize(w, bits=4, block_size=32, symmetric=symmetric, clip_search=clip)
        packed, zpp = pack_blocks(codes, zp, bits=4, block_size=32)
        deq = dequantize_blocks(packed, scale.reshape(-1), zpp, k=200, bits=4, block_size=32)
        return float((deq - w).pow(2).sum())

    assert error(True) <= error(False)
    assert error(True) / float(w.pow(2).sum()) < 0.02  # ~SQNR 17 dB at 4 bits


def test_block_quantize_rejects_bad_block():
    with pytest.raises(ValueError, match="power of two"):
        block_quantize(torch.randn(4, 48), bits=4, block_size=24)


def test_ops_match_dequantized_maths():
    torch.manual_seed(0)
    lin = nn.Linear(72, 10)  # 72 = 2 blocks of 32 + a partial one
    q = GroupQuantizedLinear.from_linear(lin, bits=4, group_size=32, symmetric=False)
    x = torch.randn(3, 5, 72)
    expected = nn.functional.linear(x, q.dequantized_weight(), q.inner.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert torch.allclose(
        matmul_nbits(x, q.packed, q.scales, q.zero_points, None, 72, 4, 32),
        x @ q.dequantized_weight().T,
        atol=1e-6,
    )
    emb = nn.Embedding(20, 64)
    qe = GroupQuantizedEmbedding(emb, bits=4, group_size=32)
    ids = torch.tensor([[1, 4], [19, 0]])
    out = gather_nbits(ids, qe.packed, qe.scales, qe.zero_points, 4, 32)
    assert out.shape == (2, 2, 64)


def test_from_codes_signed_and_unsigned_agree():
    torch.manual_seed(0)
    lin = nn.Linear(32, 4, bias=False)
    codes = torch.randint(-8, 8, (4, 32), dtype=torch.int8)
    scale = torch.rand(4, 2) + 0.1
    signed = GroupQuantizedLinear.from_codes(
        nn.Linear(32, 4, bias=False), codes=codes, scale=scale, zero_point=None, bits=4, group_size=16
    )
    unsigned = GroupQuantizedLinear.from_codes(
        lin,
        codes=codes.to(torch.int32) + 8,
        scale=scale,
        zero_point=torch.full((4, 2), 8),
        bits=4,
        group_size=16,
    )
    expected = codes.float() * scale.repeat_interleave(16, dim=1)
    assert torch.allclose(signed.dequantized_weight(), expected)
    assert torch.allclose(unsigned.dequantized_weight(), expected)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.l1 = nn.Linear(64, 96)
        self.l2 = nn.Linear(96, 40, bias=False)  # 96 columns: a partial block at group 64

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(self.emb(ids))))


@pytest.mark.parametrize("bits", [4, 8])  # 8: int8 groups (the SmolLM2 int4 rows' tied embedding / head)
@pytest.mark.parametrize("symmetric", [True, False])
def test_grouped_export_runs_in_every_runtime(tmp_path, symmetric, bits):
    import onnx

    torch.manual_seed(0)
    model = _Tiny().eval()
    small = mp.compress(model, [mp.WeightOnlyConfig(bits=bits, group_size=64, symmetric=symmetric)])
    ids = torch.randint(0, 50, (2, 7))
    path = mp.export_onnx(small, (ids,), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert "GatherBlockQuantized" in ops
    if bits == 4:
        assert ops.count("MatMulNBits") == 2
    else:  # int8 blocks: uint8 codes decompressed by Cast -> Sub -> Mul (decompress_blocks)
        assert "MatMulNBits" not in ops and "DequantizeLinear" not in ops
        codes = [
            i
            for i in graph.initializer
            if i.data_type == onnx.TensorProto.UINT8 and i.dims[1:] in ([1, 64], [2, 64])
        ]
        assert sorted(tuple(i.dims) for i in codes) == [(40, 2, 64), (96, 1, 64)]
    ratio = 4 if bits == 4 else 2.5
    assert mp.export_onnx(model, (ids,), tmp_path / "fp32.onnx").stat().st_size > ratio * path.stat().st_size
    samples = [(ids,), (torch.randint(0, 50, (1, 3)),)]
    for runtime in mp.available_runtimes():
        report = mp.check_parity(small, mp.open_session(path, runtime), samples)
        assert report.passed, (runtime, report.message)


def test_explain_covers_block_quantized_layers():
    from modelpress.analyse.explain import explain_quantization

    torch.manual_seed(0)
    model = _Tiny().eval()
    small = mp.compress(model, [mp.WeightOnlyConfig(bits=4, group_size=32)])
    rows = explain_quantization(model, small, [(torch.randint(0, 50, (2, 5)),)])
    assert {r.name for r in rows} == {"emb", "l1", "l2"}
    assert all(r.scheme == "w4g32" and 10 < r.weight_sqnr_db < 40 for r in rows)
