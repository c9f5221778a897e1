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


def _lm(family: str, **config):
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(**config)
    head = "LMHeadModel" if family == "GPT2" else "ForCausalLM"
    return getattr(transformers, f"{family}{head}")(cfg).eval()


def test_role_mlp_out_finds_the_mlp_output_projection_by_shape():
    """`role:mlp_out` selects each MLP's output projection whatever the family calls it, and no attention
    projection (GQA's K and V also narrow their input, but their siblings do not read their width)."""
    from modelpress.techniques.select import conv1d_as_linear, role_names

    small = {"num_hidden_layers": 1, "vocab_size": 64}
    cases = {
        "Llama": (
            _lm(
                "Llama",
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                **small,
            ),
            "model.layers.0.mlp.down_proj",
        ),
        "GPT2": (_lm("GPT2", n_embd=32, n_head=2, n_layer=1, vocab_size=64), "transformer.h.0.mlp.c_proj"),
        "GPTJ": (
            _lm("GPTJ", n_embd=32, n_head=2, n_layer=1, rotary_dim=8, vocab_size=64),
            "transformer.h.0.mlp.fc_out",
        ),
        "OPT": (
            _lm("OPT", hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32, **small),
            "model.decoder.layers.0.fc2",
        ),
        "Phi3": (
            _lm(
                "Phi3",
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                pad_token_id=0,
                **small,
            ),
            "model.layers.0.mlp.down_proj",
        ),
    }
    for family, (model, want) in cases.items():
        conv1d_as_linear(model)  # as compress does (GPT-2's Conv1D)
        assert role_names(model, "mlp_out") == [want], family
    with pytest.raises(mp.errors.RecipeError, match="role:mlp_out"):
        role_names(cases["GPT2"][0], "mlp_output")


def test_a_recipe_selects_by_role():
    transformers = pytest.importorskip("transformers")
    model = _lm("GPTJ", n_embd=32, n_head=2, n_layer=1, rotary_dim=8, vocab_size=64)
    steps = [mp.WeightOnlyConfig(bits=8, layers=("linear",), targets=("role:mlp_out",))]
    small = mp.compress(model, steps, allow_partial=True)
    assert type(small.transformer.h[0].mlp.fc_out).__name__ != "Linear"
    assert type(small.transformer.h[0].mlp.fc_in).__name__ == "Linear"
    del transformers
