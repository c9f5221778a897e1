"""Structured pruning: the channel graph cuts coupled channels together and nothing it does not understand."""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import zoo
from torch import nn

import modelpress as mp
from modelpress.errors import DataError, GraphError, RecipeError
from modelpress.graph.channels import ChannelGraph
from modelpress.techniques.structured import agp_ratio, prune_gradually


class Residual(nn.Module):
    """conv-BN-ReLU stem, a residual pair of convs, flatten into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.conv2(torch.relu(self.conv1(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def _residual() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
        # conv1's channels 0, 2, ..., 14 contribute nothing: removing them must not change the output.
        model.conv1.weight[::2] = 0
        model.conv1.bias[::2] = 0
        model.conv2.weight[:, ::2] = 0
    return model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_removing_dead_channels_keeps_the_output_exactly():
    model, x = _residual()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5, targets=("conv1",))], [(x,)])
    assert small.conv1.out_channels == 8 and small.conv2.in_channels == 8
    assert small.stem.out_channels == 8  # only conv1 was selected
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=1e-5)


def test_residual_channels_are_cut_together_everywhere():
    model, x = _residual()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(x,)])
    # stem, BN, conv2's output and the head's input columns are one group (the residual addition).
    assert small.stem.out_channels == small.bn.num_features == small.conv2.out_channels == 4
    assert small.conv1.in_channels == 4 and small.conv1.out_channels == 8
    assert small.head.in_features == 4 * 16 and small.head.out_features == 5
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    assert _params(small) < 0.5 * _params(model)


def test_round_to_and_ignore(caplog):
    model, x = _residual()
    # Nothing changes in either (compress would refuse such a recipe), so the step runs alone.
    small = prune_gradually(copy.deepcopy(model), mp.StructuredPruningConfig(ratio=0.3, round_to=8), [(x,)])
    assert small.conv1.out_channels == 16  # keep ceil(0.7 * 16 / 8) * 8 = 16
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.structured"):
        small = prune_gradually(
            copy.deepcopy(model), mp.StructuredPruningConfig(ratio=0.5, ignore=("conv2",)), [(x,)]
        )
    assert small.conv2.out_channels == 8 and small.stem.out_channels == 8  # conv2 protects its group
    assert small.conv1.out_channels == 16  # conv2 reads conv1's channels: protected too
    assert "'conv2' is protected" in caplog.text


@pytest.mark.parametrize("arch", sorted(zoo.ZOO))
def test_zoo_models_shrink_and_keep_their_output_shape(arch):
    model, inputs = zoo.ZOO[arch]()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [inputs])
    with torch.no_grad():
        assert small(*inputs).shape == model(*inputs).shape
    ratio = _params(small) / _params(model)
    # Convolutional models lose ~half the channels of each layer (~3/4 of the weights); transformers (ViT too) keep
    # their residual width and embeddings; the LSTM keeps its embedding.
    assert ratio < {
        "bert_encoder": 0.8,
        "gpt_decoder": 0.85,
        "lstm_classifier": 0.75,
        "vit_encoder": 0.65,
    }.get(arch, 0.4)


def test_mlp_neurons_of_a_llama_block_are_cut_in_gate_up_and_down():
    model, inputs = zoo.gpt_decoder()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5, round_to=8)], [inputs])
    mlp = small.lm.model.layers[0].mlp
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == mlp.down_proj.in_features == 64


def test_macs_halve_on_a_cnn():
    model, x = _residual()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(x,)])
    assert mp.profile(small, (x,)).macs < 0.5 * mp.profile(model, (x,)).macs


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if x.sum() > 0 else -self.a(x)


def test_bad_input_is_named_and_the_model_untouched():
    with pytest.raises(RecipeError, match="ratio=1.0 must be in"):
        mp.StructuredPruningConfig(ratio=1.0)
    model, x = _residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match="example inputs"):
        mp.compress(model, [mp.StructuredPruningConfig()])
    with pytest.raises(RecipeError, match="ignore \\['nope'\\] match no module"):
        mp.compress(model, [mp.StructuredPruningConfig(ignore=("nope",))], [(x,)])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(GraphError, match="torch.export cannot trace DataDependent"):
        ChannelGraph(DataDependent(), (torch.ones(1, 4),))


def _task() -> tuple[
    nn.Module, list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]
]:
    """A small MLP trained on a seeded 4-class problem, with held-out items."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    labels = torch.randint(0, 4, (1024,), generator=g)
    x = centers[labels] + torch.randn(1024, 16, generator=g)
    items = [(x[i : i + 64], labels[i : i + 64]) for i in range(0, 1024, 64)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        for xb, yb in items[:12]:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval(), items[:12], items[12:]


@pytest.mark.parametrize("loss", ["task", "mse", "kl"])
def test_recovery_improves_accuracy_over_the_unrecovered_model(loss):
    model, train, held = _task()
    data = train if loss == "task" else [(xb,) for xb, _ in train]
    cut = mp.StructuredPruningConfig(ratio=0.9)
    plain = mp.compress(model, [cut], [(xb,) for xb, _ in train])
    config = mp.StructuredPruningConfig(ratio=0.9, recover=mp.DistillConfig(loss=loss, epochs=5, lr=1e-2))
    recovered = mp.compress(model, [config], data)
    assert plain[0].out_features == recovered[0].out_features == 7  # ceil(0.1 * 64)
    assert mp.accuracy(recovered, held) > mp.accuracy(plain, held) + 0.02


def test_gqa_heads_go_with_their_query_heads_and_the_hf_config_round_trips(tmp_path):
    from transformers import LlamaForCausalLM

    model, inputs = zoo.gpt_decoder()  # 4 query heads, 2 key/value heads of 16, FFN 128
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [inputs])
    attn = small.lm.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (32, 16, 32)
    config = small.lm.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.intermediate_size == 64
    small.lm.save_pretrained(tmp_path / "pruned")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=inputs[0]).logits, small(*inputs))
    assert model.lm.config.num_attention_heads == 4  # the user's model and config are untouched


def test_bert_heads_are_cut_and_the_config_limit_is_said(caplog):
    model, inputs = zoo.bert_encoder()
    with caplog.at_level(logging.WARNING, logger="modelpress.techniques.structured"):
        small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [inputs])
    attention = small.bert.encoder.layer[0].attention
    assert attention.self.query.out_features == 32 and attention.output.dense.in_features == 32
    assert "cannot describe the pruned model" in caplog.text
    kept = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5, heads=False)], [inputs])
    assert kept.bert.encoder.layer[0].attention.self.query.out_features == 64


@pytest.mark.parametrize(
    ("cell", "layers", "bidirectional"),
    [(nn.LSTM, 1, False), (nn.GRU, 1, False), (nn.LSTM, 2, True), (nn.GRU, 2, False)],
)
def test_dead_recurrent_units_are_removed_exactly(cell, layers, bidirectional):
    # Stacked and bidirectional too: unit i of every layer and direction is one channel (hidden_size is shared).
    torch.manual_seed(0)
    directions = 2 if bidirectional else 1

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(6, 8, num_layers=layers, batch_first=True, bidirectional=bidirectional)
            self.fc = nn.Linear(8 * directions, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.fc(out[:, -1])

    model = Recurrent().eval()
    gates = 4 if cell is nn.LSTM else 3
    with torch.no_grad():  # units 0, 2, 4, 6 see nothing and say nothing: their state stays 0
        for name, p in model.rnn.named_parameters():
            p.view(gates, 8, -1)[:, ::2] = 0
            if name.startswith("weight_hh") or (name.startswith("weight_ih") and "_l0" not in name):
                p[:, ::2] = 0  # what reads them: the recurrence, the layer above (forward | backward)
        model.fc.weight[:, ::2] = 0
    x = torch.randn(2, 5, 6)
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(x,)])
    assert small.rnn.hidden_size == 4 and small.fc.in_features == 4 * directions
    assert all(p.shape[0] == gates * 4 for p in small.rnn.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_driven_importance_removes_the_dead_channels_first(importance):
    model, x = _residual()
    # Taylor needs labels: with recover loss "task" the items are (inputs, labels); the tiny lr keeps the weights.
    labeled = importance == "taylor"
    config = mp.StructuredPruningConfig(
        ratio=0.5,
        targets=("conv1",),
        importance=importance,
        recover=mp.DistillConfig(loss="task", lr=1e-12) if labeled else None,
    )
    small = mp.compress(model, [config], [(x, torch.tensor([1, 3]))] if labeled else [(x,)])
    assert small.conv1.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-6, rtol=1e-5)


def test_activation_importance_sees_what_the_weights_hide():
    """Hidden unit 0 has the largest weights but never fires on the data: magnitude keeps it, activation
    statistics remove it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight[0] = 5.0
        model[0].bias[0] = -100.0  # ReLU(5 * sum(x) - 100) = 0 for the data below
        model[2].weight[:, 0] = 5.0
    data = [(torch.rand(16, 4),) for _ in range(4)]
    cut = {"ratio": 0.125, "targets": ("0",)}
    by_weight = mp.compress(model, [mp.StructuredPruningConfig(**cut, importance="l2")], data)
    by_activation = mp.compress(model, [mp.StructuredPruningConfig(**cut, importance="activation")], data)
    assert by_weight[0].out_features == by_activation[0].out_features == 7
    assert torch.equal(by_weight[0].weight[0], model[0].weight[0])  # kept
    with torch.no_grad():  # the unit that never fires is gone: the output is unchanged
        torch.testing.assert_close(by_activation(data[0][0]), model(data[0][0]))


def test_taylor_scores_a_language_model_on_next_tokens_and_names_a_missing_loss():
    model, inputs = zoo.gpt_decoder()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5, importance="taylor")], [inputs])
    assert small.lm.model.layers[0].mlp.gate_proj.out_features == 64
    assert all(p.grad is None for p in small.parameters())
    cnn, x = _residual()
    with pytest.raises(DataError, match="importance='taylor' needs a loss"):
        mp.compress(cnn, [mp.StructuredPruningConfig(importance="taylor")], [(x,)])


class TwoBranches(nn.Module):
    """Two independent hidden layers; branch b has half its units nearly dead."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.a2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.b1, self.b2 = nn.Linear(8, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.b1.weight[8:] *= 1e-3
            self.b2.weight[:, 8:] *= 1e-3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.relu(self.a1(x))) + self.b2(torch.relu(self.b1(x)))


def test_global_ranking_takes_the_ratio_from_the_least_important_groups():
    torch.manual_seed(0)
    model, data = TwoBranches().eval(), [(torch.randn(4, 8),)]
    config = mp.StructuredPruningConfig(ratio=0.25, targets=("a1", "b1"), global_ranking=True)
    small = mp.compress(model, [config], data)
    assert (small.a1.out_features, small.b1.out_features) == (16, 8)  # 8 of 32 channels, all from b
    capped = mp.compress(model, [dataclasses.replace(config, ratio=0.5, max_ratio=0.25)], data)
    assert (capped.a1.out_features, capped.b1.out_features) == (12, 12)


def test_gradual_rounds_reach_the_one_shot_sizes_and_watch_quality():
    model, labeled, _ = _task()
    train = [(xb,) for xb, _ in labeled]
    one_shot = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.75)], train)
    config = mp.StructuredPruningConfig(ratio=0.75, schedule_steps=3)
    rounds: list[int] = []
    scores = iter([0.9, 0.8, 0.5])
    gradual = prune_gradually(copy.deepcopy(model), config, train, train=lambda m, step: rounds.append(step))
    assert rounds == [1, 2, 3]
    assert [m.out_features for m in gradual if isinstance(m, nn.Linear)] == [
        m.out_features for m in one_shot if isinstance(m, nn.Linear)
    ]
    stopped = prune_gradually(copy.deepcopy(model), config, train, evaluate=lambda m: next(scores), floor=0.7)
    assert stopped[0].out_features == 64 - round(64 * agp_ratio(0.75, 2, 3))  # the second round's model
    with pytest.raises(RecipeError, match="floor needs `evaluate`"):
        prune_gradually(model, config, train, floor=0.5)


def test_reconstruction_refits_what_the_removed_channels_did():
    """Correlated hidden units: the refit kept ones (and the bias) take over for the removed ones, and the
    output error drops well below plain slicing; a head-pruned BERT layer gains the same way."""
    model, labeled_items, held = _task()
    data = [(xb,) for xb, _ in labeled_items]
    cut = mp.StructuredPruningConfig(ratio=0.5, importance_batches=12)
    plain = mp.compress(model, [cut], data)
    refit = mp.compress(model, [dataclasses.replace(cut, reconstruct=True)], data)
    x = torch.cat([xb for xb, _ in held])
    with torch.no_grad():
        want = model(x)
        err_plain = (plain(x) - want).pow(2).mean()
        err_refit = (refit(x) - want).pow(2).mean()
    assert err_refit < 0.5 * err_plain
    bert, inputs = zoo.bert_encoder()
    items = [mp.parity_inputs(inputs, count=1, seed=s)[0] for s in range(4)]
    with torch.no_grad():
        want = bert(*inputs)
        errs = [
            (mp.compress(bert, [mp.StructuredPruningConfig(ratio=0.5, reconstruct=r)], items)(*inputs) - want)
            .pow(2)
            .mean()
            for r in (False, True)
        ]
    assert errs[1] < errs[0]


def test_a_pruned_vit_round_trips_through_its_hf_config(tmp_path):
    from transformers import ViTModel

    model, inputs = zoo.vit_encoder()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [inputs])
    assert (small.vit.config.num_attention_heads, small.vit.config.intermediate_size) == (2, 64)
    small.vit.save_pretrained(tmp_path / "vit")
    reloaded = ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=inputs[0]).last_hidden_state[:, 0], small(*inputs))


def test_reconstruction_refits_convolutions_too():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1, stride=2), nn.Flatten()
    ).eval()
    data = [(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    cut = mp.StructuredPruningConfig(ratio=0.5, targets=("0",))
    errors = []
    for reconstruct in (False, True):
        small = mp.compress(model, [dataclasses.replace(cut, reconstruct=reconstruct)], data)
        assert small[2].in_channels == 8
        with torch.no_grad():
            errors.append(float((small(x) - model(x)).pow(2).mean()))
    assert errors[1] < 0.7 * errors[0]


def _rows_kept(pruned: torch.Tensor, original: torch.Tensor) -> list[int]:
    """The original row each row of `pruned` is (rows are copied, not changed, by pruning)."""
    return [int((original - row).abs().sum(dim=1).argmin()) for row in pruned]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_gpt2_heads_are_rows_of_the_fused_c_attn_and_ffn_neurons_of_c_fc():
    # Removing a head or an FFN neuron is zeroing what reads it: the pruned GPT-2 computes exactly what the
    # original does with c_proj's inputs from the removed heads (attention) and neurons (MLP) zeroed.
    model, (ids,) = zoo.gpt2_lm()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(ids,)])
    reference = copy.deepcopy(model)
    for block, pruned, ref in zip(
        model.transformer.h, small.transformer.h, reference.transformer.h, strict=True
    ):
        attn = pruned.attn
        assert (attn.num_heads, attn.head_dim, attn.split_size) == (2, 16, 32)
        assert attn.c_attn.weight.shape == (96, 64) and attn.c_proj.weight.shape == (64, 32)
        c_attn = block.attn.c_attn.weight.detach().t()  # Conv1D (in, out) -> rows q | k | v
        rows = _rows_kept(attn.c_attn.weight.detach(), c_attn)
        heads = sorted({r // 16 for r in rows[:32]})
        assert len(heads) == 2
        assert rows == [part * 64 + h * 16 + i for part in range(3) for h in heads for i in range(16)]
        neurons = _rows_kept(pruned.mlp.c_fc.weight.detach(), block.mlp.c_fc.weight.detach().t())
        assert len(set(neurons)) == 128
        with torch.no_grad():  # Conv1D weights are (in, out): zero the input rows
            dropped = [i for i in range(64) if i // 16 not in heads]
            ref.attn.c_proj.weight[dropped] = 0
            ref.mlp.c_proj.weight[[i for i in range(256) if i not in set(neurons)]] = 0
    assert small.config.n_inner == 128 and model.config.n_inner is None
    torch.testing.assert_close(_logits(small, ids), _logits(reference, ids), atol=1e-5, rtol=1e-4)


def test_phi3_gate_up_halves_and_fused_qkv_heads_are_cut_together(tmp_path):
    from transformers import Phi3ForCausalLM

    model, (ids,) = zoo.phi3_decoder()  # 4 query heads, 2 key/value heads of 16; gate_up 2 x 128
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(ids,)])
    reference = copy.deepcopy(model)
    for layer, pruned, ref in zip(
        model.model.layers, small.model.layers, reference.model.layers, strict=True
    ):
        # gate_up = gate | up: the same neurons leave both halves, and down_proj's columns.
        gate_up = layer.mlp.gate_up_proj.weight.detach()
        rows = _rows_kept(pruned.mlp.gate_up_proj.weight.detach(), gate_up)
        gate, up = rows[:64], rows[64:]
        assert up == [128 + r for r in gate] and pruned.mlp.down_proj.in_features == 64
        # qkv = q (4 heads) | k (2) | v (2): a key/value head leaves with its 2 query heads.
        qkv = layer.self_attn.qkv_proj.weight.detach()
        rows = _rows_kept(pruned.self_attn.qkv_proj.weight.detach(), qkv)
        kv = sorted({(r - 64) // 16 for r in rows[32:48]})
        assert len(kv) == 1 and rows[:32] == [
            h * 16 + i for h in (2 * kv[0], 2 * kv[0] + 1) for i in range(16)
        ]
        assert rows[48:] == [96 + kv[0] * 16 + i for i in range(16)]
        with torch.no_grad():
            ref.mlp.down_proj.weight[:, [i for i in range(128) if i not in set(gate)]] = 0
            ref.self_attn.o_proj.weight[:, [i for i in range(64) if i // 32 != kv[0]]] = 0
    config = small.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    assert config.intermediate_size == 64 and model.config.num_attention_heads == 4
    torch.testing.assert_close(_logits(small, ids), _logits(reference, ids), atol=1e-5, rtol=1e-4)
    small.save_pretrained(tmp_path / "phi3")
    reloaded = Phi3ForCausalLM.from_pretrained(tmp_path / "phi3").eval()
    torch.testing.assert_close(_logits(reloaded, ids), _logits(small, ids))


def test_mixtral_experts_lose_their_own_least_important_neurons():
    model, (ids,) = zoo.moe_decoder()  # 4 experts, gate_up (4, 128, 64), down (4, 64, 64)
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [(ids,)])
    reference = copy.deepcopy(model)
    for layer, pruned, ref in zip(
        model.model.layers, small.model.layers, reference.model.layers, strict=True
    ):
        experts = pruned.mlp.experts
        assert experts.gate_up_proj.shape == (4, 64, 64) and experts.down_proj.shape == (4, 64, 32)
        assert experts.intermediate_dim == 32
        chosen = []
        for e in range(4):
            rows = _rows_kept(experts.gate_up_proj[e].detach(), layer.mlp.experts.gate_up_proj[e].detach())
            assert rows[32:] == [64 + r for r in rows[:32]]  # gate and up rows of the same neurons
            chosen.append(frozenset(rows[:32]))
            with torch.no_grad():
                ref.mlp.experts.down_proj[e][:, [i for i in range(64) if i not in chosen[-1]]] = 0
        assert len(set(chosen)) > 1  # each expert keeps its own neurons
        att = pruned.self_attn  # GQA: one key/value head of two, with its query heads
        kv = _rows_kept(att.k_proj.weight.detach(), layer.self_attn.k_proj.weight.detach())[0] // 16
        with torch.no_grad():
            ref.self_attn.o_proj.weight[:, [i for i in range(64) if i // 32 != kv]] = 0
    assert small.config.intermediate_size == 32
    torch.testing.assert_close(_logits(small, ids), _logits(reference, ids), atol=1e-5, rtol=1e-4)


def test_swin_relative_position_bias_loses_the_columns_of_removed_heads():
    model, inputs = zoo.swin_classifier()
    small = mp.compress(model, [mp.StructuredPruningConfig(ratio=0.5)], [inputs])
    for name, att in small.named_modules():
        if name.endswith("blocks.0.attention"):
            table = att.relative_position_bias.relative_position_bias_table
            assert table.shape[1] == att.q_proj.out_features // att.head_dim == att.num_attention_heads
    with torch.no_grad():
        assert small(*inputs).logits.shape == model(*inputs).logits.shape


class _Checked(nn.Module):
    """Two hidden layers; forward checks one's width in Python, a check torch.export does not see."""

    def __init__(self, together: bool = False) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.c, self.d = nn.Linear(8, 16), nn.Linear(16, 4)
        self.together = together

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = torch.relu(self.a(x)), torch.relu(self.c(x))
        if (h.shape[-1] == g.shape[-1] == 8) if self.together else h.shape[-1] != 16:
            raise ValueError("hidden width must be 16")
        return self.b(h) + self.d(g)


def test_a_cut_that_breaks_the_forward_is_kept_and_named(caplog):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="modelpress.techniques.structured"):
        small = mp.compress(_Checked().eval(), [mp.StructuredPruningConfig(ratio=0.5)], [(x,)])
    assert small.a.out_features == 16 and small.c.out_features == 8
    assert (
        "kept [a]: cutting them breaks the model's forward (ValueError: hidden width must be 16)"
        in caplog.text
    )
    with pytest.raises(GraphError, match="break it together"):
        mp.compress(_Checked(together=True).eval(), [mp.StructuredPruningConfig(ratio=0.5)], [(x,)])


def test_mobilebert_bottleneck_norms_and_heads_are_cut_and_refit():
    # MobileBERT's NoNorm (x * weight + bias) is sliced with the bottleneck channels it scales; its query
    # projection loses input columns (bottleneck) and rows (heads) at once, and reconstruction refits both.
    model, inputs = zoo.mobilebert_encoder()
    config = mp.StructuredPruningConfig(ratio=0.5, reconstruct=True)
    small = mp.compress(model, [config], mp.parity_inputs(inputs, count=2))
    layer = small.encoder.layer[0]
    assert layer.attention.self.query.weight.shape == (16, 16)
    assert layer.bottleneck.attention.LayerNorm.weight.shape == (16,)
    with torch.no_grad():
        assert small(*inputs).last_hidden_state.shape == model(*inputs).last_hidden_state.shape
    with pytest.raises(DataError, match="importance='taylor' needs a loss"):  # hidden states are not logits
        mp.compress(model, [mp.StructuredPruningConfig(importance="taylor")], [inputs])
