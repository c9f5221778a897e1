"""Loading a user's model: a Python factory reference or a Hugging Face folder, plus an optional state dict.

A reference is `path/to/file.py:factory` or `package.module:factory`; the factory takes no argument and
returns `(model, example_inputs)`. A folder with a `config.json` (written by `save_pretrained`) loads with
transformers, offline, and gets example inputs built from its config. Checkpoints load with
`weights_only=True`: nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.errors import ModelLoadError

log = logging.getLogger(__name__)

Inputs = tuple[torch.Tensor, ...]

EXAMPLE_SEQUENCE = 16  # tokens in the example input_ids built for a Hugging Face text model
EXAMPLE_AUDIO = 16_000  # samples (one second at 16 kHz) in the example input_values of a speech encoder


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
            from safetensors import safe_open
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
            with safe_open(str(p), "pt") as f:
                metadata = f.metadata() or {}
            # Tied tensors are stored once; `safetensors.torch.save_model` and modelpress record each dropped
            # name in the metadata as {dropped: kept}. Put them back so that strict loading sees every name.
            for dropped, kept in metadata.items():
                if dropped not in state and kept in state:
                    state[dropped] = state[kept]
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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' progress bars (loading and saving weights) inside the block, then restore them."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # a model that saves itself like transformers does, without transformers
        yield
        return
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _pretrained_class(transformers: Any, config: Any) -> Any:
    """The class named in config.architectures (for example LlamaForCausalLM), else AutoModel."""
    for name in getattr(config, "architectures", None) or []:
        try:
            cls = getattr(transformers, name, None)
        except ImportError as exc:  # a model class whose optional dependency is missing
            raise ModelLoadError(f"transformers' {name} cannot be imported ({_first_line(exc)}).") from exc
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
        log.info("config.architectures names %s, which transformers does not have; using AutoModel", name)
    return transformers.AutoModel


def _image_size(config: Any) -> tuple[int, int]:
    size = getattr(config, "image_size", None)
    if isinstance(size, int) and size > 0:
        return size, size
    if isinstance(size, (list, tuple)) and len(size) >= 2:
        return int(size[0]), int(size[1])
    return 224, 224


def pretrained_example_inputs(model: nn.Module, config: Any) -> Inputs:
    """Example inputs for a Hugging Face model, built from its config and in the order of its forward.

    The main input (`model.main_input_name`) is input_ids of shape (1, 16) with an attention mask, pixel
    values (1, C, H, W), Whisper-style input_features (1, mel bins, frames) or raw audio input_values
    (1, 16000); encoder-decoder models also get decoder_input_ids (1, 1).
    """
    g = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", "input_ids")
    cls = type(model).__name__
    named: dict[str, torch.Tensor] = {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if main == "input_ids":
        vocab = getattr(text, "vocab_size", None)
        if not isinstance(vocab, int) or vocab < 1:
            raise ModelLoadError(
                f"The config of {cls} has no vocab_size, so modelpress cannot build example input_ids. "
                "Give a factory 'file.py:build' that loads the model and returns (model, example_inputs)."
            )
        seq = min(EXAMPLE_SEQUENCE, getattr(text, "max_position_embeddings", None) or EXAMPLE_SEQUENCE)
        named["input_ids"] = torch.randint(0, vocab, (1, seq), generator=g)  # (B, T)
        named["attention_mask"] = torch.ones(1, seq, dtype=torch.long)  # (B, T)
    elif main == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        height, width = _image_size(vision)
        channels = getattr(vision, "num_channels", None) or 3
        named["pixel_values"] = torch.randn(1, channels, height, width, generator=g)  # (B, C, H, W)
    elif main == "input_features" and getattr(config, "num_mel_bins", None):
        # Whisper-style: (B, mel bins, frames); two stride-2 convolutions give max_source_positions
        frames = 2 * (getattr(config, "max_source_positions", None) or 1500)
        named["input_features"] = torch.randn(1, config.num_mel_bins, frames, generator=g)
    elif main == "input_values":
        named["input_values"] = torch.randn(1, EXAMPLE_AUDIO, generator=g)  # (B, samples)
    else:
        raise ModelLoadError(
            f"modelpress cannot build an example '{main}' for {cls} from its config. Give a factory "
            "'file.py:build' that loads the model and returns (model, example_inputs)."
        )
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        named["decoder_input_ids"] = torch.full((1, 1), start if isinstance(start, int) else 0)  # (B, 1)
    return _in_forward_order(model, named, main)


def _in_forward_order(model: nn.Module, named: dict[str, torch.Tensor], main: str) -> Inputs:
    """Arrange named inputs as the positional arguments of `model.forward`.

    An attention mask that is not next in line is dropped (the model then attends to everything); a gap
    named attention_mask before an input that is needed is filled with ones over the main input's last axis.
    """
    needed = dict(named)
    ordered: list[torch.Tensor] = []
    for param in inspect.signature(model.forward).parameters.values():
        if not needed or param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        if param.name in needed:
            ordered.append(needed.pop(param.name))
        elif param.name == "attention_mask" and set(needed) - {"attention_mask"}:
            ordered.append(torch.ones(1, named[main].shape[-1], dtype=torch.long))
        else:
            break
    missing = set(needed) - {"attention_mask"}
    if missing or not ordered:
        raise ModelLoadError(
            f"{type(model).__name__}.forward does not take {', '.join(sorted(missing)) or main} as its leading "
            "positional arguments, so modelpress cannot call it with example inputs built from the config. "
            "Give a factory 'file.py:build' that wraps the model and returns (model, example_inputs)."
        )
    return tuple(ordered)


def load_pretrained_folder(folder: str | Path) -> tuple[nn.Module, Inputs]:
    """Load a Hugging Face model folder offline (local files only) with example inputs from its config.

    The class is the one config.architectures names (LlamaForCausalLM, BertForMaskedLM ...), else
    AutoModel; weights load in float32.

    >>> model, inputs = load_pretrained_folder("checkpoints/my-bert")  # doctest: +SKIP
    """
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"Folder '{path}' has no config.json, so it is not a Hugging Face model folder. Give a folder "
            "written by save_pretrained, or a factory 'file.py:build'."
        )
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            f"'{path}' is a Hugging Face model folder; loading one needs transformers "
            "(pip install transformers), or give a factory 'file.py:build'."
        ) from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"Cannot read the model config in '{path}' ({_first_line(exc)}). Give a folder written by "
            "save_pretrained with a transformers model type (models that need trust_remote_code are not "
            "loaded: give a factory 'file.py:build' for those)."
        ) from exc
    model_class = _pretrained_class(transformers, config)
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                str(path), config=config, local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
    except Exception as exc:
        raise ModelLoadError(
            f"{model_class.__name__}.from_pretrained('{path}') failed ({_first_line(exc)}). The folder needs "
            "the weights saved beside config.json (model.safetensors or pytorch_model.bin)."
        ) from exc
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        unexpected = sorted(info.get("unexpected_keys") or ())
        hint = (
            f" The folder holds other weights ({', '.join(unexpected[:3])} ...): if it is the hf/ folder of "
            "`modelpress compress`, build the original model, compress it with recipe.yaml and load "
            "model.compressed.safetensors instead."
            if unexpected
            else ""
        )
        raise ModelLoadError(
            f"'{path}' lacks {len(missing)} weight(s) of {model_class.__name__} ({', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}); they would be random.{hint}"
        )
    model.eval()
    return model, pretrained_example_inputs(model, config)


def load_model(ref: str, weights: str | Path | None = None) -> tuple[nn.Module, Inputs]:
    """Build a model from a factory reference or a Hugging Face folder, load optional weights, check it runs.

    >>> model, inputs = load_model("examples/tiny_cnn.py:build")  # doctest: +SKIP
    >>> model, inputs = load_model("checkpoints/my-bert")  # a folder written by save_pretrained  # doctest: +SKIP
    """
    if Path(ref).is_dir():
        model, inputs = load_pretrained_folder(ref)
    else:
        model, inputs = _from_factory(ref)
    if weights is not None:
        apply_state_dict(model, load_state_dict_file(weights), source=str(weights))
    model.eval()
    check_forward(model, inputs, source=ref)
    return model, inputs


def _from_factory(ref: str) -> tuple[nn.Module, Inputs]:
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
    return model, as_inputs(example, where=f"example inputs returned by '{ref}'")
