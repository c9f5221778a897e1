"""The main job: profile -> compress -> export -> parity -> benchmark -> report, for one model and recipe.

Everything is written into a fresh folder that appears (by a rename) only when the whole job succeeded.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from modelpress._files import make_public
from modelpress.analyse.coverage import coverage
from modelpress.analyse.explain import explain_quantization
from modelpress.analyse.profile import profile
from modelpress.data import as_dataset
from modelpress.deploy.bench import compare_artifacts
from modelpress.deploy.export import export_for_runtimes, export_onnx
from modelpress.deploy.integer import integer_kernels
from modelpress.deploy.parity import check_parity, parity_inputs
from modelpress.deploy.runtime import available_runtimes, open_session
from modelpress.environment import environment
from modelpress.errors import ExportError
from modelpress.evaluate.metrics import evaluate
from modelpress.loading import Inputs, quiet_transformers
from modelpress.pipeline.recipe import Recipe, compress, dump_recipe, load_recipe
from modelpress.techniques import config_to_dict

log = logging.getLogger(__name__)

# The folder's files, by name (the command line's --help lists the same).
FP32_ONNX = "model.onnx"
COMPRESSED_ONNX = "model.compressed.onnx"
COMPRESSED_WEIGHTS = "model.compressed.safetensors"
RECIPE = "recipe.yaml"
HF_FOLDER = "hf"

Progress = Callable[[str], None]


def prepare_out_dir(out_dir: str | os.PathLike[str], *, overwrite: bool) -> tuple[Path, Path]:
    """Check the final folder and make a temporary sibling to build into."""
    final = Path(out_dir)
    if final.exists() and not final.is_dir():
        raise ExportError(f"Output '{final}' exists and is a file; give a folder path.")
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise ExportError(
            f"Output folder '{final}' already exists and is not empty. Choose another folder, delete it, or "
            "pass --overwrite."
        )
    parent = final.resolve().parent
    if not parent.exists():
        raise ExportError(f"The parent folder '{parent}' of '{final}' does not exist; create it first.")
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=parent))
    return final, work


def publish_dir(work: Path, final: Path) -> None:
    """Move the finished folder into place (replacing an old one only when overwrite was allowed)."""
    make_public(work)
    if final.exists():
        shutil.rmtree(final)
    os.replace(work, final)


def is_hugging_face(model: nn.Module) -> bool:
    """A transformers PreTrainedModel (or anything that saves itself the same way)."""
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def storable_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each tensor stored once, plus `{dropped name: kept name}` for tied tensors.

    safetensors refuses tensors that share memory. A name that is the very same tensor as an earlier one
    (tied embeddings and their quantized buffers) is dropped and recorded, as `safetensors.torch.save_model`
    records it, and `loading.load_state_dict_file` puts it back; a tensor that shares only part of another's
    memory is copied.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"State entry '{key}' is a {type(value).__name__}, not a tensor; safetensors stores only "
                "tensors. Keep that state in a buffer instead of get_extra_state."
            )
        ptr = value.untyped_storage().data_ptr() if value.numel() else 0
        same = (
            str(value.device),
            ptr,
            value.storage_offset(),
            tuple(value.shape),
            value.stride(),
            value.dtype,
        )
        if ptr and same in seen:
            aliases[key] = seen[same]
            continue
        if ptr:
            seen[same] = key
        if not ptr or (str(value.device), ptr) not in storages:
            storages.add((str(value.device), ptr))
            tensors[key] = value.detach().contiguous()
        else:  # part of a storage already stored under another name
            tensors[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return tensors, aliases


def save_compressed(model: nn.Module, recipe: Recipe, folder: Path) -> list[Path]:
    """Write the compressed PyTorch model into `folder`: its state dict, the recipe, and `hf/` for HF models.

    Reload: build the original model, `compress(model, recipe, data)` it to get the same modules, then
    `apply_state_dict(model, load_state_dict_file(folder / "model.compressed.safetensors"), ...)`.
    """
    from safetensors.torch import save_file

    tensors, aliases = storable_state_dict(model)
    weights = folder / COMPRESSED_WEIGHTS
    save_file(tensors, str(weights), metadata={"format": "pt", **aliases})
    (folder / RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
    written = [weights, folder / RECIPE]
    if is_hugging_face(model):
        hf = folder / HF_FOLDER
        try:
            with quiet_transformers():
                # our de-duplicated state dict: transformers' own check refuses tied quantized buffers
                model.save_pretrained(str(hf), state_dict=tensors)  # type: ignore[operator]
        except Exception as exc:
            raise ExportError(
                f"save_pretrained of the compressed {type(model).__name__} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). {COMPRESSED_WEIGHTS} holds the same weights; "
                "please report this with the model's config."
            ) from exc
        written.append(hf)
    for path in [weights, *(folder / HF_FOLDER).rglob("*")]:
        if path.is_file():
            make_public(path)  # safetensors writes its files readable by their owner only
    return written


def benchmark_batches(example: Inputs, sizes: Sequence[int]) -> dict[str, list[np.ndarray]]:
    """Input batches of each size built from the example (repeated along the batch dim)."""
    out = {}
    for b in sizes:
        arrays = []
        for t in example:
            reps = -(-b // t.shape[0])
            arrays.append(t.repeat(reps, *([1] * (t.ndim - 1)))[:b].numpy())
        out[f"b{b}"] = arrays
    return out


def run_job(
    model: nn.Module,
    example_inputs: Inputs,
    recipe: Any,
    *,
    out_dir: str | os.PathLike[str],
    name: str = "model",
    data: Iterable[Any] | None = None,
    eval_data: Iterable[Any] | None = None,
    metric: str | Callable[..., float] | None = None,
    runtimes: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (1, 16),
    rounds: int = 20,
    threads: int = 2,
    memory: bool = True,
    overwrite: bool = False,
    allow_partial: bool = False,
    progress: Progress | None = None,
    target: Literal["auto", "onnxruntime", "openvino", "tensorrt"] = "auto",
    sensitivity: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the whole job and write `model.onnx`, `model.compressed.onnx`, the compressed PyTorch model
    (`model.compressed.safetensors`, `recipe.yaml`, `hf/` for a Hugging Face model), `report.json` and
    `report.html` into `out_dir`.

    Every figure is measured on the exported artifacts, the fp32 baseline beside the compressed one, in
    this one run; speed is a ratio of interleaved timings. `allow_partial` accepts a recipe that leaves
    most weight bytes untouched (see `compress`). `target` places the compressed file's quantizers for one
    runtime; "auto" writes `model.compressed.onnx` for ONNX Runtime and, when OpenVINO is benchmarked too and
    the file has activation quantizers, `model.compressed.openvino.onnx` for OpenVINO (`export_for_runtimes`).
    `sensitivity` names families ('bits', 'sparsity', 'rank', 'structured', 'clusters', or 'sparsity:0.5,0.7')
    whose per-layer sensitivity of the original model goes into the report (`optimize.family_sensitivity`,
    cached under ~/.cache/modelpress): on the evaluation data and metric when given, else cosine on `data`.
    A progressive step's trajectory goes into the report too.
    """
    from modelpress.report.html import write_report

    say = progress or (lambda msg: log.info(msg))
    steps = load_recipe(recipe)
    final, work = prepare_out_dir(out_dir, overwrite=overwrite)
    try:
        runtimes = list(runtimes or available_runtimes())
        say("profiling the original model")
        base_profile = profile(model, example_inputs, threads=threads)

        data = as_dataset(data)  # calibrates the compression and, for ONNX Runtime, the export
        if sensitivity and eval_data is not None:
            eval_data = list(eval_data)  # read twice: sensitivity, then quality
        sensitive = _sensitivity(model, sensitivity, data, eval_data, metric, say) if sensitivity else None

        say(f"compressing ({', '.join(c.type for c in steps)})")
        start = time.perf_counter()
        small = compress(model, steps, data, allow_partial=allow_partial)
        compress_s = time.perf_counter() - start
        small_profile = profile(small, example_inputs, threads=threads)
        explain = [row.to_dict() for row in explain_quantization(model, small, parity_inputs(example_inputs))]
        covered = coverage(model, small, steps).to_dict()

        say("saving the compressed model")
        save_compressed(small, steps, work)

        say("exporting to ONNX")
        fp32_path = export_onnx(model, example_inputs, work / FP32_ONNX)
        small_paths = export_for_runtimes(
            small, example_inputs, work / COMPRESSED_ONNX, runtimes, target=target, data=data
        )

        say(f"checking parity in {', '.join(runtimes)}")
        samples = parity_inputs(example_inputs)
        parity = []
        memo: dict[tuple[int, int], Any] = {}  # each torch model runs once per sample, not once per runtime
        for runtime in runtimes:
            small_path = small_paths[runtime]
            for label, module, path in (("fp32", model, fp32_path), ("compressed", small, small_path)):
                reference = model if label == "compressed" else None
                session = open_session(path, runtime, threads=threads)
                report = check_parity(module, session, samples, reference=reference, memo=memo)
                parity.append({"artifact": label, **report.to_dict()})

        quality: dict[str, Any] = {}
        if eval_data is not None and metric is not None:
            eval_items = list(eval_data)
            say("evaluating quality on the artifacts")
            quality = {"metric": metric if isinstance(metric, str) else getattr(metric, "__name__", "custom")}
            quality["torch fp32"] = evaluate(model, eval_items, metric)
            quality["torch compressed"] = evaluate(small, eval_items, metric)
            for runtime in runtimes:
                for label, path in (("fp32", fp32_path), ("compressed", small_paths[runtime])):
                    quality[f"{runtime} {label}"] = evaluate(
                        open_session(path, runtime, threads=threads), eval_items, metric
                    )

        artifacts = {}
        for runtime in runtimes:
            artifacts[f"fp32 {runtime}"] = (fp32_path, runtime)
            artifacts[f"compressed {runtime}"] = (small_paths[runtime], runtime)
        bench = compare_artifacts(
            artifacts,
            benchmark_batches(example_inputs, batch_sizes),
            baseline="fp32 onnxruntime" if "onnxruntime" in runtimes else f"fp32 {runtimes[0]}",
            threads=threads,
            rounds=rounds,
            memory=memory,
            progress=say,
        )
        say("reading which layers run as integer")
        integer = {
            rt: {
                **integer_kernels(small_paths[rt], rt, threads=threads).to_dict(),
                "path": small_paths[rt].name,
            }
            for rt in runtimes
        }
        result: dict[str, Any] = {
            "model": {
                "name": name,
                "class": type(model).__name__,
                "input_shapes": [list(t.shape) for t in example_inputs],
            },
            "recipe": [config_to_dict(c) for c in steps],
            "environment": {**environment(), "threads": threads, "torch_threads": torch.get_num_threads()},
            "profile": {"baseline": base_profile.to_dict(), "compressed": small_profile.to_dict()},
            "compress_wall_s": compress_s,
            "explain": explain,
            "coverage": covered,
            "parity": parity,
            "quality": quality,
            "bench": {k: {**v.to_dict(), "path": Path(v.path).name} for k, v in bench.items()},
            "integer": integer,  # runtime -> which conv/matmul layers of the compressed file run as integer
        }
        if vars(small).get("_modelpress_progressive"):  # each progressive step's trajectory
            result["progressive"] = list(vars(small)["_modelpress_progressive"])
        if sensitive is not None:
            result["sensitivity"] = sensitive
        say("writing the report")
        import json

        (work / "report.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        write_report(result, work / "report.html", overwrite=True)
        publish_dir(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    result["out_dir"] = str(final)
    return result


def _sensitivity(
    model: nn.Module,
    families: Sequence[str],
    data: Iterable[Any] | None,
    eval_data: Iterable[Any] | None,
    metric: str | Callable[..., float] | None,
    say: Progress,
) -> dict[str, Any]:
    """The per-layer, per-family sensitivity of the original model, as a dict for the report."""
    from modelpress.optimize.sensitivity import family_sensitivity

    say(f"measuring sensitivity per layer ({', '.join(families)})")
    if eval_data is not None and metric is not None:
        table = family_sensitivity(model, list(eval_data), families, metric=metric)
    else:
        table = family_sensitivity(model, data, families)
    if table.cached:
        say("sensitivity read from the cache")
    return table.to_dict()
