"""OpenVINO GenAI export (deploy/ovgenai.py): a tiny seeded Llama, compressed, runs in LLMPipeline with the
same greedy tokens as PyTorch, its weights stored as compressed constants with our values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("openvino_genai", reason="openvino-genai is not installed")
pytest.importorskip("openvino_tokenizers", reason="openvino-tokenizers is not installed")
transformers = pytest.importorskip("transformers")

import openvino as ov  # noqa: E402

from modelpress.deploy.ovgenai import build_model, export_openvino_genai  # noqa: E402
from modelpress.errors import ExportError  # noqa: E402
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only  # noqa: E402

PROMPTS = ("The capital of France is", "Once upon a time")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(
        ["The capital of France is Paris. Once upon a time there lived a fox."] * 10, trainer
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def tiny_llama(hidden: int = 96, heads: int = 6, family: str = "Llama", **config: int) -> nn.Module:
    # hidden 96 / intermediate 160: groups of 64 end in a partial block (the input is padded in the IR);
    # a wide init so that greedy decoding does not repeat one token.
    torch.manual_seed(0)
    settings = {"intermediate_size": 160, "num_hidden_layers": 2, **config}
    cfg = getattr(transformers, f"{family}Config")(
        vocab_size=320,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.3,
        eos_token_id=0,
        bos_token_id=0,
        **settings,
    )
    return getattr(transformers, f"{family}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize(
    "config",
    [
        None,
        pytest.param(WeightOnlyConfig(bits=4, group_size=64, symmetric=True), marks=pytest.mark.slow),
        WeightOnlyConfig(bits=4, group_size=64, symmetric=False),
        WeightOnlyConfig(bits=8, symmetric=False),
        pytest.param(WeightOnlyConfig(bits=8, group_size=32, symmetric=True), marks=pytest.mark.slow),
    ],
    ids=["fp32", "int4-sym", "int4-asym", "int8-asym", "int8-g32"],
)
def test_greedy_tokens_match_pytorch(tmp_path, tokenizer, config):
    model = tiny_llama()
    if config is not None:
        model = weight_only(model, config)
    report = export_openvino_genai(model, tokenizer, tmp_path / "ov", prompts=PROMPTS, new_tokens=12)
    assert report.prefill_max_abs_diff < 1e-3
    for check in report.checks:
        assert len(check.torch_tokens) == 12
        assert check.openvino_tokens == check.torch_tokens
    names = {p.name for p in (tmp_path / "ov").iterdir()}
    assert {
        "openvino_model.xml",
        "openvino_model.bin",
        "openvino_tokenizer.xml",
        "openvino_detokenizer.xml",
        "config.json",
        "generation_config.json",
    } <= names
    assert json.loads((tmp_path / "ov" / "generation_config.json").read_text())["eos_token_id"] == 0


def test_stacked_qkv_keeps_each_projections_bias(tmp_path, tokenizer):
    """Qwen2's Q, K and V carry biases: stacked into one MatMul, each bias still lands on its own columns."""
    model = tiny_llama(128, 4, "Qwen2", intermediate_size=256, num_hidden_layers=1)
    with torch.no_grad():
        for proj in ("q_proj", "k_proj", "v_proj"):
            getattr(model.model.layers[0].self_attn, proj).bias.normal_(0, 0.5)
    model = weight_only(model, WeightOnlyConfig(bits=4, group_size=64, symmetric=False))
    ov_model, _ = build_model(model)
    assert any(op.get_friendly_name().endswith("q_proj+k_proj+v_proj.weight") for op in ov_model.get_ops())
    report = export_openvino_genai(model, tokenizer, tmp_path / "ov", prompts=PROMPTS[:1], new_tokens=8)
    assert report.prefill_max_abs_diff < 1e-3
    assert report.checks[0].openvino_tokens == report.checks[0].torch_tokens


def test_compressed_constants_hold_our_values():
    # Symmetric groups: the tied embedding and head (the embedding is always symmetric) share one table.
    model = weight_only(tiny_llama(hidden=128, heads=4), WeightOnlyConfig(bits=4, group_size=64))
    _, counts = build_model(model)
    per_layer = 128 * 128 * 2 + 64 * 128 * 2 + 160 * 128 * 2 + 128 * 192  # K = 160 is padded to 192
    assert counts == {"i4": 320 * 128 + 2 * per_layer}  # the 320 x 128 table once
    # Asymmetric groups: u4 codes and zero points, decompressing to the layer's weight bit for bit.
    model = weight_only(tiny_llama(), WeightOnlyConfig(bits=4, group_size=64, symmetric=False))
    ov_model, counts = build_model(model)
    assert set(counts) == {"i8", "u4"}  # the embedding (dim 96: no whole groups) stays int8 per row
    # Q, K and V (and gate and up) read the same input: one weight stacked along N, one MatMul, a split.
    stacked = {"model.layers.0.self_attn.q_proj+k_proj+v_proj": ("q_proj", "k_proj", "v_proj")}
    for name in ("model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.1.mlp.down_proj"):
        parts = [f"{name.rpartition('.')[0]}.{p}" for p in stacked.get(name, ())] or [name]
        node = next(op for op in ov_model.get_ops() if op.get_friendly_name() == name + ".weight")
        folded = ov.Model([ops_result(node)], [], "w")
        out = ov.Core().compile_model(folded, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({})[0]
        want = np.concatenate([model.get_submodule(p).dequantized_weight().numpy() for p in parts])
        np.testing.assert_array_equal(out[:, : want.shape[1]], want)  # (u - zp) * scale bit for bit
        assert not out[:, want.shape[1] :].any()  # the padded columns decompress to 0


def test_a_tied_int8_table_is_stored_once():
    # Two steps quantize the tied head and embedding alone, to equal codes in two tensors: one table.
    model = weight_only(tiny_llama(), WeightOnlyConfig(bits=8, targets=("lm_head",)))
    model = weight_only(model, WeightOnlyConfig(bits=8, layers=("embedding", "linear")))
    assert model.model.embed_tokens.qweight.data_ptr() != model.lm_head.qweight.data_ptr()
    ov_model, counts = build_model(model)
    per_layer = 96 * 96 * 2 + 32 * 96 * 2 + 160 * 96 * 3
    assert counts == {"i8": 320 * 96 + 2 * per_layer}
    # int8 per row stacks too: one MatMul for Q, K and V, one for gate and up, per layer
    names = {op.get_friendly_name() for op in ov_model.get_ops()}
    assert {
        "model.layers.1.self_attn.q_proj+k_proj+v_proj.weight",
        "model.layers.1.mlp.gate_proj+up_proj.weight",
    } <= names


def ops_result(node):
    import openvino.opset13 as ops

    return ops.result(node)


def test_refuses_what_it_cannot_write(tmp_path, tokenizer):
    with pytest.raises(ExportError, match="causal LM"):
        export_openvino_genai(nn.Linear(4, 4), tokenizer, tmp_path / "a")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    )
    with pytest.raises(ExportError, match="model_type 'gpt2'"):
        export_openvino_genai(gpt2, tokenizer, tmp_path / "b")
    with pytest.raises(ExportError, match="tokenizer"):
        export_openvino_genai(tiny_llama(), object(), tmp_path / "c", prompts=None)
    assert not (tmp_path / "c").exists()  # nothing half-written


# --------------------------------------------------------------------------------------------
# The command line: export --to openvino-genai, generate, bench
# --------------------------------------------------------------------------------------------


def _invoke(*args):
    from click.testing import CliRunner

    from modelpress.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _flat(output: str) -> str:
    return " ".join(output.split())  # rich wraps long messages


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cli_export_generate_bench(tmp_path, hf_folder):
    """A user's path: a Hugging Face folder -> `export --to openvino-genai` with a recipe -> `generate` ->
    `bench` against the fp32 folder."""
    out = tmp_path / "llm-int4"
    done = _invoke("export", hf_folder, "--to", "openvino-genai", "-o", out, "--recipe", "int4-weight-only")
    assert done.exit_code == 0, done.output
    assert "32/32 tokens match" in done.output and " i4" in done.output
    # rich wraps long lines anywhere (a long tmp path too): compare without whitespace
    assert "".join(f"wrote {out} (run it: modelpress generate {out}".split()) in "".join(done.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm-int4"]  # no temporary folder left
    done = _invoke("export", hf_folder, "--to", "openvino-genai", "-o", out)
    assert (
        done.exit_code == 2 and "already exists" in _flat(done.output) and "--overwrite" in _flat(done.output)
    )

    done = _invoke("generate", out, "--prompt", "The capital", "--max-new-tokens", "5")
    assert done.exit_code == 0, done.output
    assert done.output.startswith("The capital") and len(done.output.strip()) > len("The capital")

    fp32 = tmp_path / "llm-fp32"
    export_openvino_genai(
        tiny_llama(), transformers.AutoTokenizer.from_pretrained(hf_folder), fp32, prompts=None
    )
    report = tmp_path / "bench.json"
    done = _invoke("bench", out, "--baseline", fp32, "--rounds", "1", "--json", report)
    assert done.exit_code == 0, done.output
    assert "openvino-genai" in done.output and "decode" in done.output
    timings = json.loads(report.read_text())
    assert set(timings) == {"artifact", "baseline"}
    for t in timings.values():
        assert t["prefill_tok_s"] > 0 and t["decode_tok_s"] > 0 and t["peak_rss_bytes"] > 0
    assert timings["artifact"]["model_bytes"] < timings["baseline"]["model_bytes"] / 2  # int4 vs fp32


def test_cli_bad_inputs_are_named(tmp_path, hf_folder):
    done = _invoke("export", tmp_path / "missing", "--to", "openvino-genai", "-o", tmp_path / "x")
    assert done.exit_code == 2 and "Hugging Face causal LM folder" in _flat(done.output)
    done = _invoke(
        "export", hf_folder, "--to", "openvino-genai", "-o", tmp_path / "x", "--accuracy-level", "0"
    )
    assert done.exit_code == 2 and "--to genai only" in done.output
    assert not (tmp_path / "x").exists()

    # generate: not a folder, a folder of neither kind, a folder that looks right but does not load
    for path in (tmp_path / "missing", hf_folder):
        done = _invoke("generate", path, "--prompt", "x")
        flat = _flat(done.output)
        assert done.exit_code == 2 and "nor an OpenVINO GenAI folder" in flat and "openvino_model.xml" in flat
        assert not done.output.startswith("x")  # the error comes before any text
    fake = tmp_path / "fake"
    fake.mkdir()
    for name in (
        "openvino_model.xml",
        "openvino_model.bin",
        "openvino_tokenizer.xml",
        "openvino_detokenizer.xml",
    ):
        (fake / name).write_text("")
    done = _invoke("generate", fake, "--prompt", "x")
    assert done.exit_code == 2 and "could not load" in _flat(done.output)
    assert not done.output.startswith("x")

    # bench: a baseline of the other kind is refused before anything is loaded
    ort = tmp_path / "ort"
    ort.mkdir()
    (ort / "genai_config.json").write_text("{}")
    done = _invoke("bench", fake, "--baseline", hf_folder)
    assert done.exit_code == 2 and "is not an OpenVINO GenAI folder" in _flat(done.output)
    done = _invoke("bench", fake, "--baseline", ort)
    assert done.exit_code == 2 and "--to openvino-genai" in _flat(done.output)
    done = _invoke("bench", ort, "--baseline", fake)
    assert done.exit_code == 2 and "is not an ONNX Runtime GenAI folder" in _flat(done.output)
    done = _invoke("bench", hf_folder)
    assert done.exit_code == 2 and "nor an OpenVINO GenAI folder" in _flat(done.output)
    # options an LLM bench cannot honour are refused, not ignored
    done = _invoke("bench", ort, "--batch", "8")
    assert done.exit_code == 2 and "at batch 1" in _flat(done.output)
    done = _invoke("bench", fake, "--runtime", "onnxruntime")
    assert done.exit_code == 2 and "runs in openvino-genai only" in _flat(done.output)
