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


# --- the layer map of docs/development.md ------------------------------------------------------------------------
# Bottom up; a module imports only from its own layer or the ones below. errors/_version sit below every layer (every
# layer raises the error classes); api.py is an entry point beside metrics/ and index/ (the training index shares
# their layer: copies reads an index, an index build plans units like stats).
LAYERS = [("errors", "_version", "_compat"), ("util",), ("core",), ("sources",), ("extractors",), ("run",),
          ("outputs",), ("metrics", "index", "api"), ("cli", "__main__"), ("__init__",)]
# The deliberate exceptions docs/development.md names: a lazy import inside a function, each with why.
UPWARD_ALLOWED = {
    ("fd_eval.core.consumers", "fd_eval.run.distributed"),  # merge_over_ranks: the collectives live with the rank glue
}
MAX_FUNCTION_LINES = 100  # the rule: no function over ~100 lines, its signature and docstring included


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports(text: str, me: str, modules: set[str]) -> list[tuple[int, str]]:
    """(line, fd_eval module) for every import in the source ``text`` of module ``me``, at module level or inside a
    function: ``from X import Y`` counts as ``X.Y`` when that is a module (``from .. import errors``), else ``X``."""
    import ast

    package = me.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out += [(node.lineno, f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module)
                    for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m == "fd_eval" or m.startswith("fd_eval.")]


def _upward(text: str, me: str, modules: set[str]) -> list[str]:
    """The imports of module ``me`` (``fd_eval.x.y``; a package's ``__init__`` named ``fd_eval.x.__init__``) that
    go up the layers and are not a listed exception."""
    return [f"{line} {target}" for line, target in _imports(text, me, modules)
            if _layer(target) > _layer(me) and (me.removesuffix(".__init__"), target) not in UPWARD_ALLOWED]


def test_every_import_goes_down_the_layers():
    modules = {m.name for m in pkgutil.walk_packages(fd_eval.__path__, "fd_eval.")}
    upward = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if found := _upward(path.read_text(encoding="utf-8"), me, modules):
            upward[str(path.relative_to(PACKAGE.parent))] = found
    assert not upward, ("imports that go up the layers of docs/development.md (move the shared piece down, or "
                        f"register it from above): {upward}")


def test_the_layer_check_sees_lazy_and_package_imports():
    modules = {m.name for m in pkgutil.walk_packages(fd_eval.__path__, "fd_eval.")}
    probe = ("from .. import errors\nfrom ..util.io_utils import atomic_write\nimport fd_eval.outputs.stats\n"
             "def f():\n    from ..metrics import cmmd\n    from ..run.distributed import barrier\n")
    assert _imports(probe, "fd_eval.core.probe", modules) == [
        (1, "fd_eval.errors"), (2, "fd_eval.util.io_utils"), (3, "fd_eval.outputs.stats"), (5, "fd_eval.metrics.cmmd"),
        (6, "fd_eval.run.distributed")]
    assert _upward(probe, "fd_eval.core.probe", modules) == [
        "3 fd_eval.outputs.stats", "5 fd_eval.metrics.cmmd", "6 fd_eval.run.distributed"]
    assert _upward(probe, "fd_eval.cli.probe", modules) == []
    assert _upward("from .. import api\n", "fd_eval.outputs.__init__", modules) == ["1 fd_eval.api"]


def test_layer_map_is_the_documented_one():
    text = (PACKAGE.parent / "docs" / "development.md").read_text(encoding="utf-8")
    tree = text.split("```text", 1)[1].split("```", 1)[0]
    folders = [line.split()[0].rstrip("/") for line in tree.splitlines()
               if line.startswith("  ") and line.split()[0].endswith("/")]
    packages = [name for names in LAYERS for name in names if (PACKAGE / name).is_dir()]
    assert folders == packages
    assert sorted(folders) == sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())


def _long_functions() -> dict[str, int]:
    import ast

    out = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"] = n
    return out


def test_no_function_over_the_size_rule():
    assert not _long_functions()  # split a long one into named steps (find_copies, build_stats show how)
