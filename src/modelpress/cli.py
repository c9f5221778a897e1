"""The `modelpress` command line. It parses arguments and calls the library; the library never imports it.

Exit codes: 0 success, 2 bad input (the message says what to fix), 3 an artifact failed its parity check,
1 an unexpected error (a bug: please report it with the traceback printed by --debug).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NoReturn

import click
from rich.console import Console
from rich.table import Table

from modelpress.errors import ModelpressError, ParityError, RecipeError

console = Console(stderr=True)
out = Console()

EXIT_BAD_INPUT = 2
EXIT_PARITY = 3


@contextmanager
def _status(message: str) -> Iterator[Callable[[str], None]]:
    """Report progress: a spinner on a terminal, else one line per message on stderr (CI logs)."""
    if console.is_terminal:
        with console.status(message) as status:
            yield lambda msg: status.update(f"{msg} ...")
        return
    ctx = click.get_current_context(silent=True)
    obj = ctx.obj if ctx is not None and isinstance(ctx.obj, dict) else {}
    start: float = obj.get("started", time.perf_counter())  # seconds are counted from the command's start

    def say(msg: str) -> None:
        click.echo(f"modelpress [{time.perf_counter() - start:7.1f} s] {msg}", err=True)

    say(message)
    yield say


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"'{text}' is not a comma-separated list of batch sizes, such as 1,16."
        ) from None
    if not sizes or any(s < 1 for s in sizes):
        raise click.BadParameter(f"'{text}': batch sizes must be positive integers, such as 1,16.")
    return sizes


def _load(model_ref: str, weights: str | None) -> tuple[Any, Any]:
    from modelpress.loading import load_model

    return load_model(model_ref, weights)


def _model_name(model_ref: str) -> str:
    """A short name for MODEL: the factory's name, or the model folder's name."""
    path = Path(model_ref)
    if path.is_dir():
        return path.resolve().name
    return Path(model_ref.rpartition(":")[2]).name


def _call_data(ref: str | None, what: str) -> Any:
    if ref is None:
        return None
    from modelpress.errors import DataError
    from modelpress.loading import import_callable

    if ":" not in ref:
        hint = ""
        if Path(ref).is_file():
            hint = " A text file calibrates a causal LM given as a Hugging Face folder with its tokenizer."
        raise DataError(
            f"{what} '{ref}' is not of the form 'file.py:fn'. Give a Python file and the name of a function in "
            f"it that returns the batches.{hint}"
        )
    fn = import_callable(ref)
    try:
        return list(fn())
    except ModelpressError:
        raise
    except Exception as exc:
        raise DataError(f"The {what} function '{ref}' raised {type(exc).__name__}: {exc}. Fix it.") from exc


def _is_text(ref: str) -> bool:
    """Whether --data names a text file (a causal LM's calibration text) rather than 'file.py:fn'."""
    return Path(ref).is_file() and Path(ref).suffix != ".py"


def _data_for(model: str, data_ref: str | None, tokenizer: Any = None) -> Any:
    """--data's batches: 'file.py:fn', or for a Hugging Face folder a text file cut by its tokenizer (the
    one given, else the folder's)."""
    if data_ref is not None and _is_text(data_ref) and (Path(model) / "config.json").is_file():
        return _text_data(data_ref, tokenizer if tokenizer is not None else _folder_tokenizer(model))
    return _call_data(data_ref, "--data")


def _folder_tokenizer(folder: str) -> Any:
    """The tokenizer saved in a Hugging Face model folder, or a clear error."""
    from transformers import AutoTokenizer

    from modelpress.errors import DataError
    from modelpress.loading import quiet_transformers

    with quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception as exc:
            raise DataError(
                f"--data is a text file, which the model's tokenizer cuts into windows, and no tokenizer loaded "
                f"from '{folder}': {exc}. Save it there with tokenizer.save_pretrained(DIR), or give "
                "'file.py:fn' returning batches."
            ) from exc


def _text_data(ref: str, tokenizer: Any) -> list[Any]:
    """512-token windows of a text file, tokenized by the model's own tokenizer (at most 128)."""
    from modelpress.data import text_windows
    from modelpress.errors import DataError

    try:
        text = Path(ref).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"--data '{ref}' is not UTF-8 text. Give a text file, or 'file.py:fn' returning batches."
        ) from exc
    items = text_windows(text, tokenizer)
    tokens = sum(int(ids.shape[1]) for (ids,) in items)
    note = "" if len(items) >= 128 else " (GPTQ-style recipes want 128 x 512 tokens, ~250 KB of text)"
    click.echo(f"calibration: {len(items)} windows, {tokens} tokens of {Path(ref).name}{note}", err=True)
    return items


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ParityError as exc:
            console.print(f"[bold red]parity check failed:[/] {exc}")
            sys.exit(EXIT_PARITY)
        except ModelpressError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(EXIT_BAD_INPUT)


_runtime_option = click.option(
    "--runtime",
    "runtimes",
    multiple=True,
    type=click.Choice(["onnxruntime", "openvino"]),
    help="Runtime(s) to use (default: all installed).",
)


_data_option = click.option(
    "--data",
    "data_ref",
    help="'file.py:fn' returning calibration batches (model inputs), for recipes that calibrate "
    "(static_int8, gptq, awq ...); for a Hugging Face LM folder also a text file (up to 128 windows of 512 "
    "tokens).",
)
_allow_partial_option = click.option(
    "--allow-partial",
    is_flag=True,
    help="Accept a recipe whose quantization leaves most weight bytes untouched (refused by default; one that "
    "changes nothing is always refused).",
)


def _timing_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--batch, --rounds and --threads, shared by every command that times artifacts."""
    fn = click.option("--threads", default=2, show_default=True, help="Threads for every runtime.")(fn)
    fn = click.option("--rounds", default=20, show_default=True, help="Interleaved timing rounds.")(fn)
    return click.option(
        "--batch", "batch_text", default="1,16", show_default=True, help="Batch sizes to time."
    )(fn)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of short messages.")
@click.version_option(package_name="modelpress")
@click.pass_context
def main(ctx: click.Context, verbose: bool, debug: bool) -> None:
    """modelpress: make a trained PyTorch model smaller and faster, and prove it on the runtime it deploys to.

    \b
    Start with:   modelpress demo
    Your model:   modelpress profile models.py:build
                  modelpress compress models.py:build --recipe int8-weight-only --out run1
    A Hugging Face model folder (saved with save_pretrained) works as MODEL too:
                  modelpress compress ./my-bert --recipe int8-dynamic --out run2
    """
    ctx.obj = {"debug": debug, "started": time.perf_counter()}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")


@main.command()
@click.argument("model")
@click.option("--weights", type=click.Path(), help="A state dict (.pt/.pth weights_only, or .safetensors).")
@click.option(
    "--json", "json_out", type=click.Path(), help="Also write the profile as JSON to this new file."
)
@click.option("--top", default=25, show_default=True, help="Show the N slowest layers (0: all).")
def profile(model: str, weights: str | None, json_out: str | None, top: int) -> None:
    """Parameters, bytes, MACs, per-layer latency and peak activation memory of MODEL.

    MODEL is 'path/to/file.py:factory' or 'package.module:factory' (the factory takes no argument and returns
    (model, example_inputs)), or a Hugging Face model folder with a config.json (loaded offline; example
    inputs are built from the config). Try 'modelpress.demo:digits_cnn'.
    """
    from modelpress._files import write_text_atomic
    from modelpress.analyse.profile import human_bytes, human_count
    from modelpress.analyse.profile import profile as run_profile

    if json_out:
        from modelpress._files import check_output_path

        check_output_path(json_out)
    with _status("loading the model"):
        net, inputs = _load(model, weights)
    with _status("profiling"):
        prof = run_profile(net, inputs)
    layers = sorted(prof.layers, key=lambda layer: -layer.latency_ms)
    table = Table(title=f"{prof.model}: layers by latency")
    for col in ("layer", "type", "params", "bytes", "MACs", "ms", "output"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for layer in layers[: top or None]:
        table.add_row(
            layer.name,
            layer.type,
            human_count(layer.params),
            human_bytes(layer.bytes),
            human_count(layer.macs),
            f"{layer.latency_ms:.3f}",
            human_bytes(layer.output_bytes),
        )
    out.print(table)
    dtypes = ", ".join(f"{k} {human_bytes(v)}" for k, v in prof.bytes_by_dtype.items())
    out.print(
        f"[bold]{prof.model}[/]: {prof.params:,} parameters ({human_count(prof.params)}), {human_bytes(prof.bytes)} "
        f"({dtypes}), {prof.macs:,} MACs ({human_count(prof.macs)}) at inputs {prof.input_shapes}, "
        f"{prof.latency_ms:.2f} ms per forward in torch ({prof.threads} threads), peak activations "
        f"{human_bytes(prof.peak_activation_bytes)}"
    )
    if json_out:
        write_text_atomic(json_out, json.dumps(prof.to_dict(), indent=2))
        out.print(f"wrote {json_out}")


@main.command()
@click.argument("model")
@click.option(
    "--recipe",
    "-r",
    required=True,
    help="A recipe YAML file or a built-in recipe name (for example int8-weight-only).",
)
@click.option(
    "--out", "-o", "out_dir", required=True, type=click.Path(), help="A new folder for the results."
)
@click.option("--weights", type=click.Path(), help="A state dict (.pt/.pth weights_only, or .safetensors).")
@_data_option
@click.option("--eval", "eval_ref", help="'file.py:fn' returning (inputs, labels) batches for quality.")
@click.option(
    "--metric", type=click.Choice(["accuracy", "perplexity"]), default="accuracy", show_default=True
)
@_runtime_option
@_timing_options
@_allow_partial_option
@click.option(
    "--target",
    type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]),
    default="auto",
    show_default=True,
    help="The runtime to place int8 quantizers for. auto: model.compressed.onnx for ONNX Runtime and, when "
    "OpenVINO is benchmarked too, model.compressed.openvino.onnx for OpenVINO (static int8 only); tensorrt: "
    "TensorRT's explicit quantization (symmetric int8, standard Q/DQ), checked against its rules.",
)
@click.option(
    "--sensitivity",
    "sensitivity_text",
    help="Also measure the original model's sensitivity per layer for these families (comma-separated: "
    "bits, sparsity, rank, structured, clusters; strengths after a colon: sparsity:0.5,0.7) into the report; "
    "on --eval with --metric when given, else cosine on --data; cached in ~/.cache/modelpress.",
)
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
def compress(
    model: str,
    recipe: str,
    out_dir: str,
    weights: str | None,
    data_ref: str | None,
    eval_ref: str | None,
    metric: str,
    runtimes: tuple[str, ...],
    batch_text: str,
    rounds: int,
    threads: int,
    allow_partial: bool,
    target: Literal["auto", "onnxruntime", "openvino", "tensorrt"],
    sensitivity_text: str | None,
    overwrite: bool,
) -> None:
    """Compress MODEL with a recipe, export fp32 and compressed ONNX, check parity, benchmark, report.

    \b
    Writes into the new folder OUT (which appears only when everything succeeded):
      model.onnx                    the original model, exported
      model.compressed.onnx         the compressed model, exported (int8 placed for ONNX Runtime)
      model.compressed.openvino.onnx  the same placed for OpenVINO (static int8 with both runtimes)
      model.compressed.safetensors  the compressed PyTorch state dict
      recipe.yaml                   the recipe it was compressed with
      hf/                           save_pretrained of the compressed model (Hugging Face models only)
      report.json, report.html      every measurement, and the report of them

    MODEL is 'path/to/file.py:factory', 'package.module:factory' or a Hugging Face model folder. To reload
    the compressed PyTorch model, build MODEL, compress it with OUT/recipe.yaml (and the same --data), then
    load OUT/model.compressed.safetensors with modelpress.loading.load_state_dict_file.
    """
    from modelpress.optimize.sensitivity import split_families
    from modelpress.pipeline.recipe import load_recipe
    from modelpress.pipeline.run import run_job
    from modelpress.report.terminal import print_summary

    steps = load_recipe(recipe)  # fail on a bad recipe before any slow work
    sizes = _batches(batch_text)
    with _status("loading the model"):
        net, inputs = _load(model, weights)
    data = _data_for(model, data_ref)
    eval_data = _call_data(eval_ref, "--eval")
    with _status("starting") as say:
        result = run_job(
            net,
            inputs,
            steps,
            out_dir=out_dir,
            name=_model_name(model),
            data=data,
            eval_data=eval_data,
            metric=metric if eval_data is not None else None,
            runtimes=list(runtimes) or None,
            batch_sizes=sizes,
            rounds=rounds,
            threads=threads,
            overwrite=overwrite,
            allow_partial=allow_partial,
            progress=say,
            target=target,
            sensitivity=split_families(sensitivity_text) if sensitivity_text else None,
        )
    print_summary(result, out)
    if target == "tensorrt":
        from modelpress.deploy.tensorrt import check_tensorrt
        from modelpress.pipeline.run import COMPRESSED_ONNX

        for line in check_tensorrt(Path(result["out_dir"]) / COMPRESSED_ONNX).lines():
            out.print(line, highlight=False)
    out.print(f"report: {Path(result['out_dir']) / 'report.html'}")


@main.command()
@click.argument("model")
@click.option("--weights", type=click.Path(), help="A state dict (.pt/.pth weights_only, or .safetensors).")
@click.option(
    "--data",
    "data_ref",
    help="'file.py:fn' returning calibration batches (model inputs): static int8, the sensitivity ranking "
    "and recovery read them (default: the example inputs alone).",
)
@click.option(
    "--eval", "eval_ref", required=True, help="'file.py:fn' returning (inputs, labels) batches for quality."
)
@click.option(
    "--metric", type=click.Choice(["accuracy", "perplexity"]), default="accuracy", show_default=True
)
@click.option("--max-drop", help="Quality lost at most: 1% (of the fp32 quality) or 0.01 (in metric units).")
@click.option("--floor", type=float, help="Quality at least this (perplexity: at most this).")
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="size=8x (file 8 times smaller than fp32), latency=3x (3 times faster than the fp32 artifact) or "
    "mcu=256KB/64KB (each trial also written for TensorFlow Lite Micro: its bytes and measured arena must fit); "
    "repeatable.",
)
@click.option(
    "--runtime",
    type=click.Choice(["onnxruntime", "openvino"]),
    default="openvino",
    show_default=True,
    help="The runtime the trials' artifacts are exported for and timed in.",
)
@click.option(
    "--baseline-runtime",
    type=click.Choice(["onnxruntime", "openvino", "same"]),
    default="onnxruntime",
    show_default=True,
    help="The runtime the fp32 artifact is timed in (latency factors are against it).",
)
@click.option("--budget", help="Start no trial after this long: 90s, 60m, 2h.")
@click.option("--trials", type=int, help="Finished trials the study should hold (a resumed search goes on).")
@click.option(
    "--out",
    "-o",
    "out_dir",
    default="modelpress-search",
    show_default=True,
    type=click.Path(),
    help="Folder of the study, the trials' artifacts and the results; rerun with it to resume.",
)
@click.option("--ray-address", help="Run the trials as Ray tasks on this cluster (auto: the local one).")
@click.option("--storage", help="An Optuna storage URL for the study (default: SQLite in --out).")
@click.option("--batch", default=1, show_default=True, help="Batch size latency is timed at.")
@click.option("--rounds", default=10, show_default=True, help="Interleaved timing rounds per trial.")
@click.option("--threads", default=2, show_default=True, help="Threads for every runtime.")
@click.option("--seed", default=0, show_default=True, help="The sampler's seed.")
@click.option(
    "--space",
    "space_path",
    type=click.Path(),
    help="A YAML mapping of the search space's fields (structured, lowrank, sparsity, cluster, quantize, keep,"
    " depth, embeddings, recover, depth_recover, options ...); unset fields keep their defaults.",
)
def search(
    model: str,
    weights: str | None,
    data_ref: str | None,
    eval_ref: str,
    metric: str,
    max_drop: str | None,
    floor: float | None,
    targets: tuple[str, ...],
    runtime: str,
    baseline_runtime: str,
    budget: str | None,
    trials: int | None,
    out_dir: str,
    ray_address: str | None,
    storage: str | None,
    batch: int,
    rounds: int,
    threads: int,
    seed: int,
    space_path: str | None,
) -> None:
    """Search recipes across techniques for the smallest, fastest artifact that keeps the quality asked.

    \b
    Each trial compresses MODEL (structured ratio, low rank, sparsity, shared values, int8/int4 weight-only
    or static int8), exports it for --runtime and measures quality (--eval, --metric), file size and latency
    interleaved with the fp32 artifact. Writes into OUT: study.db (rerun the same command to resume),
    trials/NNNN/, search.json, front.svg, and recipe.yaml (closest-recipe.yaml when the constraints were
    not met), which `modelpress compress MODEL --recipe OUT/recipe.yaml --data D` reproduces.
    """
    from modelpress.optimize.search import (
        Constraints,
        SearchConfig,
        front_table,
        metric_evaluator,
        parse_budget,
    )
    from modelpress.optimize.search import search as run_search

    constraints = Constraints.parse(max_drop, targets, floor)
    space = {"space": _search_space(space_path)} if space_path else {}
    config = SearchConfig(
        **space,
        out_dir=out_dir,
        runtime=runtime,
        baseline_runtime=None if baseline_runtime == "same" else baseline_runtime,
        trials=trials if trials is not None or budget else 20,
        budget_s=parse_budget(budget) if budget else None,
        higher_is_better=metric != "perplexity",
        seed=seed,
        batch=batch,
        rounds=rounds,
        threads=threads,
        storage=storage,
        ray_address=ray_address,
    )
    with _status("loading the model"):
        net, inputs = _load(model, weights)
    data = _call_data(data_ref, "--data") or [inputs]
    eval_data = _call_data(eval_ref, "--eval")
    with _status("starting") as say:
        result = run_search(
            net,
            data,
            metric_evaluator(eval_data, metric),
            constraints,
            example_inputs=inputs,
            config=config,
            progress=say,
        )
    out.print(front_table(result))
    colour = "green" if result.met else "yellow"
    out.print(f"[{colour}]{result.message}[/]", highlight=False)
    recipe = "recipe.yaml" if result.met else "closest-recipe.yaml"
    if result.chosen is not None:
        out.print(f"recipe: {Path(out_dir) / recipe}; front: {Path(out_dir) / 'search.json'}, front.svg")


def _search_space(path: str) -> Any:
    """The SearchSpace a YAML mapping at `path` describes."""
    import dataclasses

    import yaml

    from modelpress.optimize.search import SearchSpace

    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"--space {path}: no such file; give a YAML mapping of search space fields.")
    try:
        fields = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"--space {path} is not valid YAML: {exc}") from exc
    known = {f.name for f in dataclasses.fields(SearchSpace)}
    if not isinstance(fields, dict) or set(fields) - known:
        unknown = sorted(set(fields) - known) if isinstance(fields, dict) else fields
        raise RecipeError(
            f"--space {path}: {unknown!r} are not search space fields; use a mapping of {sorted(known)}."
        )
    try:
        return SearchSpace(**fields)
    except TypeError as exc:
        raise RecipeError(f"--space {path}: {exc}") from exc


@main.command()
@click.argument("model")
@click.option(
    "--out",
    "-o",
    "out_path",
    required=True,
    type=click.Path(),
    help="The new artifact (.onnx; .xml for --to openvino, .tflite for litert/tflm, .pte for executorch).",
)
@click.option("--weights", type=click.Path(), help="A state dict (.pt/.pth weights_only, or .safetensors).")
@click.option("--recipe", "-r", help="Compress with this recipe before exporting.")
@_data_option
@_allow_partial_option
@click.option(
    "--to",
    "to",
    type=click.Choice(["onnx", "openvino", "litert", "executorch", "tflm", "web", "genai", "openvino-genai"]),
    default="onnx",
    show_default=True,
    help="The deployment format: ONNX, OpenVINO IR, LiteRT .tflite, ExecuTorch .pte (XNNPACK), a full-integer "
    ".tflite plus C array for TensorFlow Lite Micro, ONNX run in onnxruntime-web (WASM) in Chromium, or (a "
    "causal LM from a Hugging Face folder) a folder that ONNX Runtime GenAI (genai) or OpenVINO GenAI "
    "(openvino-genai) generates from, KV cache and tokenizer included. Each is checked in its runtime against "
    "the torch model.",
)
@click.option(
    "--runtime",
    "runtimes",
    multiple=True,
    type=click.Choice(["onnxruntime", "openvino"]),
    help="With --to onnx: runtime(s) to check parity in (default: all installed).",
)
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
@click.option(
    "--target",
    type=click.Choice(["onnxruntime", "openvino", "tensorrt"]),
    default=None,
    help="With --to onnx: the runtime to place int8 quantizers for (default onnxruntime). ONNX Runtime runs a "
    "layer as integer only with its output quantized too (ranges from --data); OpenVINO wants layer inputs "
    "only; TensorRT symmetric int8 on the inputs and weights of Conv/MatMul/Gemm (the file is then checked "
    "against TensorRT's rules, naming each node that would fall back).",
)
@click.option(
    "--standard-ops",
    is_flag=True,
    help="Write static int8 Linear layers as standard-ONNX QDQ instead of ONNX Runtime's MatMulIntegerToFloat "
    "(for runtimes other than ONNX Runtime and OpenVINO).",
)
@click.option(
    "--mcu",
    help="With --to tflm: the microcontroller budget FLASH/RAM, e.g. 256KB/64KB (the model's bytes / the "
    "arena measured in TensorFlow Lite Micro); nothing is written when it does not fit.",
)
@click.option(
    "--accuracy-level",
    type=click.IntRange(0, 4),
    default=4,
    show_default=True,
    help="With --to genai: MatMulNBits' accuracy_level. 4 runs int8 dot products on each block of the input "
    "(fast); 0 computes in fp32 from the dequantized weights (exactly the torch model's numbers, slower).",
)
@click.option(
    "--int8-block",
    type=click.Choice(["16", "32", "64", "128", "256"]),
    help="With --to genai: the block of int8 per-row layers (default 64), which accuracy_level 4 quantizes "
    "their inputs by: 16 keeps perplexity nearest fp32 (SmolLM2: +0.02 vs +0.12 at 64) for a bigger, "
    "slower file.",
)
def export(
    model: str,
    out_path: str,
    weights: str | None,
    recipe: str | None,
    data_ref: str | None,
    allow_partial: bool,
    to: str,
    runtimes: tuple[str, ...],
    overwrite: bool,
    target: str | None,
    standard_ops: bool,
    mcu: str | None,
    accuracy_level: int,
    int8_block: str | None,
) -> None:
    """Export MODEL (optionally compressed) to a deployment format and check parity with the torch model in
    the runtime it runs in.

    MODEL is 'path/to/file.py:factory', 'package.module:factory' or a Hugging Face model folder.
    """
    from modelpress._files import check_output_path
    from modelpress.data import as_dataset
    from modelpress.deploy.formats import close, deploy, open_artifact
    from modelpress.deploy.parity import check_parity, parity_inputs, summary_line
    from modelpress.pipeline.recipe import compress as run_compress
    from modelpress.pipeline.recipe import load_recipe

    if data_ref and not recipe:
        raise click.UsageError("--data calibrates a --recipe; add --recipe, or leave out --data.")
    if to != "onnx" and (target or runtimes or standard_ops):
        raise click.UsageError("--target, --runtime and --standard-ops apply to --to onnx only.")
    if mcu and to != "tflm":
        raise click.UsageError("--mcu is the budget of --to tflm; add --to tflm, or leave out --mcu.")
    if to != "genai" and click.get_current_context().get_parameter_source("accuracy_level") not in (
        None,
        click.core.ParameterSource.DEFAULT,
    ):
        raise click.UsageError("--accuracy-level applies to --to genai only.")
    if int8_block and to != "genai":
        raise click.UsageError("--int8-block applies to --to genai only.")
    steps = load_recipe(recipe) if recipe else None
    if to in ("genai", "openvino-genai"):
        block = int(int8_block) if int8_block else None
        _export_genai(
            model, out_path, weights, steps, data_ref, allow_partial, overwrite, accuracy_level, to, block
        )
        return
    check_output_path(out_path, overwrite=overwrite)
    data = None
    with _status("loading the model") as say:
        net, inputs = _load(model, weights)
        original = net if steps else None
        if steps:
            data = as_dataset(_data_for(model, data_ref))  # calibrates the recipe, then the export
            say("compressing")
            net = run_compress(net, steps, data, allow_partial=allow_partial)
        say("exporting" if to == "onnx" else f"exporting to {to}")
        deployed = deploy(
            net,
            inputs,
            out_path,
            to=to,  # type: ignore[arg-type]
            overwrite=overwrite,
            data=data,
            target=target,
            integer_matmul=not standard_ops,
            mcu=mcu,
        )
        path = deployed.path
        for line in deployed.notes:
            out.print(line)
        failed = []
        for runtime in runtimes or deployed.runtimes:
            say(f"checking parity in {runtime}")
            session = open_artifact(path, runtime, arena_bytes=deployed.arena_bytes)
            try:
                report = check_parity(
                    net, session, parity_inputs(inputs), reference=original, raise_on_failure=False
                )
            finally:
                close(session)
            out.print(summary_line(report))
            if not report.passed:
                failed.append(report.message)
    if failed:
        raise ParityError(" ".join(failed) + f" The file was kept at {path} for inspection.")
    out.print("wrote " + ", ".join(str(p) for p in deployed.files))


def _export_genai(
    model: str,
    out_path: str,
    weights: str | None,
    steps: Any,
    data_ref: str | None,
    allow_partial: bool,
    overwrite: bool,
    accuracy_level: int,
    to: str = "genai",
    int8_block: int | None = None,
) -> None:
    """`export --to genai` / `--to openvino-genai`: a causal LM from a Hugging Face folder, with its tokenizer."""
    from modelpress.data import as_dataset
    from modelpress.errors import ExportError
    from modelpress.pipeline.recipe import compress as run_compress

    if not (Path(model) / "config.json").is_file():
        raise ExportError(
            f"--to {to} takes a Hugging Face causal LM folder (config.json, weights, tokenizer files); "
            f"'{model}' is not one. Save yours with model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR)."
        )
    if Path(out_path).exists() and not (overwrite and Path(out_path).is_dir()):  # before the slow work
        raise ExportError(
            f"Output folder '{out_path}' already exists. Choose another, delete it, or pass --overwrite."
        )
    from transformers import AutoTokenizer

    from modelpress.loading import quiet_transformers

    with _status("loading the model") as say:
        net, _ = _load(model, weights)
        with quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(model)
            except Exception as exc:
                raise ExportError(
                    f"--to {to} needs the model's tokenizer in '{model}', and it did not load: {exc}. Save it "
                    "there with tokenizer.save_pretrained(DIR)."
                ) from exc
        # an architecture the runtime's export cannot write is refused before the recipe runs
        if to == "genai":
            from modelpress.deploy.genai import check_exportable
        else:
            from modelpress.deploy.ovgenai import check_exportable
        check_exportable(net)
        if steps:
            say("compressing")
            data = _data_for(model, data_ref, tokenizer)
            net = run_compress(net, steps, as_dataset(data), allow_partial=allow_partial)
        if to == "openvino-genai":
            from modelpress.deploy.ovgenai import export_openvino_genai

            ov_result = export_openvino_genai(net, tokenizer, out_path, overwrite=overwrite, progress=say)
            notes, path = ov_result.notes(), ov_result.folder
        else:
            from modelpress.deploy.genai import export_genai

            result = export_genai(
                net,
                tokenizer,
                out_path,
                accuracy_level=accuracy_level,
                int8_block=int8_block,
                overwrite=overwrite,
                progress=say,
            )
            notes, path = result.notes(), result.path
    for line in notes:
        out.print(line, highlight=False)
    out.print(f"wrote {path} (run it: modelpress generate {path} --prompt '...')")


@main.command()
@click.argument("folder", type=click.Path())
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--max-new-tokens", default=128, show_default=True, help="Stop after this many new tokens.")
@click.option("--threads", default=0, help="Intra-op threads (0: the runtime's default).")
def generate(folder: str, prompt: str, max_new_tokens: int, threads: int) -> None:
    """Generate text from FOLDER (written by `export --to genai` or `--to openvino-genai`) in ONNX Runtime
    GenAI or OpenVINO GenAI, streaming each token as it comes (greedy). Needs no torch: the folder has the
    model, its KV cache and the tokenizer."""
    from modelpress.deploy.genai import is_genai_folder, stream_tokens
    from modelpress.deploy.ovgenai import is_openvino_genai_folder

    if is_openvino_genai_folder(folder):
        _generate_openvino(folder, prompt, max_new_tokens, threads)
        return
    if not is_genai_folder(folder):
        _not_an_llm_folder(folder)
    pieces = stream_tokens(folder, prompt, max_new_tokens, threads)
    first = next(pieces, "")  # a folder that is not one fails here, before any text is printed
    out.print(prompt + first, end="", highlight=False, markup=False)
    for piece in pieces:
        out.print(piece, end="", highlight=False, markup=False)
    out.print()


def _not_an_llm_folder(folder: str) -> NoReturn:
    from modelpress.errors import ExportError

    raise ExportError(
        f"'{folder}' is not an ONNX Runtime GenAI folder (genai_config.json, model.onnx, tokenizer files) nor "
        "an OpenVINO GenAI folder (openvino_model.xml/.bin, openvino_tokenizer.xml, openvino_detokenizer.xml). "
        "Write one with `modelpress export MODEL_FOLDER --to genai -o FOLDER` (or --to openvino-genai)."
    )


def _generate_openvino(folder: str, prompt: str, max_new_tokens: int, threads: int) -> None:
    """`generate` of an OpenVINO GenAI folder: LLMPipeline streams text pieces to a callback."""
    from modelpress.deploy.ovgenai import stream_tokens

    started = False

    def show(piece: str) -> None:
        nonlocal started
        if not started:  # the prompt is echoed once the folder has loaded and generates
            out.print(prompt, end="", highlight=False, markup=False)
            started = True
        out.print(piece, end="", highlight=False, markup=False)

    stream_tokens(folder, prompt, show, max_new_tokens=max_new_tokens, threads=threads)
    if not started:
        out.print(prompt, end="", highlight=False, markup=False)
    out.print()


def _llm_bench_options(
    kind: str, batch_text: str, runtimes: tuple[str, ...], baseline_runtime: str | None
) -> None:
    """Refuse the options an LLM folder's bench cannot honour, instead of ignoring them."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if ctx.get_parameter_source("batch_text") == ParameterSource.COMMANDLINE and batch_text.strip() != "1":
        raise click.UsageError(
            f"--batch {batch_text}: an LLM folder is timed generating at batch 1 (its runtime's generate loop). "
            "Drop --batch; --seq sets the prompt length."
        )
    for option, value in (("--runtime", ",".join(runtimes)), ("--baseline-runtime", baseline_runtime or "")):
        if value and value != kind:
            raise click.UsageError(
                f"{option} {value}: this folder runs in {kind} only. Drop {option}, or export the model for "
                f"that runtime (`modelpress export MODEL_FOLDER --to ...`) and bench that file."
            )


def _bench_genai(
    artifact: str,
    baseline: str | None,
    rounds: int,
    threads: int,
    json_out: str | None,
    runtime: Literal["onnxruntime-genai", "openvino-genai"] = "onnxruntime-genai",
    *,
    prompt_tokens: int = 128,
) -> None:
    """`bench` of ONNX Runtime GenAI or OpenVINO GenAI folders: prefill and decode tokens/s, interleaved,
    and peak memory (a `prompt_tokens` prompt, 128 new tokens)."""
    from modelpress._files import check_output_path, write_text_atomic
    from modelpress.analyse.profile import human_bytes
    from modelpress.deploy.genai import bench_genai
    from modelpress.deploy.ovgenai import bench_openvino_genai

    if json_out:
        check_output_path(json_out)
    folders = {"artifact": artifact} | ({"baseline": baseline} if baseline else {})
    run = bench_openvino_genai if runtime == "openvino-genai" else bench_genai
    with _status(f"benchmarking generation in {runtime}") as say:
        results = run(folders, prompt_tokens=prompt_tokens, rounds=rounds, threads=threads, progress=say)
    base = results.get("baseline")
    table = Table(
        title=f"{Path(artifact).name} in {runtime}: {prompt_tokens}-token prompt, 128 new tokens, greedy ({threads} threads, "
        f"{rounds} interleaved rounds, medians)"
    )
    for col in ["folder", "model size", "prefill tok/s", "decode tok/s", "decode ratio", "peak RSS"]:
        table.add_column(col, justify="left" if col == "folder" else "right")
    for name, r in results.items():
        ratio = f"{r.decode_tok_s / base.decode_tok_s:.2f}x" if base else "-"
        rss = human_bytes(r.peak_rss_bytes) if r.peak_rss_bytes else "-"
        table.add_row(
            f"{name} ({Path(r.path).name})",
            human_bytes(r.model_bytes),
            f"{r.prefill_tok_s:.0f}",
            f"{r.decode_tok_s:.1f}",
            ratio,
            rss,
        )
    out.print(table)
    if json_out:
        write_text_atomic(json_out, json.dumps({k: v.to_dict() for k, v in results.items()}, indent=2))


_BENCH_RUNTIMES = ["onnxruntime", "openvino", "litert", "executorch", "tflite-micro", "onnxruntime-web"]


@main.command()
@click.argument("artifact", type=click.Path())
@click.option(
    "--baseline",
    type=click.Path(),
    help="Another artifact to compare with (normally the fp32 export), of any format: e.g. the fp32 .onnx "
    "beside an int8 .pte.",
)
@click.option(
    "--baseline-runtime",
    type=click.Choice(_BENCH_RUNTIMES),
    help="Runtime for --baseline (default: ARTIFACT's first runtime where it runs the baseline's file type, "
    "else the baseline type's first installed runtime).",
)
@click.option(
    "--runtime",
    "runtimes",
    multiple=True,
    type=click.Choice(_BENCH_RUNTIMES),
    help="Runtime(s) to time ARTIFACT in (default: those installed for its type: .onnx onnxruntime and "
    "openvino, .xml openvino, .tflite litert, .pte executorch; onnxruntime-web and tflite-micro, being "
    "slow, only when named).",
)
@_timing_options
@click.option(
    "--seq",
    default=128,
    show_default=True,
    help="Length for free non-batch dims (sequence); for an LLM folder, the prompt's tokens.",
)
@click.option(
    "--json", "json_out", type=click.Path(), help="Also write the results as JSON to this new file."
)
def bench(
    artifact: str,
    baseline: str | None,
    baseline_runtime: str | None,
    runtimes: tuple[str, ...],
    batch_text: str,
    seq: int,
    rounds: int,
    threads: int,
    json_out: str | None,
) -> None:
    """Time ARTIFACT (.onnx, .xml, .tflite or .pte) in every installed runtime of its type (interleaved),
    beside --baseline if given; name the fastest. An LLM folder (`export --to genai` or `--to
    openvino-genai`) is timed in its own runtime: prefill and decode tokens/s, and peak memory."""
    from modelpress._files import check_output_path, write_text_atomic
    from modelpress.analyse.profile import human_bytes
    from modelpress.deploy.bench import artifact_runtimes, compare_artifacts, runs_in
    from modelpress.deploy.genai import is_genai_folder
    from modelpress.deploy.integer import integer_kernels
    from modelpress.deploy.ovgenai import is_openvino_genai_folder
    from modelpress.errors import ExportError

    for kind, is_kind, other in (
        ("onnxruntime-genai", is_genai_folder, "an ONNX Runtime GenAI folder (genai_config.json)"),
        ("openvino-genai", is_openvino_genai_folder, "an OpenVINO GenAI folder (openvino_model.xml)"),
    ):
        if not is_kind(artifact):
            continue
        if baseline and not is_kind(baseline):
            raise ExportError(
                f"--baseline '{baseline}' is not {other} like {artifact}; LLM folders are timed against one of "
                f"their own runtime. Export the baseline with `modelpress export MODEL_FOLDER --to "
                f"{'genai' if kind == 'onnxruntime-genai' else kind} -o FOLDER`."
            )
        _llm_bench_options(kind, batch_text, runtimes, baseline_runtime)
        _bench_genai(artifact, baseline, rounds, threads, json_out, kind, prompt_tokens=seq)  # type: ignore[arg-type]
        return
    if Path(artifact).is_dir():
        _not_an_llm_folder(artifact)
    for p in [artifact] + ([baseline] if baseline else []):
        if not Path(p).is_file():
            raise ExportError(f"Artifact '{p}' does not exist. Export one first with `modelpress export`.")
    if json_out:
        check_output_path(json_out)
    runtimes_list = artifact_runtimes(artifact, runtimes)
    sizes = _batches(batch_text)
    variants: dict[str, tuple[str, str]] = {}
    if baseline:
        if baseline_runtime is None:
            # the same runtime as the artifact where it runs the baseline's type: a ratio of compression alone
            same = [rt for rt in runtimes_list if runs_in(baseline, rt)]
            baseline_runtime = same[0] if same else artifact_runtimes(baseline)[0]
        artifact_runtimes(baseline, [baseline_runtime])  # a clear error where it cannot run the baseline
        variants[f"baseline {baseline_runtime}"] = (baseline, baseline_runtime)
    for rt in runtimes_list:
        variants[f"artifact {rt}"] = (artifact, rt)
    base_key = next(iter(variants))
    with _status("benchmarking") as say:
        results = compare_artifacts(
            variants, sizes, baseline=base_key, threads=threads, rounds=rounds, seq=seq, progress=say
        )
    batches = list(results[base_key].latency)
    base = results[base_key]
    across = sorted({r.runtime for r in results.values()} - {base.runtime})
    title = f"{Path(artifact).name}: ratios vs {base_key}"
    if baseline:
        title += f" ({Path(baseline).name})"
    if across:  # the ratio then measures the runtime and the file together, not the compression alone
        title += f", across runtimes ({', '.join(across)} vs {base.runtime})"
    table = Table(title=title + f" ({threads} threads, {rounds} interleaved rounds)")
    for col in (
        ["variant", "size"]
        + [f"{b} median ms" for b in batches]
        + [f"{b} ratio" for b in batches]
        + ["peak RSS"]
    ):
        table.add_column(col, justify="left" if col == "variant" else "right", no_wrap=col == "variant")
    for name, r in results.items():
        table.add_row(
            name,
            human_bytes(r.size_bytes),
            *[f"{r.latency[b].median_ms:.3f}" for b in batches],
            *[f"{r.latency[b].ratio:.3f}" for b in batches],
            f"{r.peak_rss_mb:.0f} MB" if r.peak_rss_mb else "-",
        )
    out.print(table)
    for name, r in results.items():
        for b, why in r.skipped.items():
            out.print(f"skipped {b}: {name}: {why}", highlight=False)
    for b in batches if len(runtimes_list) > 1 else []:  # one runtime: nothing to choose between
        fastest = min(
            (n for n in results if n.startswith("artifact")), key=lambda n: results[n].latency[b].median_ms
        )
        out.print(f"fastest at {b}: [bold]{fastest.removeprefix('artifact ')}[/]")
    integer = {}
    if Path(artifact).suffix.lower() == ".onnx":  # the integer-kernel report reads ONNX graphs
        integer = {
            f"artifact {rt}": integer_kernels(artifact, rt, threads=threads)
            for rt in runtimes_list
            if rt in ("onnxruntime", "openvino")
        }
    for report in integer.values():
        out.print(report.summary(), highlight=False)
    if json_out:
        data = {
            k: {**v.to_dict(), **({"integer": integer[k].to_dict()} if k in integer else {})}
            for k, v in results.items()
        }
        write_text_atomic(json_out, json.dumps(data, indent=2))


@main.command()
@click.argument("result_json", type=click.Path())
@click.option("--out", "-o", "out_path", required=True, type=click.Path(), help="The new .html file.")
@click.option("--overwrite", is_flag=True, help="Replace the output file if it exists.")
def report(result_json: str, out_path: str, overwrite: bool) -> None:
    """Render JSON that modelpress wrote as a single self-contained HTML file (inline plots, no network).

    RESULT_JSON is a report.json (from `compress` or `demo`), or the --json output of `bench` or `profile`;
    the kind is told from its keys.
    """
    from modelpress.errors import DataError
    from modelpress.report.html import report_kind, write_report

    expected = (
        "Give the report.json written by `modelpress compress` or `modelpress demo`, or the --json output of "
        "`modelpress bench` or `modelpress profile`."
    )
    path = Path(result_json)
    if not path.is_file():
        raise DataError(f"'{path}' does not exist. {expected}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"'{path}' is not a modelpress result: it is not JSON ({exc}). {expected}") from exc
    kind = report_kind(data, source=f"'{path}'")
    try:
        write_report(data, out_path, overwrite=overwrite)
    except (KeyError, TypeError, StopIteration) as exc:
        raise DataError(
            f"'{path}' is not a modelpress result: it looks like a {kind} result but lacks a field "
            f"({type(exc).__name__}: {exc}). {expected}"
        ) from exc
    out.print(f"wrote {out_path} ({kind} report)")


@main.command()
@click.option(
    "--out",
    "-o",
    "out_dir",
    default="modelpress-demo",
    show_default=True,
    type=click.Path(),
    help="Folder for the demo's artifacts and report (replaced if it holds an earlier demo).",
)
@click.option("--rounds", default=20, show_default=True, help="Interleaved timing rounds.")
def demo(out_dir: str, rounds: int) -> None:
    """Run the whole job offline on a small CNN trained on scikit-learn's digits (trained once, cached):
    recipe prune50-int8 (half the channels, refit and retrained on the training split, int8 weights), which
    makes the exported model smaller and faster."""
    from modelpress.demo import run_demo
    from modelpress.report.terminal import print_summary

    target = Path(out_dir)
    with _status("loading or training the demo CNN") as say:
        result = run_demo(target, rounds=rounds, progress=say)
    print_summary(result, out)
    out.print(f"report: {target / 'report.html'}")


if __name__ == "__main__":
    main()
