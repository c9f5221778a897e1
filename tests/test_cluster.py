"""Weight sharing (`cluster`): k-means, index packing, the stored layer, its export, composition, errors."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.deploy.integer import integer_kernels
from modelpress.ops.cluster import (
    _RowSearch,
    index_bits,
    kmeans,
    pack_indices,
    packed_bytes,
    quantize_codebook,
    unpack_indices,
)
from modelpress.ops.quant import quantize_symmetric, symmetric_scale
from modelpress.techniques.cluster import (
    ClusteredInt8Layer,
    ClusteredLayer,
    cluster,
    decode_clustered_int8,
)
from modelpress.techniques.quantized import QuantizedLayer, SparseLayer


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 48)).eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 256),
    ).eval()


def test_kmeans_finds_separated_clusters_deterministically():
    centres = torch.tensor([-3.0, -1.0, 0.5, 2.0])
    x = centres[torch.randint(0, 4, (2, 400), generator=_gen(1))] + 0.01 * torch.randn(
        2, 400, generator=_gen(2)
    )
    c1, i1 = kmeans(x, 4)
    c2, i2 = kmeans(x, 4)
    assert torch.equal(c1, c2) and torch.equal(i1, i2)
    assert torch.allclose(c1.sort(dim=1).values, centres.expand(2, 4), atol=0.01)
    assert (c1.gather(1, i1) - x).abs().max() < 0.05  # every value on its own cluster's centre


def test_the_row_search_counts_as_searchsorted_even_outside_a_row():
    xs = torch.randn(5, 300, generator=_gen()).sort(dim=1).values
    xs[3] = 0.25  # a row of one value repeated
    queries = torch.randn(5, 15, generator=_gen(1))
    queries[0, 0], queries[1, 1], queries[2, 2], queries[3, 3] = 100.0, -100.0, xs[2, 7], 0.25
    rows = torch.tensor([4, 0, 2, 3, 1])
    assert torch.equal(_RowSearch(xs)(rows, queries), torch.searchsorted(xs[rows], queries))


def _least_squares(values: list[float], k: int) -> float:
    """The optimal k-means cost of `values` by trying every split into k runs of the sorted values."""
    import itertools

    v = sorted(values)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        runs = [v[a:b] for a, b in zip((0, *cuts), (*cuts, len(v)), strict=True)]
        best = min(best, sum(sum((x - sum(r) / len(r)) ** 2 for x in r) for r in runs))
    return best


def test_optimal_kmeans_finds_the_least_squares_codebook():
    x = torch.randn(6, 12, generator=_gen(3)) * torch.tensor([[1.0], [0.1], [5.0], [1.0], [2.0], [0.5]])
    c, i = kmeans(x, 3, method="optimal")
    cost = ((x - c.gather(1, i)) ** 2).sum(dim=1)
    for row, got in zip(x, cost, strict=True):
        assert float(got) == pytest.approx(_least_squares(row.tolist(), 3), rel=1e-5)
    lloyd, j = kmeans(x, 3)
    assert bool((cost <= ((x - lloyd.gather(1, j)) ** 2).sum(dim=1) + 1e-6).all())
    w = torch.ones_like(x)
    w[:, :4] = 0  # weightless points leave the centroids alone
    c2, _ = kmeans(x, 3, weights=w, method="optimal")
    for row, got in zip(x, c2, strict=True):
        expected, _ = kmeans(row[None, 4:], 3, method="optimal")
        torch.testing.assert_close(got, expected[0])
    with pytest.raises(ValueError, match="at most 2048"):
        kmeans(torch.randn(1, 3000), 4, method="optimal")


def test_optimal_codebooks_in_a_layer_and_too_large_a_group_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 8)).eval()
    lloyd = cluster(copy.deepcopy(model), mp.ClusterConfig(values=16, per="rows", columns=128))[0]
    optimal = cluster(
        copy.deepcopy(model), mp.ClusterConfig(values=16, per="rows", columns=128, method="optimal")
    )[0]
    w = model[0].weight.detach()
    assert (optimal.dequantized_weight() - w).square().sum() <= (
        lloyd.dequantized_weight() - w
    ).square().sum()
    with pytest.raises(mp.RecipeError, match="method: optimal solves codebooks over at most 2048 weights"):
        mp.compress(copy.deepcopy(model), [mp.ClusterConfig(values=16, method="optimal")])


def test_weighted_kmeans_ignores_points_of_weight_zero():
    x = torch.tensor([[0.0, 0.1, 1.0, 1.1, 50.0, -50.0]])
    weights = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    centroids, _ = kmeans(x, 2, weights=weights)
    assert torch.allclose(centroids.sort().values, torch.tensor([[0.05, 1.05]]))


def test_kmeans_keeps_exact_zeros_as_a_shared_value():
    x = torch.randn(3, 300, generator=_gen())
    x[:, ::3] = 0.0
    centroids, idx = kmeans(x, 8, keep_zero=True)
    assert (centroids.gather(1, idx)[x == 0] == 0).all()


@pytest.mark.parametrize(("values", "bits"), [(2, 2), (4, 2), (5, 4), (16, 4), (17, 8), (256, 8)])
def test_index_packing_round_trips_in_the_claimed_bytes(values, bits):
    assert index_bits(values) == bits
    for numel in (1, 7, 1001):
        idx = torch.randint(0, values, (numel,), generator=_gen(numel))
        packed = pack_indices(idx, bits=bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == packed_bytes(numel, bits=bits) == -(-numel * bits // 8)
        assert torch.equal(unpack_indices(packed, numel, bits=bits), idx)


def test_int8_codebook_is_on_the_int8_grid():
    centroids = torch.randn(5, 16, generator=_gen())
    codes, scale = quantize_codebook(centroids)
    assert codes.dtype == torch.int8 and scale.shape == (5,)
    assert (codes.float() * scale[:, None] - centroids).abs().max() <= scale.max() / 2 + 1e-6


def test_the_layer_stores_a_codebook_and_packed_indices():
    model = _mlp()
    small = cluster(model, mp.ClusterConfig(values=16))
    first = small[0]
    assert isinstance(first, ClusteredLayer)
    assert first.codebook.shape == (1, 16) and first.codebook.dtype == torch.float32
    assert first.indices.dtype == torch.uint8 and first.indices.numel() == 96 * 64 // 2  # 4 bits each
    assert "weight" not in dict(first.named_parameters(recurse=False))
    stored = sum(t.numel() * t.element_size() for t in first.buffers(recurse=False))
    assert stored == 16 * 4 + 96 * 64 // 2  # codebook + indices, the bias aside
    assert first.dequantized_weight().unique().numel() <= 16


def test_codebooks_per_group_of_rows_including_a_partial_last_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 30)).eval()
    small = cluster(model, mp.ClusterConfig(values=4, per="rows", group_size=4, codebook_bits=8))
    layer = small[0]
    assert layer.codebook.shape == (8, 4) and layer.codebook.dtype == torch.int8  # 7 full groups + 2 rows
    assert layer.codebook_scale is not None and layer.indices.numel() == 30 * 128 // 4  # 2 bits each
    weight = layer.dequantized_weight()
    for g in range(8):
        assert weight[4 * g : 4 * g + 4].unique().numel() <= 4


def test_codebooks_per_part_of_a_row_with_outliers_kept_apart():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 6)).eval()
    with torch.no_grad():
        model[0].weight[2, 7] = 3.0  # far outside the row's spread
    config = mp.ClusterConfig(values=16, per="rows", columns=192, outliers=2, codebook_bits=8)
    layer = cluster(copy.deepcopy(model), config)[0]
    assert layer.scheme == "cluster16/1rowsx192cols+2outliers+int8cb"
    # 600 = 3 x 192 + 24: four codebooks a row, the last one over 24 weights
    assert layer.codebook.shape == (6 * 4, 16) and layer.books_per_row == 4
    assert layer.outlier_values.shape == (6, 8) and layer.outlier_values.dtype == torch.float16
    assert layer.outlier_positions.dtype == torch.uint8  # a position within 192 columns
    weight, original = layer.dequantized_weight(), model[0].weight.detach()
    assert weight[2, 7] == torch.tensor(3.0, dtype=torch.float16).float()
    columns, values = layer.outliers()
    assert torch.equal(weight.gather(1, columns), values)
    torch.testing.assert_close(values, original.gather(1, columns), atol=2e-3, rtol=2e-3)
    for book, start in enumerate(range(0, 600, 192)):
        part = weight[:, start : start + 192].clone()
        part.scatter_(1, columns[:, 2 * book : 2 * book + 2] - start, float("nan"))
        assert all(row[~row.isnan()].unique().numel() <= 16 for row in part)
    # 4-bit indices, an int8 codebook (16 B + a 4 B scale) per 192 weights, 3 B per outlier
    stored = sum(t.numel() * t.element_size() for t in layer.buffers(recurse=False))
    assert stored == 6 * 600 // 2 + 24 * (16 + 4) + 6 * 8 * 3
    finer = cluster(copy.deepcopy(model), mp.ClusterConfig(values=16, per="rows", codebook_bits=8))[0]
    error = (weight - original).square().sum()
    assert error < 0.5 * (finer.dequantized_weight() - original).square().sum()


def test_outliers_and_part_rows_export_folded_and_quantize_to_int8(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    x = torch.randn(4, 384, generator=_gen())
    config = mp.ClusterConfig(values=16, per="rows", columns=128, outliers=2, codebook_bits=8)
    small = mp.compress(copy.deepcopy(model), [config])
    path = mp.export_onnx(small, (x,), tmp_path / "cluster.onnx")
    for runtime in mp.available_runtimes():
        report = mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], max_abs=1e-4)
        assert report.passed, (runtime, report)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert not ops & {"ScatterElements", "Gather"}, ops  # decoded once, at load
    data = [(torch.randn(8, 384, generator=_gen(s)),) for s in range(2)]
    static = mp.StaticInt8Config(calibration_batches=2, reduce_range=False)
    q = mp.compress(copy.deepcopy(small), [static], data)
    for i in (0, 2):
        layer = q[i]
        assert isinstance(layer, ClusteredInt8Layer) and layer.outlier_codes is not None
        decoded = small[i].dequantized_weight()
        scale = symmetric_scale(decoded, axis=0, bits=8)
        assert torch.equal(layer.qweight, quantize_symmetric(decoded, scale, axis=0, bits=8))
    int8 = mp.export_onnx(q, (x,), tmp_path / "int8.onnx")
    report = mp.check_parity(q, mp.open_session(int8, runtime="onnxruntime"), [(x,)], min_cosine=0.9999)
    assert report.passed, report


@pytest.mark.parametrize("per", ["layer", "rows"])
def test_forward_equals_the_layer_with_its_decoded_weight(per):
    model = _cnn()
    x = torch.randn(2, 3, 8, 8, generator=_gen())
    small = cluster(model, mp.ClusterConfig(values=16, per=per, group_size=8 if per == "rows" else 1))
    conv, linear = small[2], small[5]
    assert isinstance(conv, ClusteredLayer) and isinstance(linear, ClusteredLayer)
    h = F.relu(small[0](x))
    expected = F.conv2d(h, conv.dequantized_weight(), conv.inner.bias)
    assert torch.equal(conv(h), expected)
    torch.testing.assert_close(small(x), model(x), atol=0.1, rtol=0.1)


def test_a_transposed_convolution_clusters_its_output_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(32, 16, 4)).eval()
    small = cluster(model, mp.ClusterConfig(values=16, per="rows"))
    layer = small[0]
    assert layer.codebook.shape == (16, 16)  # one codebook per output channel (weight axis 1)
    weight = layer.dequantized_weight()
    assert weight.shape == (32, 16, 4, 4)
    assert all(weight[:, c].unique().numel() <= 16 for c in range(16))
    x = torch.randn(1, 32, 3, 3, generator=_gen())
    assert torch.equal(small(x), F.conv_transpose2d(x, weight, layer.inner.bias))


def _bytes(path) -> int:
    return path.stat().st_size


def test_the_exported_file_is_as_small_as_claimed_and_runs_with_parity(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    x = torch.randn(4, 256, generator=_gen())
    fp32 = mp.export_onnx(model, (x,), tmp_path / "fp32.onnx")
    small = mp.compress(model, [mp.ClusterConfig(values=16)])
    path = mp.export_onnx(small, (x,), tmp_path / "cluster.onnx")
    weights = 2 * 256 * 512
    claimed = weights // 2 + 2 * 16 * 4 + (512 + 256) * 4  # 4-bit indices, two codebooks, fp32 biases
    # the graph that decodes them adds a few KB; the fp32 file holds 4 bytes a weight
    assert claimed <= _bytes(path) <= claimed + 8_000
    assert _bytes(path) / _bytes(fp32) <= 0.14
    for runtime in mp.available_runtimes():
        report = mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], max_abs=1e-4)
        assert report.passed, (runtime, report)


def test_clustering_a_sparse_layer_keeps_its_zeros_and_stores_only_kept_indices(tmp_path):
    model = _mlp()
    x = torch.randn(4, 64, generator=_gen())
    small = mp.compress(
        model,
        [mp.SparsityConfig(method="magnitude", ratio=0.5), mp.ClusterConfig(values=16)],
    )
    sparse = mp.compress(model, [mp.SparsityConfig(method="magnitude", ratio=0.5)])
    for i in (0, 2):
        layer = small[i]
        assert isinstance(sparse[i], SparseLayer) and isinstance(layer, ClusteredLayer)
        assert layer.bitmask is not None and torch.equal(layer.bitmask, sparse[i].bitmask)
        weight = layer.dequantized_weight()
        assert torch.equal(weight == 0, sparse[i].dense_weight() == 0)  # zero stays zero, kept stay kept
        assert weight[weight != 0].unique().numel() <= 16  # the kept values share 16 values
        assert layer.indices.numel() == -(-layer.kept // 2)  # 4-bit indices of the kept weights only
        assert layer.scheme == "sparse50%+cluster16"
    path = mp.export_onnx(small, (x,), tmp_path / "sparse-cluster.onnx")
    for runtime in mp.available_runtimes():
        report = mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], max_abs=1e-4)
        assert report.passed, (runtime, report)


def _clustered_int8(model: nn.Module, data, **cluster_args):
    """cluster then static int8 (8-bit weights: the same on any CPU), and the clustered model between."""
    clustered = mp.compress(model, [mp.ClusterConfig(values=16, **cluster_args)])
    static = mp.StaticInt8Config(calibration_batches=len(data), reduce_range=False)
    return clustered, mp.compress(copy.deepcopy(clustered), [static], data)


def test_static_int8_after_cluster_quantizes_each_clustered_layer_as_the_layer_it_wraps():
    model = _cnn()
    x = torch.randn(2, 3, 8, 8, generator=_gen())
    data = [(torch.randn(2, 3, 8, 8, generator=_gen(s)),) for s in range(4)]
    clustered, small = _clustered_int8(model, data)
    assert isinstance(clustered[0], nn.Conv2d)  # 864 weights: too small to cluster, quantized as it is
    assert type(small[0]) is QuantizedLayer and small[0].input_scale is not None
    for i in (2, 5):
        layer = small[i]
        assert isinstance(layer, ClusteredInt8Layer) and layer.input_scale is not None
        assert layer.scheme == "w8a8+cluster16"
        decoded = clustered[i].dequantized_weight()
        # the codes static int8 gives the decoded weight on its per-channel grid, stored as 16 per row
        scale = symmetric_scale(decoded, axis=0, bits=8)
        assert torch.equal(layer.scale, scale)
        assert torch.equal(layer.qweight, quantize_symmetric(decoded, scale, axis=0, bits=8))
        assert layer.codebook.shape == (layer.rows, 16) and layer.codebook.dtype == torch.int8
        assert torch.equal(layer.indices, clustered[i].indices)  # the 4-bit indices are kept as they were
        assert max(row.unique().numel() for row in layer.qweight.reshape(layer.rows, -1)) <= 16
    torch.testing.assert_close(small(x), clustered(x), atol=0.05, rtol=0.05)


def test_an_int8_codebook_is_kept_exactly():
    model = _cnn()
    data = [(torch.randn(2, 3, 8, 8, generator=_gen(s)),) for s in range(2)]
    clustered, small = _clustered_int8(model, data, codebook_bits=8)
    for i in (2, 5):
        assert small[i].codebook.shape == (1, 16) and torch.equal(small[i].codebook, clustered[i].codebook)
        # the int8 grid is the codebook's own: the weight is exactly the clustered one
        assert torch.equal(small[i].dequantized_weight(), clustered[i].dequantized_weight())


def test_static_int8_after_cluster_follows_targets_and_ignore():
    model = _cnn()
    data = [(torch.randn(2, 3, 8, 8, generator=_gen(s)),) for s in range(2)]
    for config, expected in [
        (mp.StaticInt8Config(ignore=("2",)), (QuantizedLayer, ClusteredLayer, ClusteredInt8Layer)),
        (mp.StaticInt8Config(ignore=("re:5",)), (QuantizedLayer, ClusteredInt8Layer, ClusteredLayer)),
        (mp.StaticInt8Config(targets=("Linear",)), (nn.Conv2d, ClusteredLayer, ClusteredInt8Layer)),
        (mp.StaticInt8Config(layers=("conv",)), (QuantizedLayer, ClusteredInt8Layer, ClusteredLayer)),
    ]:
        steps = [mp.ClusterConfig(values=16), config]
        small = mp.compress(copy.deepcopy(model), steps, data, allow_partial=True)
        assert tuple(type(small[i]) for i in (0, 2, 5)) == expected, config


def test_a_sparse_clustered_layer_keeps_its_zeros_in_int8():
    model = _mlp()
    data = [(torch.randn(4, 64, generator=_gen(s)),) for s in range(2)]
    sparse = mp.compress(model, [mp.SparsityConfig(method="magnitude", ratio=0.5)])
    clustered, small = _clustered_int8(sparse, data)
    for i in (0, 2):
        layer = small[i]
        assert isinstance(layer, ClusteredInt8Layer) and layer.bitmask is not None
        assert torch.equal(layer.qweight == 0, clustered[i].dequantized_weight() == 0)
        assert layer.scheme == "w8a8+sparse50%+cluster16"


def test_the_onnx_file_keeps_the_indices_and_runs_integer_kernels(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU()).eval()
    data = [(torch.randn(8, 256, generator=_gen(s)),) for s in range(2)]
    _, small = _clustered_int8(model, data)
    plain = mp.compress(copy.deepcopy(model), [mp.StaticInt8Config(reduce_range=False)], data)
    x = data[0][0]
    dense = mp.export_onnx(plain, (x,), tmp_path / "int8.onnx")
    for runtime in mp.available_runtimes():
        path = mp.export_onnx(small, (x,), tmp_path / f"{runtime}.onnx", target=runtime)
        # 4-bit indices and an int8 codebook per row: about half the bytes of the int8 weights
        assert _bytes(path) <= 0.6 * _bytes(dense)
        report = mp.check_parity(small, mp.open_session(path, runtime=runtime), [(x,)], min_cosine=0.9999)
        assert report.passed, (runtime, report)
        # the runtime folds the gather at load and runs the layers on integer kernels (ONNX Runtime's last
        # one, whose output is the model's, stays float by placement)
        kinds = [layer.kind for layer in integer_kernels(path, runtime).layers]
        assert kinds == (["integer", "float"] if runtime == "onnxruntime" else ["integer", "integer"])


def test_the_dense_int8_form_computes_the_same_and_leaves_the_model_alone():
    model = _cnn()
    data = [(torch.randn(2, 3, 8, 8, generator=_gen(s)),) for s in range(2)]
    _, small = _clustered_int8(model, data)
    plain = decode_clustered_int8(small)
    assert isinstance(small[2], ClusteredInt8Layer)  # unchanged
    assert type(plain[2]) is QuantizedLayer and torch.equal(plain[2].qweight, small[2].qweight)
    assert plain[2].input_scale == small[2].input_scale
    x = data[1][0]
    assert torch.equal(plain(x), small(x))
    assert decode_clustered_int8(model) is model  # nothing to decode: no copy


def test_tied_weights_are_clustered_once_and_shared():
    torch.manual_seed(0)
    embed = nn.Embedding(100, 32)
    head = nn.Linear(32, 100, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, head).eval()
    small = cluster(model, mp.ClusterConfig(values=16, layers=("linear", "embedding")))
    assert small[0].indices is small[1].indices and small[0].codebook is small[1].codebook
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(
        small(ids), F.linear(F.embedding(ids, small[0].dequantized_weight()), small[1].dequantized_weight())
    )


def test_recovery_trains_the_shared_values_with_every_index_fixed():
    model = _mlp()
    gen = _gen(3)
    # inputs of unequal scales: the output error weighs the weights unequally, which k-means (weight error
    # alone) cannot see and training the shared values on data can
    scale = torch.logspace(-1, 0.7, 64)
    items = [(torch.randn(16, 64, generator=gen) * scale,) for _ in range(8)]
    config = mp.ClusterConfig(values=4, per="rows")
    plain = mp.compress(model, [config])
    recover = mp.DistillConfig(loss="mse", steps=32, lr=1e-3)
    tuned = mp.compress(model, [dataclasses.replace(config, recover=recover)], items)
    for i in (0, 2):
        assert torch.equal(tuned[i].indices, plain[i].indices)  # the clusters did not change
        assert not torch.equal(tuned[i].codebook, plain[i].codebook)  # their shared values did

    def error(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((m(*x) - model(*x)).pow(2).mean()) for x in items)

    assert error(tuned) < 0.85 * error(plain)


def test_the_config_round_trips_through_yaml_with_its_recovery(tmp_path):
    config = mp.ClusterConfig(
        values=8, per="rows", group_size=2, codebook_bits=8, recover=mp.DistillConfig(loss="task", steps=3)
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(mp.dump_recipe([config]))
    assert mp.load_recipe(path) == [config]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"values": 1}, "values=1 must be a whole number from 2 to 256"),
        ({"values": 257}, "values=257"),
        ({"per": "channel"}, "per='channel' is unknown"),
        ({"group_size": 4}, "group_size applies to per: rows"),
        ({"per": "rows", "group_size": 0}, "group_size=0"),
        ({"codebook_bits": 4}, "codebook_bits=4 is not supported"),
        ({"columns": 64}, "columns and outliers apply to per: rows"),
        ({"method": "exact"}, "method='exact' is unknown"),
        ({"per": "rows", "outliers": -1}, "outliers=-1 must be a whole number"),
        ({"per": "rows", "group_size": 2, "outliers": 2}, "outliers=2 needs one row per codebook"),
        ({"layers": ("rnn",)}, "layers=\\['rnn'\\] is invalid"),
    ],
)
def test_bad_configs_say_what_to_change(fields, message):
    with pytest.raises(mp.RecipeError, match=message):
        mp.ClusterConfig(**fields)


def test_more_clusters_than_weights_names_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 200)).eval()
    with pytest.raises(
        mp.RecipeError, match=r"layer '0' has 8 weights in its smallest codebook group.*fewer than values=16"
    ):
        mp.compress(model, [mp.ClusterConfig(values=16, per="rows")])
    with pytest.raises(mp.RecipeError, match=r"layer '0' has 8 weights in the layer"):
        mp.compress(nn.Sequential(nn.Linear(2, 4)), [mp.ClusterConfig(values=16, targets=("0",))])
    # found before any layer is clustered: the model passed in is left as it was
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(8, 200)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp.RecipeError, match=r"layer '1' has 8 weights"):
        cluster(model, mp.ClusterConfig(values=16, per="rows"))
    assert all(isinstance(m, nn.Linear) for m in model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_seeds_give_far_outliers_their_own_value():
    x = torch.randn(4, 2000, generator=_gen())
    x[:, :3] = torch.tensor([40.0, 41.0, -45.0])
    centroids, idx = kmeans(x, 16)
    assert (centroids.gather(1, idx)[:, :3] - x[:, :3]).abs().max() < 1.0
    assert torch.equal(centroids, centroids.sort(dim=1).values)  # sorted codebooks


def test_small_layers_are_left_alone_unless_named():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4)).eval()
    small = cluster(model, mp.ClusterConfig(values=16))
    assert isinstance(small[0], ClusteredLayer) and isinstance(small[1], nn.Linear)  # 256 weights
    named = cluster(nn.Sequential(nn.Linear(64, 4)), mp.ClusterConfig(values=16, targets=("0",)))
    assert isinstance(named[0], ClusteredLayer)


def test_recovery_needs_data_and_the_model_is_untouched():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mp.DataError, match="recover trains the shared values on data"):
        mp.compress(model, [mp.ClusterConfig(recover=mp.DistillConfig(loss="mse"))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
