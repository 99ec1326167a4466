"""The ``fd-eval`` command line: a thin layer over the Python API (one module per command group)."""
from ._common import main
from . import stats_cmds  # noqa: F401  (registers `fd` and `info`)
from . import ref_cmds  # noqa: F401  (registers `ref list|download|add|remove|info`)
from . import compute_cmds  # noqa: F401  (registers `compute`, `stats`, `models`)
from . import analysis_cmds  # noqa: F401  (registers `ceiling`; `compute`'s analysis options)
from . import prompts_cmds  # noqa: F401  (registers `prompts`)
from . import report_cmds  # noqa: F401  (registers `report`)
from . import copies_cmds  # noqa: F401  (registers `copies`)

__all__ = ["main"]
