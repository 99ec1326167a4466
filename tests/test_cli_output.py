"""What a user reads in the terminal: the honest floors in `compute` (published floor with its relation, the
independent-sample estimate, the N-shift warning), `--format markdown|csv`, `--report`, and the other commands'
wording. The numbers come from the registry's fitted floor model (docs/floors.md), checked against closed forms."""
import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

import fd_eval.cli.compute_cmds as compute_cmds
from fd_eval.api import EvalResult, _Ref, evaluate_stats
from fd_eval.cli import main
from fd_eval.references import get_reference
from fd_eval.stats import Stats

MODEL = "dinov2-vitl14"
C_DINO = 7.44 / (1 / 50_000 - 1 / 1_000_000)  # c fitted to GPIC's subset floor (Test-50K of Test-1M)


def _result(n: int) -> EvalResult:
    """A compute result against gpic-test at N = n: a generated set whose FD is exactly 1 + 2 (mean + cov terms)
    against a 4-dim reference (identity covariance; the generated one 3 I: tr(I + 3I - 2 sqrt(3) I) = 4 (4 - 2
    sqrt 3), mean offset 1)."""
    d = 4
    ref = Stats(np.zeros(d), np.eye(d), 1_000_000, {"extractor": MODEL})
    gen = Stats(np.eye(d)[0], 3 * np.eye(d), n, {"extractor": MODEL})
    results, warnings = evaluate_stats({MODEL: gen}, _Ref({MODEL: ref}, {"kind": "registry"}, "gpic-test"),
                                       allow_mismatch=True)
    return EvalResult(results, {"reference": {"kind": "registry", "name": "gpic-test"}}, warnings)


def _compute(monkeypatch, n: int, *args: str) -> "CliRunner.invoke":
    monkeypatch.setattr(compute_cmds, "compute_fd", lambda *a, **k: _result(n))
    r = CliRunner().invoke(main, ["compute", "gen/", "-q", *args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def test_floor_model_values_in_results():
    r = _result(50_000).results[MODEL]
    assert r["fd"] == pytest.approx(1 + 4 * (4 - 2 * np.sqrt(3)))
    assert (r["floor"], r["floor_relation"]) == (7.44, "subset")
    assert r["floor_independent_estimate"] == pytest.approx(C_DINO * (1 / 50_000 + 1 / 1_000_000))
    assert round(r["floor_independent_estimate"], 2) == 8.22
    assert get_reference("gpic-test").floor_model(MODEL).reference_bias == pytest.approx(C_DINO / 1e6)
    r = _result(200_000).results[MODEL]  # the published Val-200K floor is an independent sample
    assert (r["floor"], r["floor_relation"]) == (2.37, "independent")


@pytest.mark.parametrize("n, side", [(10_000, "below"), (100_000, "above")])
def test_n_off_protocol_warns_with_the_estimated_shift(n, side):
    res = _result(n)
    shift = C_DINO * (1 / n - 1 / 50_000)
    (w,) = [w for w in res.warnings if "protocol" in w]
    assert f"N = {n:,} is {side} the GPIC protocol's 50,000" in w and f"{shift:+.2f}" in w
    assert res.results[MODEL]["floor"] is None  # nothing published at this N ...
    assert res.results[MODEL]["floor_independent_estimate"] == pytest.approx(C_DINO * (1 / n + 1e-6))  # ... a model
    assert not [w for w in _result(50_000).warnings if "protocol" in w]


def test_compute_table_shows_published_floor_relation_and_estimate(monkeypatch):
    out = _compute(monkeypatch, 50_000).stdout
    header, _, row = out.splitlines()[:3]
    assert "published floor" in header and "indep. floor (est.)" in header
    assert "7.44 (subset)" in row and "8.22" in row and "50,000" in row and "1,000,000" in row
    assert "a perfect independent generator scores ≈ the estimate, see docs/floors.md" in out
    assert "about 7.44" not in out


def test_compute_format_markdown_and_csv(monkeypatch):
    md = _compute(monkeypatch, 50_000, "--format", "markdown").stdout.splitlines()
    assert md[0].startswith("| model | FD |") and md[1].startswith("|---|")
    assert md[2].split(" | ")[6:] == ["7.44 (subset)", "8.22 |"]
    rows = list(csv.reader(io.StringIO(_compute(monkeypatch, 50_000, "--format", "csv").stdout)))
    assert rows[0][0] == "model" and rows[0][-1] == "indep. floor (est.)"
    assert rows[1][0] == MODEL and float(rows[1][1]) == pytest.approx(1 + 4 * (4 - 2 * np.sqrt(3)), abs=1e-4)
    assert len(rows) == 2  # the notes go to stderr, the table alone is pasteable


def test_compute_json_keeps_fields_and_adds_floor_fields(monkeypatch, tmp_path):
    _compute(monkeypatch, 100_000, "--json", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())["results"][MODEL]
    assert set(r) == {"fd", "fd_mean", "fd_cov", "n", "n_ref", "floor", "floor_fd_mean", "floor_fd_cov",
                      "floor_relation", "floor_independent_estimate", "diagnostics"}
    assert r["floor"] is None and r["floor_independent_estimate"] == pytest.approx(C_DINO * (1e-5 + 1e-6))


def test_compute_report_writes_html(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    out = _compute(monkeypatch, 50_000, "--report", str(tmp_path / "r.html"))
    page = (tmp_path / "r.html").read_text()
    assert "7.44" in page and "8.22" in page and "(subset)" in page
    assert f"wrote {tmp_path / 'r.html'}" in out.output


def test_compute_report_without_matplotlib_fails_before_extracting(monkeypatch, tmp_path):
    from fd_eval.report import ReportDependencyError

    def missing():
        raise ReportDependencyError("the HTML report needs matplotlib: pip install 'fd-eval[report]'")

    monkeypatch.setattr(compute_cmds, "require_matplotlib", missing)
    monkeypatch.setattr(compute_cmds, "compute_fd", lambda *a, **k: pytest.fail("extracted before the check"))
    r = CliRunner().invoke(main, ["compute", "gen/", "-q", "--report", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "fd-eval[report]" in r.output and not (tmp_path / "r.html").exists()


def test_fd_infinity_prints_the_reference_bias(capsys):
    from fd_eval.analysis import AnalysisSpec
    from fd_eval.cli.analysis_cmds import echo_analysis, reference_biases

    bias = reference_biases(_result(50_000))
    assert bias == {MODEL: pytest.approx(C_DINO / 1_000_000)} and round(bias[MODEL], 2) == 0.39
    res_local = _result(50_000)
    res_local.provenance["reference"] = {"kind": "source"}
    assert reference_biases(res_local) == {}
    spec = AnalysisSpec(fd_infinity=True)
    echo_analysis({MODEL: {"fd_infinity": {"fd_infinity": 3.25, "r2": 0.999}}}, spec, bias)
    out = capsys.readouterr().out.splitlines()
    assert "ref. bias (est.)" in out[1] and out[3].split() == [MODEL, "3.2500", "0.999", "0.39"]
    assert "removes only the generated side's 1/N bias" in out[4]
