"""A Hugging Face model folder as MODEL: loading offline, example inputs from the config, the CLI on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import modelpress as mp
from modelpress.cli import main
from modelpress.loading import apply_state_dict, load_model, load_state_dict_file, pretrained_example_inputs

transformers = pytest.importorskip("transformers")


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny BERT encoder and a tiny Llama causal LM (tied embeddings), saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=64,
        )
    )
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )
    out = {}
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def test_folder_loads_the_architecture_class_with_inputs_from_the_config(folders):
    model, inputs = load_model(str(folders["llama"]))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    input_ids, mask = inputs
    assert input_ids.shape == (1, 16) and input_ids.dtype == torch.long
    assert int(input_ids.min()) >= 0 and int(input_ids.max()) < 100
    assert mask.shape == (1, 16) and bool(mask.all())
    reference = transformers.LlamaForCausalLM.from_pretrained(folders["llama"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs).logits, reference(*inputs).logits)


def test_folder_without_architectures_falls_back_to_automodel(folders, tmp_path):
    import shutil

    folder = tmp_path / "bare"
    shutil.copytree(folders["bert"], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    model, inputs = load_model(str(folder))
    assert type(model).__name__ == "BertModel" and [tuple(t.shape) for t in inputs] == [(1, 16), (1, 16)]


def test_example_inputs_for_vision_speech_and_whisper_configs():
    torch.manual_seed(0)
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32
        )
    ).eval()
    (pixels,) = pretrained_example_inputs(vit, vit.config)
    assert pixels.shape == (1, 3, 32, 32)
    wav2vec = transformers.Wav2Vec2Model(
        transformers.Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        )
    ).eval()
    (audio,) = pretrained_example_inputs(wav2vec, wav2vec.config)
    assert audio.shape == (1, 16000) and audio.dtype == torch.float32
    whisper = transformers.WhisperForConditionalGeneration(
        transformers.WhisperConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            vocab_size=100,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=3,
        )
    ).eval()
    features, mask, decoder_ids = pretrained_example_inputs(whisper, whisper.config)
    assert features.shape == (1, 8, 32) and mask.shape == (1, 32) and decoder_ids.tolist() == [[3]]
    with torch.no_grad():
        for model, inputs in (
            (vit, (pixels,)),
            (wav2vec, (audio,)),
            (whisper, (features, mask, decoder_ids)),
        ):
            model(*inputs)  # the inputs fit the forward


def test_bad_folders_get_clear_errors(folders, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        mp.ModelLoadError, match="has no config.json, so it is not a Hugging Face model folder"
    ):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((folders["bert"] / "config.json").read_text())
    with pytest.raises(
        mp.ModelLoadError, match=r"BertModel.from_pretrained\(.*\) failed .*needs the weights"
    ):
        load_model(str(tmp_path / "no_weights"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(mp.ModelLoadError, match="Cannot read the model config"):
        load_model(str(tmp_path / "junk"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(mp.ModelLoadError, match=r"needs transformers \(pip install transformers\)"):
        load_model(str(folders["bert"]))


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_cli_profile_on_a_folder(folders, name):
    result = run("profile", str(folders[name]), "--top", "3")
    assert result.exit_code == 0, result.output
    cls = {"bert": "BertModel", "llama": "LlamaForCausalLM"}[name]
    assert f"{cls}:" in result.output and "at inputs [[1, 16], [1, 16]]" in " ".join(result.output.split())


@pytest.mark.parametrize(("name", "recipe"), [("bert", "int8-dynamic"), ("llama", "int8-weight-only")])
def test_cli_export_a_folder(folders, tmp_path, name, recipe):
    # Needs export_onnx to handle Hugging Face outputs and caches (issue 26 item 1, the lead's export work).
    out = tmp_path / f"{name}.onnx"
    result = run("export", str(folders[name]), "-o", str(out), "--recipe", recipe)
    assert result.exit_code == 0, result.output
    assert result.output.count("parity ok") == 2 and out.exists()


def test_cli_compress_a_folder_saves_a_model_that_reloads(folders, tmp_path):
    out = tmp_path / "run"
    result = run(
        "compress",
        str(folders["llama"]),
        "--recipe",
        "int8-weight-only",
        "--out",
        str(out),
        "--batch",
        "1",
        "--rounds",
        "2",
        "--runtime",
        "onnxruntime",
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"model.compressed.safetensors", "recipe.yaml", "hf"}
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "model.safetensors").exists()
    assert json.loads((out / "report.json").read_text())["model"]["name"] == "llama"

    # Rebuild: load the model, compress it with the saved recipe, load the saved state dict strictly.
    recipe = mp.load_recipe(out / "recipe.yaml")
    model, inputs = load_model(str(folders["llama"]))
    expected = mp.compress(model, recipe)
    rebuilt = mp.compress(model, recipe)
    with torch.no_grad():
        for tensor in rebuilt.state_dict().values():
            tensor.zero_()  # so that equal outputs prove the file holds every value
    state = load_state_dict_file(out / "model.compressed.safetensors")
    assert set(state) == set(rebuilt.state_dict())  # the tied lm_head's buffers come back from the metadata
    apply_state_dict(rebuilt, state, source="model.compressed.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*inputs).logits, expected(*inputs).logits, rtol=0, atol=0)

    # hf/ holds compressed layers, which from_pretrained alone would leave random: refused, with the way back.
    with pytest.raises(mp.ModelLoadError, match="they would be random.*compress it with recipe.yaml"):
        load_model(str(out / "hf"))
