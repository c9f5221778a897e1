"""Recipes that chain the technique families (issue 27): pruning or factorization, then distillation from the
model before the recipe, then weight sharing and int8, on a tiny transformer of the zoo. Each recipe is YAML
read by `load_recipe` and run by `compress`; the exported file runs with parity in every runtime and holds
what the compressed model claims (its stored size checked on disk)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import zoo
from onnx import numpy_helper

import modelpress as mp

CHAINS = {
    # depth -> distill -> cluster (int8 codebooks of 16 values for the embeddings) -> static int8 (Linear)
    "depth-distill-cluster-int8": (
        """
- {type: depth, blocks: 1}
- {type: distill, loss: mse, steps: 4, lr: 0.001}
- {type: cluster, values: 16, codebook_bits: 8, layers: [embedding]}
- {type: static_int8, calibration_batches: 4}
""",
        0.2,  # measured 0.17 of the fp32 weights' bytes
    ),
    # lowrank (Linear and embeddings at half their weights) -> distill -> static int8
    "lowrank-distill-int8": (
        """
- {type: lowrank, ratio: 0.5, layers: [linear, embedding]}
- {type: distill, loss: mse, steps: 4, lr: 0.001}
- {type: static_int8, calibration_batches: 4}
""",
        0.45,  # measured 0.39: the factorized embedding stays fp32
    ),
}
GRAPH_BYTES = 48_000  # what the graph itself (nodes, shapes, scales) adds to the weights: measured 18-35 KB


def _initializer_bytes(path) -> dict[str, int]:
    """Bytes of the file's stored tensors by element type (int8, uint8 packed indices, float32)."""
    totals: dict[str, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        totals[str(array.dtype)] = totals.get(str(array.dtype), 0) + array.nbytes
    return totals


@pytest.mark.slow
@pytest.mark.parametrize("chain", sorted(CHAINS))
def test_a_chained_recipe_exports_with_parity_and_the_claimed_size(chain, tmp_path):
    text, most = CHAINS[chain]
    model, inputs = zoo.bert_encoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = mp.parity_inputs(inputs, count=4, seed=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    recipe = mp.load_recipe(path)
    assert [c.type for c in recipe] == chain.replace("int8", "static_int8").split("-")
    small = mp.compress(model, recipe, data, allow_partial=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the teacher, untouched

    # static shapes: a third of the dynamic export's time (dynamic shapes are the contract test's business)
    onnx_path = mp.export_onnx(small, inputs, tmp_path / f"{chain}.onnx", dynamic=False)
    for runtime in mp.available_runtimes():
        session = mp.open_session(onnx_path, runtime=runtime)
        report = mp.check_parity(small, session, data[:-1], reference=model)  # the last has another row
        assert report.passed, (runtime, report)

    stored = onnx_path.stat().st_size
    claimed = mp.profile(small, inputs, repeats=1, warmup=0).bytes  # the size modelpress reports
    fp32 = 4 * sum(p.numel() for p in model.parameters())  # an fp32 file holds at least this
    tensors = _initializer_bytes(onnx_path)
    print(f"{chain}: file {stored} B, claimed {claimed} B, {stored / fp32:.3f}x the fp32 weights; {tensors}")
    assert claimed <= stored <= claimed + GRAPH_BYTES, (stored, claimed)
    assert stored <= most * fp32, (stored / fp32, most)
    assert tensors.get("int8", 0) > 0  # static int8 weights are in the file, not only fp32 ones
    if "cluster" in chain:  # 4-bit indices packed two a byte: the 1000 x 64 word embedding in 32 KB
        assert tensors.get("uint8", 0) >= 1000 * 64 // 2
        assert tensors.get("uint8", 0) < 1.1 * (1000 + 128) * 64 // 2
    with torch.no_grad():  # still close to the model it was
        cos = torch.nn.functional.cosine_similarity(small(*inputs).flatten(), model(*inputs).flatten(), dim=0)
    assert np.isfinite(float(cos)) and float(cos) > 0.5, float(cos)
