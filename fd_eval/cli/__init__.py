"""The ``fd-eval`` command line: a thin layer over the Python API (one module per command group)."""
from . import (
    analysis_cmds,  # noqa: F401  (registers `ceiling`; `compute`'s analysis options)
    clipscore_cmds,  # noqa: F401  (registers `clipscore`)
    compute_cmds,  # noqa: F401  (registers `compute`, `stats`, `models`)
    copies_cmds,  # noqa: F401  (registers `copies`)
    index_cmds,  # noqa: F401  (registers `index build|info`)
    prompts_cmds,  # noqa: F401  (registers `prompts`)
    ref_cmds,  # noqa: F401  (registers `ref list|download|add|remove|info`)
    report_cmds,  # noqa: F401  (registers `report`)
    stats_cmds,  # noqa: F401  (registers `fd` and `info`)
)
from ._common import main

__all__ = ["main"]
