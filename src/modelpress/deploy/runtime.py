"""Runtime sessions behind one small interface: `run(list of numpy arrays) -> list of numpy arrays`."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from modelpress.deploy.qdq import placement_warning
from modelpress.errors import ExportError, RuntimeUnavailableError

log = logging.getLogger(__name__)

RuntimeName = Literal["onnxruntime", "openvino"]
RUNTIMES: tuple[RuntimeName, ...] = ("onnxruntime", "openvino")


class Session(Protocol):
    runtime: str
    input_names: list[str]
    output_names: list[str]
    input_shapes: list[tuple[int | None, ...]]  # None where a dim is dynamic

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]: ...


def available_runtimes() -> list[RuntimeName]:
    """The runtimes importable in this environment."""
    return [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]


def read_onnx(path: str | os.PathLike[str]) -> Any:
    """The ONNX graph (without external weights), or a clear error for a file that is not ONNX."""
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(
            f"'{path}' is not a readable ONNX file ({type(exc).__name__}). Give a .onnx written by "
            "`modelpress export` or `modelpress compress`."
        ) from exc


class OrtSession:
    """ONNX Runtime on the CPU with a fixed thread count and no idle spinning (it skews interleaved timing);
    nothing else differs from a default `InferenceSession`, so what it measures is what a user gets.

    Weight-only artifacts need no session setting: their weights are written as `Cast -> Sub -> Mul` on
    int8 initializers (`ops.quant.decompress_per_channel`), which a default session folds once at load.
    """

    runtime = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], *, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.input_shapes = [
            tuple(d if isinstance(d, int) else None for d in i.shape) for i in self._session.get_inputs()
        ]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(self.input_names, inputs, strict=True))
        return list(self._session.run(None, feed))


class OpenVinoSession:
    """OpenVINO on the CPU, latency hint, fixed threads, executing the graph as written.

    OpenVINO would otherwise run bf16 on CPUs that have it and quantize activations of int8-weight layers
    on the fly, both of which change the numbers a parity check sees.

    A model with dynamic input dimensions (the exported batch axis) runs as compiled, dynamic; once the
    same input shapes come a second time (a serving or benchmark loop), it is also compiled for them, as
    OpenVINO's own tools do with `-shape`: the CPU plugin's static-shape kernels skip per-call shape
    inference and memory checks (MNIST int8 CNN here: 20% faster at batch 1, 6% at batch 64). The last
    `STATIC_SHAPES` such shapes stay compiled; a model that cannot be reshaped keeps running dynamic.
    """

    runtime = "openvino"
    STATIC_SHAPES = 2

    def __init__(self, path: str | os.PathLike[str], *, threads: int, precision: str = "f32") -> None:
        import openvino as ov

        self._core = ov.Core()
        self._config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": precision,
            # OpenVINO's CPU plugin would otherwise quantize activations of every layer with compressed
            # weights on the fly (groups of 32): a weight-only artifact would silently run as dynamic W8A8.
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
        }
        self._model = self._core.read_model(str(path))
        self._dynamic = any(port.get_partial_shape().is_dynamic for port in self._model.inputs)
        self._requests: dict[tuple[tuple[int, ...], ...], Any] = {}  # by input shapes, oldest first
        self._request = self._compile(self._model)  # the model as read (dynamic shapes: any input)
        self._seen: set[tuple[tuple[int, ...], ...]] = set()  # shapes run once, dynamic
        self.input_names = [port.get_any_name() for port in self._model.inputs]
        self.input_shapes = [
            tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            for port in self._model.inputs
        ]
        self.output_names = [port.get_any_name() for port in self._model.outputs]
        self._dtypes = [_numpy_dtype(port) for port in self._model.inputs]

    def _compile(self, model: Any) -> Any:
        return self._core.compile_model(model, "CPU", self._config).create_infer_request()

    def _request_for(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        if not self._dynamic:
            return self._request
        request = self._requests.get(shapes)
        if request is None:
            if shapes not in self._seen:
                if len(self._seen) > 256:  # an evaluation over many shapes: stay dynamic, bounded
                    self._seen.clear()
                self._seen.add(shapes)
                return self._request
            model = self._model.clone()
            try:
                model.reshape({port: list(shape) for port, shape in zip(model.inputs, shapes, strict=True)})
                request = self._compile(model)
            except Exception:  # shape-dependent ops that cannot be made static: run the dynamic model
                request = self._request
            if len(self._requests) >= self.STATIC_SHAPES:
                self._requests.pop(next(iter(self._requests)))
            self._requests[shapes] = request
        return request

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        # The zero-copy path: each input is wrapped in a tensor that shares the array's memory, and the
        # outputs are copied out of the request's buffers (the next call overwrites them). The convenience
        # call `infer(list)` copies every input through Python-side dispatch, which cost 0.1-0.3 ms per
        # call here: more than a small int8 CNN takes to run at batch 1.
        import openvino as ov

        if len(inputs) != len(self._dtypes):
            raise ValueError(
                f"The artifact takes {len(self._dtypes)} inputs ({self.input_names}); got {len(inputs)}."
            )
        arrays = [np.ascontiguousarray(x, dtype=dtype) for x, dtype in zip(inputs, self._dtypes, strict=True)]
        request = self._request_for(tuple(a.shape for a in arrays))
        for i, x in enumerate(arrays):
            request.set_input_tensor(i, ov.Tensor(x, shared_memory=True))
        request.infer()
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.output_names))]


def _numpy_dtype(port: Any) -> np.dtype | None:
    """The numpy type of an OpenVINO input port (None where the port's type is dynamic)."""
    try:
        return np.dtype(port.get_element_type().to_dtype())
    except Exception:  # a dynamic element type: take the array as it comes
        return None


def open_session(path: str | os.PathLike[str], runtime: str = "onnxruntime", *, threads: int = 2) -> Session:
    """Load an exported artifact in a runtime.

    >>> session = open_session("model.onnx", "openvino", threads=2)  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"Artifact '{p}' does not exist. Export it first (`modelpress export`).")
    if runtime not in RUNTIMES:
        raise RuntimeUnavailableError(f"Unknown runtime '{runtime}'. Choose from {', '.join(RUNTIMES)}.")
    if importlib.util.find_spec(runtime) is None:
        raise RuntimeUnavailableError(
            f"Runtime '{runtime}' is not installed. Install it with `pip install modelpress[{runtime}]`."
        )
    if threads < 1:
        raise RuntimeUnavailableError(f"threads={threads} must be at least 1.")
    if not (runtime == "openvino" and p.suffix == ".xml"):  # OpenVINO also runs its own IR (.xml + .bin)
        # a corrupt or non-ONNX file gets a clear message, not a runtime's parser traceback
        mismatch = placement_warning(read_onnx(p), runtime)
        if mismatch:
            log.warning("'%s': %s", p.name, mismatch)
    if runtime == "onnxruntime":
        return OrtSession(p, threads=threads)
    return OpenVinoSession(p, threads=threads)
