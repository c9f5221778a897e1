import copy
import logging

import pytest
import torch
import zoo
from torch import nn

import modelpress as mp
from modelpress.ops.awq import ActivationStats, search_scales
from modelpress.ops.gptq import WeightGrid, search_clip
from modelpress.techniques.awq import AWQConfig, awq
from modelpress.techniques.quantized import GroupQuantizedLinear, QuantizedLayer
from modelpress.techniques.weight_only import WeightOnlyConfig, weight_only


def _outliers(n_rows=512, k=32, seed=0):
    """Inputs with a few large channels and a weight whose columns there are small: AWQ's case."""
    g = torch.Generator().manual_seed(seed)
    big = torch.ones(k)
    big[:3] = 30.0
    x = torch.randn(n_rows, k, generator=g) * big
    w = torch.randn(16, k, generator=g) / big.sqrt()
    return x, w


def test_activation_stats_mean_and_strided_sample():
    stats = ActivationStats(2, max_rows=4)
    rows = torch.arange(40, dtype=torch.float32).repeat_interleave(2).reshape(40, 2)
    for chunk in rows.split(7):
        stats.update(-chunk)
    assert torch.allclose(stats.mean_abs(), torch.full((2,), 19.5))
    sample = stats.sample()[:, 0].neg()
    assert len(sample) <= 8 and sample[0] == 0
    stride = float(sample[1] - sample[0])
    assert torch.equal(sample, torch.arange(0, 40, stride)[: len(sample)])  # evenly spread


def test_scale_search_beats_plain_rounding_on_outlier_channels():
    x, w = _outliers()
    grid = WeightGrid(4, 16, True)
    s, alpha = search_scales(x.T @ x / len(x), x.abs().mean(0), w, grid)
    assert s is not None and s.shape == (32,) and 0 <= alpha < 1
    assert float(s[:3].min()) > float(s[3:].max())  # the busy channels get the finer steps
    y = x @ w.T
    rtn = float(((x @ grid.fake_quantize(w).T - y) ** 2).mean())
    scaled = float(((x @ (grid.fake_quantize(w * s) / s).T - y) ** 2).mean())
    assert scaled < 0.7 * rtn


def test_clip_search_never_worse_than_no_clipping():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    w = torch.randn(8, 32, generator=g)
    w[0, 0] = 12.0  # one outlier weight sets its group's step
    grid = WeightGrid(4, 16, True)
    ratio = search_clip(x.T @ x / len(x), w, grid)
    assert ratio.shape == (8, 2) and bool((ratio <= 1).all()) and bool((ratio > 0.5).all())
    y = x @ w.T
    clipped = float(((x @ grid.fake_quantize(w, ratio).T - y) ** 2).mean())
    plain = float(((x @ grid.fake_quantize(w).T - y) ** 2).mean())
    assert clipped <= plain


def _llama_with_outliers():
    """The zoo's tiny Llama with a few hidden channels made loud before q/k/v and gate/up (the function is
    unchanged: the norms scale them up, the next weights' columns down), as trained LLMs have."""
    model, example = zoo.gpt_decoder()
    with torch.no_grad():
        for layer in model.lm.model.layers:
            for norm, linears in (
                (
                    layer.input_layernorm,
                    (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                ),
                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
            ):
                norm.weight[:4] *= 20.0
                for linear in linears:
                    linear.weight[:, :4] /= 20.0
    return model, example


def _lm_data(n=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 1000, (2, 16), generator=g),) for _ in range(n)]


def _rel_err(model, small, inputs):
    with torch.no_grad():
        ref, out = model(*inputs), small(*inputs)
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def test_awq_folds_into_the_right_ops_and_beats_rtn(caplog):
    model, example = _llama_with_outliers()
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.awq"):
        small = awq(
            copy.deepcopy(model), AWQConfig(bits=4, group_size=32, ignore=("lm.lm_head",)), _lm_data()
        )
    text = caplog.text
    layer = "lm.model.layers.0"
    assert f"'{layer}.self_attn.v_proj']: scale folded into '{layer}.input_layernorm'" in text
    assert f"'{layer}.mlp.up_proj']: scale folded into '{layer}.post_attention_layernorm'" in text
    assert f"'{layer}.mlp.down_proj']: scale folded into '{layer}.mlp.up_proj'" in text
    assert f"'{layer}.self_attn.o_proj']: no op to fold a scale into" in text  # GQA: v is narrower than o
    assert isinstance(small.lm.model.layers[1].mlp.down_proj, GroupQuantizedLinear)
    assert isinstance(small.lm.lm_head, nn.Linear)
    rtn = weight_only(
        copy.deepcopy(model),
        WeightOnlyConfig(bits=4, group_size=32, layers=("linear",), ignore=("lm.lm_head",)),
    )
    assert _rel_err(model, small, example) < 0.5 * _rel_err(model, rtn, example)


def test_awq_on_bert_folds_only_where_the_function_is_kept(caplog):
    model, example = zoo.bert_encoder()
    g = torch.Generator().manual_seed(2)
    data = [
        (torch.randint(1, 1000, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.int64)) for _ in range(4)
    ]
    with caplog.at_level(logging.INFO, logger="modelpress.techniques.awq"):
        small = awq(copy.deepcopy(model), AWQConfig(bits=4, group_size=32), data)
    layer = "bert.encoder.layer.0"
    assert (
        f"'{layer}.attention.output.dense']: scale folded into '{layer}.attention.self.value'" in caplog.text
    )
    for name in ("attention.self.value", "intermediate.dense", "output.dense"):
        assert f"'{layer}.{name}']: no op to fold a scale into" in caplog.text
    rtn = weight_only(copy.deepcopy(model), WeightOnlyConfig(bits=4, group_size=32, layers=("linear",)))
    assert _rel_err(model, small, example) < _rel_err(model, rtn, example)


def test_awq_int8_per_channel():
    model, example = _llama_with_outliers()
    small = awq(copy.deepcopy(model), AWQConfig(bits=8, group_size=None), _lm_data(4))
    assert isinstance(small.lm.model.layers[0].mlp.up_proj, QuantizedLayer)
    assert _rel_err(model, small, example) < 1e-3


def test_config_and_data_errors():
    with pytest.raises(mp.RecipeError, match="AWQ quantizes Linear layers only"):
        AWQConfig(layers=("conv",))  # type: ignore[arg-type]
    with pytest.raises(mp.RecipeError, match="bits=4 needs a group_size"):
        AWQConfig(group_size=None)
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    with pytest.raises(mp.DataError, match="awq needs calibration data"):
        awq(model, AWQConfig(group_size=32))
    with pytest.raises(mp.DataError, match="input of layer '0' holds NaN"):
        awq(model, AWQConfig(group_size=32), [torch.full((2, 32), float("nan"))])
