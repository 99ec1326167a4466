"""The ``fd-eval`` command line: a thin layer over the Python API (one module per command group)."""
from ._common import main
from . import stats_cmds  # noqa: F401  (registers `fd` and `info`)

__all__ = ["main"]
