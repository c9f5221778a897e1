"""A compressed causal LM as a folder that ONNX Runtime GenAI's own generate loop reads
(`onnxruntime_genai.Model(folder)`): `model.onnx` with a KV cache, `genai_config.json`, tokenizer files.

How it is built: ONNX Runtime GenAI's model builder writes the decoder graph it runs fastest (fused
`GroupQueryAttention` with its rotary embedding, `SkipSimplifiedLayerNormalization`, Q/K/V in one MatMul,
past/present KV tensors, tied embeddings read from the LM head) from a float Hugging Face folder of the
model. Then every MatMul whose layer modelpress quantized becomes `com.microsoft.MatMulNBits` holding *our*
codes, scales and zero points exactly (never re-quantized), and the embedding a `GatherBlockQuantized`
over the same packed table where the model ties it to the head. Layers left float stay float.

Which of our layers map:
- `GroupQuantizedLinear` (int4/int8 blocks: GPTQ, AWQ, weight_only with groups) -> MatMulNBits as stored;
- `QuantizedLayer` int8 per output row (weight_only int8, the int8 head of the int4 recipes) ->
  8-bit MatMulNBits whose blocks of one row share that row's scale and zero point (the same numbers);
- Q, K and V of one attention fuse into one MatMulNBits when their bits, block sizes and zero points agree;
  so do any other MatMulNBits that read the same input (a gated MLP's gate and up projections), followed by
  a `Split`: one input quantization and one kernel launch instead of two per token, the same numbers.

`accuracy_level` is MatMulNBits' own: 0 computes in fp32 from the dequantized weight (exactly what the
torch model computes); 4 (the builder's CPU default, and ours) quantizes each block of the input to int8 and
runs integer dot products, several times faster at decode, with a small numeric difference that the greedy
check at export measures.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.errors import ExportError, ModelpressError, RuntimeUnavailableError

log = logging.getLogger(__name__)

#: Prompts of the greedy-token check at export (plain text; the tokenizer adds what it adds).
CHECK_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
#: Largest logit gap (torch's top token minus the artifact's token, under torch) accepted where the two
#: greedy paths part: above it the artifact is not computing the model (garbage, wrong weights).
MAX_DIVERGENCE_GAP = 1.0
_GENAI_HINT = "pip install 'modelpress[genai]' (onnxruntime-genai)"


@dataclass
class GreedyCheck:
    """Greedy tokens of the artifact against the compressed torch model for one prompt."""

    prompt: str
    torch_tokens: list[int]
    artifact_tokens: list[int]
    first_divergence: int | None  # step where they part, None if they agree for all tokens
    logit_gap: float  # under torch at that step: top logit minus the artifact's token's logit (0 if none)

    @property
    def passed(self) -> bool:
        return self.first_divergence is None or self.logit_gap <= MAX_DIVERGENCE_GAP

    def line(self) -> str:
        n = len(self.torch_tokens)
        if self.first_divergence is None:
            return f"greedy check {self.prompt!r}: {n}/{n} tokens match"
        return (
            f"greedy check {self.prompt!r}: first {self.first_divergence}/{n} tokens match, then part "
            f"(logit gap {self.logit_gap:.3f} under torch: {'fp rounding' if self.passed else 'FAIL'})"
        )


@dataclass
class GenAIExport:
    path: Path
    files: list[Path]
    checks: list[GreedyCheck] = field(default_factory=list)
    quantized: dict[str, str] = field(default_factory=dict)  # onnx node -> what it became
    float_matmuls: list[str] = field(default_factory=list)

    @property
    def model_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.name.startswith("model.onnx"))

    def notes(self) -> list[str]:
        lines = [c.line() for c in self.checks]
        kinds: dict[str, int] = {}
        for kind in self.quantized.values():
            kinds[kind] = kinds.get(kind, 0) + 1
        done = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        lines.append(f"quantized nodes: {done}; float MatMuls: {len(self.float_matmuls)}")
        lines.append(f"model.onnx + data: {self.model_bytes / 1e6:.1f} MB")
        return lines


# --------------------------------------------------------------------------------------------------
# what our layers store, in MatMulNBits' layout
# --------------------------------------------------------------------------------------------------


@dataclass
class _NBits:
    """One weight in MatMulNBits' layout: packed (N, n_blocks, block * bits / 8) uint8, scales (N, n_blocks)
    fp32, zero points (N, n_blocks) unsigned codes or None (implicit 2^(bits-1))."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    bits: int
    block_size: int

    @property
    def n(self) -> int:
        return int(self.packed.shape[0])

    def key(self) -> tuple[int, int, bool]:
        return self.bits, self.block_size, self.zero_points is not None


def _nbits_of(module: nn.Module, int8_block: int | None = None) -> _NBits | None:
    """The MatMulNBits form of a quantized layer, or None where it has none (float, other compression)."""
    from modelpress.ops.nbits import unpack_blocks
    from modelpress.techniques.quantized import GroupQuantizedLinear, QuantizedLayer

    if isinstance(module, GroupQuantizedLinear):
        blocks = module.packed.shape[1]
        zp = None
        if module.zero_points is not None:
            _, zp_t = unpack_blocks(
                module.packed,
                module.zero_points,
                k=module.in_features,
                bits=module.bits,
                block_size=module.group_size,
            )
            zp = zp_t.numpy().astype(np.uint8)
        return _NBits(
            module.packed.numpy(),
            module.scales.reshape(-1, blocks).numpy().astype(np.float32),
            zp,
            module.in_features,
            module.bits,
            module.group_size,
        )
    if isinstance(module, QuantizedLayer) and getattr(module, "input_scale", None) is None:
        q = module.qweight
        if q.ndim != 2 or module.axis != 0 or not isinstance(module.inner, (nn.Linear, nn.Embedding)):
            return None
        if module.bits != 8 or getattr(module, "input_multiplier", None) is not None:
            return None
        n, k = q.shape
        # one row's blocks share its scale; the block is also what accuracy_level 4 quantizes inputs by
        block = int8_block or next((b for b in (64, 32, 16, 128, 256) if k % b == 0), 32)
        blocks = -(-k // block)
        u = q.to(torch.int32) + 128
        zp_row = None if module.zero_point is None else (module.zero_point.to(torch.int32) + 128)
        pad = blocks * block - k
        if pad:
            fill = (
                torch.full((n, pad), 128, dtype=torch.int32)
                if zp_row is None
                else zp_row[:, None].expand(n, pad)
            )
            u = torch.cat([u, fill], dim=1)
        packed = u.to(torch.uint8).reshape(n, blocks, block).numpy()
        scales = module.scale.float().reshape(n, 1).expand(n, blocks).numpy().astype(np.float32)
        zp = None if zp_row is None else zp_row.to(torch.uint8).reshape(n, 1).expand(n, blocks).numpy()
        return _NBits(
            packed,
            np.ascontiguousarray(scales),
            None if zp is None else np.ascontiguousarray(zp),
            k,
            8,
            block,
        )
    return None


def _concat(parts: list[_NBits]) -> _NBits | None:
    """Q, K, V stacked along N (the builder's fused qkv_proj), where they share bits, blocks and zero points."""
    if len({p.key() for p in parts}) != 1 or len({p.k for p in parts}) != 1:
        return None
    zps = [p.zero_points for p in parts if p.zero_points is not None]
    zp = np.concatenate(zps) if zps else None
    return _NBits(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zp,
        parts[0].k,
        parts[0].bits,
        parts[0].block_size,
    )


def _pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """(N, n_blocks) codes -> MatMulNBits' packed zero points (N * ceil(n_blocks * bits / 8),) uint8."""
    if bits == 8:
        return zp.reshape(-1).astype(np.uint8)
    n, blocks = zp.shape
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), dtype=zp.dtype)], axis=1)
    z = zp.astype(np.uint8)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1)


# --------------------------------------------------------------------------------------------------
# the float folder the builder reads
# --------------------------------------------------------------------------------------------------


def _float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as plain float tensors under the names of the original architecture."""
    from modelpress.techniques.quantized import WeightView

    state: dict[str, torch.Tensor] = {}
    wrapped: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, WeightView):
            wrapped.append(name)
            state[prefix + "weight"] = module.dequantized_weight().detach().float().contiguous()
            bias = getattr(getattr(module, "inner", None), "bias", None)
            if isinstance(bias, torch.Tensor):
                state[prefix + "bias"] = bias.detach().float().contiguous()
            continue
        for pname, p in module.named_parameters(recurse=False):
            state[prefix + pname] = p.detach().float().contiguous()
        for bname, b in module.named_buffers(recurse=False):
            if bname not in getattr(module, "_non_persistent_buffers_set", set()):
                state[prefix + bname] = b.detach().contiguous()
    return state


def builder_supports(architecture: str) -> bool | None:
    """Whether ONNX Runtime GenAI's model builder builds `architecture` (a transformers class name such as
    LlamaForCausalLM), read from the installed builder's own dispatch without importing it (that import
    loads torch extensions and takes seconds); None where the builder's source cannot be read."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        return None
    source = Path(spec.origin).read_text(errors="replace")
    if "architectures[0]" not in source:
        return None  # a builder that dispatches otherwise: let it decide
    return f'"{architecture}"' in source


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any slow work (a recipe, the build), a model that `export_genai` cannot write: not a
    decoder-only Hugging Face causal LM, or an architecture the GenAI builder does not build."""
    _check_causal_lm(model)
    name = type(model).__name__
    if builder_supports(name) is False:
        raise ExportError(
            f"ONNX Runtime GenAI's model builder does not support {name}; export it with to='onnx' (a "
            "whole-sequence forward without KV cache) instead."
        )


def _check_causal_lm(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    name = type(model).__name__
    try:
        from transformers import GenerationMixin
    except ImportError as exc:
        raise RuntimeUnavailableError(f"to='genai' needs transformers: {_GENAI_HINT}.") from exc
    if (
        config is None
        or not isinstance(model, GenerationMixin)
        or getattr(config, "is_encoder_decoder", False)
    ):
        raise ExportError(
            f"to='genai' exports a Hugging Face decoder-only causal LM (a model with .config and .generate, "
            f"such as LlamaForCausalLM); got {name}. Export other models with to='onnx'."
        )
    return config


def _write_float_folder(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    config = _check_causal_lm(model)
    state = _float_state_dict(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.torch_dtype = "float32"
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    try:
        tokenizer.save_pretrained(folder)
    except Exception as exc:
        raise ExportError(
            f"to='genai' needs the tokenizer's files in the folder, and saving {type(tokenizer).__name__} "
            f"failed: {exc}. Pass a Hugging Face tokenizer (AutoTokenizer.from_pretrained(...))."
        ) from exc


def _run_builder(src: Path, out: Path, cache: Path, architecture: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(src),
        "-o",
        str(out),
        "-p",
        "fp32",
        "-e",
        "cpu",
        "-c",
        str(cache),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "model.onnx").exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        if re.search(r"model is not currently supported", tail):
            raise ExportError(
                f"ONNX Runtime GenAI's model builder does not support {architecture}; export it with to='onnx' "
                "(a whole-sequence forward without KV cache) instead."
            )
        raise ExportError(f"ONNX Runtime GenAI's model builder failed on {architecture}:\n{tail}")


# --------------------------------------------------------------------------------------------------
# the graph: our codes into the builder's MatMuls
# --------------------------------------------------------------------------------------------------

_MATMUL = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul$")


def _sources(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The builder's MatMul node name -> our module(s) whose weight it multiplies."""
    modules = dict(model.named_modules())
    out: dict[str, list[nn.Module]] = {}
    layers = [n for n in modules if re.fullmatch(r"model\.layers\.\d+", n)]
    for layer in layers:
        i = layer.rsplit(".", 1)[1]
        attn = modules.get(f"{layer}.self_attn")
        mlp = modules.get(f"{layer}.mlp")
        if attn is not None:
            qkv = [modules.get(f"{layer}.self_attn.{p}_proj") for p in "qkv"]
            if all(m is not None for m in qkv):
                out[f"/model/layers.{i}/attn/qkv_proj/MatMul"] = qkv  # type: ignore[assignment]
            for p in "qkvo":
                m = modules.get(f"{layer}.self_attn.{p}_proj")
                if m is not None:
                    out[f"/model/layers.{i}/attn/{p}_proj/MatMul"] = [m]
        if mlp is not None:
            for p in ("gate_proj", "up_proj", "down_proj", "fc1", "fc2"):
                m = modules.get(f"{layer}.mlp.{p}")
                if m is not None:
                    out[f"/model/layers.{i}/mlp/{p}/MatMul"] = [m]
    head = modules.get("lm_head")
    if head is not None:
        out["/lm_head/MatMul"] = [head]
    return out


def _add_nbits(graph: Any, nb: _NBits, base: str) -> tuple[str, str, str]:
    """Our packed codes, scales and zero points as initializers: their names (zero points '' if none)."""
    from onnx import numpy_helper

    names = (f"{base}.qweight", f"{base}.scales", f"{base}.zero_points" if nb.zero_points is not None else "")
    arrays = [nb.packed, nb.scales.reshape(-1)]
    if nb.zero_points is not None:
        arrays.append(_pack_zero_points(nb.zero_points, nb.bits))
    for name, array in zip(names, arrays, strict=False):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return names


def _same_weight(a: nn.Module | None, b: nn.Module | None) -> bool:
    """Whether two quantized layers hold the same weight values (a tied embedding and its head)."""
    wa, wb = getattr(a, "dequantized_weight", None), getattr(b, "dequantized_weight", None)
    if not callable(wa) or not callable(wb):
        return False
    with torch.no_grad():
        x, y = wa(), wb()
    return bool(x.shape == y.shape and torch.equal(x, y))


def _label(op: str, nb: _NBits) -> str:
    return f"{op} int{nb.bits} g{nb.block_size}" + (" asym" if nb.zero_points is not None else "")


def _matmul_nbits(node: Any, nb: _NBits, names: tuple[str, str, str], accuracy_level: int) -> Any:
    from onnx import helper

    return helper.make_node(
        "MatMulNBits",
        [node.input[0], *(n for n in names if n)],
        list(node.output),
        name=node.name + "NBits",
        domain="com.microsoft",
        K=nb.k,
        N=nb.n,
        bits=nb.bits,
        block_size=nb.block_size,
        accuracy_level=accuracy_level,
    )


def _gather_block_quantized(graph: Any, gather: Any, nb: _NBits, names: tuple[str, str, str]) -> list[Any]:
    """Nodes that read rows of a packed (N, n_blocks, blob) table like MatMulNBits stores it, in the 2-D
    layout GatherBlockQuantized takes (reshapes only: the bytes are shared)."""
    from onnx import helper, numpy_helper

    v, blocks = nb.n, nb.packed.shape[1]
    zp_cols = blocks if nb.bits == 8 else -(-blocks // 2)
    shapes = {"table": [v, blocks * nb.packed.shape[2]], "scales": [v, blocks], "zero_points": [v, zp_cols]}
    nodes, inputs = [], []
    for (part, shape), source in zip(shapes.items(), names, strict=True):
        if not source:
            continue
        shape_name = f"/model/embed_tokens/{part}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
        out = f"/model/embed_tokens/{part}"
        nodes.append(helper.make_node("Reshape", [source, shape_name], [out], name=f"{out}/Reshape"))
        inputs.append(out)
    inputs.insert(1, gather.input[1])  # (table, indices, scales[, zero points])
    nodes.append(
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            list(gather.output),
            name="/model/embed_tokens/GatherBlockQuantized",
            domain="com.microsoft",
            bits=nb.bits,
            block_size=nb.block_size,
            gather_axis=0,
            quantize_axis=1,
        )
    )
    return nodes


def _block_for(node: str, int8_block: int | Mapping[str, int] | None) -> int | None:
    """The int8 block of a builder node: `int8_block` itself, or the first of its regexes found in the name."""
    if int8_block is None or isinstance(int8_block, int):
        return int8_block
    return next((b for pattern, b in int8_block.items() if re.search(pattern, node)), None)


def _replace_nodes(graph: Any, nodes: list[Any]) -> None:
    """Set the graph's nodes to `nodes` and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _quantize_graph(
    onnx_model: Any, model: nn.Module, accuracy_level: int, int8_block: int | Mapping[str, int] | None = None
) -> tuple[dict[str, str], list[str]]:
    """Swap the float MatMuls of quantized layers for MatMulNBits with our codes, and the embedding's
    Gather for GatherBlockQuantized, in place. Returns {node: what it became} and the MatMuls left float."""
    from onnx import helper

    graph = onnx_model.graph
    inits = {t.name: t for t in graph.initializer}
    sources = _sources(model)
    quantized: dict[str, str] = {}
    float_matmuls: list[str] = []
    head: tuple[_NBits, tuple[str, str, str]] | None = None
    nodes = []
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" else ""
        parts = [_nbits_of(m, _block_for(node.name, int8_block)) for m in sources.get(node.name, [])]
        nb = None
        if parts and all(p is not None for p in parts):
            nb = parts[0] if len(parts) == 1 else _concat(parts)  # type: ignore[arg-type]
        if weight not in inits or nb is None:
            if weight in inits:
                float_matmuls.append(node.name)
            nodes.append(node)
            continue
        k, n = (int(d) for d in inits[weight].dims)
        if (k, n) != (nb.k, nb.n):
            raise ExportError(
                f"{node.name}: the builder's weight is {k}x{n}, the quantized layer's {nb.k}x{nb.n}: the "
                "model's shapes no longer match its config (structured pruning?). Export with to='onnx'."
            )
        names = _add_nbits(graph, nb, weight.removesuffix(".weight"))
        nodes.append(_matmul_nbits(node, nb, names, accuracy_level))
        quantized[node.name] = _label("MatMulNBits", nb)
        if node.name == "/lm_head/MatMul":
            head = (nb, names)
    # The embedding: the builder ties it to the head (Transpose of the head's weight -> Gather): read the
    # head's packed table instead; an untied quantized embedding gets its own table.
    gather = next(
        (n for n in nodes if n.op_type == "Gather" and n.name == "/model/embed_tokens/Gather"), None
    )
    if gather is not None:
        tied = [n for n in nodes if n.op_type == "Transpose" and gather.input[0] in n.output]
        modules = dict(model.named_modules())
        emb_module = modules.get("model.embed_tokens", nn.Identity())
        emb = _nbits_of(emb_module, _block_for(gather.name, int8_block))
        # A tied embedding reads the head's table, unless it was quantized otherwise (an int8 table beside
        # an int4 head: a lookup reads one row, so a finer table costs file bytes, not decode time).
        own = emb is not None and not _same_weight(emb_module, modules.get("lm_head"))
        use = head if tied and head is not None and not own else None
        if use is None and emb is not None and (tied or gather.input[0] in inits):
            base = "model.embed_tokens" if tied else gather.input[0].removesuffix(".weight")
            use = (emb, _add_nbits(graph, emb, base))
        if use is not None:
            drop = {id(gather), *(id(t) for t in tied)}
            nodes = _gather_block_quantized(graph, gather, *use) + [n for n in nodes if id(n) not in drop]
            quantized[gather.name] = _label("GatherBlockQuantized", use[0]) + (
                " (the head's table)" if use is head else ""
            )
    _replace_nodes(graph, nodes)
    if not any(o.domain == "com.microsoft" for o in onnx_model.opset_import):
        onnx_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return quantized, float_matmuls


def common_prefix(names: Sequence[str], sep: str) -> str:
    """The leading `sep`-separated components that all `names` share ('a/b/c', 'a/b/d' -> 'a/b')."""
    common = []
    for column in zip(*(n.split(sep) for n in names), strict=False):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return sep.join(common)


def _fuse_siblings(graph: Any) -> int:
    """MatMulNBits nodes that read the same input with the same K, bits, block, accuracy level and kind of
    zero points (a gated MLP's gate and up projections) become one MatMulNBits over their weights stacked
    along N, then a Split: the same outputs bit for bit, with the input quantized once and one kernel call
    per token instead of two (ONNX Runtime's per-node cost is a visible part of a small model's decode).
    Weights read by another node too (the head's table, read by the embedding) are left alone. Returns how
    many nodes were fused away."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    all_nodes = list(graph.node)  # one wrapper per node: the ids below stay valid
    readers: dict[str, int] = {}
    for node in all_nodes:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for node in all_nodes:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        weights = [n for n in node.input[1:] if n]
        if any(n not in inits or readers.get(n) != 1 for n in weights):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "N"}
        key = (node.input[0], tuple(bool(n) for n in node.input), tuple(sorted(attrs.items())))
        groups.setdefault(key, []).append(node)
    fused: dict[int, list[Any]] = {}  # id of the group's first node -> its replacement
    gone: set[int] = set()
    for members in groups.values():
        if len(members) < 2:
            continue
        first = members[0]
        prefix = common_prefix([m.name for m in members], "/")
        parts = "+".join(m.name[len(prefix) + 1 :].split("/", 1)[0] for m in members)
        base = f"{prefix}/{parts}"
        names = []
        for i, suffix in enumerate(("qweight", "scales", "zero_points"), start=1):
            if i >= len(first.input) or not first.input[i]:
                continue
            arrays = [numpy_helper.to_array(inits[m.input[i]]) for m in members]
            name = f"{base}.{suffix}"
            graph.initializer.append(numpy_helper.from_array(np.concatenate(arrays), name))
            names.append(name)
        sizes = [int(helper.get_attribute_value(a)) for m in members for a in m.attribute if a.name == "N"]
        attrs = {a.name: helper.get_attribute_value(a) for a in first.attribute if a.name != "N"}
        out = f"{base}/MatMul/output_0"
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{base}/split_sizes"))
        fused[id(first)] = [
            helper.make_node(
                "MatMulNBits",
                [first.input[0], *names],
                [out],
                name=f"{base}/MatMulNBits",
                domain="com.microsoft",
                N=sum(sizes),
                **attrs,
            ),
            helper.make_node(
                "Split",
                [out, f"{base}/split_sizes"],
                [m.output[0] for m in members],
                name=f"{base}/Split",
                axis=-1,
            ),
        ]
        gone.update(id(m) for m in members[1:])
    if not fused:
        return 0
    nodes = []
    for node in all_nodes:
        if id(node) in gone:
            continue
        nodes.extend(fused.get(id(node), [node]))
    _replace_nodes(graph, nodes)
    return len(gone)


def _sort_topologically(graph: Any) -> None:
    produced = {o for n in graph.node for o in n.output}
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, order = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready or i not in produced for i in node.input):
                order.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError("internal: the rewritten GenAI graph has a cycle.")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


# --------------------------------------------------------------------------------------------------
# greedy check
# --------------------------------------------------------------------------------------------------


def torch_greedy(
    model: nn.Module, ids: list[int], new_tokens: int, *, ignore_eos: bool = True
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of a Hugging Face causal LM with its KV cache (`generate`; exactly `new_tokens` unless
    `ignore_eos=False`), and its raw logits at each step: the reference the exported folders are checked
    against."""
    from modelpress.techniques.quantized import reuse_weights

    with torch.inference_mode(), reuse_weights():  # the float weights built once, same maths
        out = model.generate(  # type: ignore[operator]
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens if ignore_eos else None,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=getattr(model.config, "pad_token_id", None) or 0,
        )
    tokens = out.sequences[0, len(ids) :].tolist()
    return tokens, [step[0].float() for step in out.logits]


def load_genai(folder: str | os.PathLike[str], threads: int = 0) -> Any:
    """`onnxruntime_genai.Model` of `folder`, with `threads` intra-op threads (0: the runtime's default)."""
    og = _import_genai()
    config = og.Config(str(folder))
    if threads:
        opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    return og.Model(config)


def genai_greedy(model: Any, ids: Sequence[int], new_tokens: int) -> list[int]:
    """Greedy tokens from ONNX Runtime GenAI's own loop (a `load_genai` model): exactly `new_tokens`,
    EOS ignored."""
    og = _import_genai()
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(list(ids), dtype=np.int32))
    tokens: list[int] = []
    while len(tokens) < new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    del generator
    return tokens


def check_greedy(
    model: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike[str],
    prompts: Sequence[str] = CHECK_PROMPTS,
    new_tokens: int = 32,
) -> list[GreedyCheck]:
    """Greedy tokens of `folder` in ONNX Runtime GenAI against `model`'s, prompt by prompt."""
    checks = []
    runtime_model = load_genai(folder)
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        want, logits = torch_greedy(model, ids, new_tokens)
        got = genai_greedy(runtime_model, ids, new_tokens)
        step = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
        gap = 0.0
        if step is not None:
            gap = float(logits[step][want[step]] - logits[step][got[step]])
        checks.append(GreedyCheck(prompt, want, got, step, gap))
    del runtime_model
    return checks


def _import_genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise RuntimeUnavailableError(f"to='genai' needs ONNX Runtime GenAI: {_GENAI_HINT}.") from exc
    return og


# --------------------------------------------------------------------------------------------------
# the entry point
# --------------------------------------------------------------------------------------------------


def export_genai(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    accuracy_level: int = 4,
    int8_block: int | Mapping[str, int] | None = None,
    overwrite: bool = False,
    check_prompts: Sequence[str] = CHECK_PROMPTS,
    check_tokens: int = 32,
    progress: Callable[[str], None] | None = None,
) -> GenAIExport:
    """Write `model` (a Hugging Face causal LM, compressed or not) and `tokenizer` as an ONNX Runtime GenAI
    folder at `out_dir`: weight-only int4/int8 layers as MatMulNBits with their own codes, a KV cache, and
    the runtime's fused attention. The greedy tokens of the folder are checked against `model`'s on
    `check_prompts` before the folder is moved into place; a folder that does not generate what the model
    generates is not written (it is kept beside `out_dir` as `<name>.rejected` for inspection).

    `int8_block` sets the MatMulNBits block of int8 per-row layers (default 64), which is also the group
    `accuracy_level` 4 quantizes their inputs by: an int, or {regex on the builder's node name: block}
    (first match; e.g. {"down_proj": 16, "": 32}). Smaller blocks cost file bytes and decode speed for a
    perplexity nearer fp32's (SmolLM2: see benchmarks/README.md).
    """
    import onnx

    _import_genai()
    say = progress or (lambda _msg: None)
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ExportError(f"accuracy_level={accuracy_level}: MatMulNBits takes 0 (fp32 maths) to 4 (int8).")
    blocks = (
        [] if int8_block is None else [int8_block] if isinstance(int8_block, int) else int8_block.values()
    )
    if any(b not in (16, 32, 64, 128, 256) for b in blocks):
        raise ExportError(f"int8_block={int8_block}: MatMulNBits takes blocks of 16, 32, 64, 128 or 256.")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (--overwrite) or choose a new folder.")
    check_exportable(model)
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".genai-", dir=out.parent) as tmp:
        src, built, cache = Path(tmp) / "hf", Path(tmp) / "built", Path(tmp) / "cache"
        src.mkdir()
        say("writing the float folder for ONNX Runtime GenAI's builder")
        _write_float_folder(model, tokenizer, src)
        say("building the decoder graph (KV cache, fused attention)")
        _run_builder(src, built, cache, type(model).__name__)
        say("placing the quantized weights")
        onnx_model = onnx.load(str(built / "model.onnx"), load_external_data=True)
        quantized, float_matmuls = _quantize_graph(onnx_model, model, accuracy_level, int8_block)
        if int8_block is not None and not any(" int8 " in f"{v} " for v in quantized.values()):
            log.warning(
                "int8_block=%s changes nothing: the model has no int8 weight-only layer (it applies to int8 "
                "per-row layers, e.g. from the int8-weight-only recipe).",
                int8_block,
            )
        _fuse_siblings(onnx_model.graph)
        _sort_topologically(onnx_model.graph)
        for f in built.glob("model.onnx*"):
            f.unlink()
        onnx.save(
            onnx_model,
            str(built / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        del onnx_model
        result = GenAIExport(built, [], quantized=quantized, float_matmuls=float_matmuls)
        if check_prompts:
            say("checking greedy tokens against the torch model")
            try:
                result.checks = check_greedy(model, tokenizer, built, check_prompts, check_tokens)
            except ModelpressError:
                raise
            except Exception as exc:
                raise ExportError(
                    f"ONNX Runtime GenAI could not run the folder it was given ({type(exc).__name__}: {exc}). "
                    "Check the model's config (token ids within the vocabulary, a supported architecture)."
                ) from exc
        failed = [c for c in result.checks if not c.passed]
        if failed:
            rejected = out.with_name(out.name + ".rejected")
            if rejected.exists():
                shutil.rmtree(rejected)
            shutil.move(str(built), rejected)
            raise ExportError(
                "The GenAI folder does not generate what the model generates: "
                + "; ".join(c.line() for c in failed)
                + f". Kept at {rejected} for inspection."
            )
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(built), out)
    result.path = out
    result.files = sorted(out.iterdir())
    return result


# --------------------------------------------------------------------------------------------------
# generate and bench: the runtime's own loop, no torch
# --------------------------------------------------------------------------------------------------

BENCH_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type, oil-based "
    "ink and a screw press were brought together in one workshop. Books that had taken a scribe months could "
    "be made by the hundred in weeks, and within fifty years presses worked in more than two hundred cities. "
    "The spread of cheap books changed how scholars shared results, how languages settled their spelling, "
    "and how news travelled between merchants, churches and governments. "
)


def is_genai_folder(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir() and (Path(path) / "genai_config.json").is_file()


def _check_folder(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not is_genai_folder(folder):
        raise ExportError(
            f"'{folder}' is not an ONNX Runtime GenAI folder (no genai_config.json). Write one with "
            "`modelpress export MODEL_FOLDER --to genai -o FOLDER`."
        )
    return folder


def stream_tokens(
    folder: str | os.PathLike[str], prompt: str, max_new_tokens: int = 128, threads: int = 0
) -> Any:
    """Yield the text of each new token (greedy) as the runtime generates it; stops at EOS."""
    og = _import_genai()
    model = load_genai(_check_folder(folder), threads)
    tokenizer = og.Tokenizer(model)
    stream = tokenizer.create_stream()
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
        yield stream.decode(generator.get_next_tokens()[0])


@dataclass
class LLMTiming:
    """One folder's generation speed: medians over interleaved rounds, peak RSS of a fresh process."""

    name: str
    path: str
    model_bytes: int
    prefill_tok_s: float
    decode_tok_s: float
    decode_rounds: list[float]
    peak_rss_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _prompt_ids(model: Any, n: int) -> list[int]:
    og = _import_genai()
    ids: list[int] = []
    while len(ids) < n:
        ids += [int(i) for i in og.Tokenizer(model).encode(BENCH_TEXT)]
    return ids[:n]


def _timed_generate(model: Any, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for `ids` then `new_tokens` greedy tokens (EOS ignored)."""
    import time

    og = _import_genai()
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    generator.generate_next_token()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        generator.generate_next_token()
    t2 = time.perf_counter()
    del generator
    return t1 - t0, t2 - t1


def bench_genai(
    folders: Mapping[str, str | os.PathLike[str]],
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    rounds: int = 5,
    threads: int = 2,
    peak_memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LLMTiming]:
    """Prefill and decode tokens/s of each folder in ONNX Runtime GenAI, timed in turn within each round
    (A, B, A, B...) in this process, the same prompt for all; peak RSS of a fresh process per folder that
    loads it and generates once."""
    import statistics

    say = progress or (lambda _msg: None)
    models = {name: load_genai(_check_folder(path), threads) for name, path in folders.items()}
    ids = _prompt_ids(next(iter(models.values())), prompt_tokens)
    prefill: dict[str, list[float]] = {n: [] for n in models}
    decode: dict[str, list[float]] = {n: [] for n in models}
    for model in models.values():  # warm-up
        _timed_generate(model, ids, 4)
    for r in range(rounds):
        for name, model in models.items():
            p, d = _timed_generate(model, ids, new_tokens)
            prefill[name].append(len(ids) / p)
            decode[name].append((new_tokens - 1) / d)
        say(f"round {r + 1}/{rounds}")
    del models
    out = {}
    for name, path in folders.items():
        size = sum(p.stat().st_size for p in Path(path).iterdir() if p.name.startswith("model.onnx"))
        out[name] = LLMTiming(
            name,
            str(path),
            size,
            statistics.median(prefill[name]),
            statistics.median(decode[name]),
            decode[name],
        )
        if peak_memory:
            say(f"peak memory of {name}")
            out[name].peak_rss_bytes = _peak_rss(path, ids, new_tokens, threads)
    return out


def _peak_rss(folder: str | os.PathLike[str], ids: list[int], new_tokens: int, threads: int) -> int:
    """Peak RSS (bytes) of a fresh Python process that loads `folder` and generates once: it imports
    onnxruntime_genai and numpy only (no torch, no modelpress), as a deployment would. Read from VmHWM:
    `getrusage`'s ru_maxrss survives fork and exec, so a child of a large process reports its parent's."""
    code = (
        "import json, resource, sys\n"
        "import numpy as np, onnxruntime_genai as og\n"
        "folder, ids, new, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])\n"
        "config = og.Config(folder)\n"
        "opts = {'intra_op_num_threads': threads, 'inter_op_num_threads': 1}\n"
        "config.overlay(json.dumps({'model': {'decoder': {'session_options': opts}}}))\n"
        "model = og.Model(config)\n"
        "params = og.GeneratorParams(model)\n"
        "params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(np.asarray(ids, dtype=np.int32))\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
        "print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    return run_peak_script(code, folder, ids, new_tokens, threads)


def run_peak_script(
    code: str, folder: str | os.PathLike[str], ids: list[int], new_tokens: int, threads: int
) -> int:
    """Run `code` in a fresh Python process with argv folder, ids (JSON), new tokens, threads (at least 1);
    its last line of output is the peak RSS in bytes."""
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), json.dumps(ids), str(new_tokens), str(max(threads, 1))],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise ExportError(f"measuring the peak memory of {folder} failed: {done.stderr.strip()[-500:]}")
    return int(done.stdout.strip().splitlines()[-1])
