import pytest

import modelpress as mp


def test_yaml_round_trip(tmp_path):
    recipe = [mp.WeightOnlyConfig(layers=("linear", "conv"), ignore=("head",))]
    text = mp.dump_recipe(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert mp.load_recipe(path) == recipe


def test_builtin_recipe_loads():
    assert "int8-weight-only" in mp.builtin_recipes()
    assert mp.load_recipe("int8-weight-only") == [mp.WeightOnlyConfig(symmetric=False)]


def test_unknown_technique_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- {type: prune_magic, sparsity: 0.5}\n")
    with pytest.raises(mp.RecipeError, match="unknown technique type 'prune_magic'. Known types: ") as info:
        mp.load_recipe(path)
    assert "static_int8" in str(info.value) and "weight_only" in str(info.value)


def test_wrong_field_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- {type: weight_only, bitz: 8}\n")
    with pytest.raises(mp.RecipeError, match=r"step 1: technique 'weight_only' has no field\(s\) \['bitz'\]"):
        mp.load_recipe(path)


def test_bad_value_named():
    with pytest.raises(mp.RecipeError, match="bits=3 is not supported"):
        mp.load_recipe([{"type": "weight_only", "bits": 3}])
    with pytest.raises(mp.RecipeError, match="layers=\\['lstm'\\] is invalid"):
        mp.load_recipe([{"type": "weight_only", "layers": ["lstm"]}])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("- {type: weight_only\n")
    with pytest.raises(mp.RecipeError, match="not valid YAML"):
        mp.load_recipe(path)
    with pytest.raises(mp.RecipeError, match="neither a file nor a built-in recipe"):
        mp.load_recipe(tmp_path / "missing.yaml")
    path.write_text("type: weight_only\n")
    with pytest.raises(mp.RecipeError, match="non-empty list of steps"):
        mp.load_recipe(path)


def test_every_builtin_recipe_loads():
    for name in mp.builtin_recipes():
        assert mp.load_recipe(name), name
    assert mp.load_recipe("sparse50-int8") == [mp.SparsityConfig(method="sparsegpt", ratio=0.5, bits=8)]
