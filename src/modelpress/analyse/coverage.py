"""What a recipe did to each weight-bearing layer: compressed, removed, or left alone and why.

A weight-bearing layer is a module holding a parameter of two or more dims (Linear, convolutions,
embeddings, LSTM/GRU matrices, a mixture-of-experts' stacked expert weights, any custom layer with a
matrix); norms and biases alone are not counted. A recipe that changes nothing, or whose quantization or
sparsity steps leave most of these bytes as they were, is refused unless the user allows a partial result:
a "compressed" model that is mostly the original is a silent failure, not a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from modelpress.errors import RecipeError
from modelpress.techniques.lowrank import skip_reason as lowrank_skip_reason
from modelpress.techniques.quantized import QUANTIZABLE_TYPES
from modelpress.techniques.select import is_conv1d, matches_any

# Steps that remove structure (channels, blocks): what they keep is kept on purpose, so only "changed
# nothing" is a failure for them, not "most bytes untouched".
PRUNING_STEPS = frozenset({"structured", "depth"})
PARTIAL_SHARE = 0.5  # quantization/sparsity leaving more than this share of weight bytes untouched fails


@dataclass
class LayerCoverage:
    name: str
    type: str
    bytes: int
    status: str  # "compressed", "removed" or "left alone"
    now: str = ""  # the layer type that replaced it (QuantizedLayer, ...), or its new size
    reason: str = ""  # why it was left alone


@dataclass
class Coverage:
    layers: list[LayerCoverage] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def left_alone(self) -> list[LayerCoverage]:
        return [layer for layer in self.layers if layer.status == "left alone"]

    @property
    def untouched_share(self) -> float:
        total = self.total_bytes
        return sum(layer.bytes for layer in self.left_alone) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_bytes": self.total_bytes,
            "untouched_share": self.untouched_share,
            "layers": [asdict(layer) for layer in self.layers],
        }


Snapshot = dict[str, tuple[nn.Module, int, int, int]]


def weight_layers(model: nn.Module) -> Snapshot:
    """Modules owning a parameter of >= 2 dims: (module, those parameters' bytes with shared ones counted
    once, all bytes the module stores, their zero entries). Taken before compressing, it is what
    `coverage` compares with."""
    seen: set[int] = set()
    out: Snapshot = {}
    for name, module in model.named_modules():
        size = 0
        for param in module.parameters(recurse=False):
            if param.dim() >= 2 and id(param) not in seen:
                seen.add(id(param))
                size += param.numel() * param.element_size()
        if size:
            out[name] = (module, size, _stored_bytes(module), _zeros(module))
    return out


def _zeros(module: nn.Module) -> int:
    return sum(int((p == 0).sum()) for p in module.parameters(recurse=False) if p.dim() >= 2)


def _stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


_KNOWN: tuple[type[nn.Module], ...] = tuple(t for types in QUANTIZABLE_TYPES.values() for t in types)


def _reason(name: str, module: nn.Module, steps: Sequence[Any]) -> str:
    """Why no step compressed this layer, from what each step selects."""
    kind = type(module).__name__
    if not isinstance(module, _KNOWN) and not is_conv1d(module):
        return (
            f"{kind} is not a layer type modelpress rewrites (Linear, GPT-2 Conv1D, convolutions, Embedding, "
            "LSTM/GRU/RNN): its weight parameters stay as they are"
        )
    reasons = []
    for i, step in enumerate(steps, 1):
        ignore = getattr(step, "ignore", ())
        targets = getattr(step, "targets", None)
        kinds = getattr(step, "layers", None)
        if step.type in PRUNING_STEPS:
            reasons.append(f"step {i} ({step.type}) kept it")
        elif ignore and matches_any(ignore, name, module):
            reasons.append(f"step {i} ({step.type}) ignores it")
        elif targets is not None and not matches_any(targets, name, module):
            reasons.append(f"step {i} ({step.type}) does not target it")
        elif kinds is not None and not isinstance(
            module, tuple(t for k in kinds for t in QUANTIZABLE_TYPES.get(k, ()))
        ):
            reasons.append(f"step {i} ({step.type}) compresses {'/'.join(kinds)} layers, not {kind}")
        elif step.type == "dynamic_int8" and not isinstance(module, (nn.Linear, nn.RNNBase)):
            reasons.append(f"step {i} (dynamic_int8) compresses Linear and recurrent layers, not {kind}")
        elif step.type == "lowrank" and (why := lowrank_skip_reason(module, step)):
            reasons.append(f"step {i} (lowrank) left it as is: {why}")
        else:
            reasons.append(f"step {i} ({step.type}) left it as is (its log says why)")
    return "; ".join(reasons)


def coverage(original: nn.Module | Snapshot, compressed: nn.Module, steps: Sequence[Any]) -> Coverage:
    """Each weight-bearing layer of `original` (the model, or its `weight_layers` taken before compressing)
    and what the recipe `steps` made of it in `compressed`.

    >>> cov = coverage(model, compress(model, "int8-weight-only"), load_recipe("int8-weight-only"))  # doctest: +SKIP
    >>> [(row.name, row.reason) for row in cov.left_alone]  # doctest: +SKIP
    """
    before = weight_layers(original) if isinstance(original, nn.Module) else original
    after = dict(compressed.named_modules())
    result = Coverage()
    for name, (module, size, stored, zeros) in before.items():
        new = after.get(name)
        kind = type(module).__name__
        if new is None:
            result.layers.append(LayerCoverage(name, kind, size, "removed"))
        elif type(new) is not type(module) and not (type(new) is nn.Linear and is_conv1d(module)):
            result.layers.append(LayerCoverage(name, kind, size, "compressed", now=type(new).__name__))
        elif _stored_bytes(new) == stored and _zeros(new) > zeros + size // 40:
            # pruned in place (a layer too small for the bitmask format keeps its zeros dense)
            result.layers.append(LayerCoverage(name, kind, size, "compressed", now="zeros, stored dense"))
        elif _stored_bytes(new) < stored:
            result.layers.append(
                LayerCoverage(name, kind, size, "compressed", now=f"{_stored_bytes(new) / stored:.2f}x bytes")
            )
        else:
            reason = _reason(name, module, steps)
            result.layers.append(LayerCoverage(name, kind, size, "left alone", reason=reason))
    return result


def check_coverage(cov: Coverage, steps: Sequence[Any], *, allow_partial: bool) -> None:
    """Refuse a recipe that changed nothing, or whose quantization/sparsity steps left most weight bytes
    untouched, naming the largest layers left alone and why; `allow_partial` accepts the latter."""
    if not cov.layers:
        return
    largest = sorted(cov.left_alone, key=lambda row: -row.bytes)[:5]
    listing = "; ".join(
        f"'{row.name}' ({row.type}, {row.bytes / 1e6:.2f} MB): {row.reason}" for row in largest
    )
    kinds = ", ".join(step.type for step in steps)
    if len(cov.left_alone) == len(cov.layers):
        raise RecipeError(
            f"The recipe ({kinds}) changed none of the model's {len(cov.layers)} weight layers: {listing}. "
            "Change the recipe's layers/targets/ignore or choose a technique for these layer types."
        )
    if allow_partial or any(step.type in PRUNING_STEPS for step in steps):
        return
    if cov.untouched_share > PARTIAL_SHARE:
        raise RecipeError(
            f"The recipe ({kinds}) left {cov.untouched_share:.0%} of the weight bytes untouched; the largest "
            f"layers left alone: {listing}. Widen the recipe (layers/targets/ignore), or accept a partial "
            "result with allow_partial=True (--allow-partial on the command line)."
        )
