"""Writing files safely: the user's files are never modified or left half-written."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from modelpress.errors import ExportError


def check_output_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Resolve an output path; refuse an existing one unless `overwrite`, and a missing parent folder."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ExportError(
            f"Output path '{out}' already exists. Choose another path, delete it, "
            "or pass overwrite=True (--overwrite on the command line)."
        )
    if out.exists() and out.is_dir():
        raise ExportError(f"Output path '{out}' is a directory; give a file path instead.")
    if not out.parent.exists():
        raise ExportError(
            f"The folder '{out.parent}' for output '{out.name}' does not exist; create it first."
        )
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the same folder; rename it onto `path` only if the block succeeds.

    >>> with atomic_path("out.json", overwrite=True) as tmp:
    ...     _ = tmp.write_text("{}")
    """
    out = check_output_path(path, overwrite=overwrite)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        make_public(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_public(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (mode 0600/0700) the permissions a plain open() would."""
    mode = 0o777 if path.is_dir() else 0o666
    os.chmod(path, mode & ~_umask())


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of an artifact, its external-data files included."""
    p = Path(path)
    total = p.stat().st_size
    if p.suffix == ".onnx":
        import onnx

        model = onnx.load(str(p), load_external_data=False)
        locations = set()
        for init in model.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
        total += sum((p.parent / loc).stat().st_size for loc in locations)
    elif p.suffix == ".xml":  # OpenVINO IR keeps its weights in a .bin beside the .xml
        bin_path = p.with_suffix(".bin")
        if bin_path.exists():
            total += bin_path.stat().st_size
    return total
