"""One self-contained HTML page from evaluation results: tables, inline-SVG charts and sample thumbnails.

    fd_eval.write_report([doc], "report.html")                  # doc: the `fd-eval compute --json` dict
    fd_eval.write_report(["step_001000.json", "step_002000.json"], "training.html")   # files work too
    html = fd_eval.build_report(docs)                            # the page as a str, nothing written

Inputs (any mix, missing fields tolerated): ``fd-eval compute --json`` documents (optionally with each model's
``"analysis"``: bootstrap, fd_infinity, prdc, mmd), ``FDMetric.compute()`` dicts saved as JSON (``"step"`` in
the file, in ``provenance.generated``, or in the file name: ``step_001000.json``, ``ckpt-5000.json``), and
``fd-eval copies --json`` documents (suspected copies shown beside their training matches).

The page needs no network: one file with its styles inline, charts as inline SVG (text kept as text, so numbers
are searchable and print sharply), thumbnails as ``data:`` URIs, and a Content-Security-Policy that forbids
every other load. Results made with different extractor identities (name + weights sha256 + preprocessing) or
against different references are never drawn on one axis. Builds are deterministic: the same inputs give the
same bytes (fixed SVG hash salt, no dates, seeded thumbnail choice).

Charts need matplotlib (``pip install 'fd-eval[report]'``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .._version import __version__
from ..errors import InputError
from ..util.io_utils import atomic_write
from .report_charts import (
    GPIC_BASELINE,
    GPIC_BASELINE_MODEL,
    ReportDependencyError,  # noqa: F401  (raised there; documented under this module)
    _esc,
    _fd_chart,
    _fd_infinity_chart,
    _float,
    _int,
    _num,
    _one_line,
    _open,
    _series_chart,
    _short_name,
    _thumb_uri,
    require_matplotlib,
    sample_thumbnails,
)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STEP_RE = re.compile(r"(?:^|[^a-z])(?:step|ckpt|checkpoint|iter|kimg)[-_]?0*(\d+)", re.IGNORECASE)


# --- inputs -------------------------------------------------------------------------------------------------
@dataclass
class ReportInput:
    """One result document read for the report.

    Attributes:
        doc: the JSON document (``{"results", "provenance", "warnings", "skipped"}``).
        kind: "fd" (compute / FDMetric / ceiling) or "copies".
        label: how the page names it (file stem, else the generated spec, else "result i").
        step: training step (from ``"step"``, ``provenance.generated.step`` or the file name), or None.
        base: the directory relative image specs are also looked up in (the JSON file's), or None.
    """

    doc: dict[str, Any]
    kind: str
    label: str
    step: int | None = None
    base: Path | None = None
    path: str | None = None


def read_input(item: "str | os.PathLike | dict[str, Any]", index: int = 0, label: str | None = None) -> ReportInput:
    """A result document from a path or a dict. Raises :class:`InputError` (one line, naming the file)."""
    path = None
    if isinstance(item, dict):  # as `compute` holds it: numpy scalars and arrays become what its JSON would hold
        doc = json.loads(json.dumps(item, default=_plain))
    else:
        path = os.fspath(item)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            depth = json_depth(text)
            if depth > MAX_JSON_DEPTH:
                raise InputError(f"{path}: JSON nested {depth} levels deep; fd-eval results never nest deeper than "
                                 f"{MAX_JSON_DEPTH}, so this is not an fd-eval result: pass the JSON written by "
                                 "`fd-eval compute --json`")
            doc = json.loads(text)
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"{path}: no such file; pass the JSON written by `fd-eval compute --json` "
                             "(or FDMetric.compute(), `fd-eval copies --json`)") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise InputError(f"{path}: not a readable JSON file ({_one_line(e)}); pass the JSON written by "
                             "`fd-eval compute --json`") from None
    where = path or f"result {index + 1}"
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict) or not doc["results"]:
        raise InputError(f"{where}: no \"results\" with at least one model; pass the JSON written by "
                         "`fd-eval compute --json`, FDMetric.compute() or `fd-eval copies --json`")
    for model, r in doc["results"].items():
        if not isinstance(r, dict):
            raise InputError(f"{where}: results[{model!r}] is not an object; the file is not an fd-eval result")
    copies = all("per_image" in r or "n_copies" in r for r in doc["results"].values())
    prov = doc.get("provenance") if isinstance(doc.get("provenance"), dict) else {}
    gen = prov.get("generated") if isinstance(prov.get("generated"), dict) else {}
    step = doc.get("step", gen.get("step"))
    if step is None and path is not None:
        m = _STEP_RE.search(Path(path).stem)
        step = int(m.group(1)) if m else None
    try:
        step = None if step is None else int(step)
    except (TypeError, ValueError):
        raise InputError(f"{where}: \"step\" is {step!r}, not an integer") from None
    if label is None:
        label = Path(path).stem if path else str(gen.get("spec") or f"result {index + 1}")
    return ReportInput(doc, "copies" if copies else "fd", label, step,
                       Path(path).resolve().parent if path else None, path)


# Results documents nest about 8 levels (provenance > extractors > model > preprocess > ...); a file nested deeper
# than this is refused before parsing (Python's json recursion would end in a RecursionError traceback).
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in JSON ``text`` (strings skipped); a linear scan, no recursion."""
    depth = deepest = 0
    for m in _JSON_BRACKET.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if m.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _plain(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


# --- identity: what may share an axis -------------------------------------------------------------------------
def extractor_identity(doc: dict[str, Any], model: str) -> tuple[str, str, str, str]:
    """(model, weights sha256, preprocessing as canonical JSON, reference) of one model of a result: results
    whose identities differ are never drawn on one axis (their FDs are not comparable)."""
    prov = doc.get("provenance") or {}
    ex = (prov.get("extractors") or {}).get(model) or {}
    ref = prov.get("reference") or {}
    ref_id = next((str(ref[k]) for k in ("name", "sha256", "fingerprint", "path", "spec", "origin") if ref.get(k)),
                  str(ref.get("kind") or "?")) if isinstance(ref, dict) else str(ref)
    return (model, str(ex.get("weights_sha256") or "?"), json.dumps(ex.get("preprocess"), sort_keys=True), ref_id)


def _identity_label(ident: tuple[str, str, str, str]) -> str:
    model, sha, pre, ref = ident
    p = json.loads(pre) or {}
    size = p.get("size")
    resize = " ".join(str(p[k]) for k in ("resize_library", "resize_filter") if p.get(k))
    size = f" {size[0]}x{size[1]}" if isinstance(size, list) and len(size) == 2 else ""
    return f"{model} · weights {sha[:12]} · resize {resize or '?'}{size} · reference {ref[:40]}"


# --- html pieces ----------------------------------------------------------------------------------------------
_CSS = """
:root{--fg:#1b1f24;--mute:#5c6670;--line:#d7dce1;--bg:#fff;--accent:#4477aa}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
background:var(--bg);margin:0 auto;max-width:1100px;padding:1.2rem 1.4rem 3rem}
h1{font-size:1.5rem;margin:.2rem 0}h2{font-size:1.2rem;margin:2rem 0 .4rem;border-bottom:1px solid var(--line);
padding-bottom:.2rem}h3{font-size:1rem;margin:1.2rem 0 .3rem}
.sub,.note{color:var(--mute);font-size:.9em}
table{border-collapse:collapse;margin:.4rem 0;font-variant-numeric:tabular-nums;width:auto;max-width:100%}
th,td{padding:.25rem .6rem;border-bottom:1px solid var(--line);text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f7;font-weight:600}
td{white-space:nowrap}td.l,th.l{text-align:left}
.table-wrap{overflow-x:auto}
svg.chart{width:100%;height:auto;max-width:760px;display:block;margin:.4rem 0}
ul.warn{background:#fff8e6;border:1px solid #f0d48a;padding:.5rem 1.6rem;border-radius:4px;font-size:.9em}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(136px,1fr));gap:.5rem;margin:.5rem 0}
figure{margin:0;text-align:center}figure img{max-width:128px;max-height:128px;display:block;margin:0 auto;
border:1px solid var(--line)}figcaption{font-size:.75em;color:var(--mute);overflow-wrap:anywhere}
.pair{display:flex;gap:.6rem;align-items:flex-start;border:1px solid var(--line);border-radius:4px;padding:.4rem}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.6rem}
.missing{color:var(--mute);font-style:italic}
details{margin:.6rem 0;border:1px solid var(--line);border-radius:4px;padding:.3rem .6rem}
summary{cursor:pointer;font-weight:600}pre{white-space:pre-wrap;overflow-wrap:anywhere;font-size:.8em}
@media print{body{max-width:none;padding:0;font-size:11px}section,figure,svg.chart,.pair,table{break-inside:avoid}
details{border:none}h2{break-after:avoid}}
"""


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """A table; the first ``left`` columns are left-aligned text, cells are pre-escaped HTML."""
    th = "".join(f'<th{" class=l" if i < left else ""}>{h}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td{" class=l" if i < left else ""}>{c}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<div class="table-wrap"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _warnings(doc: dict[str, Any]) -> str:
    ws = [w for w in doc.get("warnings") or [] if isinstance(w, str)]
    skipped = doc.get("skipped") or []
    if skipped:
        ws.append(f"{len(skipped)} input image(s) skipped: "
                  + "; ".join(f"{s.get('name')}: {s.get('reason')}" for s in skipped[:5] if isinstance(s, dict))
                  + (" ..." if len(skipped) > 5 else ""))
    return f'<ul class="warn">{"".join(f"<li>{_esc(w)}</li>" for w in ws)}</ul>' if ws else ""


def _floor_cell(r: dict[str, Any]) -> str:
    floor = _float(r.get("floor"))
    if floor is None:
        return "-"
    rel = r.get("floor_relation")
    return f"{floor:g}" + (f' <span class="note">({_esc(rel)})</span>' if rel else "")


def _ci_cell(r: dict[str, Any]) -> str:
    b = (r.get("analysis") or {}).get("bootstrap") or {}
    if _float(b.get("low")) is None:
        return "-"
    lvl = _float(b.get("ci"))
    return (f"[{_num(b['low'])}, {_num(b.get('high'))}]"
            + (f' <span class="note">{lvl * 100:g}%, {_int(b.get("n_boot"))} reps</span>' if lvl else ""))


def _fd_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"model": m, **r} for m, r in results.items()]


def _result_section(inp: ReportInput, i: int, thumbs: int, seed: int, compact: bool) -> str:
    """One result: its table, charts, analyses, samples and provenance. ``compact`` (one of several results):
    folded into a <details> without the FD bar chart, which the comparison above already draws."""
    doc, results = inp.doc, inp.doc["results"]
    prov = doc.get("provenance") or {}
    gen = prov.get("generated") if isinstance(prov.get("generated"), dict) else {}
    rows = _fd_rows(results)
    head = _esc(inp.label) + (f' <span class="note">step {inp.step:,}</span>' if inp.step is not None else "")
    out = [f'<section class="result" id="result-{i}">'
           + (f"<details><summary>{head}: FD {_fd_summary(rows)}</summary>" if compact else f"<h2>{head}</h2>")]
    ref = prov.get("reference") or {}
    if isinstance(ref, dict):
        ref_name = ref.get("name") or ref.get("spec") or ref.get("path") or ref.get("origin") or ref.get("kind")
        out.append(f'<p class="sub">generated: {_esc(gen.get("spec", "?"))} · reference: {_esc(ref_name)}'
                   + (f' · device: {_esc(prov["device"])}' if prov.get("device") else "") + "</p>")
    out.append(_warnings(doc))
    cmmd = any(r.get("cmmd") is not None for r in rows)  # CLIP models: CMMD beside FD
    out.append(_table(
        ["model", "FD"] + (["CMMD"] if cmmd else []) + ["mean term", "cov term", "N", "N ref", "published floor",
                                                        "independent-sample floor (est.)", "bootstrap interval"],
        [[_esc(r["model"]), f'<b class="fd">{_num(r.get("fd"))}</b>']
         + ([_num(r.get("cmmd")) if r.get("cmmd") is not None else "-"] if cmmd else [])
         + [_num(r.get("fd_mean")), _num(r.get("fd_cov")), _int(r.get("n")), _int(r.get("n_ref")), _floor_cell(r),
            _num(r.get("floor_independent_estimate"), 2) if r.get("floor_independent_estimate") is not None else "-",
            _ci_cell(r)] for r in rows]))
    notes = []
    if cmmd:
        notes.append("CMMD (Jayasumana et al. 2024): MMD² of CLIP ViT-L/14@336 embeddings, Gaussian kernel sigma = 10, "
                     "biased estimator, times 1000, as google-research cmmd; every image is used "
                     "(docs/metrics-cmmd-clipscore.md).")
    if any(r.get("floor") is not None for r in rows):
        notes.append("Published floor: the FD of real images of the same N against this reference, what a perfect "
                     "generator scores (not 0). <i>subset</i>: the published real sample is part of the reference, "
                     "which scores slightly lower than an independent sample would; the independent-sample "
                     "estimate is the fairer floor for generated images.")
    if any(r["model"] == GPIC_BASELINE_MODEL for r in rows):
        notes.append(f"GPIC baseline (dashed): {GPIC_BASELINE}, the paper's JiT-style 1.1B pixel flow model "
                     "(50-step Euler, CFG 6.25), FD-DINOv2 ViT-L/14 against Test-1M.")
    out += [f'<p class="note">{n}</p>' for n in notes]
    if not compact:
        out.append(_fd_chart(rows, f"{i}-fd"))
    for j, r in enumerate(rows):
        svg = _fd_infinity_chart(r["model"], r, f"{i}-fdinf-{j}")
        if svg:
            fi = r["analysis"]["fd_infinity"]
            out.append(f'<h3>FD against N: {_esc(r["model"])}</h3>{svg}<p class="note">FD∞ = '
                       f'{_num(fi.get("fd_infinity"))}, R² = {_num(fi.get("r2"), 3)}, {_int(fi.get("n_reps"))} '
                       f'repetitions per N, seed {_esc(fi.get("seed"))}; {_esc(fi.get("sampling", ""))}</p>')
    out.append(_prdc_mmd(rows))
    if not compact:
        out.append(_samples_html(gen.get("spec"), inp.base, thumbs, seed))
    out.append(_provenance(doc))
    out.append(("</details>" if compact else "") + "</section>")
    return "".join(out)


def _fd_summary(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f'{_esc(r["model"])} <b class="fd">{_num(r.get("fd"))}</b>' for r in rows)


def _prdc_mmd(rows: list[dict[str, Any]]) -> str:
    prdc = [(r["model"], (r.get("analysis") or {}).get("prdc")) for r in rows]
    mmd = [(r["model"], (r.get("analysis") or {}).get("mmd")) for r in rows]
    out = ""
    if any(p for _, p in prdc):
        out += "<h3>Precision, recall, density, coverage</h3>" + _table(
            ["model", "precision", "recall", "density", "coverage", "k", "real / generated rows"],
            [[_esc(m), *(_num(p.get(k)) for k in ("precision", "recall", "density", "coverage")),
              _esc(p.get("nearest_k", "-")), f"{_int(p.get('n_real'))} / {_int(p.get('n_fake'))}"]
             for m, p in prdc if p])
    if any(p for _, p in mmd):
        out += "<h3>MMD (KID)</h3>" + _table(
            ["model", "MMD²", "std over subsets", "subsets × size"],
            [[_esc(m), _num(p.get("mmd"), 6), _num(p.get("std"), 6),
              f"{_int(p.get('n_subsets'))} × {_int(p.get('subset_size_used', p.get('subset_size')))}"]
             for m, p in mmd if p]) + '<p class="note">' + _esc(next(p for _, p in mmd if p).get("estimator", "")) \
            + "</p>"
    return out


def _samples_html(spec: Any, base: Path | None, n: int, seed: int) -> str:
    """The seeded thumbnail grid, or a line saying why there is none."""
    if n <= 0:
        return ""
    thumbs, why = sample_thumbnails(spec, base, n, seed)
    head = f'<h3>Generated samples <span class="note">(seeded choice of up to {n}, seed {seed})</span></h3>'
    if not thumbs:
        return head + f'<p class="missing">No samples shown: {_esc(why)}.</p>'
    return head + '<div class="grid">' + "".join(
        f'<figure><img alt="{_esc(c)}" src="{u}"><figcaption>{_esc(c)}</figcaption></figure>'
        for c, u in thumbs) + "</div>"


def _provenance(doc: dict[str, Any]) -> str:
    prov = doc.get("provenance") or {}
    return ("<details><summary>Provenance</summary><pre>"
            + _esc(json.dumps(prov, indent=2, sort_keys=False, default=str)) + "</pre></details>")


def _comparison(inputs: list[ReportInput]) -> str:
    """Per extractor identity: a table and a chart of the results, by step when all have one, else by name."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for inp in inputs:
        for model, r in inp.doc["results"].items():
            b = (r.get("analysis") or {}).get("bootstrap") or {}
            groups.setdefault(extractor_identity(inp.doc, model), []).append(
                {"label": inp.label, "step": inp.step, "model": model, "fd": _float(r.get("fd")),
                 "fd_mean": r.get("fd_mean"), "fd_cov": r.get("fd_cov"), "n": r.get("n"),
                 "floor": _float(r.get("floor")), "low": _float(b.get("low")), "high": _float(b.get("high"))})
    out = ['<section id="comparison"><h2>Comparison</h2>']
    if len(groups) > 1:
        out.append(f'<p class="note">{len(groups)} groups: results made with different extractors, weights, '
                   "preprocessing or references are not comparable and are never drawn on one axis.</p>")
    for g, (ident, pts) in enumerate(groups.items()):
        by_step = all(p["step"] is not None for p in pts)
        pts.sort(key=(lambda p: (p["step"], _natural(p["label"]))) if by_step else (lambda p: _natural(p["label"])))
        title = ("FD over training steps" if by_step else "FD by result") + f": {ident[0]}"
        out.append(f"<h3>{_esc(title)}</h3><p class=\"note\">{_esc(_identity_label(ident))}</p>")
        if len(pts) > 1:
            out.append(_series_chart(pts, by_step, title, f"cmp-{g}"))
        out.append(_table(
            ["result", "step", "FD", "bootstrap interval", "mean term", "cov term", "N", "published floor"],
            [[_esc(p["label"]), _int(p["step"]), f'<b class="fd">{_num(p["fd"])}</b>',
              f"[{_num(p['low'])}, {_num(p['high'])}]" if p["low"] is not None else "-", _num(p["fd_mean"]),
              _num(p["fd_cov"]), _int(p["n"]), f"{p['floor']:g}" if p["floor"] is not None else "-"] for p in pts]))
    out.append("</section>")
    return "".join(out)


def _natural(s: str) -> list[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s)]


def _copies_section(inp: ReportInput, i: int, max_pairs: int) -> str:
    """Suspected copies (similarity at or above the threshold, most similar first) beside their nearest
    training images, per model."""
    doc = inp.doc
    prov = doc.get("provenance") or {}
    gen_spec, train_spec = _copies_specs(prov)
    gen_src, gen_why = _open(gen_spec, inp.base)
    train_src, train_why = _open(train_spec, inp.base)
    out = [f'<section class="copies" id="copies-{i}"><h2>Suspected copies: {_esc(inp.label)}</h2>']
    if gen_src is None or train_src is None:
        out.append(f'<p class="missing">Thumbnails not shown: {_esc(gen_why or train_why)}.</p>')
    try:
        for model, r in doc["results"].items():
            out += _copies_model(model, r, gen_src, train_src, max_pairs)
    finally:
        for src in (gen_src, train_src):
            if src is not None:
                src.close()
    out.append(_provenance(doc) + "</section>")
    return "".join(out)


def _copies_specs(prov: dict[str, Any]) -> tuple[Any, Any]:
    """(generated spec, training spec) of a copies document: ``fd-eval copies --json`` records them as strings
    (``gen``, ``train``; with ``--train-index`` the index's source folders in ``train_index.sources``); older or
    hand-made documents as ``{"spec": ...}`` under ``generated`` / ``train``."""
    def spec(v: Any) -> Any:
        return v.get("spec") if isinstance(v, dict) else v

    gen = spec(prov.get("generated")) or spec(prov.get("gen"))
    idx = prov.get("train_index")
    train = (idx.get("sources") or [None])[0] if isinstance(idx, dict) else spec(prov.get("train"))
    return gen, train


def _quantile_table(q: Any) -> str:
    """Top-1 similarity quantiles as one readable row (p0 ... p100), not a raw dict."""
    if not isinstance(q, dict) or not q:
        return ""
    def level(k: str) -> float | None:
        try:
            return float(k)
        except ValueError:
            return None

    keys = sorted(q, key=lambda k: (level(k) is None, level(k) or 0.0, k))
    head = [f"p{level(k) * 100:g}" if level(k) is not None else _esc(k) for k in keys]  # type: ignore[operator]
    return ('<p class="sub">Top-1 similarity quantiles</p>'
            + _table(head, [[_num(_float(q[k])) for k in keys]], left=0))


def _copies_model(model: str, r: dict[str, Any], gen_src: Any, train_src: Any, max_pairs: int) -> list[str]:
    """One model's copies: the summary line, the recorded statistics, and up to ``max_pairs`` image pairs."""
    out = []
    thr = _float(r.get("threshold"))
    per = [p for p in r.get("per_image") or [] if isinstance(p, dict) and p.get("nearest")]
    flagged = [p for p in per if p.get("copy") or p.get("is_copy")
               or (thr is not None and (_float(p["nearest"][0].get("similarity")) or -1) >= thr)]
    flagged.sort(key=lambda p: (-(_float(p["nearest"][0].get("similarity")) or 0), str(p.get("index"))))
    frac = _float(r.get("copy_fraction"))
    out.append(f"<h3>{_esc(model)}</h3><p class=\"sub\">{_int(r.get('n_copies'))} suspected copies"
               + (f" ({frac * 100:.2f}% of the generated images)" if frac is not None else "")
               + (f" at similarity ≥ {thr:g}" if thr is not None else "")
               + (f" · showing the {min(max_pairs, len(flagged))} most similar" if flagged else "") + "</p>")
    names = {"authpct": "AuthPct (% authentic)", "ct": "C_T (data-copying test)", "n_gen": "generated images",
             "n_train": "training images", "top_k": "neighbours kept (K)"}
    extra = [[_esc(names[k]), "null" if r[k] is None else _int(r[k]) if k.startswith(("n_", "top")) else _num(r[k])]
             for k in names if k in r]
    search = r.get("search")
    if isinstance(search, dict) and search.get("approximate"):
        extra.append(["search", _esc(f"approximate ({search.get('method')}), recall@1 "
                                     f"{_num(_float(search.get('recall_at_1')))} on {search.get('recall_sample')} "
                                     "queries")])
    if extra:
        out.append(_table(["statistic", "value"], extra))
    out.append(_quantile_table(r.get("quantiles")))
    shown = flagged[:max_pairs]
    gen_at = _locate(gen_src, [(p.get("name"), p.get("index")) for p in shown])
    train_at = _locate(train_src, [(p["nearest"][0].get("key"), p["nearest"][0].get("index")) for p in shown])
    pairs = []
    for p, gj, tj in zip(shown, gen_at, train_at):
        near = p["nearest"][0]
        g = _img_fig(gen_src, gj, f"generated {p.get('name') or p.get('index')}")
        t = _img_fig(train_src, tj, f"train {near.get('key')}")
        pairs.append(f'<div class="pair">{g}{t}<div class="note">similarity<br><b>'
                     f'{_num(_float(near.get("similarity")))}</b></div></div>')
    if pairs:
        out.append('<div class="pairs">' + "".join(pairs) + "</div>")
    return out


def _locate(src: Any, wanted: list[tuple[Any, Any]]) -> list[int | None]:
    """Indices in ``src`` of (name or key, index hint) pairs: the hint when the item there has that name, else
    the item whose file name (or name without extension, e.g. a GPIC tar key) matches, found in one scan that
    stops when all are found. None: not in the source."""
    if src is None:
        return [None] * len(wanted)
    n = len(src)
    out: list[int | None] = []
    need: dict[str, list[int]] = {}
    for w, (name, hint) in enumerate(wanted):
        key = _short_name(str(name)) if name is not None else None
        ok_hint = isinstance(hint, int) and 0 <= hint < n
        if ok_hint and (key is None or _short_name(src.describe(hint)) in (key, key.rsplit(".", 1)[0])):
            out.append(hint)
            continue
        out.append(None)
        if key is not None:
            need.setdefault(key, []).append(w)
    for j in range(n if need else 0):
        name = _short_name(src.describe(j))
        for k in {name, name.rsplit(".", 1)[0]} & need.keys():
            for w in need.pop(k):
                out[w] = j
        if not need:
            break
    return out


def _img_fig(src: Any, j: int | None, caption: str) -> str:
    cap = f"<figcaption>{_esc(caption)}</figcaption>"  # wrapped by the CSS, never cut
    if src is None:
        return f'<figure><div class="missing">not reachable</div>{cap}</figure>'
    if j is None:
        return f'<figure><div class="missing">not found in the source</div>{cap}</figure>'
    img, err = src.load_checked(j)
    if img is None:
        return f'<figure><div class="missing">unreadable</div>{cap}</figure>'
    return f'<figure><img alt="{_esc(caption)}" src="{_thumb_uri(img)}">{cap}</figure>'


# --- the page -------------------------------------------------------------------------------------------------
def build_report(results: Sequence["str | os.PathLike | dict[str, Any]"], *, labels: Sequence[str] | None = None,
                 title: str | None = None, thumbnails: int = 16, seed: int = 0, max_copies: int = 12) -> str:
    """The report page as a string (see the module docstring).

    Args:
        results: result documents (dicts) or paths of their JSON files; fd results and copies results in any order.
        labels: names for the results (default: file stems, else the generated spec).
        thumbnails: generated samples shown per result (0: none); only for a single fd result, or the last one
            (highest step) of several.
        seed: the seed of the thumbnail choice.
        max_copies: most suspected copies shown per model.

    Raises:
        InputError: a file that is missing or not an fd-eval result (one line naming it).
        ReportDependencyError: matplotlib is not installed.
    """
    require_matplotlib()  # before reading anything: the missing extra is the first thing to fix
    if not results:
        raise InputError("no result given; pass at least one JSON written by `fd-eval compute --json`")
    if labels is not None and len(labels) != len(results):
        raise InputError(f"{len(labels)} labels for {len(results)} results; give one label per result")
    inputs = [read_input(r, i, None if labels is None else labels[i]) for i, r in enumerate(results)]
    fds = [x for x in inputs if x.kind == "fd"]
    copies = [x for x in inputs if x.kind == "copies"]
    if fds and all(x.step is not None for x in fds):
        fds.sort(key=lambda x: x.step)
    body = []
    if len(fds) > 1:
        body.append(_comparison(fds))
    if len(fds) > 1:
        body.append("<h2>Results</h2>")
    for i, x in enumerate(fds):
        body.append(_result_section(x, i, thumbnails, seed, compact=len(fds) > 1))
    if len(fds) > 1:  # the samples of the last result (the latest step): one grid, not one per checkpoint
        last = fds[-1]
        gen = (last.doc.get("provenance") or {}).get("generated") or {}
        body.append(f'<section id="samples"><h2>Samples of {_esc(last.label)}</h2>'
                    + _samples_html(gen.get("spec") if isinstance(gen, dict) else None, last.base, thumbnails, seed)
                    + "</section>")
    for i, x in enumerate(copies):
        body.append(_copies_section(x, i, max_copies))
    if title is None:
        title = "fd-eval report" + (f": {fds[0].label}" if len(fds) == 1 else f": {len(fds)} results" if fds else "")
    models = sorted({m for x in fds for m in x.doc["results"]})
    sub = (f"{len(fds)} FD result(s)" + (f", {len(copies)} copies result(s)" if copies else "")
           + (f" · models: {', '.join(models)}" if models else "") + f" · made by fd-eval {__version__}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body><header><h1>{_esc(title)}</h1>"
            f'<p class="sub">{_esc(sub)}</p></header>\n' + "\n".join(body) + "\n</body></html>\n")


def write_report(results: Sequence["str | os.PathLike | dict[str, Any]"], out: "str | os.PathLike", **kw: Any) -> Path:
    """Build the report (:func:`build_report`, same keyword arguments) and write it atomically to ``out``.

    ``fd-eval compute --report PATH`` calls ``write_report([doc], PATH)`` with its ``--json`` document.
    Returns the path written.
    """
    page = build_report(results, **kw)
    out = Path(out)
    with atomic_write(out, "wb") as f:
        f.write(page.encode("utf-8"))
    return out
