"""The errors modelpress raises for input a user can fix.

Every message names what is wrong (the file, layer, field or value) and how to fix it. The CLI turns
any `ModelpressError` into that message and exit code 2, never a traceback.
"""

from __future__ import annotations


class ModelpressError(Exception):
    """Base class: a problem the user can act on."""


class ModelLoadError(ModelpressError):
    """The model reference, factory, checkpoint or example inputs are unusable."""


class RecipeError(ModelpressError):
    """A recipe or technique config is malformed (unknown type, wrong field, bad value)."""


class DataError(ModelpressError):
    """Calibration or evaluation data is missing or does not fit the model."""


class ExportError(ModelpressError):
    """The model could not be exported, or an output path is unusable."""


class ParityError(ModelpressError):
    """The exported artifact disagrees with the model it came from."""


class RuntimeUnavailableError(ModelpressError):
    """A requested runtime (for example OpenVINO) is not installed."""


class GraphError(ModelpressError):
    """The model cannot be traced into a graph, or the graph cannot be rewritten as asked."""
