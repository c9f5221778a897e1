"""Sparsity: masks, SparseGPT and Wanda, the bitmask storage and its ONNX artifact."""

from __future__ import annotations

import importlib

import pytest
import torch
import zoo
from torch import nn

import modelpress as mp
from modelpress.errors import DataError, RecipeError
from modelpress.ops.sparse import (
    lowest_mask,
    nm_mask,
    pack_mask,
    scatter_kept,
    sparsegpt_prune,
    unpack_mask,
    wanda_scores,
)
from modelpress.techniques.blockwise import bf16_supported
from modelpress.techniques.finetune import kl_loss
from modelpress.techniques.quantized import SparseLayer


def test_nm_and_ratio_masks_keep_exactly_what_they_say():
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(6, 4, 4).sum(-1) == 2).all()
    kept = scores.reshape(6, 4, 4).topk(2, dim=-1).values.sum()
    assert torch.isclose((scores * mask).sum(), kept)
    assert (lowest_mask(scores, 0.25, per_row=True).sum(1) == 12).all()
    assert int(lowest_mask(scores, 0.5, per_row=False).sum()) == 48
    with pytest.raises(ValueError, match="groups of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("numel", [1, 7, 8, 13, 64])
def test_bitmask_round_trip(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (numel + 7) // 8
    assert torch.equal(unpack_mask(bits, numel), mask)
    values = torch.arange(1, int(mask.sum()) + 1, dtype=torch.float32)
    dense = scatter_kept(values, mask)
    assert torch.equal(dense[mask], values) and (dense[~mask] == 0).all()


def _correlated(n: int = 512, k: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n, 4, generator=g)
    return base @ torch.randn(4, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_the_layer_output(nm):
    x = _correlated()
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    h = x.T @ x / x.shape[0]
    pruned = sparsegpt_prune(w, h, ratio=0.5, nm=nm, block_size=8)
    assert float((pruned == 0).float().mean()) == 0.5
    if nm is not None:
        assert ((pruned != 0).reshape(16, 8, 4).sum(-1) == 2).all()

    def error(v: torch.Tensor) -> float:
        return float((x @ (w - v).T).pow(2).mean())

    def masked(scores: torch.Tensor) -> torch.Tensor:
        return w * (nm_mask(scores, *nm) if nm else lowest_mask(scores, 0.5, per_row=True))

    assert error(pruned) < error(masked(wanda_scores(w, torch.diagonal(h)))) < error(masked(w.abs()))


def test_sparse_layer_stores_compactly_and_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 4)).eval()
    x = torch.randn(3, 512)
    dense_path = mp.export_onnx(model, (x,), tmp_path / "dense.onnx")
    for bits, most in ((None, 0.56), (8, 0.18)):
        small = mp.compress(model, [mp.SparsityConfig(method="magnitude", bits=bits)])
        layer = small[0]
        assert isinstance(layer, SparseLayer) and layer.scheme == ("sparse50%" + ("+w8" if bits else ""))
        weight = model[0].weight.detach()
        kept = layer.dense_weight() != 0
        assert int(kept.sum()) == weight.numel() // 2
        if bits is None:
            assert torch.equal(layer.dense_weight()[kept], weight[kept])
        path = mp.export_onnx(small, (x,), tmp_path / f"sparse{bits}.onnx")
        assert path.stat().st_size < most * dense_path.stat().st_size
        for runtime in mp.available_runtimes():
            report = mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], max_abs=1e-4)
            assert report.passed


def test_one_shot_pruning_of_a_decoder_block_by_block():
    model, inputs = zoo.gpt_decoder()
    data = mp.parity_inputs(inputs, count=4, seed=1)
    for config in (
        mp.SparsityConfig(method="sparsegpt", calibration_batches=4),
        mp.SparsityConfig(method="wanda", pattern="2:4", calibration_batches=4),
    ):
        small = mp.compress(model, [config], data)
        layers = [
            m
            for n, m in small.named_modules()
            if isinstance(m, (SparseLayer, nn.Linear)) and ".layers." in n and not n.endswith(".inner")
        ]
        assert len(layers) == 14  # q, k, v, o, gate, up, down in each of the 2 blocks
        # k and v (64 x 32) are under MIN_SPARSE_ELEMENTS: pruned, stored dense.
        assert sum(isinstance(m, SparseLayer) for m in layers) == 10
        for layer in layers:
            weight = layer.dense_weight() if isinstance(layer, SparseLayer) else layer.weight
            assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01
            if config.pattern == "2:4":
                assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all()
        with torch.no_grad():
            cosine = torch.cosine_similarity(small(*inputs).flatten(), model(*inputs).flatten(), dim=0)
        assert cosine > 0.8


def _held_out_error(model: nn.Module, small: nn.Module, held_out: list) -> float:
    """Mean relative MSE of `small`'s outputs to `model`'s over the held-out inputs."""
    with torch.no_grad():
        pairs = [(small(*x), model(*x)) for x in held_out]
    return sum(float((a - b).pow(2).mean() / b.pow(2).mean()) for a, b in pairs) / len(pairs)


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_reconstruction_recovers_the_block_outputs_on_held_out_inputs(method):
    model, inputs = zoo.gpt_decoder()
    data = mp.parity_inputs(inputs, count=16, seed=1)
    held_out = mp.parity_inputs(inputs, count=4, seed=7)
    base = {"method": method, "calibration_batches": 16}

    plain = mp.compress(model, [mp.SparsityConfig(**base)], data)
    rebuilt = mp.compress(model, [mp.SparsityConfig(**base, reconstruct_epochs=4, reconstruct_lr=3e-3)], data)
    assert _held_out_error(model, rebuilt, held_out) < 0.8 * _held_out_error(model, plain, held_out)
    for name, layer in rebuilt.named_modules():
        if isinstance(layer, SparseLayer):  # the masks are kept: same density, the pruned weights stay 0
            assert abs(layer.density - 0.5) < 0.01, name
    assert all(not p.requires_grad or p.grad is None for p in rebuilt.parameters())


def test_reconstruction_of_a_model_without_repeated_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    data = [(torch.randn(16, 32),) for _ in range(8)]
    config = {"method": "wanda", "calibration_batches": 8}
    plain = mp.compress(model, [mp.SparsityConfig(**config)], data)
    rebuilt = mp.compress(
        model, [mp.SparsityConfig(**config, reconstruct_epochs=8, reconstruct_lr=3e-3)], data
    )
    x = torch.randn(64, 32)
    with torch.no_grad():
        errors = [float((m(x) - model(x)).pow(2).mean()) for m in (plain, rebuilt)]
    assert errors[1] < 0.8 * errors[0]


def _held_out_kl(model: nn.Module, small: nn.Module, held_out: list) -> float:
    with torch.no_grad():
        return sum(float(kl_loss(small(*x), model(*x), owner="test")) for x in held_out) / len(held_out)


def test_recovery_distills_the_kept_weights_with_the_masks_fixed():
    model, inputs = zoo.gpt_decoder()
    data = mp.parity_inputs(inputs, count=16, seed=1)
    held_out = mp.parity_inputs(inputs, count=4, seed=7)
    base = {"method": "wanda", "calibration_batches": 16}
    plain = mp.compress(model, [mp.SparsityConfig(**base)], data)
    recovered = mp.compress(
        model,
        [mp.SparsityConfig(**base, recover=mp.DistillConfig(loss="kl", epochs=4, lr=3e-3))],
        data,
    )
    assert _held_out_kl(model, recovered, held_out) < 0.8 * _held_out_kl(model, plain, held_out)
    sparse = {n: m for n, m in plain.named_modules() if isinstance(m, SparseLayer)}
    assert len(sparse) == 11  # q, o, gate, up, down of each block (k and v are small) and the LM head
    for name, layer in recovered.named_modules():
        if isinstance(layer, SparseLayer):  # the same masks, new kept values
            assert torch.equal(layer.bitmask, sparse[name].bitmask), name
            assert not torch.equal(layer.values, sparse[name].values), name
    assert all(p.grad is None for p in recovered.parameters())


def test_the_teacher_is_the_unpruned_model_also_with_int8_values(monkeypatch):
    sparsity_module = importlib.import_module(
        "modelpress.techniques.sparsity"
    )  # the package exports the function

    model, inputs = zoo.gpt_decoder()
    data = mp.parity_inputs(inputs, count=4, seed=1)
    seen = []

    def check(pruned, teacher, _data, _config, **_kw):  # runs where the recovery would train
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_supported()):
            seen.append((teacher(*inputs).float(), model(*inputs).float(), pruned(*inputs).float()))
        # only the kept values train (Adam's moments cover them, not the dense tensors)
        trained = [p for p in pruned.parameters() if p.requires_grad]
        kept = [m.values for m in pruned.modules() if isinstance(m, sparsity_module._KeptValues)]
        assert kept and {id(p) for p in trained} == {id(v) for v in kept}
        return 0.0

    monkeypatch.setattr(sparsity_module, "train", check)
    for bits in (None, 8):  # int8: k and v are too small to store sparse (no float weight to swap)
        config = mp.SparsityConfig(method="wanda", calibration_batches=4, bits=bits, recover={})
        mp.compress(model, [config], data)
        teacher, unpruned, pruned = seen[-1]
        torch.testing.assert_close(teacher, unpruned)
        assert not torch.allclose(pruned, unpruned, atol=1e-3)


def test_task_recovery_trains_on_labeled_items():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    xs = [torch.randn(32, 64) for _ in range(12)]
    with torch.no_grad():
        data = [(x, model(x).argmax(-1)) for x in xs]  # the dense model's labels: the task it solves
    config = {"method": "magnitude", "ratio": 0.7}
    plain = mp.compress(model, [mp.SparsityConfig(**config)], data)
    recovered = mp.compress(
        model, [mp.SparsityConfig(**config, recover={"loss": "task", "epochs": 5, "lr": 3e-3})], data
    )
    x = torch.randn(256, 64)
    with torch.no_grad():
        labels = model(x).argmax(-1)
        accuracy = [float((m(x).argmax(-1) == labels).float().mean()) for m in (plain, recovered)]
    assert accuracy[1] > accuracy[0] + 0.02
    assert abs(float((recovered[0].dense_weight() == 0).float().mean()) - 0.7) < 0.01


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_sensitivity_allocation_keeps_each_blocks_ratio_and_lowers_the_error(method):
    model, inputs = zoo.gpt_decoder()
    data = mp.parity_inputs(inputs, count=8, seed=1)
    held_out = mp.parity_inputs(inputs, count=4, seed=7)
    base = {"method": method, "calibration_batches": 8}

    uniform = mp.compress(model, [mp.SparsityConfig(**base)], data)
    spread = mp.compress(model, [mp.SparsityConfig(**base, allocation="sensitivity")], data)
    for block in ("layers.0.", "layers.1."):
        weights = [
            (m.dense_weight() if isinstance(m, SparseLayer) else m.weight)
            for n, m in spread.named_modules()
            if block in n and isinstance(m, (SparseLayer, nn.Linear)) and not n.endswith(".inner")
        ]
        zeros = [float((w == 0).float().mean()) for w in weights]
        assert len(zeros) == 7
        assert all(0.15 - 0.01 <= z <= 0.85 + 0.01 for z in zeros)  # ratio +- allocation_range
        assert max(zeros) - min(zeros) > 0.05  # the layers differ
        pruned = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert abs(pruned - 0.5) < 0.01  # the block's total is kept
    assert _held_out_error(model, spread, held_out) < _held_out_error(model, uniform, held_out)


def test_global_magnitude_ranks_layers_together():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        model[2].weight.mul_(10.0)  # the second layer's weights are all larger
    small = mp.compress(model, [mp.SparsityConfig(method="magnitude", scope="global", ratio=0.5)])
    zeros = [float((m.dense_weight() == 0).float().mean()) for m in small if isinstance(m, SparseLayer)]
    assert zeros[0] > 0.8 and zeros[1] < 0.2
    assert abs((zeros[0] + zeros[1]) / 2 - 0.5) < 0.01  # equal sizes: the overall ratio is kept


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ratio": 1.0}, "must be in \\[0, 1\\)"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "2:4", "ratio": 0.5}, "leave ratio unset"),
        ({"method": "wanda", "scope": "global"}, "method: magnitude"),
        ({"method": "prune"}, "unknown"),
        ({"reconstruct_epochs": -1}, "reconstruct_epochs"),
        ({"reconstruct_epochs": 1.5}, "whole number"),
        ({"reconstruct_lr": 2.0}, "reconstruct_lr"),
        ({"reconstruct_epochs": 1, "method": "magnitude", "scope": "global"}, "scope: layer"),
        ({"allocation": "owl"}, "allocation="),
        ({"allocation": "sensitivity", "method": "magnitude"}, "wanda or sparsegpt"),
        ({"allocation": "sensitivity", "pattern": "2:4"}, "pattern: unstructured"),
        ({"allocation": "sensitivity", "ratio": 0.9}, "allocation_range"),
        ({"allocation": "sensitivity", "allocation_range": "wide"}, "allocation_range"),
        ({"recover": "distill"}, r"recover: \{loss: mse\}"),
        ({"recover": {"loss": "l2"}}, "recover: distill: loss='l2'"),
        ({"recover": {"epochs": 0}}, "epochs=0"),
        ({"recover": {"steps": 0}}, "steps=0"),
        ({"recover": {"lr": 0.0}}, "lr=0.0"),
        ({"recover": {"recover_lr": 0.1}}, r"recover has no field\(s\) \['recover_lr'\]"),
    ],
)
def test_bad_configs_say_what_to_change(fields, message):
    with pytest.raises(RecipeError, match=message):
        mp.SparsityConfig(**fields)


def test_data_methods_need_data_and_the_model_is_untouched():
    model, _ = zoo.gpt_decoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="method: magnitude"):
        mp.compress(model, [mp.SparsityConfig(method="wanda")])
    with pytest.raises(DataError, match="reconstruct_epochs needs calibration data"):
        mp.compress(model, [mp.SparsityConfig(method="magnitude", reconstruct_epochs=1)])
    with pytest.raises(DataError, match="recover trains on data"):
        mp.compress(model, [mp.SparsityConfig(method="magnitude", recover={})])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
