"""Sensitivity per layer and per family (issue 28): one layer compressed at a time, cached on disk, measured on
a subset, drawn in the report."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelpress as mp
from modelpress.optimize.sensitivity import FamilySensitivity, as_family, family_sensitivity
from modelpress.report.html import sensitivity_chart


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    gen = torch.Generator().manual_seed(1)
    return model, [torch.randn(8, 16, generator=gen) for _ in range(6)]


def _cosine(a: nn.Module, b: nn.Module, items: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return float(
            torch.cat([F.cosine_similarity(a(x).double(), b(x).double(), dim=1) for x in items]).mean()
        )


def test_each_probe_is_the_quality_with_only_that_layer_compressed(tmp_path):
    model, data = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = family_sensitivity(
        model, data, ["bits", "sparsity:0.5,0.9", "rank", "structured"], cache=tmp_path
    )
    assert table.layers == ["0", "2", "4"]
    assert table.columns == ["bits@4", "sparsity@0.5", "sparsity@0.9", "rank@0.5", "structured@0.5"]
    assert table.reference == pytest.approx(1.0) and table.items == 6 and not table.cached
    # the same probe built by hand: magnitude sparsity at 0.9 on layer '2' alone
    alone = mp.REGISTRY["sparsity"][1](
        copy.deepcopy(model),
        mp.SparsityConfig(method="magnitude", ratio=0.9, targets=("2",)),
        None,
    )
    assert table.drop("2", "sparsity", 0.9) == pytest.approx(1.0 - _cosine(alone, model, data))
    # the output layer's channels are the model's outputs: structured pruning does not apply there
    row = next(r for r in table.rows if r.layer == "4" and r.family == "structured")
    assert row.value is None and row.drop is None and "left this layer as is" in row.note
    for layer in table.layers:
        assert table.drop(layer, "sparsity", 0.9) > table.drop(layer, "sparsity", 0.5) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "sparsity@0.9" in table.format()


def test_a_second_call_reads_the_cache_and_a_change_misses_it(tmp_path):
    model, data = _mlp()
    first = family_sensitivity(model, data, ["sparsity", "rank"], cache=tmp_path)
    (path,) = tmp_path.glob("*.json")
    assert path.stem == first.key
    start = time.perf_counter()
    second = family_sensitivity(model, data, ["sparsity", "rank"], cache=tmp_path)
    assert second.cached and time.perf_counter() - start < 0.5
    assert second.rows == first.rows and second.key == first.key
    # other settings, other data, other weights: new keys
    assert not family_sensitivity(model, data, ["sparsity:0.7", "rank"], cache=tmp_path).cached
    assert not family_sensitivity(model, data[:5], ["sparsity", "rank"], cache=tmp_path).cached
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    assert not family_sensitivity(model, data, ["sparsity", "rank"], cache=tmp_path).cached
    assert len(list(tmp_path.glob("*.json"))) == 4
    # a damaged file is measured again
    path.write_text("{not json")
    with torch.no_grad():
        model[0].weight[0, 0] -= 1e-3
    assert not family_sensitivity(model, data, ["sparsity", "rank"], cache=tmp_path).cached
    assert json.loads(path.read_text())["key"] == first.key


def test_max_items_measures_on_a_subset_and_accuracy_takes_labels():
    model, data = _mlp()
    table = family_sensitivity(model, data, ["sparsity"], max_items=2, cache=False)
    assert table.items == 2
    with torch.no_grad():
        labeled = [(x, model(x).argmax(dim=1)) for x in data]
    acc = family_sensitivity(model, labeled, ["sparsity:0.9"], metric="accuracy", max_items=3, cache=False)
    assert acc.metric == "accuracy" and acc.reference == 1.0 and acc.items == 3
    assert all(r.value is not None and 0 <= r.value <= 1 for r in acc.rows)


def test_layers_select_candidates_and_bad_input_says_what_to_fix():
    model, data = _mlp()
    only = family_sensitivity(model, data, ["bits"], layers=["re:[02]"], cache=False)
    assert only.layers == ["0", "2"]
    with pytest.raises(mp.RecipeError, match="unknown family 'bitz'"):
        family_sensitivity(model, data, ["bitz"], cache=False)
    with pytest.raises(mp.RecipeError, match="match no layer"):
        family_sensitivity(model, data, ["bits"], layers=["nope"], cache=False)
    with pytest.raises(mp.DataError, match="needs data"):
        family_sensitivity(model, None, ["bits"], cache=False)
    with pytest.raises(mp.RecipeError, match="strengths must be numbers"):
        as_family("sparsity:half")


def test_table_round_trips_and_draws_a_heatmap():
    model, data = _mlp()
    table = family_sensitivity(model, data, ["sparsity", "structured"], cache=False)
    again = FamilySensitivity.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again == table
    svg = sensitivity_chart(table.to_dict())
    assert svg.startswith("<svg") and svg.count("<rect") == 6  # 3 layers x 2 columns
    assert "structured@0.5" in svg and ">-<" in svg  # the output layer: not applicable


@pytest.mark.slow
def test_job_report_shows_the_trajectory_and_the_sensitivity(tmp_path, monkeypatch, tiny_model_file):
    from click.testing import CliRunner

    from modelpress.cli import main
    from modelpress.loading import import_callable, load_model
    from modelpress.pipeline.run import run_job

    monkeypatch.setattr("modelpress.optimize.sensitivity.default_cache_dir", lambda: tmp_path / "cache")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "- type: progressive\n"
        "  technique: {type: sparsity, method: magnitude, layers: [linear, conv]}\n"
        "  steps: [0.3, 0.6, 0.99]\n  max_drop: 30%\n  holdout: 1\n"
    )
    args = ["compress", f"{tiny_model_file}:build", "--recipe", recipe, "--out", tmp_path / "a"]
    args += [
        "--data",
        f"{tiny_model_file}:calib",
        "--runtime",
        "onnxruntime",
        "--batch",
        "1",
        "--rounds",
        "2",
    ]
    done = CliRunner().invoke(main, [*map(str, args), "--sensitivity", "bits,sparsity:0.5,0.9,rank"])
    assert done.exit_code == 0, done.output
    first = json.loads((tmp_path / "a" / "report.json").read_text())
    # the same model, data and families again (through the library, without the memory probe): from the cache
    model, inputs = load_model(f"{tiny_model_file}:build")
    calib = import_callable(f"{tiny_model_file}:calib")()
    second = run_job(
        model,
        inputs,
        recipe,
        out_dir=tmp_path / "b",
        data=calib,
        runtimes=["onnxruntime"],
        batch_sizes=(1,),
        rounds=2,
        memory=False,
        sensitivity=["bits", "sparsity:0.5,0.9", "rank"],
    )
    assert [p["strength"] for p in first["progressive"][0]["points"]][:2] == [0.3, 0.6]
    assert first["sensitivity"]["rows"] == second["sensitivity"]["rows"]
    assert not first["sensitivity"]["cached"] and second["sensitivity"]["cached"]
    html = (tmp_path / "b" / "report.html").read_text()
    assert "<h2>Progressive compression</h2>" in html and "<polyline" in html
    assert "<h2>Sensitivity per layer and family</h2>" in html and "sparsity@0.9" in html
    assert "read from the cache" in html


def test_a_probe_that_cannot_reach_the_strength_is_not_counted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    table = family_sensitivity(model, data, ["bits"], cache=False)
    conv = next(r for r in table.rows if r.layer == "0")
    assert conv.value is None and "at 8 bits, not 4" in conv.note  # no int4 kernel for a convolution
    assert table.drop("2", "bits") is not None
