"""Loading a user's model: a Python factory reference plus an optional state dict.

A reference is `path/to/file.py:factory` or `package.module:factory`. The factory takes no argument and
returns `(model, example_inputs)`. Checkpoints load with `weights_only=True`: nothing here unpickles
arbitrary objects.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelLoadError

Inputs = tuple[torch.Tensor, ...]


def import_callable(ref: str) -> Any:
    """Import `file.py:name` or `package.module:name` and return that callable."""
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr:
        raise ModelLoadError(
            f"Model reference '{ref}' is not of the form 'path/to/file.py:factory' or "
            "'package.module:factory'. Add ':' and the name of a function that returns (model, example_inputs)."
        )
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ModelLoadError(f"Model file '{path}' does not exist or is not a file. Check the path.")
        name = f"_modelpress_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"'{path}' cannot be imported as Python; give a .py file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ModelLoadError(
                f"Importing '{path}' failed with {type(exc).__name__}: {exc}. Fix the error in that file."
            ) from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise ModelLoadError(
                f"Cannot import module '{module_part}' ({type(exc).__name__}: {exc}). Check the name, or "
                "give a file path such as 'models/net.py:build'."
            ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ModelLoadError(
            f"'{module_part}' has no callable named '{attr}'. Callables there: {', '.join(public[:12]) or 'none'}."
        )
    return factory


def as_inputs(example: Any, *, where: str = "example inputs") -> Inputs:
    """Normalise a tensor, or a tuple/list of tensors, to a tuple of tensors."""
    if isinstance(example, torch.Tensor):
        return (example,)
    if isinstance(example, Sequence) and example and all(isinstance(t, torch.Tensor) for t in example):
        return tuple(example)
    kind = type(example).__name__
    hint = (
        " Return for example `(model, (torch.randn(1, 3, 32, 32),))` from the factory."
        if "example inputs" in where
        else " Each item must be what the model's forward takes (use a transform_fn to reshape items)."
    )
    raise ModelLoadError(f"The {where} must be a tensor or a tuple of tensors, got {kind}.{hint}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a `.pt`/`.pth`/`.bin` (weights_only) or `.safetensors` state dict."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"Checkpoint '{p}' does not exist or is not a file. Check the path.")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot read checkpoint '{p}' ({type(exc).__name__}: {str(exc).splitlines()[0]}). modelpress "
            "loads only plain state dicts (weights_only=True); save one with "
            "`torch.save(model.state_dict(), path)` or safetensors."
        ) from exc
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = state.get(key)
            if isinstance(inner, Mapping):
                state = inner
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(
            f"Checkpoint '{p}' is not a state dict (a mapping of names to tensors). Save "
            "`model.state_dict()` rather than the whole model."
        )
    return dict(state)


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load `state` strictly, turning PyTorch's mismatch report into one actionable message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(
                f"missing from the checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        if unexpected:
            parts.append(
                f"not in the model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        if shapes:
            parts.append(f"shape mismatch: {'; '.join(shapes[:5])}")
        raise ModelLoadError(
            f"The state dict in '{source}' does not match the model ({'; '.join(parts)}). Use the checkpoint "
            "saved from this architecture, or change the factory to build the matching one."
        )
    model.load_state_dict(dict(state), strict=True)


def check_forward(model: nn.Module, inputs: Inputs, *, source: str) -> Any:
    """Run the model once on its example inputs, with a message naming the shapes if it fails."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)
        raise ModelLoadError(
            f"The model from '{source}' fails on its example inputs [{shapes}] with "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Return example inputs of "
            "the shape and dtype the model's forward expects."
        ) from exc


def load_model(ref: str, weights: str | Path | None = None) -> tuple[nn.Module, Inputs]:
    """Build a model from a factory reference, load optional weights, and check it runs.

    >>> model, inputs = load_model("examples/tiny_cnn.py:build")  # doctest: +SKIP
    """
    factory = import_callable(ref)
    if inspect.signature(factory).parameters and any(
        p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in inspect.signature(factory).parameters.values()
    ):
        raise ModelLoadError(f"Factory '{ref}' takes required arguments; it must be callable with none.")
    try:
        result = factory()
    except Exception as exc:
        raise ModelLoadError(
            f"Factory '{ref}' raised {type(exc).__name__}: {exc}. Fix the factory so it returns "
            "(model, example_inputs)."
        ) from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ModelLoadError(
            f"Factory '{ref}' returned {type(result).__name__}; it must return a pair "
            "(model: torch.nn.Module, example_inputs: tensor or tuple of tensors)."
        )
    model, example = result
    inputs = as_inputs(example, where=f"example inputs returned by '{ref}'")
    if weights is not None:
        apply_state_dict(model, load_state_dict_file(weights), source=str(weights))
    model.eval()
    check_forward(model, inputs, source=ref)
    return model, inputs
