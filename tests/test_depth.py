"""Depth pruning: whole blocks go, the least influential first, and Hugging Face models stay consistent."""

from __future__ import annotations

import logging

import pytest
import torch
import zoo
from torch import nn

import modelpress as mp
from modelpress.errors import DataError, GraphError, RecipeError
from modelpress.ops.similarity import block_similarity
from modelpress.techniques import DepthPruningConfig, config_from_dict, config_to_dict, depth
from modelpress.techniques.depth import find_stack

LOGGER = "modelpress.techniques.depth"


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in state.items())


class Stage(nn.Module):
    """Stem, one ResNet stage (a strided projection block, then three identity blocks), pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(
            zoo.BasicBlock(8, 16, stride=2), *(zoo.BasicBlock(16, 16) for _ in range(3))
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))


def _stage(identity: int | None = 2) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = zoo._finish(Stage())
    if identity is not None:
        with torch.no_grad():  # the residual branch adds 0: relu(0 + x) = x for the post-ReLU input
            block = model.stage[identity]
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    return model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _llama(layers: int = 4, identity: int | None = 2) -> tuple[nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    if identity is not None:
        with torch.no_grad():  # no attention and no MLP output: the layer passes its input through
            model.model.layers[identity].self_attn.o_proj.weight.zero_()
            model.model.layers[identity].mlp.down_proj.weight.zero_()
    return model, torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def test_block_similarity_per_token_and_per_sample():
    x = torch.randn(2, 3, 4)
    assert block_similarity(x, 2 * x) == pytest.approx((6.0, 6))
    assert block_similarity(x, -x) == pytest.approx((-6.0, 6))
    maps = torch.randn(2, 4, 5, 5)
    assert block_similarity(maps, maps)[1] == 2  # one vector per sample


def test_identity_block_has_the_lowest_influence_and_goes_first(caplog):
    model, x = _stage(identity=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        small = mp.compress(model, [DepthPruningConfig(blocks=1)], [(x,)])
    assert len(small.stage) == 3
    assert small.stage[1] is not small.stage[2]
    assert _params(small) < _params(model)
    with torch.no_grad():  # the removed block was the identity: nothing changes
        torch.testing.assert_close(small(x), model(x))
    assert "block influence of 'stage.2': 0.000000" in caplog.text
    assert "removed 1 of 4 BasicBlock blocks of 'stage' (lowest influence): ['stage.2']" in caplog.text
    # the strided block changes shape and is named as such
    assert (
        "'stage.0' cannot be removed: its output (2, 16, 4, 4) differs in shape from its input" in caplog.text
    )
    assert sorted(small.stage.state_dict()) == sorted(
        k for k in model.stage.state_dict() if not k.startswith("3.")
    )  # entries renumbered 0..2


def test_last_removes_the_last_blocks_and_ignore_protects(caplog):
    model, x = _stage(identity=2)
    small = mp.compress(model, [DepthPruningConfig(blocks=2, importance="last")], [(x,)])
    assert len(small.stage) == 2
    assert all(a is not b for a, b in zip(small.stage, model.stage, strict=False))
    torch.testing.assert_close(small.stage[1].conv1.weight, model.stage[1].conv1.weight)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        kept = mp.compress(model, [DepthPruningConfig(blocks=1, ignore=("stage.2",))], [(x,)])
    assert "'stage.2' cannot be removed: it matches `ignore`" in caplog.text
    torch.testing.assert_close(kept.stage[-1].conv1.weight, model.stage[2].conv1.weight)


def test_ratio_counts_the_stack_and_zero_leaves_the_model(caplog):
    model, x = _stage()
    small = mp.compress(model, [DepthPruningConfig(ratio=0.5)], [(x,)])
    assert len(small.stage) == 2  # keep ceil(0.5 * 4)
    # removing nothing is said, and compress refuses a recipe that changed nothing
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with pytest.raises(mp.RecipeError, match="changed none of the model's"):
            mp.compress(model, [DepthPruningConfig(ratio=0.2)], [(x,)])
        with pytest.raises(mp.RecipeError, match="changed none of the model's"):
            mp.compress(model, [DepthPruningConfig(blocks=0)])
    assert len(model.stage) == 4
    assert "ratio=0.2 of 4 BasicBlock blocks of 'stage' removes none; the model is unchanged" in caplog.text
    assert "blocks=0 removes no block; the model is unchanged" in caplog.text


@pytest.mark.parametrize(
    ("arch", "stack"),
    [
        ("gpt_decoder", "lm.model.layers"),
        ("bert_encoder", "bert.encoder.layer"),
        ("inverted_residual_cnn", "blocks"),
    ],
)
def test_zoo_models_lose_a_block_and_keep_their_output_shape(arch, stack):
    model, inputs = zoo.ZOO[arch]()
    assert find_stack(model)[0] == stack
    small = mp.compress(model, [DepthPruningConfig(blocks=1)], [inputs])
    assert len(small.get_submodule(stack)) == len(model.get_submodule(stack)) - 1
    assert _params(small) < _params(model)
    with torch.no_grad():
        assert small(*inputs).shape == model(*inputs).shape
    if arch != "inverted_residual_cnn":
        root = stack.split(".")[0]
        assert small.get_submodule(root).config.num_hidden_layers == 1
        assert model.get_submodule(root).config.num_hidden_layers == 2  # the user's model is untouched


def test_strided_blocks_are_not_removable_and_the_count_is_named():
    model, inputs = zoo.inverted_residual_cnn()
    before = _state(model)
    with pytest.raises(
        RecipeError, match=r"asks to remove 3 of the 4 InvertedResidual blocks of 'blocks', but 2"
    ) as info:
        depth(model, DepthPruningConfig(blocks=3), [inputs])
    assert "'blocks.1': its output (2, 24, 8, 8) differs in shape" in str(info.value)
    assert "Ask for at most blocks: 2" in str(info.value)
    assert len(model.blocks) == 4 and _same_state(model, before)


def test_llama_loses_its_identity_layer_and_saves_reloads_and_generates(tmp_path):
    from transformers import LlamaForCausalLM

    model, ids = _llama(layers=4, identity=2)
    small = mp.compress(model, [DepthPruningConfig(blocks=1)], [(ids,)])
    layers = small.model.layers
    assert len(layers) == 3 and small.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]  # the old layer 3 is now 2
    assert model.config.num_hidden_layers == 4 and model.model.layers[3].self_attn.layer_idx == 3
    with torch.no_grad():
        logits = small(ids).logits
        torch.testing.assert_close(logits, model(ids).logits)
    small.save_pretrained(tmp_path / "pruned")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert len(reloaded.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits)
    prompt = ids[:1, :5]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    cached = small.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, small.generate(prompt, use_cache=False, **kwargs))
    assert torch.equal(cached, model.generate(prompt, use_cache=True, **kwargs))
    assert torch.equal(cached, reloaded.generate(prompt, use_cache=True, **kwargs))


def test_gpt2_n_layer_and_layer_idx_follow():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=3, n_head=4)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        for proj in (model.transformer.h[1].attn.c_proj, model.transformer.h[1].mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    small = mp.compress(model, [DepthPruningConfig(blocks=1)], [(ids,)])
    assert small.config.n_layer == 2 and [b.attn.layer_idx for b in small.transformer.h] == [0, 1]
    with torch.no_grad():
        torch.testing.assert_close(small(ids).logits, model(ids).logits)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        small.generate(ids[:1, :4], use_cache=True, **kwargs),
        small.generate(ids[:1, :4], use_cache=False, **kwargs),
    )


def test_layer_types_are_sliced_with_their_layers():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=types,
        attn_implementation="eager",
    )
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    small = mp.compress(model, [DepthPruningConfig(blocks=1)], [(ids,)])
    assert small.config.num_hidden_layers == 3
    assert small.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        small.generate(ids[:1, :6], use_cache=True, **kwargs),
        model.generate(ids[:1, :6], use_cache=True, **kwargs),
    )


def test_bad_input_is_named_and_the_model_untouched():
    with pytest.raises(RecipeError, match=r"ratio=1.0 must be in \[0, 1\)"):
        DepthPruningConfig(ratio=1.0)
    with pytest.raises(RecipeError, match="blocks=-1 must be 0 or more"):
        DepthPruningConfig(blocks=-1)
    with pytest.raises(RecipeError, match="importance='l2' is unknown"):
        DepthPruningConfig(importance="l2")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="depth: recover: distill: lr=0 must be positive"):
        DepthPruningConfig(recover={"lr": 0})
    with pytest.raises(RecipeError, match="loss='ce' is unknown"):
        DepthPruningConfig(recover={"loss": "ce"})
    with pytest.raises(RecipeError, match="structured: recover: distill: loss='ce' is unknown"):
        mp.StructuredPruningConfig(recover={"loss": "ce"})
    model, ids = _llama(layers=2, identity=None)
    before = _state(model)
    with pytest.raises(
        RecipeError, match=r"asks to remove 2 of the 2 LlamaDecoderLayer .* at least one must stay"
    ):
        depth(model, DepthPruningConfig(blocks=2), [(ids,)])
    with pytest.raises(
        RecipeError, match=r"stack='model.blocks' is not a module of the model. .*\['model.layers'\]"
    ):
        depth(model, DepthPruningConfig(blocks=1, stack="model.blocks"), [(ids,)])
    with pytest.raises(RecipeError, match="stack='model.norm' is a LlamaRMSNorm, not an nn.ModuleList"):
        depth(model, DepthPruningConfig(blocks=1, stack="model.norm"), [(ids,)])
    with pytest.raises(RecipeError, match=r"ignore \['nope'\] match no module"):
        depth(model, DepthPruningConfig(blocks=1, ignore=("nope",)), [(ids,)])
    with pytest.raises(DataError, match="needs example inputs"):
        depth(model, DepthPruningConfig(blocks=1))
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert _same_state(model, before)
    resnet, inputs = zoo.resnet_cnn()  # its two blocks are plain attributes, not a stack
    with pytest.raises(GraphError, match="found no stack of repeated blocks in TinyResNet.*`stack:`"):
        depth(resnet, DepthPruningConfig(blocks=1), [inputs])


def test_named_stack_of_plain_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 8)
    small = mp.compress(model, [DepthPruningConfig(blocks=1, stack="")], [(x,)])
    # the Linear layers are the repeated class; the last changes the width, so one of the first two goes
    assert [type(m).__name__ for m in small].count("Linear") == 2 and small[-1].out_features == 3
    assert small(x).shape == (4, 3)


def test_distill_recovery_trains_the_pruned_model():
    model, x = _stage(identity=None)
    data = [(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    plain = mp.compress(model, [DepthPruningConfig(blocks=1)], data)
    tuned = mp.compress(
        model, [DepthPruningConfig(blocks=1, recover={"loss": "mse", "steps": 3, "lr": 1e-2})], data
    )
    assert not torch.equal(plain.fc.weight, tuned.fc.weight)
    with torch.no_grad():
        assert tuned(x).shape == model(x).shape


def test_config_round_trips(tmp_path):
    config = DepthPruningConfig(blocks=2, importance="last", stack="model.layers", ignore=("re:.*0",))
    raw = config_to_dict(config)
    assert raw["type"] == "depth" and raw["ignore"] == ["re:.*0"]
    assert config_from_dict(raw) == config
    path = tmp_path / "recipe.yaml"
    path.write_text(mp.dump_recipe([config]))
    assert mp.load_recipe(path) == [config]
    assert config_from_dict({"type": "depth"}) == DepthPruningConfig()
    with pytest.raises(RecipeError, match="ratio=1.5 must be in"):
        config_from_dict({"type": "depth", "ratio": 1.5})
