"""ONNX Runtime GenAI folders from compressed causal LMs (issue 32): our codes in MatMulNBits, a KV cache,
the runtime's own generate loop, and the greedy-token check that refuses a folder generating otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import modelpress as mp
from modelpress.errors import ExportError

og = pytest.importorskip("onnxruntime_genai", reason="needs the genai extra (onnxruntime-genai)")
transformers = pytest.importorskip("transformers")

from modelpress.deploy import genai  # noqa: E402

TEXT = ["The capital of France is Paris.", "def fibonacci(n): return n", "Once upon a time in a village"]


@pytest.fixture(scope="module")
def tokenizer() -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(TEXT * 10, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_llama(vocab: int, *, tied: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def ops(folder: Path) -> dict[str, int]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int4_folder_runs_in_genai_with_our_codes(tokenizer: object, tmp_path: Path) -> None:
    model = mp.compress(tiny_llama(len(tokenizer)), "int4-weight-only")  # type: ignore[arg-type]
    out = tmp_path / "int4"
    result = genai.export_genai(model, tokenizer, out, check_prompts=TEXT[:2], check_tokens=16)
    assert all(c.passed for c in result.checks), [c.line() for c in result.checks]
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    counts = ops(out)
    # 2 layers x (qkv, o, gate + up, down) + the head; the embedding reads the head's packed table.
    assert counts["MatMulNBits"] == 9 and counts.get("MatMul", 0) == 0 and counts["Split"] == 2
    assert counts["GatherBlockQuantized"] == 1 and counts["GroupQueryAttention"] == 2
    assert not result.float_matmuls
    # The codes are ours: the head's packed table is the layer's own bytes.
    inits = {
        t.name: t for t in onnx.load(str(out / "model.onnx")).graph.initializer if t.name.endswith("qweight")
    }
    head = next(t for name, t in inits.items() if name.startswith("lm_head"))
    packed = model.get_submodule("lm_head").packed
    assert isinstance(packed, torch.Tensor)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(head), packed.numpy())
    # The runtime's own loop generates; the file stores 4-bit weights (smaller than the fp32 one would be).
    ids = tokenizer(TEXT[0])["input_ids"]  # type: ignore[operator]
    assert len(genai.genai_greedy(genai.load_genai(out), ids, 8)) == 8
    fp32_bytes = sum(p.numel() * 4 for p in tiny_llama(len(tokenizer)).parameters())  # type: ignore[arg-type,misc]
    assert result.model_bytes < 0.5 * fp32_bytes


def test_gate_and_up_run_as_one_matmulnbits_with_the_same_outputs(
    tokenizer: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gated MLP's gate and up projections read the same input: one MatMulNBits over both weights, then
    a Split, gives the logits of the two nodes bit for bit."""
    import onnxruntime as ort

    model = mp.compress(tiny_llama(len(tokenizer)), "int4-weight-only")  # type: ignore[arg-type]
    fused = genai.export_genai(model, tokenizer, tmp_path / "fused", check_prompts=())
    monkeypatch.setattr(genai, "_fuse_siblings", lambda graph: 0)
    plain = genai.export_genai(model, tokenizer, tmp_path / "plain", check_prompts=())
    assert ops(fused.path)["MatMulNBits"] == ops(plain.path)["MatMulNBits"] - 2
    names = [n.name for n in onnx.load(str(fused.path / "model.onnx"), load_external_data=False).graph.node]
    assert "/model/layers.0/mlp/gate_proj+up_proj/MatMulNBits" in names
    logits = []
    for folder in (fused.path, plain.path):
        session = ort.InferenceSession(str(folder / "model.onnx"))
        feed = {"input_ids": np.array([[5, 9, 13, 40, 7]]), "attention_mask": np.ones((1, 5), np.int64)}
        for i in session.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, 2, 0, 16), np.float32)
        logits.append(session.run(["logits"], feed)[0])
    np.testing.assert_array_equal(logits[0], logits[1])


def test_a_tied_embedding_quantized_otherwise_than_its_head_keeps_its_own_table(
    tokenizer: object, tmp_path: Path
) -> None:
    # int4 head (decode reads it every token) beside an int8 embedding (a lookup reads one row): two tables.
    recipe = [
        mp.WeightOnlyConfig(bits=4, group_size=32, layers=("linear",)),
        mp.WeightOnlyConfig(bits=8, layers=("embedding",)),
    ]
    model = mp.compress(tiny_llama(len(tokenizer)), recipe)  # type: ignore[arg-type]
    result = genai.export_genai(model, tokenizer, tmp_path / "mixed", check_prompts=TEXT[:1], check_tokens=16)
    assert all(c.passed for c in result.checks), [c.line() for c in result.checks]
    assert result.quantized["/lm_head/MatMul"].startswith("MatMulNBits int4 g32")
    assert result.quantized["/model/embed_tokens/Gather"].startswith("GatherBlockQuantized int8")
    names = {t.name for t in onnx.load(str(tmp_path / "mixed" / "model.onnx")).graph.initializer}
    assert "model.embed_tokens.qweight" in names
    # Quantized alike, the two share one table (the head's).
    same = mp.compress(tiny_llama(len(tokenizer)), "int4-weight-only")  # type: ignore[arg-type]
    shared = genai.export_genai(same, tokenizer, tmp_path / "same", check_prompts=TEXT[:1], check_tokens=4)
    assert shared.quantized["/model/embed_tokens/Gather"].endswith("(the head's table)")


def test_the_lm_recipe_gives_an_int4_head_beside_an_int8_embedding(tokenizer: object, tmp_path: Path) -> None:
    class Wrapper(nn.Module):  # a user's wrapper: the head is 'lm.lm_head'
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=ids).logits

    model = Wrapper(tiny_llama(len(tokenizer)))  # type: ignore[arg-type]
    texts = [tokenizer(TEXT[i % 3])["input_ids"] * 3 for i in range(4)]  # type: ignore[operator]
    small = mp.compress(model, "int4-gptq-lm", [(torch.tensor([ids]),) for ids in texts]).lm
    result = genai.export_genai(small, tokenizer, tmp_path / "lm", check_prompts=TEXT[:1], check_tokens=16)
    assert all(c.passed for c in result.checks), [c.line() for c in result.checks]
    kinds = set(result.quantized.values())
    assert {"MatMulNBits int4 g64 asym", "MatMulNBits int4 g32 asym"} <= kinds
    assert result.quantized["/lm_head/MatMul"] == "MatMulNBits int4 g32 asym"
    assert result.quantized["/model/embed_tokens/Gather"].startswith("GatherBlockQuantized int8")


@pytest.mark.slow
def test_the_mixed_lm_recipe_keeps_the_mlp_outputs_and_the_head_int8(
    tokenizer: object, tmp_path: Path
) -> None:
    model = tiny_llama(len(tokenizer))  # type: ignore[arg-type]
    texts = [tokenizer(TEXT[i % 3])["input_ids"] * 3 for i in range(4)]  # type: ignore[operator]
    small = mp.compress(model, "int4-gptq-lm-mixed", [(torch.tensor([ids]),) for ids in texts])
    result = genai.export_genai(small, tokenizer, tmp_path / "lm", check_prompts=TEXT[:1], check_tokens=16)
    assert all(c.passed for c in result.checks), [c.line() for c in result.checks]
    for name, kind in result.quantized.items():
        if "down_proj" in name or name == "/lm_head/MatMul":
            assert kind.startswith("MatMulNBits int8"), (name, kind)
        elif "MatMul" in name:
            assert kind == "MatMulNBits int4 g64 asym", (name, kind)
    # the embedding and the head, quantized alike in two steps, share the head's table
    assert result.quantized["/model/embed_tokens/Gather"].endswith("(the head's table)")


def test_int8_per_row_matches_torch_exactly_at_accuracy_level_0(tokenizer: object, tmp_path: Path) -> None:
    """int8 per output row (asymmetric) as 8-bit MatMulNBits whose blocks share the row's scale and zero
    point: fp32 maths (accuracy_level 0) reproduces torch's greedy tokens."""
    model = mp.compress(tiny_llama(len(tokenizer), tied=False), "int8-weight-only")  # type: ignore[arg-type]
    result = genai.export_genai(
        model, tokenizer, tmp_path / "int8", accuracy_level=0, check_prompts=TEXT[:1], check_tokens=16
    )
    assert [c.first_divergence for c in result.checks] == [None]
    assert set(result.quantized.values()) >= {
        "MatMulNBits int8 g64 asym",
        "GatherBlockQuantized int8 g64 asym",
    }


def test_int8_blocks_are_chosen_per_layer_and_bad_ones_refused(
    tokenizer: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = mp.compress(tiny_llama(len(tokenizer), tied=False), "int8-weight-only")  # type: ignore[arg-type]
    result = genai.export_genai(
        model,
        tokenizer,
        tmp_path / "b",
        int8_block={"down_proj": 16, "": 32},
        check_prompts=TEXT[:1],
        check_tokens=8,
    )
    assert all(c.passed for c in result.checks)
    assert result.quantized["/model/layers.0/mlp/down_proj/MatMul"] == "MatMulNBits int8 g16 asym"
    assert result.quantized["/model/layers.0/mlp/up_proj/MatMul"] == "MatMulNBits int8 g32 asym"
    with pytest.raises(ExportError, match="int8_block=48"):
        genai.export_genai(model, tokenizer, tmp_path / "bad", int8_block=48)
    int4 = mp.compress(tiny_llama(len(tokenizer)), "int4-weight-only")  # type: ignore[arg-type]
    with caplog.at_level("WARNING", logger="modelpress.deploy.genai"):
        genai.export_genai(
            int4, tokenizer, tmp_path / "int4", int8_block=16, check_prompts=TEXT[:1], check_tokens=4
        )
    assert "int8_block=16 changes nothing" in caplog.text  # no int8 layer: said, not silently ignored


def test_a_folder_that_generates_otherwise_is_not_written(
    tokenizer: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_llama(len(tokenizer))  # type: ignore[arg-type]
    bad = genai.GreedyCheck("p", [1, 2, 3], [1, 5, 5], 1, 7.5)
    monkeypatch.setattr(genai, "check_greedy", lambda *a, **k: [bad])
    out = tmp_path / "llm"
    with pytest.raises(ExportError, match=r"does not generate what the model generates.*logit gap 7\.5"):
        genai.export_genai(model, tokenizer, out)
    assert not out.exists() and (tmp_path / "llm.rejected" / "genai_config.json").exists()


def test_bad_input_is_named(tokenizer: object, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="causal LM"):
        genai.export_genai(nn.Linear(4, 4), tokenizer, tmp_path / "x")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))  # type: ignore[arg-type]
    )
    with pytest.raises(ExportError, match="builder does not support GPT2LMHeadModel.*to='onnx'"):
        genai.export_genai(gpt2.eval(), tokenizer, tmp_path / "gpt2")
    assert not (tmp_path / "gpt2").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        genai.export_genai(tiny_llama(len(tokenizer)), tokenizer, tmp_path / "taken")  # type: ignore[arg-type]


def test_cli_refuses_an_architecture_before_the_recipe_runs(
    tokenizer: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GPT-2 is no architecture of the GenAI builder (nor of our OpenVINO GenAI block): `export --to genai
    --recipe ...` says so before compressing, not after a recipe of many minutes."""
    from click.testing import CliRunner

    import modelpress.pipeline.recipe as recipe
    from modelpress.cli import main

    hf = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))  # type: ignore[arg-type]
    ).save_pretrained(hf)
    tokenizer.save_pretrained(hf)  # type: ignore[attr-defined]

    def no_recipe(*args: object, **kwargs: object) -> None:
        raise AssertionError("the recipe ran before the refusal")

    monkeypatch.setattr(recipe, "compress", no_recipe)
    for to, says in (
        ("genai", "builder does not support GPT2LMHeadModel"),
        ("openvino-genai", "model_type 'gpt2'"),
    ):
        args = ["export", str(hf), "--to", to, "-o", str(tmp_path / to), "--recipe", "int4-gptq-lm-mixed"]
        done = CliRunner().invoke(main, args)
        assert done.exit_code == 2 and says in " ".join(done.output.split()), done.output
        assert not (tmp_path / to).exists()


def test_cli_export_generate_bench(tokenizer: object, tmp_path: Path) -> None:
    """A new user's path: a Hugging Face folder -> `export --to genai` with a recipe -> `generate` -> `bench`."""
    from click.testing import CliRunner

    from modelpress.cli import main

    hf = tmp_path / "hf"
    tiny_llama(len(tokenizer)).save_pretrained(hf)  # type: ignore[arg-type,operator]
    tokenizer.save_pretrained(hf)  # type: ignore[attr-defined]
    out = tmp_path / "llm"
    runner = CliRunner()
    done = runner.invoke(
        main, ["export", str(hf), "--to", "genai", "-o", str(out), "--recipe", "int4-weight-only"]
    )
    assert done.exit_code == 0, done.output
    assert "tokens match" in done.output and "MatMulNBits int4" in done.output
    done = runner.invoke(main, ["generate", str(out), "--prompt", "The capital", "--max-new-tokens", "5"])
    assert done.exit_code == 0, done.output
    assert done.output.startswith("The capital") and len(done.output.strip()) > len("The capital")
    report = tmp_path / "bench.json"
    done = runner.invoke(main, ["bench", str(out), "--rounds", "1", "--seq", "32", "--json", str(report)])
    assert done.exit_code == 0, done.output
    timing = json.loads(report.read_text())["artifact"]
    assert timing["decode_tok_s"] > 0 and timing["peak_rss_bytes"] > 0 and timing["model_bytes"] > 0
    assert "32-token prompt" in " ".join(done.output.split())
    done = runner.invoke(main, ["generate", str(hf), "--prompt", "x"])
    assert done.exit_code != 0 and "not an ONNX Runtime GenAI folder" in " ".join(done.output.split())
    assert not done.output.startswith("x")  # the error comes before any text
    # int8 with its inputs quantized per 16 (nearer fp32); the option belongs to --to genai alone
    args = ["export", str(hf), "--to", "genai", "-o", str(tmp_path / "i8"), "--recipe", "int8-weight-only"]
    done = runner.invoke(main, [*args, "--int8-block", "16"])
    assert done.exit_code == 0 and "MatMulNBits int8 g16" in done.output, done.output
    done = runner.invoke(main, ["export", str(hf), "-o", str(tmp_path / "m.onnx"), "--int8-block", "16"])
    assert done.exit_code != 0 and "--int8-block applies to --to genai only" in done.output


@pytest.mark.slow
def test_cli_calibrates_an_lm_recipe_on_a_text_file(tokenizer: object, tmp_path: Path) -> None:
    """`export --to genai --recipe int4-gptq-lm-mixed --data corpus.txt`: the model's tokenizer cuts the text
    into 512-token windows (no Python function to write); a file that is not text is refused by name."""
    from click.testing import CliRunner

    from modelpress.cli import main

    hf = tmp_path / "hf"
    tiny_llama(len(tokenizer)).save_pretrained(hf)  # type: ignore[arg-type,operator]
    tokenizer.save_pretrained(hf)  # type: ignore[attr-defined]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(TEXT) * 200)
    args = ["export", str(hf), "--to", "genai", "--recipe", "int4-gptq-lm-mixed"]
    done = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "lm"), "--data", str(corpus)])
    assert done.exit_code == 0, done.output
    flat = " ".join(done.output.split())
    assert "calibration: " in flat and "tokens of corpus.txt" in flat and "MatMulNBits int8" in flat
    windows = int(flat.split("calibration: ")[1].split()[0])
    assert 1 < windows < 128 and "~250 KB of text" in flat  # short text: said, and used
    binary = tmp_path / "corpus.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    done = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "bad"), "--data", str(binary)])
    assert done.exit_code == 2 and "not UTF-8 text" in " ".join(done.output.split())
    assert not (tmp_path / "bad").exists()
    # `compress` of the folder reads the text the same way; beside a 'file.py:factory' model it is refused
    done = CliRunner().invoke(
        main, ["compress", str(hf), "-r", "int4-gptq-lm", "-o", str(tmp_path / "c"), "--data", str(corpus)]
    )
    assert done.exit_code == 0, done.output
    assert "tokens of corpus.txt" in " ".join(done.output.split())
    from modelpress.cli import _call_data
    from modelpress.errors import DataError

    with pytest.raises(DataError, match="not of the form 'file.py:fn'.*Hugging Face folder"):
        _call_data(str(corpus), "--data")  # what a model given as 'file.py:factory' gets for a text file
