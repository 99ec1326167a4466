"""Old module paths of the flat layout (``fd_eval.moments``, ``fd_eval.build``, ...) kept importable.

The package is laid out by layer (``util``, ``core``, ``sources``, ``extractors``, ``run``, ``outputs``,
``metrics``, ``index``, ``cli``; see docs/development.md). Code written against the flat layout keeps working:
``import fd_eval.moments`` and ``from fd_eval.build import build_stats`` return THE module
``fd_eval.core.moments`` / ``fd_eval.metrics.build`` itself (not a copy, not a stub file), so monkeypatching an
attribute through either name changes the code that runs. A meta-path finder answers for the old names only;
every other import goes through the normal machinery untouched.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

#: old module (relative to ``fd_eval``) -> where it lives now
MOVED: dict[str, str] = {
    "io_utils": "util.io_utils", "download": "util.download", "threads": "util.threads",
    "frechet": "core.frechet", "moments": "core.moments", "splitmm": "core.splitmm",
    "uncertainty": "core.uncertainty", "feature_metrics": "core.feature_metrics", "consumers": "core.consumers",
    "topk": "core.topk",
    "loader": "sources.loader", "gpu_decode": "sources.gpu_decode",
    "preprocess": "extractors.preprocess", "precision": "extractors.precision", "pil_resize": "extractors.pil_resize",
    "options": "run.options", "distributed": "run.distributed", "pipeline": "run.pipeline", "engine": "run.engine",
    "preflight": "run.preflight", "provenance": "run.provenance",
    "stats": "outputs.stats", "references": "outputs.references", "report": "outputs.report",
    "contact_sheet": "outputs.contact_sheet", "prompts": "outputs.prompts",
    "build": "metrics.build", "metric": "metrics.metric", "cmmd": "metrics.cmmd", "clipscore": "metrics.clipscore",
    "ceiling": "metrics.ceiling", "copies": "metrics.copies", "copies_result": "metrics.copies_result",
    "copy_metrics": "metrics.copy_metrics", "analysis": "metrics.analysis",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # The real module, imported under its own name; the import system then binds it to the old name too
        # (sys.modules and the parent package's attribute).
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its real name. The import system stamped the alias's spec on it: put the real
        # one back, so that relative imports inside its functions and importlib.reload keep resolving by
        # the module's own place.
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        head, _, tail = fullname.partition(".")
        new = MOVED.get(tail) if head == "fd_eval" else None
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"fd_eval.{new}"))


def install() -> None:
    """Register the finder once (idempotent: re-importing fd_eval does not stack finders)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


install()  # on import: fd_eval/__init__.py imports this module first, before any other submodule


def bind_loaded(package: ModuleType) -> None:
    """Give ``package`` (fd_eval) its old attributes for the moved modules already imported, as the flat layout
    had them after ``import fd_eval`` (``fd_eval.stats.load_stats(...)`` without importing ``fd_eval.stats``)."""
    for old, new in MOVED.items():
        module = sys.modules.get(f"{package.__name__}.{new}")
        if module is None:
            continue
        # In sys.modules under the old name too, so `import fd_eval.cmmd` finds it there and the import system
        # does not rebind the package attribute: fd_eval.cmmd and fd_eval.ceiling stay the public functions.
        sys.modules.setdefault(f"{package.__name__}.{old}", module)
        if not hasattr(package, old):
            setattr(package, old, module)
