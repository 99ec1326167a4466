import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything else (fixtures of module or session scope run before the per-test fixture below, and subprocesses
# inherit the environment): every cache and config location points into one session temp folder, so no test can
# write the user's ~/.cache/fd_eval, ~/.cache/huggingface or ~/.cache/torch.
_REAL_HOME_CACHE = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fd_eval").resolve()
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="fd_eval_tests_"))
for _var, _sub in {"FD_EVAL_CACHE": "cache", "FD_EVAL_CONFIG": "config", "HF_HOME": "hf", "TORCH_HOME": "torch",
                   "XDG_CACHE_HOME": "xdg_cache", "MPLCONFIGDIR": "matplotlib"}.items():
    os.environ[_var] = str(_SESSION_HOME / _sub)
os.environ["HF_HUB_OFFLINE"] = os.environ["FD_EVAL_OFFLINE"] = "1"
# The FD step's thread count follows the machine's load (fd_eval.util.threads), and a different count may change an FD's
# last bits; tests that compare two FDs exactly must not depend on the load between them (the rule has its own
# tests, which set this variable themselves).
os.environ["FD_EVAL_LINALG_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
_REPO = Path(__file__).resolve().parent.parent

# Tests compare against reference code on the CPU in float32; keep results independent of core count noise.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture()
def one_thread():
    """One intra-op thread for the test (torchrun ranks run with OMP_NUM_THREADS=1; small matrices on 2 busy
    cores, where thread hand-offs cost more than the arithmetic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- disk: a full run writes several GB of checkpoints and shards in all, so what a passing test wrote goes at once --
# (pyproject sets tmp_path_retention_policy = "failed" for tmp_path; the two fixtures below do the same for the
# per-test cache folders and for module fixtures' tmp_path_factory folders). FD_EVAL_TESTS_KEEP_TMP=1 keeps all.
_KEEP_TMP = os.environ.get("FD_EVAL_TESTS_KEEP_TMP") == "1"
_FAILED_IN: dict[str, bool] = {}
_FAILED_KEY = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        item.stash[_FAILED_KEY] = True
        module = getattr(item, "module", None)
        _FAILED_IN[module.__name__ if module is not None else ""] = True
    return report


@pytest.fixture(autouse=True, scope="module")
def _module_temp_cleanup(request, tmp_path_factory):
    """Remove the folders that this module's fixtures made with tmp_path_factory once the module is done, unless one
    of its tests failed (they are kept for a look then). No session-scoped fixture makes a folder (it would go with
    the first module that used it)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    name = request.module.__name__
    if _KEEP_TMP or _FAILED_IN.get(name):
        return
    for p in set(base.iterdir()) - before:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Every test gets its own cache/config dirs, and no network unless it turns offline mode off."""
    root = tmp_path_factory.mktemp("fd_eval_home")
    monkeypatch.setenv("FD_EVAL_CACHE", str(root / "cache"))
    monkeypatch.setenv("FD_EVAL_CONFIG", str(root / "config"))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FD_EVAL_OFFLINE", "1")
    yield root
    if not _KEEP_TMP and not request.node.stash.get(_FAILED_KEY, False):
        shutil.rmtree(root, ignore_errors=True)


# --- nothing outside the test folders may be written ----------------------------------------------------------------
def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files under ``root`` (empty when it does not exist)."""
    out = {}
    if root.is_dir():
        for p in root.rglob("*"):
            try:
                st = p.lstat()
            except OSError:
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


# Tracked files a test could produce (figures, notebooks, data); hand-edited sources (.py, .md, ...) are left out so
# that editing while the tests run is not reported.
_ARTIFACT_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg", ".pdf", ".ipynb", ".npz", ".npy", ".safetensors", ".json",
                      ".csv", ".tar", ".pt", ".pth"}


def _tracked_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=_REPO, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        return []  # not a git checkout (an sdist): nothing to compare
    return [_REPO / n for n in names if n and Path(n).suffix.lower() in _ARTIFACT_SUFFIXES]


def _written_by_others(root: Path, changed: list[str], mine: list[Path]) -> bool:
    """True when a changed hash record names a file outside this session's temp folders: another process (a test run
    in another checkout) is writing the real cache concurrently, so changes there cannot be attributed."""
    for k in changed:
        if k.startswith("sha256") and k.endswith(".json"):
            try:
                hashed = json.loads((root / k).read_text())["path"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not any(str(hashed).startswith(str(m) + os.sep) for m in mine):
                return True
    return False


def _stat_all(paths: list[Path]) -> dict[str, tuple[int, int]]:
    out = {}
    for p in paths:
        try:
            st = p.stat()
            out[str(p.relative_to(_REPO))] = (st.st_size, st.st_mtime_ns)
        except OSError:
            out[str(p.relative_to(_REPO))] = (-1, -1)
    return out


def _real_cache_guard(root: Path) -> None:
    """Fail at once when fd_eval resolves its cache to the user's real one (a test that cleared FD_EVAL_CACHE)."""
    import fd_eval.util.io_utils as io

    real = io.cache_root

    def cache_root() -> Path:
        got = real()
        if got.resolve() == root:
            _VIOLATIONS.append(f"fd_eval used the real cache {got} (FD_EVAL_CACHE was unset)")
            raise AssertionError(f"a test reached the user's real cache {got}; set FD_EVAL_CACHE (conftest does)")
        return got

    io.cache_root = cache_root


_VIOLATIONS: list[str] = []
_MINE: list[Path] = [_SESSION_HOME]


@pytest.fixture(autouse=True, scope="session")
def _session_temp_roots(tmp_path_factory):
    _MINE.append(tmp_path_factory.getbasetemp().resolve())
_BEFORE: dict[str, dict[str, tuple[int, int]]] = {}


def pytest_sessionstart(session):
    _real_cache_guard(_REAL_HOME_CACHE)
    _BEFORE["cache"] = _snapshot(_REAL_HOME_CACHE)
    _BEFORE["tracked"] = _stat_all(_tracked_files())


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when it wrote into ~/.cache/fd_eval or changed a tracked artifact file of the repository.

    The ~/.cache/fd_eval comparison becomes a note when another process demonstrably wrote there at the same time
    (a hash record of a file outside this session's temp folders) or FD_EVAL_TESTS_SHARED_HOME=1; the in-process
    guard (fd_eval resolving its cache to the real one) always fails.
    """
    problems = list(_VIOLATIONS)
    after = _snapshot(_REAL_HOME_CACHE)
    changed = sorted(k for k, v in after.items() if _BEFORE["cache"].get(k) != v)
    notes = []
    if changed:
        line = f"{len(changed)} entries of {_REAL_HOME_CACHE} were written during the run, e.g. {changed[:3]}"
        shared = (os.environ.get("FD_EVAL_TESTS_SHARED_HOME") == "1"
                  or _written_by_others(_REAL_HOME_CACHE, changed, _MINE))
        (notes if shared else problems).append(line + (" (by another process at the same time)" if shared else ""))
    touched = sorted(k for k, v in _stat_all([_REPO / k for k in _BEFORE["tracked"]]).items()
                     if _BEFORE["tracked"].get(k) != v)
    if touched:
        problems.append(f"tests changed tracked files: {touched[:10]}")
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and (notes or problems):
        reporter.ensure_newline()
    for line in notes + problems:
        if reporter is not None:
            reporter.write_line(f"{'ERROR' if line in problems else 'note'}: {line}", red=line in problems)
    if problems and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
