"""Every registered technique through the same checks, on every zoo architecture.

Forward still runs, the config round-trips through YAML, the ONNX export passes parity in every
installed runtime, and the report shows what the technique did.
"""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
import zoo

import modelpress as mp
import modelpress.pipeline.run as pipeline_run
from modelpress.pipeline.run import run_job

# At least one representative config per registered technique (keyed by a readable name); a new
# technique must add itself here.
CONTRACT_CONFIGS = {
    "weight_only": mp.WeightOnlyConfig(),
    "weight_only_int4": mp.WeightOnlyConfig(bits=4, group_size=32),
    "static_int8": mp.StaticInt8Config(calibration_batches=4),
    "dynamic_int8": mp.DynamicInt8Config(),
    "qat": mp.QATConfig(calibration_batches=4),
    "gptq": mp.GPTQConfig(bits=4, group_size=32, calibration_batches=4),
    "awq": mp.AWQConfig(bits=4, group_size=32, calibration_batches=4),
    "sparsity": mp.SparsityConfig(
        method="sparsegpt", bits=8, layers=("linear", "conv"), calibration_batches=4
    ),
    "structured": mp.StructuredPruningConfig(ratio=0.5),
    "depth": mp.DepthPruningConfig(blocks=1),
    # issue 27 (each owned by its helper while being written)
    "lowrank": mp.LowRankConfig(ratio=0.5, whiten=True, layers=("linear", "conv", "embedding")),
    # one codebook per layer, 4-bit indices
    "cluster": mp.ClusterConfig(values=16, layers=("linear", "conv", "embedding")),
    # distill alone on the unchanged model changes nothing (refused below, NOTHING_TO_DO); after depth
    # pruning it is checked through the pipeline in test_distill.py::test_depth_then_distill_exports_with_parity.
    "distill": mp.DistillConfig(loss="mse", steps=2),
    "mixed_precision": mp.MixedPrecisionConfig(
        min_cosine=0.99, holdout=2, scheme={"type": "static_int8", "calibration_batches": 2}
    ),
    # int8 then int4 weight-only, the strongest within 5% of the original's cosine (issue 28)
    "progressive": mp.ProgressiveConfig(
        technique={"type": "weight_only", "group_size": 32}, max_drop="5%", holdout=2
    ),
}


# (technique, arch) pairs with nothing to compress: dynamic int8 and AWQ are for Linear layers; the
# generator has none. The recipe is refused, naming the layers it left alone.
NOTHING_TO_DO = {
    ("dynamic_int8", "dcgan_generator"),
    ("awq", "dcgan_generator"),
    ("sparsity", "dcgan_generator"),  # transposed convolutions are not pruned
    ("dynamic_int8", "dense_unet"),  # convolutions only
    ("awq", "dense_unet"),
    ("cluster", "gru_classifier"),  # its only Linear (320 weights) is under cluster's 1024-weight minimum
    *{("distill", arch) for arch in zoo.ZOO},  # student = teacher: nothing to learn, no weight changes
}


def test_every_technique_has_a_contract_config():
    assert {config.type for config in CONTRACT_CONFIGS.values()} == set(mp.REGISTRY)


@pytest.mark.parametrize("technique", sorted(CONTRACT_CONFIGS))
def test_config_round_trips_through_yaml(technique, tmp_path):
    config = CONTRACT_CONFIGS[technique]
    path = tmp_path / "recipe.yaml"
    path.write_text(mp.dump_recipe([config]))
    assert mp.load_recipe(path) == [config]


# Variant configs of a technique already in the matrix run only where they differ from it: int4 groups
# apply to Linear layers, so on the convolutional and recurrent models (a tiny head) weight_only_int4 is
# weight_only again. Keeps the suite inside its 15-minute budget.
# Depth pruning needs a stack of repeated, shape-keeping blocks: the transformers and the MobileNet-style CNN.
VARIANT_ARCHS = {
    "weight_only_int4": ("bert_encoder", "gpt_decoder"),
    "depth": ("bert_encoder", "gpt_decoder", "inverted_residual_cnn", "vit_encoder"),
    "progressive": ("bert_encoder",),  # a wrapper: the technique it steps runs on every model above
    # Static int8 graphs (QAT's trained scales, mixed precision's static int8 on the layers it keeps), which
    # static_int8 exports on every model: one Linear, one conv and one recurrent/transposed model each. The
    # generality test runs both on every architecture of the wide zoo.
    "qat": ("gpt_decoder", "inverted_residual_cnn", "dcgan_generator"),
    "mixed_precision": ("bert_encoder", "resnet_cnn", "lstm_classifier"),
}
PAIRS = [
    (technique, arch)
    for technique in sorted(CONTRACT_CONFIGS)
    for arch in sorted(zoo.ZOO)
    if arch in VARIANT_ARCHS.get(technique, (arch,))
]


def _fingerprint(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    digest = hashlib.sha256(repr(model).encode())
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().cpu().numpy().tobytes())
    for t in inputs:
        digest.update(f"{tuple(t.shape)} {t.dtype}".encode())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def export_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("exports"), {}


@pytest.fixture
def cached_export(monkeypatch, export_cache):
    """The zoo's seeded fp32 models are exported once per architecture, not once per technique (the ONNX
    export is most of a transformer's test time): identical models (same modules, same weights) reuse
    the first export's file. Compressed models differ and are exported as usual."""
    folder, seen = export_cache
    export = pipeline_run.export_onnx

    def memoized(model, example_inputs, path, **kwargs):
        model.eval()  # as export_onnx leaves it
        key = _fingerprint(model, tuple(example_inputs)) + repr(sorted(kwargs.items()))
        if key not in seen:
            seen[key] = export(model, example_inputs, folder / f"{len(seen)}.onnx", **kwargs)
        shutil.copyfile(seen[key], path)
        return path

    monkeypatch.setattr(pipeline_run, "export_onnx", memoized)


@pytest.mark.usefixtures("cached_export")
@pytest.mark.parametrize(("technique", "arch"), PAIRS)
def test_technique_on_zoo(arch, technique, tmp_path):
    model, inputs = zoo.ZOO[arch]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CONTRACT_CONFIGS[technique]
    calibration = mp.parity_inputs(inputs, count=4, seed=1)
    if (technique, arch) in NOTHING_TO_DO:
        with pytest.raises(mp.RecipeError, match="changed none of the model's"):
            mp.compress(model, [config], calibration, allow_partial=True)
        return
    result = run_job(
        model,
        inputs,
        [config],
        out_dir=tmp_path / "out",
        name=arch,
        data=calibration,
        batch_sizes=(2,),
        rounds=2,
        memory=False,
        allow_partial=True,  # one technique alone may leave a tiny model's embeddings as they are
    )
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p["passed"] for p in result["parity"])
    assert {p["runtime"] for p in result["parity"]} == set(mp.available_runtimes())
    html = (tmp_path / "out" / "report.html").read_text()
    assert f"&#x27;type&#x27;: &#x27;{config.type}&#x27;" in html
    # every weight layer is accounted for: compressed, removed, or left alone with a reason
    assert "Layers the recipe left alone" in html
    assert all(row["status"] != "left alone" or row["reason"] for row in result["coverage"]["layers"])
    before_layers = {layer["name"]: layer for layer in result["profile"]["baseline"]["layers"]}
    changed = [
        layer
        for layer in result["profile"]["compressed"]["layers"]
        if layer["type"] != before_layers.get(layer["name"], {}).get("type")
        or layer["bytes"] != before_layers.get(layer["name"], {}).get("bytes")
    ]
    removed = set(before_layers) - {layer["name"] for layer in result["profile"]["compressed"]["layers"]}
    assert changed or removed, "the technique changed no layer"
    assert all(layer["type"] in html for layer in changed)
    assert result["profile"]["compressed"]["bytes"] < result["profile"]["baseline"]["bytes"]
    assert result["bench"][f"compressed {mp.available_runtimes()[0]}"]["size_ratio"] < 1.0
