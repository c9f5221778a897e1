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


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (AVX512-VNNI, AVX-VNNI or AMX).

    Without them ONNX Runtime's u8 x s8 kernels (AVX2 `vpmaddubsw`) add pairs of products in int16 and
    saturate when activations and weights both use their full 8-bit range, so quantized weights should
    then use 7 bits (`reduce_range`). Unknown platforms count as having VNNI.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return True


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
        "cpu_vnni": cpu_has_vnni(),
        "versions": {p: v for p in packages if (v := _version(p)) is not None},
    }
