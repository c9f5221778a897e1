"""Export to LiteRT (TensorFlow Lite) through litert-torch, and run `.tflite` files in LiteRT's interpreter.

An fp32 model converts as it is. A model compressed by modelpress's `static_int8` converts to a full-integer
int8 `.tflite` (int8 weights, int8 activations, int8 input and output tensors) that keeps modelpress's own
decisions: each quantized layer's int8 weight codes and per-channel scales, and its calibrated input range.
litert-torch lowers only the pt2e Q/DQ form its `PT2EQuantizer` writes, and TFLite's integer kernels need the
output of every layer quantized too (modelpress's graph quantizes layer inputs only), so the export
rebuilds the float model from modelpress's dequantized weights, lets the pt2e quantizer place quantizers
on every tensor, calibrates the ranges modelpress did not measure (layer outputs, logits) on `data`, and
fixes the quantizers modelpress did measure to modelpress's values before converting.

The int8 file's inputs and outputs are int8; `LiteRTSession` quantizes float inputs and dequantizes
outputs with the file's own parameters, so a parity check against the torch model runs unchanged.

Transformers take a second int8 form, `activations="dynamic"` (dynamic-range, "hybrid"): the same int8
weight codes and per-channel scales, float activations, and TFLite's hybrid FULLY_CONNECTED / CONV_2D
kernels quantize each layer's input at run time (one scale per row: per token). TFLite's full-integer
kernels write int8 outputs, so every Linear output and residual add of a BERT gets one per-tensor range,
which its outlier features do not survive (all-MiniLM-L6-v2: embedding cosine 0.942 to fp32, against
0.9989 dynamic). `export_litert` picks it for models with a LayerNorm/RMSNorm (`activations="auto"`);
full-integer ("static") stays what TFLite Micro and integer-only NPUs need.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modelpress._files import atomic_path, check_output_path
from modelpress.deploy.export import traceable
from modelpress.errors import DataError, ExportError, GraphError, RuntimeUnavailableError
from modelpress.loading import Inputs, as_inputs
from modelpress.outputs import no_cache

log = logging.getLogger(__name__)

Quantize = Literal["auto", "fp32", "int8"]
QUANTIZE: tuple[Quantize, ...] = ("auto", "fp32", "int8")
Activations = Literal["auto", "static", "dynamic"]
ACTIVATIONS: tuple[Activations, ...] = ("auto", "static", "dynamic")
CALIBRATION_ITEMS = 1024  # items of `data` the ranges modelpress did not measure are calibrated on


def require_litert() -> None:
    """Raise a clear error when the `litert` extra (litert-torch, ai-edge-litert) is not installed."""
    for module in ("litert_torch", "ai_edge_litert"):
        if importlib.util.find_spec(module) is None:
            raise RuntimeUnavailableError(
                f"LiteRT export needs '{module}', which is not installed. Install it with "
                "`pip install modelpress[litert]`."
            )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """litert-torch prints a progress tree and torch.export warnings on every conversion; keep the user's
    terminal clean (its switch is an environment variable, restored afterwards)."""
    before = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        if before is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = before


# --------------------------------------------------------------------------------------------------
# modelpress's static layers -> the float twin and the quantizer values to keep
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fixed:
    """What modelpress decided for one static layer: its input quantizer as int8 (scale, zero point)
    and its weight's per-channel scales (symmetric, zero point 0)."""

    input_scale: float
    input_zero_point: int
    weight_scale: torch.Tensor  # (out_channels,)


class _Smoothed(nn.Module):
    """SmoothQuant's per-feature input multiplier in front of a layer (a Mul in the graph)."""

    def __init__(self, inner: nn.Module, multiplier: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.multiplier: torch.Tensor
        self.register_buffer("multiplier", multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.multiplier)


def static_layers(model: nn.Module) -> list[str]:
    """Names of the layers modelpress quantized statically (int8 weights and a calibrated input)."""
    from modelpress.techniques.quantized import QuantizedLayer

    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, QuantizedLayer) and m.input_scale is not None and m.bits in (7, 8)
    ]


class _Int8Rows(nn.Module):
    """modelpress's int8 embedding (codes, a scale and optional zero point per row) with each row's scale
    gathered by indexing (TFLite's GATHER) rather than an embedding lookup: in a dynamic-range conversion
    the TFLite converter quantizes the float (V, 1) table of an EMBEDDING_LOOKUP, asymmetrically, and
    LiteRT's lookup kernel then refuses to load (its table's zero point must be 0)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        super().__init__()
        self.codes: torch.Tensor  # (V, D) int8
        self.scale: torch.Tensor  # (V,) fp32
        self.zero_point: torch.Tensor | None  # (V,) or None
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(ids, self.codes).float()  # (..., D) codes
        if self.zero_point is not None:
            rows = rows - self.zero_point[ids].float().unsqueeze(-1)
        return rows * self.scale[ids].unsqueeze(-1)  # (..., 1) scale per row


def _gather_embeddings(twin: nn.Module) -> list[str]:
    """Swap modelpress's int8 embeddings in `twin` for `_Int8Rows`; returns their names."""
    from modelpress.techniques.quantized import QuantizedLayer

    names = []
    for name, m in list(twin.named_modules()):
        if (
            isinstance(m, QuantizedLayer)
            and isinstance(m.inner, nn.Embedding)
            and m.input_scale is None
            and m.inner.max_norm is None
            and m.qweight.dtype == torch.int8
        ):
            zero_point = m.zero_point.reshape(-1) if m.zero_point is not None else None
            rows = _Int8Rows(m.qweight, m.scale.reshape(-1), zero_point)
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, child, rows)
            names.append(name)
    return names


def _float_twin(model: nn.Module) -> tuple[nn.Module, dict[str, _Fixed]]:
    """A copy of `model` whose static layers are plain layers holding modelpress's dequantized weights,
    and {name of the conv/linear layer in the copy: modelpress's quantizer values}."""
    from modelpress.techniques.quantized import QuantizedLayer

    twin = copy.deepcopy(model)
    fixed: dict[str, _Fixed] = {}
    for name in static_layers(twin):
        layer = twin.get_submodule(name)
        assert isinstance(layer, QuantizedLayer) and layer.input_scale is not None
        inner = layer.inner
        # codes * scale: the pt2e weight quantizer with modelpress's scales gives back the same codes
        inner.weight = nn.Parameter(layer.dequantized_weight().detach().clone(), requires_grad=False)
        # TFLite takes int8 activations: a uint8 input quantizer is the same grid shifted by 128
        zero_point = layer.input_zero_point - (0 if layer.input_signed else 128)
        replacement: nn.Module = inner
        key = name
        if layer.input_multiplier is not None:
            replacement = _Smoothed(inner, layer.input_multiplier.detach().clone())
            key = f"{name}.inner"
        fixed[key] = _Fixed(layer.input_scale, zero_point, layer.scale.detach().float().clone())
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, replacement)
    return twin, fixed


def _fold_batchnorm(twin: nn.Module, example: Inputs, fixed: dict[str, _Fixed]) -> list[str]:
    """Fold each BatchNorm after a static layer of the float twin into that layer (as static_int8 does
    before quantizing when it can: a BatchNorm after a clustered conv, or with `fold_batchnorm: false`,
    is still there), scaling the layer's fixed weight scales by |gamma / sigma| per channel so that the
    pt2e weight quantizer gives back modelpress's codes (negated where the factor is negative). Left in
    the twin, the converter folds it itself over modelpress's scales and the codes change (TinyResNet:
    output cosine 0.997). Returns the folded BatchNorms."""
    from modelpress.graph.equalize import fold_batchnorm

    def weight(name: str) -> torch.Tensor:
        w = twin.get_submodule(name).weight
        assert isinstance(w, torch.Tensor)
        return w.detach().reshape(w.shape[0], -1).clone()

    before = {name: weight(name) for name in fixed}
    try:
        folded = fold_batchnorm(twin, example, owner="LiteRT export")
    except GraphError as exc:
        log.info("LiteRT: BatchNorm layers are not folded (%s); the converter folds them", exc)
        return []
    for name, old in before.items():
        new = weight(name)
        if torch.equal(old, new):
            continue
        # the folded rows are the old ones times one factor each: recover it (rows of zeros keep 1)
        norm = (old.double() * old.double()).sum(dim=1)
        factor = torch.where(norm > 0, (new.double() * old.double()).sum(dim=1) / norm.clamp_min(1e-300), 1.0)
        values = fixed[name]
        scale = (values.weight_scale.double() * factor.abs()).float()
        fixed[name] = _Fixed(values.input_scale, values.input_zero_point, scale)
    return folded


_LAYER_OPS = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def _module_path(node: Any) -> str | None:
    """The module a traced node came from (`features.0`), from torch.export's nn_module_stack."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    # strict traces spell it L['self'].features[0]; non-strict ones features.0
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".")


def _quantizer(quantized: set[str], *, dynamic: bool = False) -> Any:
    """litert-torch's PT2E quantizer (int8 per-tensor activations, int8 per-channel symmetric weights;
    with `dynamic`, int8 weights only: the converter writes hybrid kernels) with two changes. Only the
    Conv/Linear layers in `quantized` (modelpress's static layers) are quantized: a layer modelpress left
    in float (mixed precision, `ignore`) stays float. And a global average
    pool (`adaptive_avg_pool2d` to 1x1, TFLite's MEAN, whose int8 kernel rescales) gets its own output
    range: the stock quantizer shares it with the pool's input, so where modelpress quantized the pooled
    value (the head's input), the feature map before the pool would be clipped to the pooled range."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)

    class _Quantizer(PT2EQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for node in model.graph.nodes:
                if node.target in _LAYER_OPS and _module_path(node) not in quantized:
                    # an empty annotation: the pt2e annotators skip nodes already annotated
                    node.meta["quantization_annotation"] = QuantizationAnnotation(_annotated=True)
            model = super().annotate(model)
            for node in model.graph.nodes:
                annotation = node.meta.get("quantization_annotation")
                if (
                    node.target == torch.ops.aten.adaptive_avg_pool2d.default
                    and annotation is not None
                    and isinstance(annotation.output_qspec, SharedQuantizationSpec)
                    and list(node.args[1]) == [1, 1]
                ):
                    annotation.output_qspec = config.output_activation
            return model

    return _Quantizer().set_global(config)


def _fix_observers(
    prepared: torch.fx.GraphModule, fixed: dict[str, _Fixed], *, dynamic: bool = False
) -> list[str]:
    """Set the observers on the input and weight of each of modelpress's layers to modelpress's values
    (with `dynamic`, on the weight only: the input has none); returns the layers found."""

    def observed(a: Any) -> bool:
        return getattr(a, "op", None) == "call_module" and "activation_post_process" in str(a.target)

    found: list[str] = []
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in _LAYER_OPS:
            continue
        name = _module_path(node)
        values = fixed.get(name) if name is not None else None
        x, w = node.args[0], node.args[1]
        if name is None or values is None or not observed(w) or not (dynamic or observed(x)):
            continue
        w_obs = prepared.get_submodule(w.target)
        if not dynamic:
            x_obs = prepared.get_submodule(x.target)
            scale = torch.tensor([values.input_scale], dtype=torch.float32)
            zero_point = torch.tensor([values.input_zero_point], dtype=torch.int32)
            # convert_pt2e reads each observer's calculate_qparams(); an instance attribute takes its place
            setattr(x_obs, "calculate_qparams", lambda s=scale, z=zero_point: (s, z))  # noqa: B010
        w_scale = values.weight_scale
        w_zero = torch.zeros(len(w_scale), dtype=torch.int32)
        setattr(w_obs, "calculate_qparams", lambda s=w_scale, z=w_zero: (s, z))  # noqa: B010
        found.append(name)
    return found


def _batches(data: Iterable[Any] | None, example: Inputs, limit: int, *, split: bool) -> list[Inputs]:
    """Calibration batches: the items of `data` (up to `limit` rows), which must differ from the example
    inputs only in the batch dim; with `split` (a graph traced with static shapes) each is cut along dim 0
    into pieces of the example's batch size."""
    if data is None:
        log.warning(
            "LiteRT int8 export without calibration data: the ranges modelpress did not measure (layer "
            "outputs, logits) come from the example inputs only. Pass data= (--data) for better ranges."
        )
        return [example]
    batch = example[0].shape[0] if example[0].ndim else 1
    out: list[Inputs] = []
    items = 0
    for sample in data:
        inputs = as_inputs(sample, where="calibration item")
        if len(inputs) != len(example) or any(
            t.shape[1:] != e.shape[1:] or t.dtype != e.dtype for t, e in zip(inputs, example, strict=True)
        ):
            raise DataError(
                "A calibration item has shapes "
                f"{[tuple(t.shape) for t in inputs]}, but the LiteRT graph is static with inputs "
                f"{[tuple(t.shape) for t in example]}: give items that differ only in the batch dim."
            )
        rows = inputs[0].shape[0] if inputs[0].ndim else 1
        step = batch if split else max(rows, 1)
        for start in range(0, rows - step + 1, step):
            out.append(tuple(t[start : start + step] for t in inputs) if split else inputs)
            items += step
            if items >= limit:
                return out
    if not out:
        raise DataError(f"The calibration data holds no batch of {batch} items; give more data.")
    return out


def _trace_for_calibration(twin: nn.Module, example: Inputs) -> tuple[torch.fx.GraphModule, bool]:
    """The float twin traced by torch.export, with a dynamic batch where the model allows it (calibration
    then runs on whole batches, 30x faster than item by item on MNIST), else static; and whether static."""
    batch = torch.export.Dim.AUTO
    shapes = tuple({0: batch} if t.ndim else {} for t in example)
    # a batch of 1 would be specialized (torch.export's 0/1 rule): trace with two items
    wide = tuple(torch.cat([t, t]) if t.ndim and t.shape[0] == 1 else t for t in example)
    try:
        return torch.export.export(twin, wide, dynamic_shapes=shapes, strict=False).module(), False
    except Exception:
        log.debug("LiteRT: tracing with a dynamic batch failed; calibrating item by item", exc_info=True)
    return torch.export.export(twin, example, strict=False).module(), True


def _convert_error(model: nn.Module, exc: BaseException) -> ExportError:
    """An ExportError naming the op litert-torch could not lower, where its message says."""
    text = ""
    inner: BaseException | None = exc
    while inner is not None:
        text += f"\n{inner}"
        inner = inner.__cause__ or inner.__context__
    missing = re.search(r"Lowering not found: (\S+)", text)
    if missing:
        op = missing.group(1).removesuffix(".default")
        return ExportError(
            f"LiteRT conversion of {type(model).__name__} failed: litert-torch has no lowering for the op "
            f"'{op}'. Replace it in forward with ops LiteRT supports, or export to ONNX instead."
        )
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    node = re.search(r"target=torch\.ops\.(\S+?)\]?\(", text)
    where = f" at op '{node.group(1).removesuffix('.default')}'" if node else ""
    return ExportError(
        f"LiteRT conversion of {type(model).__name__} failed{where} ({type(exc).__name__}: {first}). "
        "torch.export must trace the model and litert-torch must lower every op: check the op, or export to "
        "ONNX instead."
    )


def has_norm_layers(model: nn.Module) -> bool:
    """Whether `model` has a LayerNorm / RMSNorm (a transformer): what `activations="auto"` exports with
    dynamic-range int8, since the residual stream such norms read carries outlier features that one
    int8 range per tensor clips."""
    return any(
        isinstance(m, nn.LayerNorm | nn.RMSNorm) or re.search(r"(Layer|RMS)Norm", type(m).__name__)
        for m in model.modules()
    )


def _to_litert_int8(model: nn.Module, example: Inputs, data: Iterable[Any] | None, *, dynamic: bool) -> Any:
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    twin, fixed = _float_twin(model)
    _fold_batchnorm(twin, example, fixed)
    embeddings = _gather_embeddings(twin) if dynamic else []
    quantizer = _quantizer(set(fixed), dynamic=dynamic)
    try:
        graph, static = _trace_for_calibration(twin, example)
        prepared = prepare_pt2e(graph, quantizer)
    except Exception as exc:
        raise _convert_error(model, exc) from exc
    # dynamic: nothing to calibrate (inputs are quantized at run time; weights take modelpress's scales)
    batches = [example] if dynamic else _batches(data, example, CALIBRATION_ITEMS, split=static)
    with torch.no_grad():
        for inputs in batches:
            try:
                prepared(*inputs)
            except Exception as exc:
                raise DataError(
                    f"{type(model).__name__} fails on a calibration batch of shapes "
                    f"{[tuple(t.shape) for t in inputs]} ({type(exc).__name__}: {exc})."
                ) from exc
    found = _fix_observers(prepared, fixed, dynamic=dynamic)
    log.info(
        "LiteRT int8 %s: %d layers with int8 weights and %s: %s; int8 embeddings: %s",
        "dynamic-range" if dynamic else "full-integer",
        len(found),
        "inputs quantized at run time (hybrid kernels, float activations)"
        if dynamic
        else "calibrated int8 inputs and outputs",
        ", ".join(sorted(found)) or "none",
        ", ".join(embeddings) or "none",
    )
    missed = sorted(set(fixed) - set(found))
    if missed:
        log.warning(
            "LiteRT: the quantized layers %s have no int8 LiteRT kernel pattern (pt2e annotates Conv2d and "
            "Linear); they run in float with modelpress's rounded weights.",
            ", ".join(missed),
        )
    quantized = convert_pt2e(prepared, fold_quantize=False)
    move_exported_model_to_eval(quantized)
    for module in quantized.modules():  # litert-torch warns about a module left in training mode
        module.training = False
    try:
        return litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    except Exception as exc:
        raise _convert_error(model, exc) from exc


def _compact_layers(model: nn.Module) -> list[str]:
    """Layers held in a compressed form other than static int8 (weight-only, grouped, clustered, sparse)."""
    from modelpress.techniques.quantized import QuantizedLayer, _Wrapper

    static = set(static_layers(model))
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, _Wrapper) and not (isinstance(m, QuantizedLayer) and name in static)
    ]


def litert_bytes(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    quantize: Quantize = "auto",
    data: Iterable[Any] | None = None,
    activations: Activations = "static",
) -> tuple[bytes, bool]:
    """The `.tflite` flatbuffer of `model` (see `export_litert`) and whether it is int8. The default
    `activations="static"` is full-integer (what TFLite Micro runs).

    >>> content, int8 = litert_bytes(model, (x,))  # doctest: +SKIP
    """
    require_litert()
    if quantize not in QUANTIZE:
        raise ExportError(f"quantize={quantize!r} is unknown; choose from {', '.join(QUANTIZE)}.")
    if activations not in ACTIVATIONS:
        raise ExportError(f"activations={activations!r} is unknown; choose from {', '.join(ACTIVATIONS)}.")
    example = as_inputs(example_inputs)
    model = model.eval()
    layers = static_layers(model)
    if quantize == "int8" and not layers:
        raise ExportError(
            f"{type(model).__name__} has no statically quantized layer to export as int8 to LiteRT. Compress "
            "it with static int8 first (`mp.compress(model, 'int8-static', data)`, --recipe int8-static), or "
            "export fp32 (quantize='fp32')."
        )
    int8 = bool(layers) and quantize != "fp32"
    compact = _compact_layers(model)
    if quantize == "auto" and compact and not int8:
        raise ExportError(
            f"LiteRT would store {len(compact)} compressed layer(s) of {type(model).__name__} as float weights "
            f"(e.g. '{compact[0]}': weight-only, grouped, clustered or sparse forms have no LiteRT form here), so "
            "the file would not be smaller. Compress with static int8 for LiteRT (--recipe int8-static; a "
            "clustered model takes a static_int8 step after cluster), or export a float file on purpose with "
            "quantize='fp32'."
        )
    with no_cache(model), torch.no_grad():
        traced, _ = traceable(model, example)
        with _quiet():
            if int8:
                dynamic = activations == "dynamic" or (activations == "auto" and has_norm_layers(model))
                converted = _to_litert_int8(traced, example, data, dynamic=dynamic)
            else:
                import litert_torch

                try:
                    converted = litert_torch.convert(traced, example)
                except Exception as exc:
                    raise _convert_error(model, exc) from exc
            content = bytes(converted.model_content())
    return content, int8


def export_litert(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    quantize: Quantize = "auto",
    data: Iterable[Any] | None = None,
    activations: Activations = "auto",
) -> Path:
    """Export `model` to a LiteRT `.tflite` file at `path`, written atomically; static input shapes.

    `quantize="auto"` writes int8 when the model has layers modelpress quantized statically (`static_int8`,
    `mp.compress(model, "int8-static", data)`), else fp32; "int8" requires such layers; "fp32" always
    converts in float (static layers then run their Q/DQ ops in float). The int8 file is full-integer
    (int8 input and output tensors too; `LiteRTSession` converts floats at the boundary) with modelpress's
    weight codes and input ranges; ranges modelpress did not measure (layer outputs, logits) are calibrated
    on up to `CALIBRATION_ITEMS` items of `data` (the calibration data: items differing from the example
    inputs only in the batch dim).

    `activations` picks the int8 form: "static" is that full-integer file; "dynamic" (dynamic-range) keeps
    the int8 weights and per-channel scales but float activations, each layer's input quantized at run time
    per row by TFLite's hybrid kernels, and needs no calibration data; "auto" takes "dynamic" for a model
    with a LayerNorm/RMSNorm (transformers: a full-integer BERT loses its outlier features) and "static"
    otherwise. `int8_kernels` tells from the file which form each layer got.

    >>> small = mp.compress(model, "int8-static", calib)  # doctest: +SKIP
    >>> export_litert(small, (x[:1],), "model.tflite", data=calib)  # doctest: +SKIP
    """
    out = check_output_path(path, overwrite=overwrite)
    content, int8 = litert_bytes(model, example_inputs, quantize=quantize, data=data, activations=activations)
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.write_bytes(content)
    log.info("exported %s (%s, %d bytes)", out, "int8" if int8 else "fp32", len(content))
    return out


# --------------------------------------------------------------------------------------------------
# reading .tflite files and running them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TfliteTensor:
    name: str
    dtype: str  # numpy name: float32, int8, int32, ...
    shape: tuple[int, ...]
    constant: bool  # held in the file (a weight or bias)
    bytes: int


@dataclass(frozen=True)
class TfliteOp:
    name: str  # CONV_2D, FULLY_CONNECTED, ...
    inputs: tuple[TfliteTensor, ...]
    outputs: tuple[TfliteTensor, ...]


_TYPE_NAMES = {
    0: "float32",
    1: "float16",
    2: "int32",
    3: "uint8",
    4: "int64",
    6: "bool",
    7: "int16",
    9: "int8",
    10: "float64",
    16: "uint32",
    17: "uint16",
    18: "int4",
}


def read_tflite(model: bytes | str | os.PathLike[str]) -> list[TfliteOp]:
    """The operators of a `.tflite` file's main graph with their tensors, read from the flatbuffer.

    >>> [op.name for op in read_tflite("model.tflite")]  # doctest: +SKIP
    ['CONV_2D', 'MAX_POOL_2D', 'CONV_2D', 'MAX_POOL_2D', 'RESHAPE', 'FULLY_CONNECTED', 'FULLY_CONNECTED']
    """
    from ai_edge_litert import schema_py_generated as schema

    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    try:
        root = schema.Model.GetRootAsModel(data, 0)
        graph = root.Subgraphs(0)
    except Exception as exc:
        raise ExportError(
            f"'{model if not isinstance(model, bytes) else 'model'}' is not a .tflite file."
        ) from exc
    ops_by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}

    def tensor(i: int) -> TfliteTensor:
        t = graph.Tensors(i)
        buffer = root.Buffers(t.Buffer())
        size = buffer.DataLength() if buffer is not None else 0
        if size == 0 and buffer is not None and buffer.Size() > 0:  # stored outside the flatbuffer
            size = int(buffer.Size())
        shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
        return TfliteTensor(
            name=t.Name().decode(),
            dtype=_TYPE_NAMES.get(t.Type(), str(t.Type())),
            shape=shape,
            constant=size > 0,
            bytes=size,
        )

    ops = []
    for k in range(graph.OperatorsLength()):
        op = graph.Operators(k)
        code = root.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = ops_by_code.get(builtin, str(builtin))
        if name == "CUSTOM":
            name = f"CUSTOM:{code.CustomCode().decode()}"
        ins = tuple(tensor(int(i)) for i in op.InputsAsNumpy() if i >= 0) if op.InputsLength() else ()
        outs = tuple(tensor(int(i)) for i in op.OutputsAsNumpy() if i >= 0) if op.OutputsLength() else ()
        ops.append(TfliteOp(name=name, inputs=ins, outputs=outs))
    return ops


def float_ops(model: bytes | str | os.PathLike[str]) -> list[str]:
    """The ops of a `.tflite` file that compute in float (a float32 activation in or out): what a
    full-integer target (TFLite Micro, NPUs) cannot run. Empty for a full-integer file."""
    return [
        op.name
        for op in read_tflite(model)
        if any(t.dtype in ("float32", "float16") and not t.constant for t in (*op.inputs, *op.outputs))
    ]


def int8_kernels(model: bytes | str | os.PathLike[str]) -> dict[str, int]:
    """How the weighted layers (CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED) of a `.tflite` file run:
    {"full-integer": int8 input and weight, "dynamic": float input and int8 weight (hybrid kernel, input
    quantized at run time), "float": float weight}.

    >>> int8_kernels("minilm.tflite")  # doctest: +SKIP
    {'full-integer': 0, 'dynamic': 36, 'float': 0}
    """
    counts = {"full-integer": 0, "dynamic": 0, "float": 0}
    for op in read_tflite(model):
        if op.name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op.inputs) < 2:
            continue
        x, w = op.inputs[0].dtype, op.inputs[1].dtype
        if w not in ("int8", "uint8", "int4"):
            counts["float"] += 1
        else:
            counts["dynamic" if x in ("float32", "float16") else "full-integer"] += 1
    return counts


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A float array to an int8/uint8 input tensor with the tensor's own (scale, zero point), rounding
    half to even as torch's quantize ops do."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(x.dtype, np.floating) or not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(x, dtype=dtype)
    scale, zero_point = detail["quantization"]
    if scale == 0:
        return np.ascontiguousarray(x, dtype=dtype)
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float32) * np.float32(1.0 / scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if scale == 0 or not np.issubdtype(y.dtype, np.integer) or np.dtype(detail["dtype"]) == np.int32:
        return y
    return ((y.astype(np.float32) - zero_point) * np.float32(scale)).astype(np.float32)


class LiteRTSession:
    """A `.tflite` file in LiteRT's interpreter (ai-edge-litert, CPU, XNNPACK for the ops it takes).

    Inputs and outputs are numpy arrays in the torch model's layout (litert-torch keeps NCHW at the
    boundary). A full-integer file takes float inputs, quantized here with each input tensor's own scale and
    zero point, and gives float outputs (dequantized): what `check_parity` compares with torch. Shapes are
    those of the export (`input_shapes`); `raw=True` passes the integer tensors through unchanged.

    >>> session = LiteRTSession("model.tflite", threads=2)  # doctest: +SKIP
    >>> logits, = session.run([x.numpy()])  # doctest: +SKIP
    """

    runtime = "litert"

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 2, raw: bool = False) -> None:
        require_litert()
        from ai_edge_litert.interpreter import Interpreter

        p = Path(path)
        if not p.is_file():
            raise ExportError(
                f"Artifact '{p}' does not exist. Export it first (`modelpress export --to litert`)."
            )
        try:
            self._interpreter = Interpreter(model_path=str(p), num_threads=threads)
            self._interpreter.allocate_tensors()
        except Exception as exc:
            raise ExportError(
                f"'{p}' is not a .tflite file LiteRT can load ({type(exc).__name__}: {exc})."
            ) from exc
        self._raw = raw
        self._inputs = self._interpreter.get_input_details()
        self._outputs = self._interpreter.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self.input_shapes: list[tuple[int | None, ...]] = [
            tuple(int(s) for s in d["shape"]) for d in self._inputs
        ]
        self.input_dtypes = [np.dtype(d["dtype"]) for d in self._inputs]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._inputs):
            raise ValueError(
                f"The artifact takes {len(self._inputs)} inputs ({self.input_names}); got {len(inputs)}."
            )
        for x, detail in zip(inputs, self._inputs, strict=True):
            if tuple(x.shape) != tuple(detail["shape"]):
                raise ValueError(
                    f"Input '{detail['name']}' has the fixed shape {tuple(int(s) for s in detail['shape'])} "
                    f"in LiteRT; got {tuple(x.shape)}. Export with example inputs of the shape you run."
                )
            value = (
                np.ascontiguousarray(x, dtype=detail["dtype"])
                if self._raw
                else _quantize(np.asarray(x), detail)
            )
            self._interpreter.set_tensor(detail["index"], value)
        self._interpreter.invoke()
        outs = [self._interpreter.get_tensor(d["index"]).copy() for d in self._outputs]
        return outs if self._raw else [_dequantize(y, d) for y, d in zip(outs, self._outputs, strict=True)]


def open_litert(path: str | os.PathLike[str], *, threads: int = 2) -> LiteRTSession:
    """Load a `.tflite` file in LiteRT for `check_parity` or timing.

    >>> mp.check_parity(model, open_litert("model.tflite"), [(x,)])  # doctest: +SKIP
    """
    if threads < 1:
        raise RuntimeUnavailableError(f"threads={threads} must be at least 1.")
    return LiteRTSession(path, threads=threads)
