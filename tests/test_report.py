"""`fd-eval report`: the page built from a real `fd-eval compute --json` run (random ViT-S weights, 2 blocks) holds
its numbers, its thumbnails are the seeded images resized by Pillow, several results are grouped by extractor
identity and ordered by step, and the page opens in a real browser without console errors or network requests."""
import base64
import builtins
import copy
import functools
import io
import json
import re
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fd_eval.extractors.dinov2 as dv
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import InputError
from fd_eval.outputs.report import CSP, ReportDependencyError, build_report, read_input, sample_thumbnails, write_report

N = 16
DEPTH = 2  # the real ViT-S architecture, two blocks deep: the report reads the numbers, not their quality


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A real `compute --json` document with every analysis, plus the image folders it points at."""
    root = tmp_path_factory.mktemp("report")
    ckpt, _ = save_dinov2_checkpoint(root / "w.pth", "vits14", "official", seed=3, depth=DEPTH)
    gen = save_images(photo_crops(N, 64, 64, seed=1), root / "gen")
    ref = save_images(photo_crops(N, 64, 64, seed=2), root / "ref")
    out = root / "res.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FD_EVAL_CACHE", str(root / "cache"))
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, ["compute", str(gen), "-r", str(ref), "-m", "dinov2-vits14", "--weights",
                                      str(ckpt), "--device", "cpu", "-q", "--num-workers", "0", "--json", str(out),
                                      "--ci", "0.9", "--bootstrap", "10", "--fd-infinity", "--prdc", "--mmd"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    doc = json.loads(out.read_text())
    return {"root": root, "gen": gen, "ref": ref, "json": out, "doc": doc}


def _with_floor(doc):
    """The document as against gpic-test: a published floor (subset) and the independent-sample estimate."""
    d = copy.deepcopy(doc)
    r = d["results"]["dinov2-vits14"]
    r.update(floor=7.44, floor_fd_mean=0.04, floor_fd_cov=7.404, floor_relation="subset",
             floor_independent_estimate=8.22)
    return d


class _Attrs(HTMLParser):
    """Every (tag, attribute, value) of a page, and its text."""

    def __init__(self):
        super().__init__()
        self.attrs, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k, v or "") for k, v in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _parse(page):
    p = _Attrs()
    p.feed(page)
    return p


def _fmt(x):
    return f"{x:.4f}"


# --- content ----------------------------------------------------------------------------------------------------
def test_single_result_page_holds_every_number(world):
    doc = _with_floor(world["doc"])
    r = doc["results"]["dinov2-vits14"]
    a = r["analysis"]
    page = build_report([doc])
    text = " ".join(_parse(page).text)
    for x in (r["fd"], r["fd_mean"], r["fd_cov"], a["bootstrap"]["low"], a["bootstrap"]["high"],
              a["fd_infinity"]["fd_infinity"], a["prdc"]["precision"], a["prdc"]["density"]):
        assert _fmt(x) in text, x
    assert f"{a['mmd']['mmd']:.6f}" in text
    assert "7.44" in text and "(subset)" in text and "8.22" in text  # floor, relation, independent estimate
    assert f"{N}" in text and "90%" in text
    assert "GPIC baseline" not in page  # a ViT-S/14 FD is not on the scale of the ViT-L/14 baseline
    assert page.count("<svg") == 2  # FD bars, FD against N
    assert "<details><summary>Provenance</summary>" in page and r["fd"] is not None
    assert json.dumps(doc["provenance"]["extractors"]["dinov2-vits14"]["weights_sha256"]) in text


def test_baseline_line_for_fd_dinov2_vitl14(world):
    doc = copy.deepcopy(world["doc"])
    r = doc["results"]["dinov2-vits14"]
    doc["results"] = {"dinov2-vitl14": r, "inception-v3-pt": {**r, "fd": 0.5}}
    page = build_report([doc], thumbnails=0)
    assert "GPIC baseline 76.25" in page  # the legend entry of the dashed line, as SVG text
    # two extractors in one result: two axes, never one (their FDs are on different scales)
    assert "FD-dinov2-vitl14 (lower is better)" in page and "FD-inception-v3-pt (lower is better)" in page


def test_self_contained_and_deterministic(world, tmp_path):
    page = build_report([_with_floor(world["doc"])])
    assert f'content="{CSP}"' in page
    refs = [(t, k, v) for t, k, v in _parse(page).attrs if k in ("src", "href", "xlink:href", "action", "srcset")]
    assert refs and all(v.startswith(("data:", "#")) for _, _, v in refs), [r for r in refs if r[2][:1] != "#"][:3]
    assert not re.search(r"https?://", page.replace('xmlns="http://www.w3.org/2000/svg"', "")
                         .replace('xmlns:xlink="http://www.w3.org/1999/xlink"', ""))
    assert "<script" not in page and "<link" not in page
    out = write_report([_with_floor(world["doc"])], tmp_path / "r.html")
    assert out.read_bytes() == page.encode("utf-8")  # same input, same bytes (SVG ids and metadata fixed)
    assert build_report([world["json"]]) == build_report([str(world["json"])])


def test_thumbnails_are_the_seeded_images_resized_by_pillow(world):
    thumbs, why = sample_thumbnails(str(world["gen"]), n=5, seed=7)
    assert why == ""
    names = sorted(p.name for p in world["gen"].iterdir())
    want = [names[i] for i in sorted(np.random.default_rng(7).choice(N, 5, replace=False).tolist())]
    assert [c for c, _ in thumbs] == want
    for name, uri in thumbs:
        data = base64.b64decode(uri.split(",", 1)[1])
        want_jpeg = io.BytesIO()
        Image.open(world["gen"] / name).convert("RGB").save(want_jpeg, format="JPEG", quality=90, subsampling=0)
        assert data == want_jpeg.getvalue()  # 64 px images are not enlarged, just encoded
    assert [c for c, _ in sample_thumbnails(str(world["gen"]), n=100)[0]] == names  # fewer images than asked
    assert sample_thumbnails(str(world["gen"]), n=5, seed=8)[0] != thumbs
    page = build_report([world["doc"]], thumbnails=4)
    assert page.count('<img alt=') == 4


def test_thumbnails_fit_128px(tmp_path):
    save_images(photo_crops(3, 300, 200, seed=5), tmp_path / "big")
    thumbs, _ = sample_thumbnails(str(tmp_path / "big"), n=3)
    for name, uri in thumbs:
        im = Image.open(tmp_path / "big" / name).convert("RGB").resize((85, 128), Image.BICUBIC)
        want = io.BytesIO()
        im.save(want, format="JPEG", quality=90, subsampling=0)
        assert base64.b64decode(uri.split(",", 1)[1]) == want.getvalue()  # 200x300 into 128x128: 85.3 x 128


def test_relative_spec_found_beside_the_json_and_unreachable_said(world, tmp_path, monkeypatch):
    doc = copy.deepcopy(world["doc"])
    doc["provenance"]["generated"]["spec"] = "gen"  # as recorded by a run started in the JSON's folder
    path = world["root"] / "relative.json"
    path.write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    assert build_report([path]).count("<img alt=") == N
    doc["provenance"]["generated"]["spec"] = "elsewhere/gen"
    page = build_report([doc])
    assert "<img alt=" not in page and "not reachable" in page and "elsewhere/gen" in page
    doc["provenance"]["generated"]["spec"] = "<tensors>"
    assert "passed in memory" in build_report([doc])


# --- several results ----------------------------------------------------------------------------------------
def _checkpoint_doc(doc, fd, **generated):
    d = copy.deepcopy(doc)
    r = d["results"]["dinov2-vits14"]
    r["fd"], r["analysis"]["bootstrap"]["low"], r["analysis"]["bootstrap"]["high"] = fd, fd - 1.0, fd + 1.5
    d["provenance"]["generated"] = {"spec": "<tensors>", "kind": "FDMetric", **generated}
    return d


def test_training_steps_ordered_and_identities_never_share_an_axis(world, tmp_path):
    base = world["doc"]
    files = []
    for step, fd in ((5000, 30.5), (1000, 90.25), (20000, 12.125)):  # written out of order
        p = tmp_path / f"ckpt-{step}.json"
        p.write_text(json.dumps(_checkpoint_doc(base, fd)))
        files.append(p)
    p = tmp_path / "latest.json"  # the step from FDMetric.compute(step=...) (provenance.generated)
    p.write_text(json.dumps(_checkpoint_doc(base, 20.0, step=10000)))
    files.append(p)
    other = _checkpoint_doc(base, 55.0, step=3000)  # other weights: its own group
    other["provenance"]["extractors"]["dinov2-vits14"]["weights_sha256"] = "f" * 64
    p = tmp_path / "other.json"
    p.write_text(json.dumps(other))
    files.append(p)
    assert [read_input(f).step for f in files] == [5000, 1000, 20000, 10000, 3000]
    page = build_report(files)
    cmp = page[page.index('id="comparison"'):page.index('id="result-0"')]
    assert cmp.count("FD over training steps") == 2 + 1  # two groups' headings; a chart only for 2+ points
    first = cmp[:cmp.index("f" * 12)]  # the first group ends where the other weights' group begins
    order = [float(x) for x in re.findall(r'<b class="fd">([\d.]+)</b>', first)]
    assert order == [90.25, 30.5, 20.0, 12.125]  # by step 1000, 5000, 10000, 20000; 55.0 not among them
    assert "[89.2500, 91.7500]" in first
    assert 'id="result-4"' in page


@pytest.mark.parametrize("name,step", [("step_001000", 1000), ("ckpt-5000", 5000), ("run3_checkpoint_20000", 20000),
                                       ("kimg-0200", 200), ("model-10", None), ("fruit_10", None)])
def test_step_from_file_name(tmp_path, name, step):
    path = tmp_path / f"{name}.json"
    path.write_text('{"results": {"m": {"fd": 1.5}}}')
    assert read_input(path).step == step and read_input(path).label == name


def test_numpy_values_in_a_dict(world):
    doc = copy.deepcopy(world["doc"])
    r = doc["results"]["dinov2-vits14"]
    r["fd"], r["n"] = np.float32(12.5), np.int64(16)  # what compute_fd's result may hold before its JSON is written
    page = build_report([doc], thumbnails=0)
    assert '<b class="fd">12.5000</b>' in page and "<td>16</td>" in page


def test_results_without_steps_ordered_by_name(world, tmp_path):
    files = []
    for name, fd in (("model-10", 3.0), ("model-2", 2.0), ("model-1", 1.0)):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(_checkpoint_doc(world["doc"], fd)))
        files.append(p)
    page = build_report(files, thumbnails=0)
    cmp = page[page.index('id="comparison"'):page.index('id="result-0"')]
    assert "FD by result" in cmp
    assert re.findall(r"<td class=l>(model-\d+)</td>", cmp) == ["model-1", "model-2", "model-10"]


def test_copies_beside_their_matches(world, tmp_path):
    names = sorted(p.name for p in world["gen"].iterdir())
    per = [{"index": i, "name": names[i], "nearest": [{"key": f"{(i + 1) % N:03d}", "similarity": s}]}
           for i, s in ((0, 0.97), (1, 0.5), (2, 0.991), (3, 0.2))]
    doc = {"results": {"dinov2-vitl14": {"per_image": per, "threshold": 0.95, "n_copies": 2,
                                         "copy_fraction": 0.125}},
           "provenance": {"generated": {"spec": str(world["gen"])}, "train": {"spec": str(world["ref"])}}}
    page = build_report([world["doc"], doc], thumbnails=0)
    sec = page[page.index('id="copies-0"'):]
    assert sec.count('class="pair"') == 2 and "12.50%" in sec
    assert sec.index("0.9910") < sec.index("0.9700")  # most similar first; 0.5 and 0.2 are not copies
    assert "0.5000" not in sec
    assert sec.count("<img alt=") == 4 and "train 003" in sec
    with tarfile.open(tmp_path / "train_00000.tar", "w") as tf:  # GPIC's layout: {key}.png + {key}.json
        for j in range(N):
            key = f"{j:064x}"
            tf.add(world["ref"] / f"{j:03d}.png", f"{key}.png")
            (tmp_path / "meta.json").write_text(json.dumps({"key": key}))
            tf.add(tmp_path / "meta.json", f"{key}.json")
    for p in per:
        p["nearest"][0]["key"] = f"{int(p['nearest'][0]['key']):064x}"
    doc["provenance"]["train"]["spec"] = str(tmp_path / "train_00000.tar")
    sec = build_report([doc], thumbnails=0)
    train_imgs = re.findall(r'<img alt="train 0+3" src="([^"]+)"', sec)
    assert sec.count("<img alt=") == 4 and len(train_imgs) == 1  # 002's match: train image 003, by its key
    want = io.BytesIO()
    Image.open(world["ref"] / "003.png").convert("RGB").save(want, format="JPEG", quality=90, subsampling=0)
    assert base64.b64decode(train_imgs[0].split(",", 1)[1]) == want.getvalue()
    doc["provenance"]["train"]["spec"] = str(tmp_path / "gone")
    sec = build_report([doc], thumbnails=0)
    assert sec.count("not reachable") == 2 + 1 and sec.count('class="pair"') == 2  # the note, each match
    assert sec.count("<img alt=") == 2  # the generated images are still there


# --- errors -------------------------------------------------------------------------------------------------
def test_missing_matplotlib_one_line_error(world, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mpl(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(ReportDependencyError, match=r"pip install 'fd-eval\[report\]'"):
        build_report([world["doc"]])
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(world["json"]), "-o", str(out)])
    assert r.exit_code == 1 and not out.exists()
    assert r.output.strip().count("\n") == 0 and "matplotlib" in r.output and "fd-eval[report]" in r.output


@pytest.mark.parametrize("content,match", [(None, "no such file"), ("{not json", "not a readable JSON"),
                                            ('{"results": {}}', "no \"results\""),
                                            ('{"results": {"m": 3}}', "not an object"),
                                            ('{"results": {"m": {}}, "step": "x"}', "not an integer")])
def test_bad_inputs_one_line_errors(tmp_path, content, match):
    path = tmp_path / "in.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match) as e:
        build_report([path])
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(path), "-o", str(out)])
    assert r.exit_code == 1 and not out.exists() and str(path) in r.output


def test_cli_writes_the_page(world, tmp_path):
    out = tmp_path / "r.html"
    r = CliRunner().invoke(main, ["report", str(world["json"]), "-o", str(out), "--thumbnails", "3", "--seed", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert out.read_text(encoding="utf-8") == build_report([world["json"]], thumbnails=3, seed=1)


# --- a real browser ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium():
    """The browser's executable; the test skips (with the reason) where there is none. Requested before
    `world`, so a skip costs no computation."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("no Chromium on PATH (.ci/run installs the Debian package `chromium` when it can)")
    return exe


def _open_in_browser(exe, page_path, tmp_path):
    """(DOM after load, console messages) of a headless Chromium opening the file; console messages (errors,
    CSP violations, i.e. blocked requests) come from Chromium's own log on stderr."""
    cmd = [exe, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           "--dump-dom", page_path.as_uri()]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout, [ln for ln in p.stderr.splitlines() if ":CONSOLE" in ln]


def test_browser_detects_errors_and_requests(chromium, tmp_path):
    """The check below can fail: a page that requests the network and throws is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}">'
                   '</head><body><img src="http://example.invalid/a.png"></body></html>')
    _, console = _open_in_browser(chromium, bad, tmp_path)
    assert any("example.invalid" in ln and "Content Security Policy" in ln for ln in console), console


def test_page_opens_in_browser_without_errors_or_requests(chromium, world, tmp_path):
    doc = _with_floor(world["doc"])
    out = write_report([doc], tmp_path / "report.html")
    dom, console = _open_in_browser(chromium, out, tmp_path)
    assert console == []
    r = doc["results"]["dinov2-vits14"]
    text = " ".join(_parse(dom).text)
    assert _fmt(r["fd"]) in text and "7.44" in text and _fmt(r["analysis"]["fd_infinity"]["fd_infinity"]) in text
    assert dom.count("<svg") == 2 and dom.count("<img") == N
    assert not [v for _, k, v in _parse(dom).attrs if k in ("src", "href") and not v.startswith(("data:", "#"))]


def test_several_results_open_in_browser_without_errors(chromium, world, tmp_path):
    files = []
    for step, fd in ((1000, 90.25), (2000, 30.5)):
        p = tmp_path / f"step_{step:06d}.json"
        p.write_text(json.dumps(_checkpoint_doc(world["doc"], fd)))
        files.append(p)
    out = write_report(files, tmp_path / "training.html")
    dom, console = _open_in_browser(chromium, out, tmp_path)
    assert console == []
    text = " ".join(_parse(dom).text)
    assert "90.2500" in text and "30.5000" in text and "FD over training steps" in text
