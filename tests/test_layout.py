"""The package layout: every old (flat) module path still imports as THE module of the new layout, the
documented import paths work, and no module grows past the size rule."""
from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fd_eval
from fd_eval._compat import MOVED

PACKAGE = Path(fd_eval.__file__).parent
MAX_LINES = 650  # the rule is ~600; a module past 650 must be split along a seam


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_path_is_the_same_module(old):
    module = importlib.import_module(f"fd_eval.{old}")
    new = importlib.import_module(f"fd_eval.{MOVED[old]}")
    assert module is new
    assert sys.modules[f"fd_eval.{old}"] is new
    # the module keeps its real identity (relative imports inside functions, pickling, reload resolve by it)
    assert module.__name__ == f"fd_eval.{MOVED[old]}" and module.__spec__.name == module.__name__


def test_compat_map_points_at_real_modules():
    modules = {m.name for m in pkgutil.walk_packages(fd_eval.__path__, "fd_eval.")}
    assert {f"fd_eval.{new}" for new in MOVED.values()} <= modules
    # no stub files left at the top level for the moved modules
    assert not [old for old in MOVED if (PACKAGE / f"{old}.py").exists()]


def test_monkeypatch_through_either_name_hits_the_same_code(monkeypatch):
    import fd_eval.core.frechet as new
    import fd_eval.frechet as old
    monkeypatch.setattr("fd_eval.frechet.frechet_distance", lambda *a, **k: 123.0)
    assert new.frechet_distance() == 123.0 and old.frechet_distance is new.frechet_distance


def test_public_functions_named_like_old_modules_survive():
    import fd_eval.ceiling  # noqa: F401  (the old module path of fd_eval.metrics.ceiling)
    import fd_eval.cmmd  # noqa: F401
    from fd_eval.metrics.ceiling import ceiling
    from fd_eval.metrics.cmmd import cmmd
    assert fd_eval.ceiling is ceiling and fd_eval.cmmd is cmmd  # still the documented functions


def test_documented_import_paths():
    from fd_eval.build import build_stats
    from fd_eval.references import fetch_reference, load_reference
    from fd_eval.report import ReportDependencyError, build_report, write_report
    from fd_eval.stats import Stats, load_stats, save_stats
    assert build_stats is fd_eval.build_stats and Stats is fd_eval.Stats
    assert load_stats is fd_eval.load_stats and save_stats is fd_eval.save_stats
    assert fetch_reference is fd_eval.fetch_reference and load_reference is fd_eval.load_reference
    assert callable(build_report) and callable(write_report) and issubclass(ReportDependencyError, fd_eval.FDEvalError)


def test_old_paths_in_a_fresh_interpreter():
    # `import fd_eval.X` as the first fd_eval import of a process (the finder is installed by fd_eval/__init__)
    code = ("import fd_eval.moments as m, fd_eval.core.moments as n, fd_eval.build as b; "
            "from fd_eval.pipeline import run_units; import fd_eval.run.pipeline as p; "
            "assert m is n and b.__name__ == 'fd_eval.metrics.build' and run_units is p.run_units")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packages_listed_for_the_wheel():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {"fd_eval"} | {m.name for m in pkgutil.walk_packages(fd_eval.__path__, "fd_eval.") if m.ispkg}
    assert packages <= listed, f"add {sorted(packages - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_no_module_over_the_size_rule():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text(encoding="utf-8").splitlines())
             for p in PACKAGE.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > MAX_LINES}


def test_package_code_imports_the_real_paths():
    # The old paths are for users' code; fd_eval's own modules (a merge from an older branch included) import
    # the new ones, so that the layer map says what really depends on what.
    import ast
    old = {f"fd_eval.{m}" for m in MOVED}
    found = []
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found += [f"{path.name}:{node.lineno} {t}" for t in targets
                      if any(t == o or t.startswith(o + ".") for o in old)]
    assert not found
