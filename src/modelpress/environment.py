"""What the numbers were measured on: package versions and the CPU."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions and CPU facts recorded beside every figure."""
    packages = [
        "modelpress",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "openvino",
        "transformers",
        "numpy",
    ]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": {p: v for p in packages if (v := _version(p)) is not None},
    }
