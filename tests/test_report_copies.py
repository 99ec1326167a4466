"""`fd-eval report` on the JSON of a real `fd-eval copies --json` run (absolute image paths that exist): every
suspected copy is shown beside its training image, AuthPct and C_T are in the statistics table and the quantiles
are one readable row; the contact sheet is a grid. Opened in headless Chromium where there is one (a screenshot
is written beside the page for a person to look at)."""
from __future__ import annotations

import functools
import json
import shutil
import subprocess

import pytest
from click.testing import CliRunner
from PIL import Image

import fd_eval.extractors.dinov2 as dv
from fd_eval.cli import main
from fd_eval.outputs.report import build_report, write_report
from test_copies_run import DEPTH, sets, vit  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def copies_json(sets, vit, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("report_copies")
    args = ["copies", str(sets["gen"]), "--train", str(sets["train"]), "--test", str(sets["test"]), "-m",
            "dinov2-vits14", "--weights", str(vit), "--top", "2", "--threshold", "0.9", "--checkpoint-every", "8",
            "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "-q", "--json", str(out / "c.json"),
            "--sheet", str(out / "sheet.png")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    return out / "c.json"


def test_report_of_a_real_copies_run_shows_every_pair_and_the_statistics(copies_json):
    doc = json.loads(copies_json.read_text())
    r = doc["results"]["dinov2-vits14"]
    flagged = [p for p in r["per_image"] if p["nearest"][0]["similarity"] >= r["threshold"]]
    assert flagged and r["authpct"] is not None
    page = build_report([copies_json], max_copies=12)
    sec = page[page.index('id="copies-0"'):]
    assert "not reachable" not in sec and "no image location" not in sec
    n = min(12, len(flagged))
    assert sec.count('class="pair"') == n and sec.count("<img alt=") == 2 * n
    assert f"<td class=l>AuthPct (% authentic)</td><td>{r['authpct']:.4f}</td>" in sec
    stats = sec[sec.index("<h3>dinov2-vits14</h3>"):sec.index('class="pairs"')]
    assert "C_T (data-copying test)" in stats and "{" not in stats  # no raw JSON dict stretching the table
    q = r["quantiles"]
    assert "<th>p50</th>" in sec and f"<td>{q['0.5']:.4f}</td>" in sec  # one row, one cell per quantile
    best = max(flagged, key=lambda p: p["nearest"][0]["similarity"])
    assert f"train {best['nearest'][0]['key']}" in sec  # the whole key, never cut


def test_contact_sheet_is_a_grid_with_whole_captions(copies_json):
    with Image.open(copies_json.parent / "sheet.png") as im:
        w, h = im.size
    assert w == 3 * (2 * 160 + 6) + 2 * 12 + 2 * 6  # three pairs per row
    assert h > 5 * 160  # 16 pairs: six rows, captions of several lines


def test_contact_sheet_wraps_long_paths_without_dropping_a_character():
    from fd_eval.outputs.contact_sheet import wrap

    text = "train: /very/long/" + "x" * 200 + "/000123.png"
    lines = wrap(text, 100, lambda s: 6 * len(s))
    assert "".join(lines) == text.replace("train: ", "train:")  # only the space at the line break goes
    assert all(6 * len(ln) <= 100 for ln in lines)


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no Chromium")
def test_copies_page_in_a_browser(copies_json, tmp_path):
    page = write_report([copies_json], tmp_path / "copies.html")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "copies.png"
    p = subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1800",
                        f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 1800)
    keep = copies_json.parent / "copies_page.png"  # for a person to look at (tmp folder of the test run)
    shutil.copy(shot, keep)
