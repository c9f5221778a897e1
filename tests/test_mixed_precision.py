import logging

import pytest
import torch
import torch.nn.functional as F
import zoo
from torch import nn

import modelpress as mp
from modelpress.analyse.sensitivity import scheme_sensitivity
from modelpress.techniques.mixed_precision import (
    FloorNotMetError,
    MixedPrecisionConfig,
    mixed_precision,
    search_mixed_precision,
)
from modelpress.techniques.quantized import QuantizedLayer


def _mlp():
    """Three Linears; the middle one's input has one outlier feature (100x), so its per-tensor activation
    quantizer crushes every other feature: that layer, and only it, needs keeping out of W8A8."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():
        model[0].weight[0] *= 100
        model[0].bias[0] *= 100
        model[2].weight[:, 0] /= 10
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 16, generator=gen) for _ in range(8)]
    return model, data


def test_keeps_only_the_sensitive_layer_at_weight_only():
    model, data = _mlp()
    small, result = search_mixed_precision(model, MixedPrecisionConfig(min_cosine=0.999), data)
    assert result.met and result.kept_layers == ["2"]
    assert result.all_quantized < 0.999 <= result.quality
    assert small[2].scheme == "w8" and small[0].scheme == small[4].scheme == "w8a8"
    assert all(isinstance(small[i], QuantizedLayer) for i in (0, 2, 4))
    kept = result.kept[0]
    assert kept.quality_without == pytest.approx(result.all_quantized)
    assert kept.reason.startswith("2: mean cosine to fp32 0.99") and "int8 weight-only" in kept.reason
    # the user's model is untouched
    assert isinstance(model[2], nn.Linear)


def test_result_is_the_plain_recipe_with_those_ignores():
    model, data = _mlp()
    config = MixedPrecisionConfig(min_cosine=0.999, holdout=3)
    small, result = search_mixed_precision(model, config, data)
    plain = mp.compress(model, mp.load_recipe(result.recipe), data[3:])
    assert result.recipe[0]["ignore"] == ["2"]
    assert result.recipe[1]["type"] == "weight_only" and result.recipe[1]["targets"] == ["2"]
    x = torch.randn(5, 16)
    assert torch.equal(small(x), plain(x))
    # the quality reported is the returned model's, measured on the held-out items
    with torch.no_grad():
        cos = F.cosine_similarity(
            torch.cat([small(d) for d in data[:3]]), torch.cat([model(d) for d in data[:3]]), dim=1
        )
    assert float(cos.double().mean()) == pytest.approx(result.quality, abs=1e-6)


def test_fp32_fallback_and_sensitivity_rankings():
    model, data = _mlp()
    small, result = search_mixed_precision(
        model, MixedPrecisionConfig(min_cosine=0.999, fallback="fp32", ranking="only"), data
    )
    assert result.kept_layers == ["2"] and isinstance(small[2], nn.Linear)
    for mode in ("all_but", "only", "sqnr"):
        table = scheme_sensitivity(model, mp.StaticInt8Config(), data, holdout=4, mode=mode)
        assert table.layers[0] == "2", mode
        assert [r.type for r in table.rows] == ["Linear"] * 3
        assert table.rows[0].params == 32 * 32 + 32
        if mode == "sqnr":
            assert [r.value for r in table.rows] == sorted(r.value for r in table.rows)
        else:
            drops = [r.drop for r in table.rows]
            assert drops == sorted(drops, reverse=True) and drops[0] > 0.001
        assert "2 " in table.format().splitlines()[2]


def test_floor_already_met_keeps_nothing_and_ranks_by_sqnr():
    model, data = _mlp()
    small, result = search_mixed_precision(model, MixedPrecisionConfig(min_cosine=0.99), data)
    assert result.met and result.kept == [] and result.trials == 1
    assert result.sensitivity.mode == "sqnr" and result.sensitivity.layers[0] == "2"
    assert all(small[i].scheme == "w8a8" for i in (0, 2, 4))


def test_impossible_floor_names_the_best_found():
    model, data = _mlp()
    with pytest.raises(
        FloorNotMetError, match=r"no configuration meets the floor mean cosine to fp32 >= 0\.99999"
    ) as err:
        search_mixed_precision(model, MixedPrecisionConfig(min_cosine=0.99999), data)
    message = str(err.value)
    assert "best found keeps 3 layer(s) at int8 weight-only (2, 0, 4)" in message
    assert "use fallback: fp32" in message
    assert err.value.result.quality < 0.99999 and not err.value.result.met
    assert isinstance(err.value, mp.RecipeError)
    with pytest.raises(
        FloorNotMetError, match=r"keeps 1 layer\(s\) at int8 weight-only \(2\).*raise max_layers \(now 1 of 3"
    ):
        search_mixed_precision(model, MixedPrecisionConfig(min_cosine=0.99999, max_layers=1), data)


def test_on_fail_best_returns_the_best_and_warns(caplog):
    model, data = _mlp()
    config = MixedPrecisionConfig(min_cosine=0.99999, max_layers=1, on_fail="best")
    with caplog.at_level(logging.WARNING):
        small = mixed_precision(model, config, mp.Dataset(data))
    assert "no configuration meets the floor" in caplog.text and "Returning the best found" in caplog.text
    summary = small._modelpress_mixed_precision
    assert summary["met"] is False and [k["layer"] for k in summary["kept"]] == ["2"]
    assert small[2].scheme == "w8" and small[0].scheme == "w8a8"


def test_accuracy_drop_floor_on_labeled_items_and_custom_metric():
    model, data = _mlp()
    # labels: the fp32 model's own predictions, so fp32 accuracy is 1.0
    labeled = [(x, model(x).argmax(-1)) for x in data]
    small, result = search_mixed_precision(model, MixedPrecisionConfig(max_drop=0.0), labeled)
    assert result.reference == 1.0 and result.met and result.quality == 1.0
    assert "accuracy >= 1.00000 (at most 0.00% worse than fp32" in result.floor
    assert all(small[int(n)].scheme == "w8" for n in result.kept_layers)

    def cosine_to_fp32(predict, items):  # any score where higher is better
        with torch.no_grad():
            return float(
                torch.cat([F.cosine_similarity(predict((x,)), model(x), dim=1) for x in items]).mean()
            )

    _, result = search_mixed_precision(
        model, MixedPrecisionConfig(max_drop=0.001), data, metric=cosine_to_fp32
    )
    assert result.metric == "cosine_to_fp32" and result.met and result.kept_layers == ["2"]


def test_data_errors():
    model, data = _mlp()
    config = MixedPrecisionConfig(min_cosine=0.999, holdout=8)
    with pytest.raises(mp.DataError, match="mixed_precision needs data"):
        mixed_precision(model, config, None)
    with pytest.raises(mp.DataError, match=r"the data has 8 item\(s\) but holdout=8 needs more than 8"):
        mixed_precision(model, config, data)
    with pytest.raises(mp.DataError, match="needs items of the form \\(inputs, labels\\)"):
        mixed_precision(model, MixedPrecisionConfig(max_drop=0.01), data)


def test_config_validation_and_yaml_round_trip(tmp_path, monkeypatch):
    with pytest.raises(mp.RecipeError, match="exactly one quality floor"):
        MixedPrecisionConfig()
    with pytest.raises(mp.RecipeError, match="exactly one quality floor"):
        MixedPrecisionConfig(min_cosine=0.99, max_drop=0.01)
    with pytest.raises(mp.RecipeError, match="mixed_precision scheme: technique 'static_int8' has no field"):
        MixedPrecisionConfig(min_cosine=0.99, scheme={"type": "static_int8", "bits": 4})
    with pytest.raises(mp.RecipeError, match="use fallback: fp32"):
        MixedPrecisionConfig(min_cosine=0.99, scheme="weight_only")
    with pytest.raises(mp.RecipeError, match="holdout=0 must be at least 1"):
        MixedPrecisionConfig(min_cosine=0.99, holdout=0)
    config = MixedPrecisionConfig(
        scheme=mp.StaticInt8Config(smooth_alpha=0.75, ignore=("fc",)), min_cosine=0.998
    )
    assert config.scheme == {"type": "static_int8", "smooth_alpha": 0.75, "ignore": ["fc"]}
    assert MixedPrecisionConfig(min_cosine=0.998).scheme == {"type": "static_int8"}
    assert hash(config) == hash(MixedPrecisionConfig(scheme=dict(config.scheme), min_cosine=0.998))
    path = tmp_path / "recipe.yaml"
    path.write_text(mp.dump_recipe([config]))
    assert mp.load_recipe(path) == [config]
    loaded = mp.load_recipe(
        [
            {
                "type": "mixed_precision",
                "scheme": {"type": "static_int8", "observer": "mse"},
                "max_drop": 0.005,
                "ignore": ["lm_head"],
            }
        ]
    )[0]
    assert loaded.scheme_config() == mp.StaticInt8Config(observer="mse", ignore=("lm_head",))


def test_exports_and_passes_parity(tmp_path, monkeypatch):
    model, data = _mlp()
    small = mp.compress(model, [MixedPrecisionConfig(min_cosine=0.999)], data)
    assert small[2].scheme == "w8"
    path = mp.export_onnx(small, (data[0],), tmp_path / "mixed.onnx")
    for runtime in mp.available_runtimes():
        report = mp.check_parity(
            small, mp.open_session(path, runtime), [(d,) for d in data[:4]], min_cosine=0.999, reference=model
        )
        assert report.passed, report.message


def test_bert_encoder_meets_a_floor_between_int8_and_fp32():
    model, _ = zoo.bert_encoder()
    with torch.no_grad():  # an outlier feature, as trained BERTs have: random init is too easy to quantize
        for layer in model.bert.encoder.layer:
            layer.attention.output.LayerNorm.weight[5] = 40.0
    gen = torch.Generator().manual_seed(1)
    data = [
        (torch.randint(1, 1000, (4, 16), generator=gen), torch.ones(4, 16, dtype=torch.int64))
        for _ in range(3)
    ]
    # Every Linear quantized, measured as the search measures it, to place the floor halfway to fp32.
    int8 = mp.compress(model, [mp.StaticInt8Config()], data[1:], allow_partial=True)
    with torch.no_grad():
        cos = F.cosine_similarity(int8(*data[0]).flatten(1), model(*data[0]).flatten(1), dim=1)
    all_quantized = float(cos.double().mean())
    floor = all_quantized + (1 - all_quantized) / 2
    # the cheap SQNR ranking: one pass instead of a model measurement per layer
    config = MixedPrecisionConfig(min_cosine=floor, holdout=1, ranking="sqnr")
    small, result = search_mixed_precision(model, config, data)
    assert result.all_quantized == pytest.approx(all_quantized, abs=1e-6) and result.all_quantized < floor
    assert result.met and result.quality >= floor
    assert 1 <= len(result.kept) < result.candidates == 12
    assert all(small.get_submodule(n).scheme == "w8" for n in result.kept_layers)
    assert result.sensitivity.mode == "sqnr"
    assert result.trials < 2 * 12  # every layer quantized, a logarithmic search and a pruning pass
