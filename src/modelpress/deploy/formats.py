"""One compressed model, each deployment format: `deploy(model, inputs, path, to=...)` writes the artifact and
`open_artifact(path, runtime)` loads it in the runtime that format runs in, behind the `Session` interface
(so `check_parity` compares any of them with the torch model).

| to           | artifact                          | runtime (parity)                    | extra            |
|--------------|-----------------------------------|-------------------------------------|------------------|
| `onnx`       | `.onnx`, int8 placed for `target` | ONNX Runtime and OpenVINO           | (base), openvino |
| `openvino`   | OpenVINO IR `.xml` + `.bin`       | OpenVINO                            | openvino         |
| `litert`     | `.tflite` (int8: full-integer)    | LiteRT                              | litert           |
| `executorch` | `.pte`, XNNPACK-delegated         | ExecuTorch                          | executorch       |
| `tflm`       | full-integer `.tflite` + C array  | TensorFlow Lite Micro (arena, flash)| tflm             |
| `web`        | single-file `.onnx`               | onnxruntime-web (WASM) in Chromium  | web + npm        |
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from modelpress._files import check_output_path
from modelpress.deploy.runtime import Session, available_runtimes, open_session
from modelpress.errors import ExportError, RuntimeUnavailableError
from modelpress.loading import Inputs

Format = Literal["onnx", "openvino", "litert", "executorch", "tflm", "web"]
FORMATS: tuple[Format, ...] = ("onnx", "openvino", "litert", "executorch", "tflm", "web")
#: The runtime each format's artifact is checked in (onnx: every installed ONNX runtime).
RUNTIME_OF: dict[str, str] = {
    "openvino": "openvino",
    "litert": "litert",
    "executorch": "executorch",
    "tflm": "tflite-micro",
    "web": "onnxruntime-web",
}
_SUFFIX = {"openvino": ".xml", "litert": ".tflite", "executorch": ".pte", "tflm": ".tflite", "web": ".onnx"}


@dataclass
class Deployed:
    """What `deploy` wrote: the artifact, the runtimes to check it in, and facts worth printing."""

    path: Path
    to: Format
    runtimes: list[str]
    files: list[Path] = field(default_factory=list)  # everything written (IR .bin, C array, ...)
    notes: list[str] = field(default_factory=list)
    arena_bytes: int | None = None  # tflm: the arena measured in the TFLM interpreter


def deploy(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    to: Format = "onnx",
    overwrite: bool = False,
    data: Iterable[Any] | None = None,
    target: str | None = None,
    integer_matmul: bool = True,
    mcu: str | None = None,
) -> Deployed:
    """Write `model` as a `to` artifact at `path` (atomically, never over an existing file unless
    `overwrite`). `data` calibrates what the format must measure (int8 output ranges); `target` places ONNX
    quantizers (`onnx`: "onnxruntime", "openvino" or "tensorrt"); `mcu` ("256KB/64KB", flash/RAM) is the
    microcontroller budget of `tflm`.

    >>> deploy(small, (x[:1],), "mnist.pte", to="executorch", data=calib)  # doctest: +SKIP
    """
    if to not in FORMATS:
        raise ExportError(f"to={to!r} is not a deployment format; choose from {', '.join(FORMATS)}.")
    if mcu is not None and to != "tflm":
        raise ExportError(f"An MCU budget ({mcu!r}) applies to to='tflm' only, not to={to!r}.")
    suffix = _SUFFIX.get(to)
    if suffix and Path(path).suffix.lower() != suffix:
        raise ExportError(
            f"A {to} artifact is a '{suffix}' file; name the output '{Path(path).stem}{suffix}'."
        )
    from modelpress.deploy.export import export_onnx

    if to == "onnx":
        out = export_onnx(
            model,
            example_inputs,
            path,
            overwrite=overwrite,
            integer_matmul=integer_matmul and target != "tensorrt",
            target=target or "onnxruntime",  # type: ignore[arg-type]
            data=data,
        )
        deployed = Deployed(out, to, list(available_runtimes()), [out])
        if target == "tensorrt":
            from modelpress.deploy.tensorrt import check_tensorrt

            deployed.notes.extend(check_tensorrt(out).lines())
        return deployed
    if to == "web":
        out = export_onnx(model, example_inputs, path, overwrite=overwrite, target="onnxruntime", data=data)
        return Deployed(out, to, ["onnxruntime-web"], [out])
    if to == "openvino":
        return _openvino_ir(model, example_inputs, path, overwrite=overwrite, data=data)
    if to == "litert":
        from modelpress.deploy.litert import export_litert

        out = export_litert(model, example_inputs, path, overwrite=overwrite, data=data)
        return Deployed(out, to, ["litert"], [out])
    if to == "executorch":
        from modelpress.deploy.executorch import export_executorch

        out = export_executorch(model, example_inputs, path, overwrite=overwrite, data=data)
        return Deployed(out, to, ["executorch"], [out])
    from modelpress.deploy.tflm import export_tflm

    art = export_tflm(model, example_inputs, path, data=data, budget=mcu, overwrite=overwrite)
    return Deployed(
        art.path,
        to,
        ["tflite-micro"],
        [art.path, art.source, art.header],
        [f"flash {art.flash_bytes:,} B (the model), arena {art.arena_bytes:,} B (measured in TFLite Micro)"],
        arena_bytes=art.arena_bytes,
    )


def _openvino_ir(
    model: nn.Module,
    example_inputs: Inputs,
    path: str | os.PathLike[str],
    *,
    overwrite: bool,
    data: Iterable[Any] | None,
) -> Deployed:
    """OpenVINO IR through the ONNX export placed for OpenVINO (weights kept as they are: int8 stays int8,
    fp32 is not halved)."""
    from modelpress.deploy.export import export_onnx

    out = check_output_path(path, overwrite=overwrite)
    bin_path = out.with_suffix(".bin")
    check_output_path(bin_path, overwrite=overwrite)
    try:
        import openvino as ov
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "OpenVINO is not installed. Install it with `pip install modelpress[openvino]`."
        ) from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        onnx_path = export_onnx(model, example_inputs, tmp / "model.onnx", target="openvino", data=data)
        ov.save_model(ov.convert_model(str(onnx_path)), str(tmp / out.name), compress_to_fp16=False)
        os.replace(tmp / bin_path.name, bin_path)  # the weights first: an .xml never lacks its .bin
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Deployed(out, "openvino", ["openvino"], [out, bin_path])


def open_artifact(
    path: str | os.PathLike[str], runtime: str, *, threads: int = 2, arena_bytes: int | None = None
) -> Session:
    """Load an artifact in `runtime`: "onnxruntime" / "openvino" (`.onnx`, OpenVINO also `.xml`), "litert"
    (`.tflite`), "executorch" (`.pte`), "tflite-micro" (full-integer `.tflite`), "onnxruntime-web" (`.onnx`
    in headless Chromium: close the session when done).

    >>> session = open_artifact("mnist.pte", "executorch")  # doctest: +SKIP
    """
    if runtime == "litert":
        from modelpress.deploy.litert import open_litert

        return open_litert(path, threads=threads)
    if runtime == "executorch":
        from modelpress.deploy.executorch import ExecuTorchSession

        return ExecuTorchSession(path, threads=threads)
    if runtime == "tflite-micro":
        from modelpress.deploy.tflm import TflmSession

        return TflmSession(path, arena_bytes=arena_bytes)
    if runtime == "onnxruntime-web":
        from modelpress.deploy.web import WebSession

        return WebSession(path)
    return open_session(path, runtime, threads=threads)


def close(session: Session) -> None:
    """Release what a session holds beyond memory (the browser of onnxruntime-web)."""
    closer = getattr(session, "close", None)
    if callable(closer):
        closer()
