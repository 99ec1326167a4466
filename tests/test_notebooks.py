"""The notebooks in notebooks/ execute from scratch (nbclient, this venv's python as the kernel), write their
plots, and print numbers that pass sanity checks.

A notebook saves its plot into its working directory (next to itself when a user runs it in Jupyter). Here the
kernel's working directory is the test's tmp_path, so the plots and the executed copies land there and no
tracked file is written: the committed notebooks (output-free) and their committed plots stay untouched."""
import hashlib
import json
import math
from pathlib import Path

import nbclient  # test dependencies (pyproject [test]): a missing one fails, never skips
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def _digests() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(NOTEBOOKS.iterdir()) if p.is_file()}


def _execute(name: str, tmp_path: Path, monkeypatch) -> dict:
    """Run notebooks/{name}.ipynb with tmp_path as the working directory; return the summary cell's JSON."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' own tempfile.mkdtemp() work dirs go there too
    src = NOTEBOOKS / f"{name}.ipynb"
    before = _digests()
    nb = nbformat.read(src, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{src} is stored with outputs"
    # The kernel inherits this process's environment: conftest's private FD_EVAL_CACHE/CONFIG, offline mode.
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")  # for inspection when a check fails
    assert _digests() == before  # nothing under notebooks/ was written (notebooks, committed plots)
    summary = [c for c in nb.cells if "summary" in c.get("metadata", {}).get("tags", [])]
    assert len(summary) == 1
    text = "".join(o.get("text", "") for o in summary[0].outputs if o.output_type == "stream")
    return json.loads(text)


def _png_written(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"  # tmp_path is fresh: only this run can have written it
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.slow
def test_quickstart(tmp_path, monkeypatch):
    s = _execute("quickstart", tmp_path, monkeypatch)
    _png_written(tmp_path / "quickstart.png")
    # the CLI and the Python API give the same FD, and its terms add up
    assert s["fd_api"] == pytest.approx(s["fd_cli"], rel=1e-9)
    assert s["fd_cli"] == pytest.approx(s["fd_mean"] + s["fd_cov"], rel=1e-12)
    assert (s["n"], s["n_ref"], s["ceiling_n"]) == (16, 32, 16)
    # the bootstrap interval brackets FD; the Python analysis equals the CLI's (same rows, same seed)
    assert s["ci_low"] < s["fd_cli"] < s["ci_high"]
    assert (s["ci_low_api"], s["ci_high_api"]) == pytest.approx((s["ci_low"], s["ci_high"]), rel=1e-9)
    assert s["prdc_api"] == s["prdc"] and all(0 <= v <= 1 for k, v in s["prdc"].items() if k != "density")
    # held-out real images score better than the washed-out, blurred "generator"
    assert 0 < s["ceiling_fd"] < s["fd_cli"]


@pytest.mark.slow
def test_trustworthy(tmp_path, monkeypatch):
    s = _execute("trustworthy", tmp_path, monkeypatch)
    _png_written(tmp_path / "trustworthy.png")
    gen, real = s["fd_mean_generated"], s["fd_mean_real"]
    assert s["ns"] == [20, 24, 32, 40, 56, 80]
    # the floor lies below the generated curve at every N, and both fall with N (finite-sample bias)
    assert all(r < g for r, g in zip(real, gen))
    assert gen[0] > gen[-1] and real[0] > real[-1]
    # FD-infinity: positive bias, a line that fits, the real images closer to the reference
    assert s["slope_generated"] > 0 and s["fd_inf_generated"] < s["fd_full_generated"]
    assert s["r2_generated"] > 0.8 and s["r2_real"] > 0.8
    assert s["fd_inf_real"] < s["fd_inf_generated"] / 2
    # bootstrap intervals contain the FD and separate the generator from real data
    for b in s["boot"].values():
        assert b["low"] < b["fd"] < b["high"] and b["n_boot"] == 40
    assert s["boot"]["held-out real"]["high"] < s["boot"]["generated"]["low"]
    assert s["boot_inf"]["high"] < s["boot"]["generated"]["high"]  # bias-corrected: shifted down
    assert math.isclose(s["gpic_floor_50k"], 7.44)
