"""Block-by-block calibration for algorithms that need each layer's inputs (GPTQ, AWQ).

A transformer is a stack of identical blocks. Rather than keep statistics for every layer at once, the
model runs once up to the first block and the inputs of that block (positional and keyword: attention
masks, rotary embeddings, ...) are cached for every calibration item. Then, block after block:

1. the cached inputs run through the block while hooks feed each selected layer's input to the
   algorithm (`BlockStep.run`);
2. the algorithm quantizes that block's layers and returns their replacements;
3. the block runs again (or its outputs from step 1 are kept) to give the next block's inputs.

Peak memory is the model, one block's activations for one item, and two copies of the hidden states of
the calibration set. Layers outside the blocks (an LM head, a classifier, a CNN stem) are calibrated
afterwards in one pass through the whole model; a model without a repeated block is one block.

The blocks are the longest `nn.ModuleList` / `nn.Sequential` whose children share one type and hold
selected layers (`model.layers` of a Hugging Face decoder, `encoder.layer` of BERT). Before trusting
them, one forward of the first item checks that each block feeds the next and that all blocks get the
same keyword arguments; otherwise the whole model is calibrated as one block, with a warning.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.data import Dataset
from modelpress.errors import DataError
from modelpress.loading import as_inputs
from modelpress.outputs import first_output
from modelpress.techniques.quantized import reuse_weights
from modelpress.techniques.select import set_submodule

log = logging.getLogger(__name__)

Observe = Callable[[str, torch.Tensor], None]  # (layer name, the layer's input)
Process = Callable[["BlockStep"], dict[str, nn.Module]]  # a step -> replacements by layer name

# Keyword arguments that carry a KV cache: running a block twice must not append to it.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def bf16_supported() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


class _Stop(Exception):
    """Raised by a hook to end a forward early once the wanted inputs are captured."""


@dataclass
class _Call:
    """The inputs of one block call: positional args, keyword args, and where the hidden state is."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_key: str | None = None  # None: args[0]

    def hidden(self) -> torch.Tensor:
        return self.args[0] if self.hidden_key is None else self.kwargs[self.hidden_key]

    def with_hidden(self, x: torch.Tensor) -> _Call:
        if self.hidden_key is None:
            return _Call((x, *self.args[1:]), self.kwargs, None)
        return _Call(self.args, {**self.kwargs, self.hidden_key: x}, self.hidden_key)


@dataclass
class BlockStep:
    """One step of block-wise calibration: a block (or the whole model), its selected layers, and the
    inputs it runs on."""

    name: str  # the block's dotted name; "" for the whole model
    module: nn.Module
    layers: dict[str, nn.Module]  # selected layers inside `module`, by their name in the model
    owner: str
    calls: list[_Call] | None = None  # cached block inputs; None: run the model on `data`
    data: Dataset | None = None
    batches: int = 0
    record_outputs: bool = False
    outputs: list[torch.Tensor] | None = field(default=None, repr=False)
    # With `targets=True` in calibrate_blockwise: the unmodified model's inputs to this block (carried along
    # the unmodified blocks, the "dense chain"), and what the unmodified block gives for them. `process`
    # fills `targets` (`reference_step()` records them while it calibrates on the reference inputs, or
    # `compute_targets()`) before it changes the block; the driver carries them to the next block.
    carry_targets: bool = False
    reference: list[_Call] | None = field(default=None, repr=False)  # None: the step's own inputs
    targets: list[torch.Tensor] | None = field(default=None, repr=False)
    # The reference pass (`reference_step`) under bf16 autocast where the CPU has bf16 units (its outputs
    # are returned in fp32).
    fast_reference: bool = False
    autocast: bool = False  # `run` under bf16 autocast (what `fast_reference` sets on the reference step)

    def _inputs(self) -> Iterator[_Call]:
        if self.calls is not None:
            yield from self.calls
            return
        assert self.data is not None
        for item in self.data.take(self.batches):
            yield _Call(as_inputs(item, where="calibration item"), {})

    def _forward(self, call: _Call) -> Any:
        if self.calls is not None:
            return self.module(*call.args, **call.kwargs)
        return _run_model(self.module, call.args, self.owner)

    def run(self, observe: Observe) -> None:
        """Run every input through the block; `observe(name, x)` sees each selected layer's input.

        Unless outputs are recorded, each forward after the first stops once the last selected layer's
        input is seen (what follows it is not needed).
        """
        calls = [0, 0]  # hook calls in this item, and in the first item (0 until it completed)

        def counting(name: str, x: torch.Tensor) -> None:
            with torch.autocast("cpu", enabled=False):  # statistics (x^T x) stay fp32 under `autocast`
                observe(name, x)
            calls[0] += 1
            if calls[0] == calls[1] and not self.record_outputs:
                raise _Stop

        handles = [
            module.register_forward_pre_hook(_layer_hook(name, counting), with_kwargs=True)
            for name, module in self.layers.items()
        ]
        outputs: list[torch.Tensor] = []
        try:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                for call in self._inputs():
                    calls[0] = 0
                    try:
                        out = self._forward(call)
                    except _Stop:
                        continue
                    finally:
                        calls[1] = calls[1] or calls[0]
                    if self.record_outputs:
                        first = _first_tensor(out)
                        outputs.append(first.float() if self.autocast else first)
        finally:
            for h in handles:
                h.remove()
        if self.record_outputs:
            self.outputs = outputs

    def reference_step(self) -> BlockStep:
        """This step on the unmodified model's inputs, recording the block's outputs (the targets)."""
        fast = self.fast_reference and bf16_supported()
        if self.reference is None:
            return dataclasses.replace(self, record_outputs=True, outputs=None, autocast=fast)
        return dataclasses.replace(
            self, calls=self.reference, record_outputs=True, outputs=None, autocast=fast
        )

    def compute_targets(self) -> list[torch.Tensor]:
        """The unmodified block's outputs for the reference inputs (call before changing the block)."""
        ref = self.reference_step()
        self.targets = _outputs(ref, ref.inputs())
        return self.targets

    def inputs(self) -> list[_Call]:
        """The step's inputs (cached block inputs, or the calibration items for the whole model)."""
        return list(self._inputs())

    def forward(self, call: _Call) -> torch.Tensor:
        """The block's hidden-state output for one input, with the block's current weights (and autograd,
        if enabled)."""
        return _first_tensor(self._forward(call))

    def forward_first(self, observe: Observe | None = None) -> torch.Tensor:
        """The block's output for the first input, with the block's current weights; `observe` sees the
        selected layers' inputs."""
        handles = (
            [
                module.register_forward_pre_hook(_layer_hook(name, observe), with_kwargs=True)
                for name, module in self.layers.items()
            ]
            if observe is not None
            else []
        )
        try:
            with torch.no_grad():
                return _first_tensor(self._forward(next(iter(self._inputs()))))
        finally:
            for h in handles:
                h.remove()

    def execution_order(self) -> list[str]:
        """Names (in the model) of the block's submodules in the order the first input calls them."""
        order: list[str] = []
        prefix = f"{self.name}." if self.name else ""
        handles = [
            m.register_forward_pre_hook(lambda _m, _a, n=prefix + n: order.append(n))
            for n, m in self.module.named_modules()
            if n
        ]
        try:
            self.forward_first()
        finally:
            for h in handles:
                h.remove()
        return order


def _layer_hook(name: str, observe: Observe) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(x, torch.Tensor):
            observe(name, x)  # the very tensor: layers reading the same one can share work

    return hook


def _first_tensor(out: Any) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, the first element of a tuple, or the first tensor of
    a mapping (a Hugging Face ModelOutput)."""
    found = first_output(out)
    if found is None:
        raise TypeError(f"a block returned {type(out).__name__}; expected a tensor or a tuple of tensors")
    return found


def _run_model(model: nn.Module, inputs: tuple[Any, ...], owner: str) -> Any:
    try:
        return model(*inputs)
    except (_Stop, DataError):
        raise
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise DataError(
            f"{owner}: the model fails on a calibration item of shapes [{shapes}] with {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Calibration items must be model inputs (use a "
            "transform_fn to drop labels)."
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# Finding and checking the blocks


def find_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Names of the repeated blocks: the children of the longest ModuleList/Sequential whose children share
    one type and that holds selected layers (ties: the one holding more). Empty if there is none.

    >>> find_blocks(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), {"0": nn.Linear(4, 4)})
    ['0', '1']
    """
    best: tuple[int, int, list[str]] = (0, 0, [])
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        prefix = f"{name}." if name else ""
        children = [prefix + child for child, _ in module.named_children()]
        held = sum(1 for n in layers if any(n == c or n.startswith(c + ".") for c in children))
        if held and (len(children), held) > best[:2]:
            best = (len(children), held, children)
    return best[2]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (bool, int, float, str, type(None))):
        return type(a) is type(b) and a == b
    return False


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    for key in _CACHE_KWARGS:
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def _chain_problem(model: nn.Module, blocks: list[str], first: tuple[Any, ...], owner: str) -> str | None:
    """Why the blocks cannot be calibrated one after another (None if they can), from one forward."""
    seen: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    outs: dict[str, Any] = {}
    handles = []
    for name in blocks:
        module = model.get_submodule(name)

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if name in seen:
                raise _Stop(f"block '{name}' runs more than once per forward")
            seen[name] = (args, _clean_kwargs(kwargs))

        def post(_m: nn.Module, _a: tuple[Any, ...], out: Any, name: str = name) -> None:
            outs[name] = out
            if name == blocks[-1]:
                raise _Stop  # what follows the blocks (an LM head's logits) is not needed

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            _run_model(model, first, owner)
    except _Stop as stop:
        if stop.args:
            return str(stop)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in blocks if n not in seen]
    if missing:
        return f"block '{missing[0]}' does not run"
    args0, kwargs0 = seen[blocks[0]]
    for prev, name in itertools.pairwise(blocks):
        args, kwargs = seen[name]
        hidden = args[0] if args else next(iter(kwargs.values()), None)
        if not _same(hidden, _first_tensor(outs[prev])):
            return f"block '{name}' does not take the output of '{prev}' as its input"
        if not _same(args[1:], args0[1:]) or kwargs.keys() != kwargs0.keys():
            return f"block '{name}' gets other arguments than '{blocks[0]}'"
        if not all(_same(kwargs[k], kwargs0[k]) for k in kwargs if k not in _CACHE_KWARGS):
            return f"block '{name}' gets other keyword arguments than '{blocks[0]}'"
    return None


def _capture(model: nn.Module, block: nn.Module, data: Dataset, batches: int, owner: str) -> list[_Call]:
    """The inputs of `block` for each calibration item, stopping each forward at the block."""
    calls: list[_Call] = []

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = _clean_kwargs(kwargs)
        hidden_key = None
        if not args or not isinstance(args[0], torch.Tensor):
            hidden_key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
            if hidden_key is None:
                raise DataError(f"{owner}: the first block was called without a tensor input.")
        if calls:  # identical masks and position tensors are stored once
            prev = calls[-1].kwargs
            kwargs = {k: prev[k] if k in prev and _same(v, prev[k]) else v for k, v in kwargs.items()}
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        calls.append(_Call(args, kwargs, hidden_key))
        raise _Stop

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            for item in data.take(batches):
                try:
                    _run_model(model, as_inputs(item, where="calibration item"), owner)
                except _Stop:
                    continue
                raise DataError(
                    f"{owner}: a calibration item ran through the model without reaching its blocks."
                )
    finally:
        handle.remove()
    return calls


# ---------------------------------------------------------------------------------------------------------
# The driver


def _apply(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    for name, new in replacements.items():
        if not name:
            model = new
        else:
            set_submodule(model, name, new)
    return model


def calibrate_blockwise(
    model: nn.Module,
    data: Dataset,
    *,
    layers: dict[str, nn.Module],
    batches: int,
    process: Process,
    rerun: bool,
    owner: str,
    targets: bool = False,
    fast_rerun: bool = False,
    fast_reference: bool = False,
) -> nn.Module:
    """Run `process` on each block holding `layers`, in order, and return the model with its replacements.

    `rerun=True` feeds the next block from the processed (quantized) block, as GPTQ does; `rerun=False`
    reuses the outputs recorded while `process` called `BlockStep.run` (for algorithms whose changes keep
    the block's function, such as AWQ's scaling). `targets=True` also carries the unmodified model's
    hidden states along the blocks (one more copy of the calibration set's hidden states) and gives each
    step the unmodified outputs of its block (`BlockStep.targets`). `fast_rerun` (with `targets`): the
    rerun runs under bf16 autocast where the CPU has bf16 units (`_rerun`); `fast_reference` (with
    `targets`): so does each step's reference pass (`BlockStep.reference_step`), the layers' input
    statistics computed in fp32 from its bf16 activations.

    >>> calibrate_blockwise(model, data, layers=chosen, batches=128, process=fn, rerun=True, owner="gptq")  # doctest: +SKIP
    """
    first = next(iter(data.take(1)), None)
    if first is None:
        raise DataError(f"{owner}: the calibration data is empty; pass at least one batch of model inputs.")
    blocks = find_blocks(model, layers)
    if blocks:
        problem = _chain_problem(model, blocks, as_inputs(first, where="calibration item"), owner)
        if problem is not None:
            log.warning(
                "%s: %s; calibrating the whole model at once instead of block by block (more memory).",
                owner,
                problem,
            )
            blocks = []
    if not blocks:
        step = BlockStep("", model, dict(layers), owner, data=data, batches=batches)
        if targets and not _tensor_output(step):
            log.warning("%s: the model does not return a tensor; no reconstruction targets.", owner)
            targets = False
        step.carry_targets = targets  # the whole model: its own inputs are the reference
        return _apply(model, process(step))

    # Blocks after the last one holding selected layers need no pass: nothing reads their inputs.
    holding = [i for i, b in enumerate(blocks) if any(n == b or n.startswith(b + ".") for n in layers)]
    blocks = blocks[: holding[-1] + 1]
    calls = _capture(model, model.get_submodule(blocks[0]), data, batches, owner)
    log.info("%s: %d blocks, %d calibration items cached", owner, len(blocks), len(calls))
    inside: set[str] = set()
    dense = [c.hidden() for c in calls] if targets else None  # the unmodified model's hidden states
    changed = False  # whether a block before this one was processed (the two chains differ from there)
    for i, name in enumerate(blocks):
        start = time.perf_counter()
        # Compressed layers (an earlier block's, or this one's once replaced) decode their weight once per
        # block, not once per input.
        with reuse_weights():
            held = {n: m for n, m in layers.items() if n == name or n.startswith(name + ".")}
            inside.update(held)
            outputs = None
            step = BlockStep(
                name, model.get_submodule(name), held, owner, calls=calls, record_outputs=not rerun
            )
            if dense is not None:
                step.carry_targets = True
                step.fast_reference = fast_reference
                step.reference = [c.with_hidden(h) for c, h in zip(calls, dense, strict=True)]
                if not held:
                    step.compute_targets()
            if held:
                model = _apply(model, process(step))
                outputs = step.outputs
                changed = True
            if dense is not None:
                if step.targets is None:
                    raise RuntimeError(f"{owner}: the process did not record the reconstruction targets")
                dense = step.targets
                if not changed:  # both chains are still the unmodified model: one pass serves both
                    outputs = dense
            if i + 1 < len(blocks):
                if outputs is None:
                    outputs = _rerun(model.get_submodule(name), calls, fast=fast_rerun and dense is not None)
                calls = [c.with_hidden(o) for c, o in zip(calls, outputs, strict=True)]
        log.info(
            "%s: block %d/%d '%s' (%d layers) done in %.1f s",
            owner,
            i + 1,
            len(blocks),
            name,
            len(held),
            time.perf_counter() - start,
        )
    del calls, dense
    outside = {n: m for n, m in layers.items() if n not in inside}
    if outside:
        log.info("%s: %d layers outside the blocks, calibrated on the whole model", owner, len(outside))
        step = BlockStep("", model, outside, owner, data=data, batches=batches)
        with reuse_weights():  # the blocks' compressed layers: a float copy each while this pass runs
            model = _apply(model, process(step))
    return model


def _rerun(block: nn.Module, calls: list[_Call], *, fast: bool) -> list[torch.Tensor]:
    """The block's outputs for the calls: the next block's inputs. `fast` (when reconstructing): under bf16
    autocast where the CPU has bf16 units, about 1.7x faster (GPTQ's and sparsity's reconstruction use it).
    These inputs then only feed reconstruction, which itself trains under autocast, and the residual stream
    stays fp32 (a SmolLM2 block's output moves by 1.4e-5 relative MSE, under 1% of a block's reconstruction
    loss); the Hessians and targets come from the unmodified chain (under autocast too with `fast_reference`)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast and bf16_supported()):
        outputs = [_first_tensor(block(*c.args, **c.kwargs)) for c in calls]
    return [o.to(c.hidden().dtype) for o, c in zip(outputs, calls, strict=True)]


def _tensor_output(step: BlockStep) -> bool:
    try:
        step.forward_first()
    except TypeError:
        return False
    return True


def _outputs(step: BlockStep, calls: list[_Call]) -> list[torch.Tensor]:
    """The step's block outputs for the calls, under bf16 autocast where the step asks for it (as `run`)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=step.autocast):
        return [step.forward(c).float() if step.autocast else step.forward(c) for c in calls]
