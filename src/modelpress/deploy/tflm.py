"""Microcontrollers: a full-integer int8 `.tflite` run in the TensorFlow Lite Micro interpreter, checked
against a flash / RAM budget, and written as a C array to compile into firmware.

Flash is the model's bytes (the `.tflite` the C array holds; the TFLM library and the application come on
top); RAM is the tensor arena the TFLM interpreter allocates for this model, measured by its recording
allocator after one inference (activations, scratch buffers and the interpreter's own structures; the
stack and the application come on top).

>>> art = export_tflm(small, (x[:1],), "mnist.tflite", data=calib, budget="256KB/64KB")  # doctest: +SKIP
>>> art.flash_bytes, art.arena_bytes  # doctest: +SKIP
(118368, 31520)
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from modelpress._files import atomic_path, check_output_path
from modelpress.deploy.litert import _dequantize, _quantize, float_ops, litert_bytes
from modelpress.errors import ExportError, RuntimeUnavailableError
from modelpress.loading import Inputs

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 1024, "KIB": 1024, "K": 1024, "MB": 1024**2, "MIB": 1024**2, "M": 1024**2}
ARENA_ALIGNMENT = 16  # TFLM aligns the arena's start; the measured size is rounded up to it
MAX_ARENA = 256 * 1024**2  # the largest arena tried when measuring


def require_tflm() -> None:
    """Raise a clear error when the `tflm` extra (tflite-micro) is not installed."""
    if importlib.util.find_spec("tflite_micro") is None:
        raise RuntimeUnavailableError(
            "TFLite Micro needs 'tflite-micro', which is not installed. Install it with "
            "`pip install modelpress[tflm]`."
        )


def _bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ExportError(
            f"'{text}' is not a size; write it as bytes or with KB / MB (1 KB = 1024 bytes), e.g. 256KB."
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _kb(n: int) -> str:
    return f"{n / 1024:.1f} KB"


@dataclass(frozen=True)
class McuBudget:
    """A microcontroller's memory for the model: flash (the model's bytes) and RAM (the tensor arena)."""

    flash_bytes: int
    ram_bytes: int

    @classmethod
    def parse(cls, text: str) -> McuBudget:
        """`FLASH/RAM`, each in bytes or with KB / MB (1024-based).

        >>> McuBudget.parse("256KB/64KB")
        McuBudget(flash_bytes=262144, ram_bytes=65536)
        """
        parts = text.split("/")
        if len(parts) != 2:
            raise ExportError(
                f"MCU budget '{text}' must be FLASH/RAM, e.g. 256KB/64KB (flash for the model, RAM for "
                "the tensor arena)."
            )
        budget = cls(_bytes(parts[0]), _bytes(parts[1]))
        if budget.flash_bytes <= 0 or budget.ram_bytes <= 0:
            raise ExportError(f"MCU budget '{text}': flash and RAM must both be above zero.")
        return budget

    def __str__(self) -> str:
        return f"{_kb(self.flash_bytes)} flash / {_kb(self.ram_bytes)} RAM"


def check_budget(flash_bytes: int, arena_bytes: int, budget: McuBudget | str) -> None:
    """Raise an ExportError naming each budget the model exceeds, and by how much.

    >>> check_budget(300_000, 20_000, "256KB/64KB")  # doctest: +SKIP
    ExportError: The model does not fit the MCU budget 256.0 KB flash / 64.0 KB RAM: flash ...
    """
    budget = McuBudget.parse(budget) if isinstance(budget, str) else budget
    over = []
    if flash_bytes > budget.flash_bytes:
        over.append(
            f"flash: the model is {_kb(flash_bytes)}, {_kb(flash_bytes - budget.flash_bytes)} "
            f"({flash_bytes - budget.flash_bytes} bytes) over the {_kb(budget.flash_bytes)} budget"
        )
    if arena_bytes > budget.ram_bytes:
        over.append(
            f"RAM: the tensor arena needs {_kb(arena_bytes)}, {_kb(arena_bytes - budget.ram_bytes)} "
            f"({arena_bytes - budget.ram_bytes} bytes) over the {_kb(budget.ram_bytes)} budget"
        )
    if over:
        raise ExportError(
            f"The model does not fit the MCU budget {budget}: {'; '.join(over)}. Make it smaller "
            "(structured pruning, fewer channels; smaller inputs shrink the arena) or give a larger budget."
        )


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """TFLM's C++ reports (allocation, missing kernels) go to file descriptor 2: capture them."""
    lines: list[str] = []
    fd = 2
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield lines
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def _interpreter(model: bytes, arena: int) -> tuple[Any | None, list[str]]:
    from tflite_micro import runtime

    with _captured_stderr() as lines:
        try:
            interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena)
        except Exception:
            interpreter = None
    return interpreter, lines


def _inputs_outputs(model: bytes) -> tuple[list[str], list[str]]:
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.Model.GetRootAsModel(model, 0).Subgraphs(0)
    ins = [graph.Tensors(int(i)).Name().decode() for i in graph.InputsAsNumpy()]
    outs = [graph.Tensors(int(i)).Name().decode() for i in graph.OutputsAsNumpy()]
    return ins, outs


def _loaded(model: bytes) -> tuple[Any, int]:
    """An interpreter with an ample arena, and that arena's size; a clear error for a model TFLM cannot
    run (a float or unsupported op)."""
    floats = float_ops(model)
    if floats:
        raise ExportError(
            f"TFLite Micro needs a full-integer model, but these ops compute in float: {', '.join(floats)}. "
            "Compress with static int8 (`--recipe int8-static`) so every Conv/Linear is quantized, and avoid "
            "ops litert-torch's int8 quantizer leaves in float."
        )
    arena = max(64 * 1024, 4 * len(model))
    while True:
        interpreter, lines = _interpreter(model, arena)
        if interpreter is not None:
            return interpreter, arena
        allocation = any("allocat" in line.lower() or "arena" in line.lower() for line in lines)
        if not allocation or arena >= MAX_ARENA:
            detail = "; ".join(line.strip() for line in lines if line.strip())[:400]
            raise ExportError(
                f"TFLite Micro cannot load the model ({detail or 'no reason given'}). TFLM runs a subset of "
                "TFLite's int8 kernels: replace the op it names, or deploy to LiteRT instead."
            )
        arena *= 2


def measure_arena(model: bytes | str | os.PathLike[str]) -> int:
    """Bytes of tensor arena the TFLM interpreter needs for a `.tflite` model: what its recording
    allocator reports after one inference, rounded up to `ARENA_ALIGNMENT`, checked to allocate.

    >>> measure_arena("model.tflite")  # doctest: +SKIP
    31520
    """
    require_tflm()
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    interpreter, ample = _loaded(data)
    for i in range(len(_inputs_outputs(data)[0])):
        detail = interpreter.get_input_details(i)
        interpreter.set_input(np.zeros(tuple(detail["shape"]), dtype=detail["dtype"]), i)
    interpreter.invoke()
    with _captured_stderr() as lines:
        interpreter.print_allocations()
    total = next(
        (int(m.group(1)) for line in lines if (m := re.search(r"allocation total (\d+) bytes", line))), None
    )
    if total is None:
        raise ExportError("TFLite Micro did not report its arena use; update tflite-micro.")
    size = -(-total // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
    for _ in range(8):  # the arena's start is aligned inside the buffer, which can cost a few bytes more
        if _interpreter(data, size)[0] is not None:
            return size
        size += ARENA_ALIGNMENT
    # The report leaves out fixed overheads a tiny model notices (~25% of a 2 KB arena). Sizes just under
    # the true minimum can crash the TFLM interpreter instead of failing, so no search near it: a margin
    # well above, then the ample arena (the figure is then an upper bound, and says so in the log).
    for size in (max(total * 5 // 4, total + 1024), 2 * total, ample):
        size = -(-size // ARENA_ALIGNMENT) * ARENA_ALIGNMENT
        if _interpreter(data, size)[0] is not None:
            log.info("TFLite Micro reported %d bytes of arena; it loads in %d (an upper bound).", total, size)
            return size
    raise ExportError(f"TFLite Micro reported {total} bytes of arena but does not load in {size}.")


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    return f"model_{name}" if not name or name[0].isdigit() else name


def write_c_array(
    model: bytes | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    arena_bytes: int | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write a `.tflite` model as C++ source `path` (`.cc`) and its header (`.h` beside it), each atomically:
    `alignas(16) const unsigned char NAME[]`, `const unsigned int NAME_len`, and with `arena_bytes` a
    `constexpr unsigned int NAME_arena_size` for the `tensor_arena`.

    >>> write_c_array("mnist.tflite", "mnist_model.cc", name="mnist_model")  # doctest: +SKIP
    (PosixPath('mnist_model.cc'), PosixPath('mnist_model.h'))
    """
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    source = Path(path)
    if source.suffix not in (".cc", ".cpp", ".c"):
        raise ExportError(f"C array path '{source}' must end in .cc, .cpp or .c.")
    header = source.with_suffix(".h")
    check_output_path(source, overwrite=overwrite)
    check_output_path(header, overwrite=overwrite)
    symbol = _identifier(name or source.stem)
    guard = f"{symbol.upper()}_H_"
    arena = (
        f"// Tensor arena measured in the TFLite Micro interpreter (bytes).\n"
        f"constexpr unsigned int {symbol}_arena_size = {arena_bytes};\n"
        if arena_bytes is not None
        else ""
    )
    header_text = (
        f"// Generated by modelpress: a TFLite model ({len(data)} bytes) for TensorFlow Lite Micro.\n"
        f"#ifndef {guard}\n#define {guard}\n\n"
        f"extern const unsigned char {symbol}[];\nextern const unsigned int {symbol}_len;\n"
        f"{arena}\n#endif  // {guard}\n"
    )
    rows = [", ".join(f"0x{b:02x}" for b in data[i : i + 12]) for i in range(0, len(data), 12)]
    source_text = (
        f"// Generated by modelpress: a TFLite model ({len(data)} bytes) for TensorFlow Lite Micro.\n"
        f'#include "{header.name}"\n\n'
        f"// 16-byte aligned: TFLM reads the flatbuffer in place.\n"
        f"alignas(16) const unsigned char {symbol}[] = {{\n  "
        + ",\n  ".join(rows)
        + f"\n}};\nconst unsigned int {symbol}_len = {len(data)};\n"
    )
    with atomic_path(header, overwrite=overwrite) as tmp:
        tmp.write_text(header_text)
    with atomic_path(source, overwrite=overwrite) as tmp:
        tmp.write_text(source_text)
    return source, header


@dataclass(frozen=True)
class TflmArtifact:
    path: Path  # the .tflite
    source: Path  # the C array (.cc)
    header: Path
    flash_bytes: int
    arena_bytes: int
    budget: McuBudget | None


def export_tflm(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    data: Iterable[Any] | None = None,
    budget: McuBudget | str | None = None,
    overwrite: bool = False,
) -> TflmArtifact:
    """Export a statically quantized model as a full-integer `.tflite` for TensorFlow Lite Micro at `path`,
    plus its C array (`<stem>_model.cc` / `.h` beside it), after measuring its arena in the TFLM
    interpreter and checking `budget` (`McuBudget` or "FLASH/RAM", e.g. "256KB/64KB"). Nothing is written
    when the model does not fit or TFLM cannot run it.

    >>> small = mp.compress(model, "int8-static", calib)  # doctest: +SKIP
    >>> export_tflm(small, (x[:1],), "mnist.tflite", data=calib, budget="256KB/64KB")  # doctest: +SKIP
    """
    require_tflm()
    out = check_output_path(path, overwrite=overwrite)
    if out.suffix != ".tflite":
        raise ExportError(f"TFLite Micro output '{out}' must end in .tflite.")
    source = out.with_name(f"{_identifier(out.stem)}_model.cc")
    check_output_path(source, overwrite=overwrite)
    check_output_path(source.with_suffix(".h"), overwrite=overwrite)
    parsed = McuBudget.parse(budget) if isinstance(budget, str) else budget
    content, _ = litert_bytes(model, example_inputs, quantize="int8", data=data)
    arena = measure_arena(content)
    if parsed is not None:
        check_budget(len(content), arena, parsed)
    source, header = write_c_array(
        content, source, name=f"{out.stem}_model", arena_bytes=arena, overwrite=overwrite
    )
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.write_bytes(content)
    return TflmArtifact(out, source, header, len(content), arena, parsed)


class TflmSession:
    """A full-integer `.tflite` in the TensorFlow Lite Micro interpreter (its Python build runs the same
    reference kernels as a microcontroller). Float inputs are quantized with each input tensor's own
    scale and zero point and outputs dequantized, as `LiteRTSession` does, so `check_parity` runs unchanged.

    >>> mp.check_parity(small, TflmSession("mnist.tflite"), [(x[:1],)])  # doctest: +SKIP
    """

    runtime = "tflite-micro"

    def __init__(self, path: str | os.PathLike[str], *, arena_bytes: int | None = None) -> None:
        require_tflm()
        p = Path(path)
        if not p.is_file():
            raise ExportError(
                f"Artifact '{p}' does not exist. Export it first (`modelpress export --to tflm`)."
            )
        data = p.read_bytes()
        self.arena_bytes = arena_bytes if arena_bytes is not None else measure_arena(data)
        interpreter, lines = _interpreter(data, self.arena_bytes)
        if interpreter is None:
            raise ExportError(
                f"TFLite Micro cannot load '{p}' in {self.arena_bytes} bytes: {'; '.join(lines)[:400]}"
            )
        self._interpreter = interpreter
        self.input_names, self.output_names = _inputs_outputs(data)
        self._inputs = [self._detail(interpreter.get_input_details(i)) for i in range(len(self.input_names))]
        self._outputs = [
            self._detail(interpreter.get_output_details(i)) for i in range(len(self.output_names))
        ]
        self.input_shapes: list[tuple[int | None, ...]] = [d["shape"] for d in self._inputs]

    @staticmethod
    def _detail(raw: dict[str, Any]) -> dict[str, Any]:
        q = raw.get("quantization_parameters") or {}
        scales, zero_points = q.get("scales", []), q.get("zero_points", [])
        quantization = (float(scales[0]), int(zero_points[0])) if len(scales) == 1 else (0.0, 0)
        return {
            "dtype": raw["dtype"],
            "shape": tuple(int(s) for s in raw["shape"]),
            "quantization": quantization,
        }

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self._inputs):
            raise ValueError(
                f"The artifact takes {len(self._inputs)} inputs ({self.input_names}); got {len(inputs)}."
            )
        for i, (x, detail) in enumerate(zip(inputs, self._inputs, strict=True)):
            if tuple(x.shape) != detail["shape"]:
                raise ValueError(
                    f"Input '{self.input_names[i]}' has the fixed shape {detail['shape']} in TFLite Micro; "
                    f"got {tuple(x.shape)}."
                )
            self._interpreter.set_input(_quantize(np.asarray(x), detail), i)
        self._interpreter.invoke()
        return [_dequantize(self._interpreter.get_output(i), d) for i, d in enumerate(self._outputs)]
