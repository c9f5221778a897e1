"""The browser as a runtime: an ONNX artifact run by onnxruntime-web (WebAssembly) in headless Chromium.

A local HTTP server on 127.0.0.1 serves the artifact, the onnxruntime-web files and a small page
(`webpage/harness.html`); playwright drives Debian's Chromium (`/usr/bin/chromium`, no browser
download) to it. Inputs go to the page and outputs come back as raw bytes over that server, so what
Python compares is exactly what the WASM kernels computed.

onnxruntime-web comes from npm, installed once into a cache folder (offline afterwards):

    npm install --prefix ~/.cache/modelpress/web onnxruntime-web@1.30.0

(`install_onnxruntime_web()` runs that). The page loads one `.onnx` file: artifacts with external data
are refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from modelpress.errors import ExportError, RuntimeUnavailableError

log = logging.getLogger(__name__)

ORT_WEB_VERSION = "1.30.0"
CHROMIUM = Path("/usr/bin/chromium")
HARNESS = Path(__file__).parent / "webpage" / "harness.html"
_ENTRY = "ort.wasm.min.mjs"  # the WASM-only build: no WebGL/WebGPU code to load
_CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
# numpy dtype name -> onnxruntime-web tensor type (bool travels as one byte per value)
_ORT_TYPES = {
    "float32": "float32",
    "float64": "float64",
    "int8": "int8",
    "uint8": "uint8",
    "int16": "int16",
    "uint16": "uint16",
    "int32": "int32",
    "uint32": "uint32",
    "int64": "int64",
    "uint64": "uint64",
    "bool": "bool",
}
_CONTENT_TYPES = {
    ".mjs": "text/javascript",
    ".js": "text/javascript",
    ".wasm": "application/wasm",
    ".html": "text/html; charset=utf-8",
    ".onnx": "application/octet-stream",
}


def default_web_dir() -> Path:
    """Where onnxruntime-web is installed by default: `~/.cache/modelpress/web`."""
    return Path.home() / ".cache" / "modelpress" / "web"


def install_command(web_dir: str | os.PathLike[str] | None = None) -> str:
    """The npm command that installs the onnxruntime-web this module uses into `web_dir`."""
    root = Path(web_dir) if web_dir is not None else default_web_dir()
    shown = str(root).replace(str(Path.home()), "~", 1) if web_dir is None else str(root)
    return f"npm install --prefix {shown} onnxruntime-web@{ORT_WEB_VERSION}"


def find_onnxruntime_web(web_dir: str | os.PathLike[str] | None = None) -> Path:
    """The `dist` folder of the onnxruntime-web installed in `web_dir`, or an error naming the command that
    installs it.

    >>> find_onnxruntime_web()  # doctest: +SKIP
    PosixPath('/root/.cache/modelpress/web/node_modules/onnxruntime-web/dist')
    """
    root = Path(web_dir) if web_dir is not None else default_web_dir()
    package = root / "node_modules" / "onnxruntime-web"
    dist = package / "dist"
    if not (dist / _ENTRY).is_file() or not any(dist.glob("ort-wasm*.wasm")):
        raise RuntimeUnavailableError(
            f"onnxruntime-web is not installed in {root}. Install it once (it is then used offline) with "
            f"`{install_command(web_dir)}`, or call modelpress.deploy.web.install_onnxruntime_web(); npm comes "
            "with Node.js (`apt-get install -y npm` on Debian)."
        )
    try:
        version = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        version = "unknown"
    if version != ORT_WEB_VERSION:
        log.warning("onnxruntime-web %s in %s (modelpress is tested with %s)", version, root, ORT_WEB_VERSION)
    return dist


def install_onnxruntime_web(web_dir: str | os.PathLike[str] | None = None) -> Path:
    """Install onnxruntime-web with npm into `web_dir` (default `~/.cache/modelpress/web`); returns its
    `dist` folder. Needs the npm registry once; every later run is offline."""
    root = Path(web_dir) if web_dir is not None else default_web_dir()
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeUnavailableError(
            "npm is not installed: install Node.js's npm (`apt-get install -y npm` on Debian), then run "
            f"`{install_command(web_dir)}`."
        )
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            npm,
            "install",
            "--no-audit",
            "--no-fund",
            "--prefix",
            str(root),
            f"onnxruntime-web@{ORT_WEB_VERSION}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeUnavailableError(
            f"`{install_command(web_dir)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}"
        )
    return find_onnxruntime_web(root)


def find_chromium(path: str | os.PathLike[str] | None = None) -> Path:
    """Chromium's executable (Debian's `/usr/bin/chromium` by default), or an error saying how to install it."""
    candidates = [Path(path)] if path is not None else [CHROMIUM]
    if path is None:
        candidates += [Path(p) for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeUnavailableError(
        f"Chromium is not installed ({candidates[0]} is missing); the browser runtime drives it headless. "
        "Install it with `apt-get install -y chromium` (Debian)."
    )


def _sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "The browser runtime needs the playwright package (it drives the system Chromium; no browser "
            "download): `pip install playwright`."
        ) from exc
    return sync_playwright


def check_single_file(path: str | os.PathLike[str]) -> Any:
    """The ONNX graph of `path` (weights not loaded), or an error when the file keeps tensors in external
    data files, which onnxruntime-web's page cannot open beside it."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ExportError(f"Artifact '{p}' does not exist. Export it first (`modelpress export`).")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"'{p}' is not a readable ONNX file ({type(exc).__name__}).") from exc
    external = [t.name for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        files = sorted(
            {e.value for t in _all_tensors(model.graph) for e in t.external_data if e.key == "location"}
        )
        raise ExportError(
            f"'{p.name}' keeps {len(external)} tensor(s) in external data ({', '.join(files)}); onnxruntime-web "
            "loads a single .onnx file. Save it with the weights inside (onnx.save(onnx.load(path), path, "
            "save_as_external_data=False); files over 2 GB cannot be, and do not fit the browser's memory)."
        )
    return model


def _all_tensors(graph: Any) -> list[Any]:
    tensors = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
            if attr.HasField("g"):
                tensors += _all_tensors(attr.g)
            for sub in attr.graphs:
                tensors += _all_tensors(sub)
    return tensors


class _State:
    """What the local server hands out and receives."""

    def __init__(self, model: Path, dist: Path) -> None:
        self.model = model
        self.dist = dist
        self.inputs: list[bytes] = []
        self.outputs: dict[int, bytes] = {}
        self.lock = threading.Lock()


def _handler(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("web server: " + format, *args)

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            # Cross-origin isolation: SharedArrayBuffer, which multi-threaded WASM needs.
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            route = self.path.split("?", 1)[0]
            if route in ("/", "/index.html"):
                self._send(200, HARNESS.read_bytes(), _CONTENT_TYPES[".html"])
            elif route == "/favicon.ico":  # asked for by every page: answered, so no 404 lands in the errors
                self._send(200, b"", "image/x-icon")
            elif route == "/model.onnx":
                self._send(200, state.model.read_bytes(), _CONTENT_TYPES[".onnx"])
            elif route.startswith("/in/") and route[4:].isdigit() and int(route[4:]) < len(state.inputs):
                self._send(200, state.inputs[int(route[4:])], "application/octet-stream")
            elif route.startswith("/ort/"):
                name = route[5:]
                file = state.dist / name
                if "/" in name or name.startswith(".") or not file.is_file():
                    self._send(404, b"not found", "text/plain")
                else:
                    self._send(
                        200, file.read_bytes(), _CONTENT_TYPES.get(file.suffix, "application/octet-stream")
                    )
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self) -> None:
            route = self.path
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if route.startswith("/out/") and route[5:].isdigit():
                with state.lock:
                    state.outputs[int(route[5:])] = body
                self._send(200, b"ok", "text/plain")
            else:
                self._send(404, b"not found", "text/plain")

    return Handler


@dataclass
class BrowserRun:
    """Outputs of one run in the browser, and the latency of the same run repeated in the page."""

    outputs: list[np.ndarray]
    latency_ms: float | None  # median of `times_ms`; None when no timed runs were asked for
    times_ms: list[float] = field(default_factory=list)
    version: str = ""  # onnxruntime-web's
    threads: int = 1


class WebSession:
    """onnxruntime-web (WASM backend) in headless Chromium, behind the `Session` protocol of
    `deploy.runtime`, so `check_parity` compares it with the torch model like any other runtime.

    The browser stays open (and the model loaded) until `close()`; use it as a context manager.

    >>> with WebSession("model.onnx") as session:  # doctest: +SKIP
    ...     logits = session.run([x])[0]
    """

    runtime = "onnxruntime-web"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        threads: int = 1,
        web_dir: str | os.PathLike[str] | None = None,
        chromium: str | os.PathLike[str] | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        model = check_single_file(path)
        if threads < 1:
            raise RuntimeUnavailableError(f"threads={threads} must be at least 1.")
        dist = find_onnxruntime_web(web_dir)
        executable = find_chromium(chromium)
        sync_playwright = _sync_playwright()
        initializers = {i.name for i in model.graph.initializer}
        graph_inputs = [v for v in model.graph.input if v.name not in initializers]
        self.input_names = [v.name for v in graph_inputs]
        self.input_shapes: list[tuple[int | None, ...]] = [
            tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
            for v in graph_inputs
        ]
        self.output_names = [v.name for v in model.graph.output]
        self.threads = threads
        self._timeout_ms = timeout_s * 1000
        self._state = _State(Path(path), dist)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self._state))
        self._thread = threading.Thread(target=self._server.serve_forever, name="modelpress-web", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._playwright: Any = None
        self._browser: Any = None
        self._errors: list[str] = []
        try:
            try:
                self._playwright = sync_playwright().start()
                self._browser = self._playwright.chromium.launch(
                    executable_path=str(executable), args=list(_CHROMIUM_ARGS), timeout=self._timeout_ms
                )
            except Exception as exc:  # playwright's own errors: no browser, or called inside an asyncio loop
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
                raise RuntimeUnavailableError(
                    f"Chromium ({executable}) did not start under playwright: {first}. The browser runtime "
                    "uses playwright's sync API: call it outside a running asyncio loop (in a notebook, from a "
                    "thread)."
                ) from exc
            self._page = self._browser.new_page()
            self._page.set_default_timeout(self._timeout_ms)
            self._page.on("pageerror", lambda e: self._errors.append(str(e)))
            self._page.on("console", lambda m: self._errors.append(m.text) if m.type == "error" else None)
            self._page.goto(self.url)
            self._page.wait_for_function("window.modelpressReady === true")
            failed = self._page.evaluate("window.modelpressError")
            if failed:
                raise RuntimeUnavailableError(
                    f"onnxruntime-web did not load in Chromium from {dist}: {failed}"
                )
            self.version = str(self._page.evaluate("window.modelpress.version"))
            self._call("load", "([t]) => window.modelpress.load(t)", [threads])
        except BaseException:
            self.close()
            raise

    def _call(self, what: str, script: str, args: list[Any]) -> Any:
        from playwright.sync_api import Error as PlaywrightError

        try:
            return self._page.evaluate(script, args)
        except PlaywrightError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            seen = f" (page errors: {'; '.join(self._errors[-3:])})" if self._errors else ""
            raise ExportError(
                f"onnxruntime-web {self.version or ORT_WEB_VERSION} failed to {what} '{self._state.model.name}' "
                f"in Chromium: {first}{seen}. Check that the model runs in ONNX Runtime (Python) and uses "
                "only standard ONNX ops or contrib ops onnxruntime-web's WASM build has."
            ) from exc

    def _execute(
        self, inputs: Sequence[np.ndarray], runs: int, warmup: int
    ) -> tuple[list[np.ndarray], list[float]]:
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"The artifact takes {len(self.input_names)} inputs ({self.input_names}); got {len(inputs)}."
            )
        specs = []
        payload = []
        for i, (name, x) in enumerate(zip(self.input_names, inputs, strict=True)):
            array = np.ascontiguousarray(x)
            kind = _ORT_TYPES.get(array.dtype.name)
            if kind is None:
                raise ValueError(f"input '{name}': dtype {array.dtype} has no onnxruntime-web tensor type")
            payload.append((array.astype(np.uint8) if kind == "bool" else array).tobytes())
            specs.append({"index": i, "name": name, "dtype": kind, "shape": list(array.shape)})
        with self._state.lock:
            self._state.inputs = payload
            self._state.outputs = {}
        result = self._call(
            "run", "([s, r, w]) => window.modelpress.run(s, r, w)", [specs, int(runs), int(warmup)]
        )
        outputs = []
        with self._state.lock:
            received = dict(self._state.outputs)
        for k, meta in enumerate(result["outputs"]):
            kind = meta["dtype"]
            dtype = np.dtype("uint8" if kind == "bool" else kind)
            array = np.frombuffer(received[k], dtype=dtype).reshape(meta["shape"]).copy()
            outputs.append(array.astype(bool) if kind == "bool" else array)
        return outputs, [float(t) for t in result["times"]]

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self._execute(inputs, 0, 0)[0]

    def timed_run(self, inputs: Sequence[np.ndarray], *, runs: int = 10, warmup: int = 2) -> BrowserRun:
        """Outputs of one run plus `runs` more timed in the page (`performance.now()`, after `warmup`)."""
        outputs, times = self._execute(inputs, runs, warmup)
        latency = statistics.median(times) if times else None
        return BrowserRun(outputs, latency, times, self.version, self.threads)

    def close(self) -> None:
        if self._browser is not None:
            try:
                self._browser.close()
            except Exception:  # already gone: nothing to release
                log.debug("closing Chromium failed", exc_info=True)
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None  # type: ignore[assignment]

    def __enter__(self) -> WebSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_in_browser(
    path: str | os.PathLike[str],
    inputs: Sequence[np.ndarray],
    *,
    latency_runs: int = 10,
    threads: int = 1,
    web_dir: str | os.PathLike[str] | None = None,
) -> BrowserRun:
    """Run an ONNX file once in onnxruntime-web (WASM) inside headless Chromium and return its outputs,
    with the median latency of `latency_runs` more runs timed in the page.

    >>> result = run_in_browser("model.onnx", [x])  # doctest: +SKIP
    >>> result.outputs[0].shape, result.latency_ms
    ((1, 10), 0.9)
    """
    with WebSession(path, threads=threads, web_dir=web_dir) as session:
        return session.timed_run(inputs, runs=latency_runs)
