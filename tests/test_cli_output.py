"""What a user reads in the terminal: the honest floors in `compute` (published floor with its relation, the
independent-sample estimate, the N-shift warning), `--format markdown|csv`, `--report`, and the other commands'
wording. The numbers come from the registry's fitted floor model (docs/floors.md), checked against closed forms."""
import csv
import functools
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

import fd_eval.cli.compute_cmds as compute_cmds
from fd_eval.api import EvalResult, _Ref, evaluate_stats
from fd_eval.cli import main
from fd_eval.outputs.references import get_reference
from fd_eval.outputs.stats import Stats

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
    assert rows[1][4:] == ["50000", "1000000", "7.44", "subset", "8.22"]  # plain numbers for a spreadsheet
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
    from fd_eval.outputs.report import ReportDependencyError

    def missing():
        raise ReportDependencyError("the HTML report needs matplotlib: pip install 'fd-eval[report]'")

    monkeypatch.setattr(compute_cmds, "require_matplotlib", missing)
    monkeypatch.setattr(compute_cmds, "compute_fd", lambda *a, **k: pytest.fail("extracted before the check"))
    r = CliRunner().invoke(main, ["compute", "gen/", "-q", "--report", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and "fd-eval[report]" in r.output and not (tmp_path / "r.html").exists()


def test_fd_infinity_prints_the_reference_bias(capsys):
    from fd_eval.cli.analysis_cmds import echo_analysis, reference_biases
    from fd_eval.metrics.analysis import AnalysisSpec

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


def test_sample_overlap_by_keys_and_fingerprint(tmp_path):
    from _images import photo_crops, save_images
    from fd_eval.metrics.ceiling import sample_overlap
    from fd_eval.sources import open_source

    d = save_images(photo_crops(6, 32, 32, seed=1), tmp_path / "real")  # 000.png ... 005.png
    names = sorted(p.stem for p in d.iterdir())
    st = Stats(np.zeros(2), np.eye(2), 10, {}, extras={"key": np.array(names[:4] + ["x", "y"])})
    assert sample_overlap(d, None, None, st, {}) == {"relation": "partial", "method": "keys", "in_reference": 4,
                                                     "n": 6}
    picked = sorted(names[i] for i in np.random.RandomState(5).permutation(6)[:3])
    for keys, rel in ((picked, "subset"), (sorted(set(names) - set(picked)), "independent")):
        st.extras["key"] = np.array(keys)
        assert sample_overlap(d, 3, 5, st, {})["relation"] == rel
    bare = Stats(np.zeros(2), np.eye(2), 10, {})
    assert sample_overlap(d, 3, 0, bare, {})["relation"] is None
    fp = open_source(str(d)).fingerprint()
    assert sample_overlap(d, 3, 0, bare, {"kind": "source", "fingerprint": fp}) == {
        "relation": "subset", "method": "fingerprint", "in_reference": 3, "n": 3}
    assert sample_overlap(d, 3, 0, bare, {"kind": "source", "fingerprint": "0" * 64})["relation"] is None


def test_overlap_text():
    from fd_eval.cli.analysis_cmds import overlap_text

    assert overlap_text({"relation": "subset", "method": "keys", "in_reference": 8, "n": 8}, "gpic-test") == (
        "overlap (by image keys): all 8 real images are part of gpic-test: a subset result, comparable with "
        "published subset floors (GPIC Test-50K); a generator's independent floor is higher")
    assert "3 of 8 real images are in r" in overlap_text({"relation": "partial", "method": "keys",
                                                          "in_reference": 3, "n": 8}, "r")
    assert "cannot tell" in overlap_text({"relation": None, "method": None, "in_reference": None, "n": None}, "r")


@pytest.mark.parametrize("units, text", [(1, "from 1 unit\n"), (3, "from 3 units, 1 resumed\n")])
def test_stats_summary_grammar(monkeypatch, tmp_path, units, text):
    meta = {"source": {"build": {"units": units, "resumed_units": units // 3}, "skipped_items": []}}
    monkeypatch.setattr(compute_cmds, "build_stats",
                        lambda *a, **k: {MODEL: Stats(np.zeros(2), np.eye(2), 1234, meta)})
    r = CliRunner().invoke(main, ["stats", "src/", "-o", str(tmp_path / "s.safetensors"), "-q"])
    assert r.exit_code == 0 and r.stdout == f"wrote {tmp_path / 's.safetensors'}: {MODEL} over 1,234 images {text}"


def test_fd_prints_unknown_n_for_files_without_one(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(40, 3)) + 1
    np.savez(tmp_path / "a.npz", mu=x.mean(0), sigma=np.cov(x, rowvar=False))  # pytorch-fid layout: no N
    from fd_eval.outputs.stats import save_stats

    save_stats(tmp_path / "b.safetensors", [Stats(y.mean(0), np.cov(y, rowvar=False), 40, {"extractor": "x"})])
    r = CliRunner().invoke(main, ["fd", str(tmp_path / "a.npz"), str(tmp_path / "b.safetensors"), "--allow-mismatch"])
    assert r.exit_code == 0, r.output
    header, _, row = r.stdout.splitlines()[:3]
    cols = dict(zip(header.split("  "), [c for c in row.split("  ") if c]))
    assert row.split()[3:6] == ["unknown", "40", "3"], r.stdout
    from fd_eval.core.frechet import frechet_distance

    fd = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert float(row.split()[0]) == pytest.approx(fd, abs=1e-4) and "FD" in cols


def test_models_marks_default_aliases_and_gpic_references():
    r = CliRunner().invoke(main, ["models"])
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and max(map(len, lines)) <= 100, r.stdout
    row = {line.split()[0]: line.split() for line in lines[2:] if line and not line[0].isspace()}
    assert row["dinov2-vitl14"][:6] == ["dinov2-vitl14", "*", "1024", "dinov2", "gpic-test,", "gpic-val"]
    assert row["inception-v3-tf"][:4] == ["inception-v3-tf", "2048", "fid", "-"]
    assert row["inception-v3-pt"][3:5] == ["gpic-test?,", "gpic-val?"]
    assert "* = the default --model" in r.stdout


def test_models_urls_lists_each_weights_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FD_EVAL_CACHE", str(tmp_path / "c"))
    r = CliRunner().invoke(main, ["models", "--urls"])
    out = r.stdout
    assert r.exit_code == 0 and out.count("pt_inception-2015-12-05-6726825d.pth (~91 MiB)") == 1
    assert "inception-v3-pt, inception-v3-tf: pt_inception" in out
    assert "sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2" in out
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in out
    assert f"put the files in {tmp_path / 'c' / 'weights'}" in out and not (tmp_path / "c").exists()


def test_weights_sizes_match_the_architectures():
    """The listed size of each official file is its float32 parameter count x 4 bytes (the real architectures,
    built on the meta device; Inception's file also holds the 1008-class logits layer, 2048 x 1008 + 1008)."""
    import torch

    from fd_eval.extractors import extractor_entry
    from fd_eval.extractors.dinov2 import ARCHS, build_model, extractor_name
    from fd_eval.extractors.inception import FIDInceptionV3
    from fd_eval.extractors.sscd import SSCDNet

    def mib(build, extra=0):
        with torch.device("meta"):
            m = build()
        return (sum(p.numel() for p in m.state_dict().values()) + extra) * 4 / 2**20

    for arch in ARCHS:
        for reg in (False, True):
            got = extractor_entry(extractor_name(arch, reg)).weights.approx_mib
            assert got == pytest.approx(mib(functools.partial(build_model, ARCHS[arch], reg=reg)), abs=0.5)
    assert extractor_entry("fid").weights.approx_mib == pytest.approx(mib(FIDInceptionV3, 2048 * 1008 + 1008),
                                                                        abs=0.5)
    assert extractor_entry("sscd-disc-mixup").weights.approx_mib == pytest.approx(mib(SSCDNet), abs=0.5)


def test_ref_list_marks_a_local_file(tmp_path):
    np.savez(tmp_path / "s.npz", mu=np.zeros(3), sigma=np.eye(3))
    r = CliRunner().invoke(main, ["ref", "add", "mine", str(tmp_path / "s.npz"), "-m", "dinov2-vits14", "--n", "10"])
    assert r.exit_code == 0, r.output
    lines = CliRunner().invoke(main, ["ref", "list"]).stdout.splitlines()
    assert next(line for line in lines if line.startswith("mine")).split()[:5] == [
        "mine", "(user)", "10", "local", "dinov2-vits14"]
    (tmp_path / "s.npz").unlink()
    lines = CliRunner().invoke(main, ["ref", "list"]).stdout.splitlines()
    assert next(line for line in lines if line.startswith("mine")).split()[3] == "missing"


def test_floor_model_ignores_a_subset_floor_of_the_whole_reference():
    from fd_eval.outputs.references import Floor, FloorModel

    whole = Floor("m", 100, 5.0, relation="subset")  # n = M: 1/n - 1/M = 0, nothing to fit
    assert FloorModel.fit([whole], 100) is None
    fm = FloorModel.fit([whole, Floor("m", 50, 2.0, relation="subset")], 100)
    assert fm.c == pytest.approx(2.0 / (1 / 50 - 1 / 100))


def test_progress_is_labelled_by_side_and_notes_the_cached_reference(tmp_path, monkeypatch):
    """A real (2-block ViT-S) run: the passes are labelled `reference B/ (model)` and `generated ...`, with
    images/s; the second run takes the reference from the cache and names the file."""
    import fd_eval.extractors.dinov2 as dv
    from _checkpoints import save_dinov2_checkpoint
    from _images import photo_crops, save_images

    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=2))
    ckpt, _ = save_dinov2_checkpoint(tmp_path / "w.pth", "vits14", "official", seed=3, depth=2)
    save_images(photo_crops(4, 32, 32, seed=1), tmp_path / "gen")
    save_images(photo_crops(4, 32, 32, seed=2), tmp_path / "B")
    monkeypatch.chdir(tmp_path)
    args = ["compute", "gen", "-r", "B/", "-m", "dinov2-vits14", "--weights", str(ckpt), "--device", "cpu",
            "--num-workers", "0"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "reference B/ (dinov2-vits14): 100%" in first.stderr and "4/4" in first.stderr
    assert "generated gen (dinov2-vits14): 100%" in first.stderr and "img/s" in first.stderr
    second = CliRunner().invoke(main, args)
    from fd_eval.util.io_utils import cache_dir

    (cached,) = cache_dir("ref_stats").glob("*.safetensors")  # the test's own cache (conftest)
    assert f"reference B/ (dinov2-vits14): from the cache, {cached}" in second.stderr
    assert "reference B/ (dinov2-vits14): 100%" not in second.stderr
    assert second.stdout == first.stdout  # the same table
