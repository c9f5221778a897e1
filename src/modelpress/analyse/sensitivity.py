"""Moved to `modelpress.optimize.sensitivity` (the optimize layer sits above the techniques it measures);
this module keeps the old import path working."""

from modelpress.optimize.sensitivity import *  # noqa: F403
from modelpress.optimize.sensitivity import __all__ as __all__
