"""Export a (compressed) Llama-family causal LM to the folder OpenVINO GenAI's own generate loop runs.

`openvino_genai.LLMPipeline(folder, "CPU")` reads: `openvino_model.xml/.bin` (a stateful IR: the KV cache
lives in OpenVINO state variables, inputs `input_ids`, `attention_mask`, `position_ids`, `beam_idx`, output
`logits`), `openvino_tokenizer.xml` / `openvino_detokenizer.xml` (openvino-tokenizers), `config.json` and
`generation_config.json`. No modelpress import is needed to run it.

The IR is written op by op with OpenVINO's graph API rather than traced from PyTorch: the weights go in as
we stored them, never re-quantized. A weight-only layer becomes the weight-decompression pattern NNCF
writes and the CPU plugin runs with its int4/int8 kernels (`Constant(u4|i4|u8|i8) -> Convert -> [Subtract
zero point] -> Multiply scale -> Reshape -> MatMul`), with our codes, scales and zero points bit for bit.
The attention is the pattern the CPU plugin fuses into its KV-cache SDPA kernel (`ReadValue -> Gather
beam_idx -> Concat -> Assign`, GQA as Unsqueeze -> Broadcast -> Reshape, `ScaledDotProductAttention`), the
pattern optimum-intel's export produces. A tied embedding / LM head is stored once.

Only the Llama block is written (Llama, Mistral without a sliding window, Qwen2): another architecture, a
RoPE scaling or an activation it does not express is refused with an `ExportError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.deploy.genai import BENCH_TEXT, LLMTiming, common_prefix, run_peak_script, torch_greedy
from modelpress.errors import ExportError, ParityError, RuntimeUnavailableError
from modelpress.techniques.quantized import (
    GroupQuantizedEmbedding,
    GroupQuantizedLinear,
    QuantizedLayer,
    reuse_weights,
)

log = logging.getLogger(__name__)

MODEL_TYPES = ("llama", "mistral", "qwen2")
DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
# The greedy-token check compiles with these: fp32 maths, fp32 KV cache, no int8 quantization of the
# activations, so a divergence from PyTorch is fp rounding, not the runtime's own approximations (its
# defaults on CPUs with bf16: bf16 maths, u8 KV cache, activations quantized per 32 for int4/int8 weights).
EXACT_PROPERTIES = {
    "INFERENCE_PRECISION_HINT": "f32",
    "KV_CACHE_PRECISION": "f32",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
}


@dataclass
class PromptCheck:
    prompt: str
    torch_tokens: list[int]
    openvino_tokens: list[int]
    first_divergence: int | None = None  # step (0-based) of the first differing new token, or None
    logit_gap: float | None = None  # torch's logit of its token minus that of OpenVINO's, at that step

    def line(self) -> str:
        n = len(self.torch_tokens)
        if self.first_divergence is None:
            return f"greedy check {self.prompt!r}: {n}/{n} tokens match"
        gap = "n/a" if self.logit_gap is None else f"{self.logit_gap:.3f}"
        return (
            f"greedy check {self.prompt!r}: first {self.first_divergence}/{n} tokens match, then part "
            f"(logit gap {gap} under torch: fp rounding)"
        )


@dataclass
class OVGenAIExport:
    folder: Path
    prefill_max_abs_diff: float  # logits of the first prompt, IR (fp32) against PyTorch
    checks: list[PromptCheck] = field(default_factory=list)
    weights: dict[str, int] = field(default_factory=dict)  # compressed constants written, by element type

    @property
    def model_bytes(self) -> int:
        return _model_bytes(self.folder)

    def notes(self) -> list[str]:
        """What `export --to openvino-genai` prints: the checks, the weights written, the model's size."""
        lines = [c.line() for c in self.checks]
        if not math.isnan(self.prefill_max_abs_diff):
            lines.append(f"prefill logits vs PyTorch: max abs diff {self.prefill_max_abs_diff:.2e}")
        kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(self.weights.items())) or "none"
        lines.append(f"weight elements by constant type: {kinds}")
        lines.append(f"openvino_model.xml + .bin: {self.model_bytes / 1e6:.1f} MB")
        return lines


def _require_openvino() -> tuple[Any, Any]:
    try:
        import openvino as ov
        import openvino.opset13 as ops
    except ImportError as e:
        raise RuntimeUnavailableError(
            f"OpenVINO is not installed ({e}); run `pip install openvino openvino-tokenizers openvino-genai`."
        ) from e
    return ov, ops


def _require_genai() -> Any:
    try:
        import openvino_genai
    except ImportError as e:
        raise RuntimeUnavailableError(
            f"openvino-genai is not installed ({e}); run `pip install openvino-genai openvino-tokenizers` "
            "(or `pip install 'modelpress[genai]'`)."
        ) from e
    return openvino_genai


# --------------------------------------------------------------------------------------------
# The model's shape: what the Llama block needs, checked
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    inv_freq: np.ndarray  # (head_dim / 2,) fp32, the model's own buffer
    attention_scaling: float


def check_exportable(model: nn.Module) -> None:
    """Refuse, before any slow work (a recipe), a model that `export_openvino_genai` cannot write."""
    _spec(model)


def _spec(model: nn.Module) -> _Spec:
    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    can_generate = getattr(model, "can_generate", None)
    is_lm = config is not None and callable(can_generate) and can_generate()
    if not is_lm or getattr(config, "is_encoder_decoder", False):
        raise ExportError(
            f"OpenVINO GenAI export needs a Hugging Face causal LM (a decoder-only model with .config and .generate); got {name}. "
            "Export other models with `modelpress export` (ONNX) instead."
        )
    if model_type not in MODEL_TYPES:
        raise ExportError(
            f"OpenVINO GenAI export writes the Llama block ({', '.join(MODEL_TYPES)}); {name} is "
            f"model_type '{model_type}'. Use optimum-intel for other architectures."
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"OpenVINO GenAI export: hidden_act '{act}' is not supported (only 'silu').")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(
            f"OpenVINO GenAI export: RoPE type '{rope_type}' is not supported (only 'default', no scaling)."
        )
    if getattr(config, "sliding_window", None) and (
        model_type == "mistral" or getattr(config, "use_sliding_window", False)
    ):
        raise ExportError(
            f"OpenVINO GenAI export: sliding-window attention (sliding_window={config.sliding_window}) is not "
            "supported; set config.sliding_window = None if the model never sees longer sequences."
        )
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if inner is None or rotary is None or not hasattr(inner, "layers"):
        raise ExportError(f"OpenVINO GenAI export: {name} has no .model.layers / .model.rotary_emb.")
    attn = inner.layers[0].self_attn
    for extra in ("q_norm", "k_norm"):
        if hasattr(attn, extra):
            raise ExportError(f"OpenVINO GenAI export: attention with '{extra}' is not supported.")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inv_freq = rotary.inv_freq.detach().float().cpu().numpy()
    if inv_freq.shape != (head_dim // 2,):
        raise ExportError(
            f"OpenVINO GenAI export: partial rotary embeddings ({2 * inv_freq.shape[0]} of {head_dim}) "
            "are not supported."
        )
    return _Spec(
        layers=len(inner.layers),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        inv_freq=inv_freq,
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0)),
    )


# --------------------------------------------------------------------------------------------
# Weights: our stored codes as OpenVINO compressed constants
# --------------------------------------------------------------------------------------------


def _low_bit_constant(ov: Any, kind: str, data: np.ndarray, shape: tuple[int, ...]) -> Any:
    """A u4/i4 constant of `shape` from packed bytes (element 2i in the low nibble: OpenVINO's layout and
    ours), or a u8/i8 constant from the codes."""
    if kind in ("u4", "i4"):
        tensor = ov.Tensor(ov.Type.u4 if kind == "u4" else ov.Type.i4, ov.Shape(list(shape)))
        tensor.data[:] = np.ascontiguousarray(data).reshape(tensor.data.shape)
        return ov.op.Constant(tensor)
    dtype = np.uint8 if kind == "u8" else np.int8
    return ov.op.Constant(np.ascontiguousarray(data.view(dtype).reshape(shape)))


def _pack_nibbles(u: np.ndarray) -> np.ndarray:
    """(n,) codes in [0, 15] -> ceil(n / 2) bytes, low nibble first."""
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


class _Weights:
    """Builds each weight's decompression subgraph once (tied layers share it) and counts the constants."""

    def __init__(self, ov: Any, ops: Any) -> None:
        self.ov, self.ops = ov, ops
        self.built: dict[tuple[Any, ...], tuple[Any, int]] = {}
        self.counts: dict[str, int] = {}

    def _count(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    def _grouped(
        self,
        packed: torch.Tensor,
        scales: torch.Tensor,
        zero_points: torch.Tensor | None,
        *,
        rows: int,
        blocks: int,
        block: int,
        bits: int,
        name: str,
    ) -> Any:
        """(rows, blocks * block) fp32 from block storage (`ops.nbits` layout)."""
        ops = self.ops
        data = packed.detach().cpu().contiguous().numpy().reshape(-1)
        if zero_points is None:
            # Implicit zero point 2^(bits-1): signed codes u - 2^(bits-1), which flips the top bit of each
            # code (0x88 for two nibbles per byte): NNCF's symmetric form, no Subtract.
            kind = "i4" if bits == 4 else "i8"
            codes = _low_bit_constant(
                self.ov, kind, data ^ (0x88 if bits == 4 else 0x80), (rows, blocks, block)
            )
            w = ops.convert(codes, "f32")
        else:
            kind = "u4" if bits == 4 else "u8"
            codes = _low_bit_constant(self.ov, kind, data, (rows, blocks, block))
            per_row = math.ceil(blocks * bits / 8)
            zp_rows = zero_points.detach().cpu().numpy().reshape(rows, per_row)
            if bits == 4:  # unpack per row (a row may end in half a byte), repack across rows
                lo, hi = zp_rows & 0xF, zp_rows >> 4
                zp = np.stack([lo, hi], axis=-1).reshape(rows, -1)[:, :blocks].astype(np.uint8)
                zp_const = _low_bit_constant(self.ov, "u4", _pack_nibbles(zp.reshape(-1)), (rows, blocks, 1))
            else:
                zp_const = _low_bit_constant(self.ov, "u8", zp_rows[:, :blocks], (rows, blocks, 1))
            w = ops.subtract(ops.convert(codes, "f32"), ops.convert(zp_const, "f32"))
        self._count(kind, rows * blocks * block)
        scale = ops.constant(scales.detach().float().cpu().numpy().reshape(rows, blocks, 1))
        w = ops.multiply(w, scale)
        return ops.reshape(w, ops.constant(np.array([rows, blocks * block], np.int64)), False, name=name)

    def _per_channel(self, layer: QuantizedLayer, name: str) -> Any:
        """(N, K) fp32 from int8 codes with a scale (and zero point) per row."""
        ops = self.ops
        q = layer.qweight.detach().cpu().numpy()
        if layer.qweight.dim() != 2 or layer.axis != 0:
            raise ExportError(f"OpenVINO GenAI export: '{name}' is not a 2-D per-row int8 weight.")
        n = q.shape[0]
        if layer.zero_point is None:
            w = ops.convert(_low_bit_constant(self.ov, "i8", q, q.shape), "f32")
            self._count("i8", q.size)
        else:
            # Unsigned codes q + 128 with zero point zp + 128: the same differences, NNCF's INT8_ASYM form.
            u = (q.astype(np.int16) + 128).astype(np.uint8)
            zp = (layer.zero_point.detach().cpu().numpy().astype(np.int16) + 128).astype(np.uint8)
            w = ops.subtract(
                ops.convert(_low_bit_constant(self.ov, "u8", u, q.shape), "f32"),
                ops.convert(_low_bit_constant(self.ov, "u8", zp, (n, 1)), "f32"),
            )
            self._count("u8", q.size)
        scale = ops.constant(layer.scale.detach().float().cpu().numpy().reshape(n, 1))
        return ops.multiply(w, scale, name=name)

    def matrix(self, module: nn.Module, name: str) -> tuple[Any, int]:
        """The (N, K_padded) fp32 weight of a Linear or Embedding as an OpenVINO output, and K_padded
        (the input is zero-padded up to it where our last block is partial)."""
        key = self._key(module)
        if key in self.built:
            return self.built[key]
        ops = self.ops
        if isinstance(module, GroupQuantizedLinear):
            n, blocks, _ = module.packed.shape
            out = self._grouped(
                module.packed,
                module.scales,
                module.zero_points,
                rows=n,
                blocks=blocks,
                block=module.group_size,
                bits=module.bits,
                name=name,
            )
            built = (out, blocks * module.group_size)
        elif isinstance(module, GroupQuantizedEmbedding):
            v = module.packed.shape[0]
            blocks = module.scales.shape[1]
            out = self._grouped(
                module.packed,
                module.scales,
                module.zero_points,
                rows=v,
                blocks=blocks,
                block=module.group_size,
                bits=module.bits,
                name=name,
            )
            built = (out, blocks * module.group_size)
        elif isinstance(module, QuantizedLayer) and module.input_scale is None:
            out = self._per_channel(module, name)
            built = (out, int(module.qweight.shape[1]))
        elif type(module) in (nn.Linear, nn.Embedding):
            assert isinstance(module.weight, torch.Tensor)
            w = module.weight.detach().float().cpu().numpy()
            self._count("f32", w.size)
            built = (ops.constant(w, name=name), w.shape[1])
        else:
            raise ExportError(
                f"OpenVINO GenAI export: layer '{name}' is {type(module).__name__}, which has no OpenVINO "
                "form here (supported: fp32 Linear/Embedding, weight-only int4/int8 group or per-channel). "
                "Compress it with a weight-only recipe (int4-weight-only, int4-gptq, int8-weight-only)."
            )
        self.built[key] = built
        return built

    @staticmethod
    def _key(module: nn.Module) -> tuple[Any, ...]:
        """Identity of the stored weight: a tied embedding and head share it (same tensors, or identical
        codes and scales: the weight-only technique quantizes a tied matrix twice with the same result)."""

        def digest(*tensors: torch.Tensor | None) -> str:
            h = hashlib.blake2b(digest_size=16)
            for t in tensors:
                h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
            return h.hexdigest()

        if isinstance(module, (GroupQuantizedLinear, GroupQuantizedEmbedding)):
            tensors = (module.packed, module.scales, module.zero_points)
            return ("group", module.bits, module.group_size, int(module.packed.shape[0]), digest(*tensors))
        if isinstance(module, QuantizedLayer):
            tensors = (module.qweight, module.scale, module.zero_point)
            return ("channel", tuple(module.qweight.shape), module.axis, digest(*tensors))
        weight = getattr(module, "weight", None)
        return ("float", weight.data_ptr()) if isinstance(weight, torch.Tensor) else ("module", id(module))


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


def _linear(ops: Any, weights: _Weights, x: Any, module: nn.Module, name: str) -> Any:
    """x (B, L, K) @ W.T (+ bias) -> (B, L, N)."""
    w, k_padded = weights.matrix(module, name + ".weight")
    k = getattr(module, "in_features", k_padded)
    if k_padded != k:  # our last block is partial: its codes decompress to 0, the input is padded with 0
        x = ops.pad(x, np.array([0, 0, 0], np.int64), np.array([0, 0, k_padded - k], np.int64), "constant")
    y = ops.matmul(x, w, transpose_a=False, transpose_b=True)
    bias = getattr(getattr(module, "inner", module), "bias", None)
    if bias is not None:
        y = ops.add(y, ops.constant(bias.detach().float().cpu().numpy()))
    return y


def _stacked_weight(
    weights: _Weights, modules: Sequence[nn.Module], name: str
) -> tuple[Any, int, list[int]] | None:
    """One (sum N, K_padded) weight (with K_padded and each layer's N) for layers quantized alike (int4/int8 groups, or int8 per row), their
    codes, scales and zero points stacked along N; None where they differ or are not quantized."""
    groups = [m for m in modules if isinstance(m, GroupQuantizedLinear)]
    rows_ = [m for m in modules if isinstance(m, QuantizedLayer)]
    if len(groups) == len(modules):
        group_kinds = {
            (m.bits, m.group_size, m.zero_points is None, tuple(m.packed.shape[1:])) for m in groups
        }
        if len(group_kinds) != 1:
            return None
        first, rows = groups[0], [int(m.packed.shape[0]) for m in groups]
        zps = [m.zero_points for m in groups]
        w = weights._grouped(
            torch.cat([m.packed for m in groups]),
            torch.cat([m.scales.reshape(r, -1) for m, r in zip(groups, rows, strict=True)]),
            None
            if first.zero_points is None
            else torch.cat([z.reshape(r, -1) for z, r in zip(zps, rows, strict=True)]),  # type: ignore[union-attr]
            rows=sum(rows),
            blocks=int(first.packed.shape[1]),
            block=first.group_size,
            bits=first.bits,
            name=name,
        )
        return w, int(first.packed.shape[1]) * first.group_size, rows
    if len(rows_) == len(modules):
        kinds = {
            (m.qweight.dim(), m.axis, m.input_scale is None, m.zero_point is None, int(m.qweight.shape[-1]))
            for m in rows_
        }
        if len(kinds) != 1 or next(iter(kinds))[:3] != (2, 0, True):
            return None
        stacked = SimpleNamespace(
            qweight=torch.cat([m.qweight for m in rows_]),
            scale=torch.cat([m.scale.reshape(-1) for m in rows_]),
            zero_point=None
            if rows_[0].zero_point is None
            else torch.cat([m.zero_point.reshape(-1) for m in rows_]),  # type: ignore[union-attr]
            axis=0,
        )
        n_rows = [int(m.qweight.shape[0]) for m in rows_]
        return weights._per_channel(stacked, name), int(stacked.qweight.shape[1]), n_rows  # type: ignore[arg-type]
    return None


def _linears(
    ops: Any, weights: _Weights, x: Any, modules: Sequence[nn.Module], names: Sequence[str]
) -> list[Any]:
    """x @ W.T (+ bias) for layers that read the same input (Q, K and V; a gated MLP's gate and up): one
    MatMul over their weights stacked along N, then a VariadicSplit, where they are quantized alike (the same
    codes and scales, so the same numbers); a MatMul each otherwise."""
    built = _stacked_weight(weights, modules, _stacked_name(names) + ".weight") if len(modules) > 1 else None
    if built is None:
        return [_linear(ops, weights, x, m, n) for m, n in zip(modules, names, strict=True)]
    w, k_padded, rows = built
    k = int(getattr(modules[0], "in_features", k_padded))
    if k_padded != k:
        x = ops.pad(x, np.array([0, 0, 0], np.int64), np.array([0, 0, k_padded - k], np.int64), "constant")
    y = ops.matmul(x, w, transpose_a=False, transpose_b=True)
    biases = [getattr(getattr(m, "inner", m), "bias", None) for m in modules]
    if any(b is not None for b in biases):
        bias = np.concatenate(
            [
                np.zeros(r, np.float32) if b is None else b.detach().float().cpu().numpy()
                for b, r in zip(biases, rows, strict=True)
            ]
        )
        y = ops.add(y, ops.constant(bias))
    split = ops.variadic_split(y, np.int64(-1), np.array(rows, np.int64))
    return [split.output(i) for i in range(len(modules))]


def _stacked_name(names: Sequence[str]) -> str:
    """'model.layers.0.mlp.gate_proj' + 'model.layers.0.mlp.up_proj' -> 'model.layers.0.mlp.gate_proj+up_proj'."""
    prefix = common_prefix(names, ".")
    return prefix + "." + "+".join(n[len(prefix) + 1 :] for n in names) if prefix else "+".join(names)


def _rms_norm(ops: Any, x: Any, norm: nn.Module, eps: float) -> Any:
    """weight * x / sqrt(mean(x^2) + eps): the ops of Hugging Face's RMSNorm (OpenVINO fuses them)."""
    var = ops.reduce_mean(ops.power(x, ops.constant(np.float32(2.0))), np.array([-1], np.int64), True)
    inv = ops.divide(ops.constant(np.float32(1.0)), ops.sqrt(ops.add(var, ops.constant(np.float32(eps)))))
    weight = norm.weight
    assert isinstance(weight, torch.Tensor)
    gamma = ops.constant(weight.detach().float().cpu().numpy())
    return ops.multiply(gamma, ops.multiply(x, inv))


def _rope(ops: Any, x: Any, cos: Any, sin: Any, half: int) -> Any:
    """x * cos + rotate_half(x) * sin over (B, H, L, S)."""
    step = np.array([1], np.int64)
    axis = np.array([3], np.int64)
    x1 = ops.slice(x, np.array([0], np.int64), np.array([half], np.int64), step, axis)
    x2 = ops.slice(x, np.array([half], np.int64), np.array([2**31 - 1], np.int64), step, axis)
    rotated = ops.concat([ops.multiply(x2, ops.constant(np.float32(-1.0))), x1], -1)
    return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin))


def _heads(ops: Any, x: Any, heads: int, head_dim: int) -> Any:
    """(B, L, H * S) -> (B, H, L, S)."""
    x = ops.reshape(x, np.array([0, 0, heads, head_dim], np.int64), True)
    return ops.transpose(x, np.array([0, 2, 1, 3], np.int64))


def build_model(model: nn.Module) -> tuple[Any, dict[str, int]]:
    """The stateful OpenVINO model of a Llama-family causal LM, and the count of weight elements written
    per constant type ('u4', 'i4', 'u8', 'i8', 'f32')."""
    ov, ops = _require_openvino()
    from openvino.op.util import Variable, VariableInfo

    spec = _spec(model)
    inner: Any = model.model
    weights = _Weights(ov, ops)
    s, h, kvh = spec.head_dim, spec.heads, spec.kv_heads

    def parameter(name: str, dtype: Any, shape: list[int]) -> Any:
        p = ops.parameter(ov.PartialShape(shape), dtype, name=name)
        p.output(0).get_tensor().set_names({name})
        return p

    input_ids = parameter("input_ids", ov.Type.i64, [-1, -1])
    attention_mask = parameter("attention_mask", ov.Type.i64, [-1, -1])
    position_ids = parameter("position_ids", ov.Type.i64, [-1, -1])
    beam_idx = parameter("beam_idx", ov.Type.i32, [-1])

    # Embedding: Gather on the (decompressed) table.
    table, _ = weights.matrix(inner.embed_tokens, "model.embed_tokens.weight")
    x = ops.gather(table, input_ids, np.int64(0))  # (B, L, D)

    # RoPE tables from position_ids, as Hugging Face computes them: freqs = pos * inv_freq in fp32.
    pos = ops.convert(position_ids, "f32")
    freqs = ops.multiply(ops.unsqueeze(pos, np.int64(-1)), ops.constant(spec.inv_freq))  # (B, L, S/2)
    emb = ops.concat([freqs, freqs], -1)  # (B, L, S)
    cos, sin = ops.cos(emb), ops.sin(emb)
    if spec.attention_scaling != 1.0:
        cos = ops.multiply(cos, ops.constant(np.float32(spec.attention_scaling)))
        sin = ops.multiply(sin, ops.constant(np.float32(spec.attention_scaling)))
    cos, sin = ops.unsqueeze(cos, np.int64(1)), ops.unsqueeze(sin, np.int64(1))  # (B, 1, L, S)

    # Mask (B, 1, L, T): query i (at past + i) sees key j where j <= past + i and attention_mask[b, j].
    ids_shape = ops.shape_of(input_ids, "i64")
    seq = ops.gather(ids_shape, np.int64(1), np.int64(0))
    batch = ops.gather(ids_shape, np.array([0], np.int64), np.int64(0))
    total = ops.gather(ops.shape_of(attention_mask, "i64"), np.int64(1), np.int64(0))
    past = ops.subtract(total, seq)
    q_pos = ops.range(past, total, np.int64(1), "i64")
    k_pos = ops.range(np.int64(0), total, np.int64(1), "i64")
    causal = ops.less_equal(ops.unsqueeze(k_pos, np.int64(0)), ops.unsqueeze(q_pos, np.int64(1)))  # (L, T)
    keep = ops.convert(ops.unsqueeze(attention_mask, np.array([1, 2], np.int64)), "boolean")  # (B, 1, 1, T)
    allowed = ops.logical_and(causal, keep)  # (B, 1, L, T)
    mask = ops.select(allowed, np.float32(0.0), np.float32(np.finfo(np.float32).min))

    init_shape = ops.concat([batch, ops.constant(np.array([kvh, 0, s], np.int64))], 0)
    init = ops.broadcast(ops.constant(np.float32(0.0)), init_shape)
    sinks = []
    for i, layer in enumerate(inner.layers):
        prefix = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        hs = _rms_norm(ops, x, layer.input_layernorm, spec.eps)
        q, k, v = _linears(
            ops,
            weights,
            hs,
            [attn.q_proj, attn.k_proj, attn.v_proj],
            [f"{prefix}.self_attn.{p}_proj" for p in "qkv"],
        )
        q, k, v = _heads(ops, q, h, s), _heads(ops, k, kvh, s), _heads(ops, v, kvh, s)
        q, k = _rope(ops, q, cos, sin, s // 2), _rope(ops, k, cos, sin, s // 2)
        present = []
        for part, cur in (("key", k), ("value", v)):
            var_id = f"past_key_values.{i}.{part}present.{i}.{part}"
            info = VariableInfo()
            info.data_shape, info.data_type, info.variable_id = (
                ov.PartialShape([-1, kvh, -1, s]),
                ov.Type.f32,
                var_id,
            )
            variable = Variable(info)
            past_kv = ops.read_value(init, variable)
            both = ops.concat([ops.gather(past_kv, beam_idx, np.int64(0)), cur], 2)  # (B, KVH, T, S)
            sinks.append(ops.assign(both, variable))
            if kvh != h:  # GQA: each kv head serves h / kvh query heads
                rep = ops.broadcast(
                    ops.unsqueeze(both, np.int64(2)),
                    ops.constant(np.array([1, 1, h // kvh, 1, 1], np.int64)),
                    broadcast_spec="bidirectional",
                )
                both = ops.reshape(rep, np.array([0, h, -1, s], np.int64), True)
            present.append(both)
        o = ops.scaled_dot_product_attention(q, present[0], present[1], mask)  # (B, H, L, S)
        o = ops.reshape(
            ops.transpose(o, np.array([0, 2, 1, 3], np.int64)), np.array([0, 0, h * s], np.int64), True
        )
        x = ops.add(x, _linear(ops, weights, o, attn.o_proj, f"{prefix}.self_attn.o_proj"))
        hs = _rms_norm(ops, x, layer.post_attention_layernorm, spec.eps)
        gate, up = _linears(
            ops,
            weights,
            hs,
            [mlp.gate_proj, mlp.up_proj],
            [f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"],
        )
        gate = ops.swish(gate)
        x = ops.add(
            x, _linear(ops, weights, ops.multiply(gate, up), mlp.down_proj, f"{prefix}.mlp.down_proj")
        )
    x = _rms_norm(ops, x, inner.norm, spec.eps)
    logits = _linear(ops, weights, x, model.get_submodule("lm_head"), "lm_head")
    logits.output(0).get_tensor().set_names({"logits"})
    result = ops.result(logits, name="logits")
    ov_model = ov.Model([result], sinks, [input_ids, attention_mask, position_ids, beam_idx], "modelpress")
    ov_model.validate_nodes_and_infer_types()
    return ov_model, dict(weights.counts)


# --------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------


def _write_tokenizer(tokenizer: Any, folder: Path) -> None:
    ov, _ = _require_openvino()
    try:
        from openvino_tokenizers import convert_tokenizer
    except ImportError as e:
        raise RuntimeUnavailableError(
            f"openvino-tokenizers is not installed ({e}); run `pip install openvino-tokenizers`."
        ) from e
    try:
        ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
    except Exception as e:  # the converter raises many types for what it cannot express
        raise ExportError(
            f"OpenVINO GenAI export: the tokenizer ({type(tokenizer).__name__}) cannot be converted by "
            f"openvino-tokenizers: {e}. Pass the model's fast Hugging Face tokenizer (AutoTokenizer)."
        ) from e
    ov.save_model(ov_tokenizer, folder / "openvino_tokenizer.xml")
    ov.save_model(ov_detokenizer, folder / "openvino_detokenizer.xml")
    try:
        tokenizer.save_pretrained(folder)  # chat template and special tokens for readers of the folder
    except Exception as e:  # optional: the IR above is what GenAI reads
        log.warning("OpenVINO GenAI export: tokenizer.save_pretrained failed (%s); the IR is written.", e)


def _write_configs(model: nn.Module, folder: Path) -> None:
    config: Any = model.config
    data = config.to_dict()
    data.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(data, indent=2, default=str))
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        gen = generation.to_dict()
    else:
        gen = {
            k: data[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if data.get(k) is not None
        }
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2, default=str))


def export_openvino_genai(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    prompts: Sequence[str] | None = DEFAULT_PROMPTS,
    new_tokens: int = 32,
    max_logit_gap: float = 0.05,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> OVGenAIExport:
    """Write `out_dir`, the folder `openvino_genai.LLMPipeline(out_dir, "CPU")` runs: a stateful IR with
    the model's weights as stored (int4/int8 weight-only layers as compressed constants), the tokenizer
    and detokenizer IR, config.json and generation_config.json.

    With `prompts`, the folder is checked before it appears: the IR's prefill logits against the model's,
    and LLMPipeline's greedy tokens (fp32 properties, `EXACT_PROPERTIES`) against the model's own `generate`
    for `new_tokens` tokens. Tokens may part where fp rounding flips a near tie: that is reported (first
    step, logit gap); a gap above `max_logit_gap` raises `ParityError`. `prompts=None` skips the check.

    >>> report = export_openvino_genai(mp.compress(model, "int4-weight-only"), tok, "smollm2-ov")  # doctest: +SKIP
    >>> openvino_genai.LLMPipeline("smollm2-ov", "CPU").generate("Hello", max_new_tokens=20)  # doctest: +SKIP
    """
    ov, _ = _require_openvino()
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()):
        raise ExportError(
            f"OpenVINO GenAI export: '{out}' exists; choose a new folder, or pass overwrite=True (--overwrite "
            "on the command line) to replace a folder."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    say("building the OpenVINO model")
    ov_model, counts = build_model(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ov.save_model(ov_model, tmp / "openvino_model.xml", compress_to_fp16=False)
        say("converting the tokenizer")
        _write_tokenizer(tokenizer, tmp)
        _write_configs(model, tmp)
        report = OVGenAIExport(folder=out, prefill_max_abs_diff=float("nan"), weights=counts)
        if prompts:
            say("checking the greedy tokens against PyTorch")
            report.prefill_max_abs_diff = _check_prefill(
                model, tmp / "openvino_model.xml", tokenizer, prompts[0]
            )
            report.checks = check_greedy(model, tokenizer, tmp, prompts, new_tokens=new_tokens)
            _judge(report, max_logit_gap)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, prompt: str) -> list[int]:
    return [int(t) for t in tokenizer(prompt)["input_ids"]]


def ir_logits(compiled: Any, ids: Sequence[int]) -> np.ndarray:
    """(L, V) fp32 logits of `ids` from an empty cache, on a compiled stateful IR."""
    request = compiled.create_infer_request()
    request.reset_state()
    n = len(ids)
    request.infer(
        {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        }
    )
    # a copy, not a view of the buffer of a request that is dropped on return
    return np.array(request.get_tensor("logits").data[0], np.float32, copy=True)


def _check_prefill(model: nn.Module, xml: Path, tokenizer: Any, prompt: str) -> float:
    ov, _ = _require_openvino()
    ids = _encode(tokenizer, prompt)
    compiled = ov.Core().compile_model(str(xml), "CPU", EXACT_PROPERTIES)
    got = ir_logits(compiled, ids)
    with torch.inference_mode(), reuse_weights():  # the float weights built once, same maths
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    return float(np.abs(got - want).max())


def check_greedy(
    model: nn.Module,
    tokenizer: Any,
    folder: str | Path,
    prompts: Sequence[str],
    *,
    new_tokens: int = 32,
    properties: dict[str, str] | None = None,
) -> list[PromptCheck]:
    """LLMPipeline's greedy tokens for each prompt against the model's `generate`; where they part, the
    first step and the model's logit gap there (its token's logit minus OpenVINO's token's)."""
    openvino_genai = _require_genai()
    ov, _ = _require_openvino()
    pipe = openvino_genai.LLMPipeline(
        str(folder), "CPU", **(EXACT_PROPERTIES if properties is None else properties)
    )
    config = pipe.get_generation_config()
    config.max_new_tokens = new_tokens
    config.do_sample = False
    checks = []
    for prompt in prompts:
        ids = _encode(tokenizer, prompt)
        result = pipe.generate(ov.Tensor(np.asarray([ids], np.int64)), config)
        got = [int(t) for t in result.tokens[0]]
        want, logits = torch_greedy(model, ids, new_tokens, ignore_eos=False)
        check = PromptCheck(prompt=prompt, torch_tokens=want, openvino_tokens=got)
        for step, (a, b) in enumerate(zip(want, got, strict=False)):
            if a != b:
                check.first_divergence = step
                check.logit_gap = float(logits[step][a] - logits[step][b])
                break
        else:
            if len(want) != len(got):
                check.first_divergence = min(len(want), len(got))
        checks.append(check)
    return checks


def _judge(report: OVGenAIExport, max_logit_gap: float) -> None:
    for check in report.checks:
        if check.first_divergence is None:
            continue
        gap = check.logit_gap
        log.warning(
            "OpenVINO GenAI export: prompt %r parts from PyTorch at new token %d (logit gap %s)",
            check.prompt,
            check.first_divergence,
            "n/a" if gap is None else f"{gap:.4g}",
        )
        if gap is None or gap > max_logit_gap:
            raise ParityError(
                f"OpenVINO GenAI export: for prompt {check.prompt!r} the folder's greedy tokens part from "
                f"the model's at new token {check.first_divergence} (PyTorch {check.torch_tokens[:8]}..., "
                f"OpenVINO {check.openvino_tokens[:8]}...; logit gap {gap}, allowed {max_logit_gap}). "
                "This is a bug in the export; please report it with the model's config."
            )


# --------------------------------------------------------------------------------------------
# generate and bench: OpenVINO GenAI's own loop, no torch
# --------------------------------------------------------------------------------------------

FOLDER_FILES = (
    "openvino_model.xml",
    "openvino_model.bin",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
)


def is_openvino_genai_folder(path: str | Path) -> bool:
    """Whether `path` is a folder LLMPipeline can generate text from: the model IR, the tokenizer and the
    detokenizer IR (what `export_openvino_genai` and optimum-intel write)."""
    folder = Path(path)
    return folder.is_dir() and all((folder / name).is_file() for name in FOLDER_FILES)


def _check_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not is_openvino_genai_folder(folder):
        missing = [n for n in FOLDER_FILES if not (folder / n).is_file()]
        raise ExportError(
            f"'{folder}' is not an OpenVINO GenAI folder (missing {', '.join(missing)}). Write one with "
            "`modelpress export MODEL_FOLDER --to openvino-genai -o FOLDER`."
        )
    return folder


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("openvino_model."))


def load_pipeline(folder: str | Path, threads: int = 0, properties: Mapping[str, str] | None = None) -> Any:
    """`openvino_genai.LLMPipeline(folder, "CPU")` with `threads` inference threads (0: the runtime's
    default) and the runtime's default precision unless `properties` say otherwise."""
    openvino_genai = _require_genai()
    props: dict[str, Any] = dict(properties or {})
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    path = _check_folder(folder)
    try:
        return openvino_genai.LLMPipeline(str(path), "CPU", **props)
    except RuntimeError as e:  # a truncated or foreign IR: OpenVINO's own message says which file
        raise ExportError(
            f"OpenVINO GenAI could not load '{path}': {str(e).strip()[-500:]}. Write the folder again with "
            "`modelpress export MODEL_FOLDER --to openvino-genai -o FOLDER --overwrite`."
        ) from e


def stream_tokens(
    folder: str | Path,
    prompt: str,
    on_text: Callable[[str], None],
    *,
    max_new_tokens: int = 128,
    threads: int = 0,
) -> None:
    """Generate from `prompt` (greedy, no chat template: the text is continued) and call `on_text` with each
    piece of text as LLMPipeline streams it; stops at EOS or after `max_new_tokens`. The folder is loaded
    before the first call, so a bad folder raises before any text.

    >>> stream_tokens("smollm2-ov", "The history of printing", print)  # doctest: +SKIP
    """
    openvino_genai = _require_genai()
    pipe = load_pipeline(folder, threads)
    config = pipe.get_generation_config()
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    config.apply_chat_template = False

    def streamer(text: str) -> Any:
        on_text(text)
        return openvino_genai.StreamingStatus.RUNNING

    pipe.generate(prompt, config, streamer)


def _bench_ids(pipe: Any, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += [int(i) for i in pipe.get_tokenizer().encode(BENCH_TEXT).input_ids.data[0]]
    return ids[:n]


def _timed_generate(pipe: Any, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy generation of exactly `new_tokens` tokens from
    `ids`, from LLMPipeline's own perf metrics: time to the first token, and the mean time per later token."""
    ov, _ = _require_openvino()
    config = pipe.get_generation_config()
    config.max_new_tokens = config.min_new_tokens = new_tokens
    config.ignore_eos = True
    config.do_sample = False
    metrics = pipe.generate(ov.Tensor(np.asarray([ids], np.int64)), config).perf_metrics
    ttft_ms, tpot_ms = metrics.get_ttft().mean, metrics.get_tpot().mean
    return len(ids) / (ttft_ms / 1e3), 1e3 / tpot_ms


def bench_openvino_genai(
    folders: Mapping[str, str | Path],
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    rounds: int = 5,
    threads: int = 2,
    peak_memory: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, LLMTiming]:
    """Prefill and decode tokens/s of each folder in OpenVINO GenAI (the runtime's default precision on
    this CPU), timed in turn within each round (A, B, A, B...) in this process, the same prompt for all;
    peak RSS of a fresh process per folder that loads it and generates once. `deploy.genai.bench_genai`'s
    counterpart: the same prompt text and result type.

    >>> bench_openvino_genai({"artifact": "llm-int4-ov", "baseline": "llm-fp32-ov"})  # doctest: +SKIP
    """
    import statistics

    say = progress or (lambda _msg: None)
    pipes = {name: load_pipeline(path, threads) for name, path in folders.items()}
    ids = _bench_ids(next(iter(pipes.values())), prompt_tokens)
    prefill: dict[str, list[float]] = {n: [] for n in pipes}
    decode: dict[str, list[float]] = {n: [] for n in pipes}
    for pipe in pipes.values():  # warm-up: the first inference compiles kernels
        _timed_generate(pipe, ids, 4)
    for r in range(rounds):
        for name, pipe in pipes.items():
            p, d = _timed_generate(pipe, ids, new_tokens)
            prefill[name].append(p)
            decode[name].append(d)
        say(f"round {r + 1}/{rounds}")
    del pipes
    out = {}
    for name, path in folders.items():
        out[name] = LLMTiming(
            name,
            str(path),
            _model_bytes(Path(path)),
            statistics.median(prefill[name]),
            statistics.median(decode[name]),
            decode[name],
        )
        if peak_memory:
            say(f"peak memory of {name}")
            out[name].peak_rss_bytes = _peak_rss(path, ids, new_tokens, threads)
    return out


_PEAK_RSS_SCRIPT = """\
import json, resource, sys
import numpy as np, openvino as ov, openvino_genai
folder, ids, new, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipe = openvino_genai.LLMPipeline(folder, "CPU", INFERENCE_NUM_THREADS=threads)
config = pipe.get_generation_config()
config.max_new_tokens = config.min_new_tokens = new
config.ignore_eos, config.do_sample = True, False
pipe.generate(ov.Tensor(np.asarray([ids], np.int64)), config)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(folder: str | Path, ids: list[int], new_tokens: int, threads: int) -> int:
    """Peak RSS (bytes) of a fresh Python process that loads `folder` and generates once, importing
    openvino_genai and numpy only (no torch, no modelpress), as a deployment would. Read from VmHWM, as
    `deploy.genai` does: `getrusage`'s ru_maxrss survives fork and exec, so a child of a large process
    reports its parent's."""
    return run_peak_script(_PEAK_RSS_SCRIPT, folder, ids, new_tokens, threads)
