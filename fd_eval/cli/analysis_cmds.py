"""`fd-eval ceiling` (real images scored like generated ones) and the analysis options of `fd-eval compute`
(``--ci/--bootstrap``, ``--fd-infinity``, ``--prdc``, ``--mmd``, ``--analysis-seed``)."""
from __future__ import annotations

import sys
from typing import Any

import click

from ..extractors.preprocess import SOURCE_TRANSFORMS
from ..metrics.analysis import AnalysisSpec, analyze_result
from ..metrics.ceiling import ceiling as real_ceiling
from ..metrics.ceiling import split_half as real_split_half
from ..run.options import RunOptions
from ._checks import check_paths, render_accounting
from ._common import (
    echo_table,
    fmt_num,
    main,
    model_option,
    run_options,
    warn,
    weights_arg,
    weights_option,
    write_json,
)


# --- the analysis options of `compute` ----------------------------------------------------------------------
def analysis_options(f):
    """Adds the analysis options; the command receives them as keyword arguments for :func:`analysis_spec`."""
    opts = [
        click.option("--ci", type=float, default=None,
                     help="Bootstrap confidence interval for FD at this level, e.g. 0.95 (for E[FD] at this N)."),
        click.option("--bootstrap", "n_boot", type=int, default=None,
                     help="Bootstrap replicates (default 100 with --ci; alone it implies --ci 0.95)."),
        click.option("--fd-infinity", is_flag=True,
                     help="Extrapolate FD to infinitely many samples (fit in 1/N; Chong & Forsyth 2020)."),
        click.option("--prdc", is_flag=True,
                     help="Precision, recall, density, coverage (k=5, seeded subsets of <= 10K); needs reference "
                          "features."),
        click.option("--mmd", is_flag=True,
                     help="Polynomial-kernel MMD (KID: degree 3, 100 seeded subsets of 1000); needs reference "
                          "features."),
        click.option("--analysis-seed", type=int, default=0, show_default=True,
                     help="Seed of every analysis draw (bootstrap, FD-infinity, PRDC/MMD subsets); recorded."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def analysis_spec(ci: float | None = None, n_boot: int | None = None, fd_infinity: bool = False,
                  prdc: bool = False, mmd: bool = False, analysis_seed: int = 0) -> AnalysisSpec | None:
    """The options of :func:`analysis_options` as an :class:`AnalysisSpec`; None when none was given."""
    if ci is None and n_boot is not None:
        ci = 0.95
    spec = AnalysisSpec(ci=ci, n_boot=100 if n_boot is None else n_boot, fd_infinity=fd_infinity, prdc=prdc,
                        mmd=mmd, seed=analysis_seed)
    return spec if spec.requested else None


def run_analysis(res: Any, spec: AnalysisSpec, device: str | None = None) -> dict[str, dict[str, Any]]:
    """Analyses of a `compute` result (see :func:`fd_eval.metrics.analysis.analyze_result`), printed as a compact
    table."""
    analyses = analyze_result(res, spec, device=device)
    for a in analyses.values():
        for w in a["warnings"]:
            warn(w)
    echo_analysis(analyses, spec, reference_biases(res) if spec.fd_infinity else None)
    return analyses


def reference_biases(res: Any) -> dict[str, float | None]:
    """c / M per model (the reference's own finite-sample share of FD) for a registry reference with floors."""
    ref = res.provenance.get("reference") or {}
    if ref.get("kind") != "registry" or not ref.get("name"):
        return {}
    from ..errors import UnknownReferenceError
    from ..outputs.references import get_reference

    try:
        entry = get_reference(ref["name"])
    except UnknownReferenceError:
        return {}
    return {m: (fm.reference_bias if (fm := entry.floor_model(m)) else None) for m in res.results}


def echo_analysis(analyses: dict[str, dict[str, Any]], spec: AnalysisSpec,
                  ref_bias: dict[str, float | None] | None = None) -> None:
    """The analysis table; ``ref_bias``: c / M per model, printed beside FD-infinity (None: not known)."""
    header = ["model"]
    if spec.bootstrap:
        header.append(f"FD {spec.ci * 100:g}% CI")
    if spec.fd_infinity:
        header += ["FD-infinity", "fit R^2", "ref. bias (est.)"]
    if spec.prdc:
        header += ["precision", "recall", "density", "coverage"]
    if spec.mmd:
        header.append("MMD")
    rows = []
    for model, a in analyses.items():
        row = [model]
        if spec.bootstrap:
            b = a["bootstrap"]
            row.append(f"[{fmt_num(b['low'])}, {fmt_num(b['high'])}]")
        if spec.fd_infinity:
            bias = (ref_bias or {}).get(model)
            row += [fmt_num(a["fd_infinity"]["fd_infinity"]), f"{a['fd_infinity']['r2']:.3f}",
                    "?" if bias is None else f"{bias:.2f}"]
        if spec.prdc:
            row += [f"{a['prdc'][k]:.4f}" for k in ("precision", "recall", "density", "coverage")]
        if spec.mmd:
            row.append(fmt_num(a["mmd"]["mmd"]))
        rows.append(row)
    click.echo("")
    echo_table(rows, header)
    notes = [f"seed {spec.seed}"]
    if spec.bootstrap:
        notes.append(f"bootstrap: {spec.n_boot} replicates, interval for E[FD] at this N")
    if spec.fd_infinity:
        notes.append("FD-infinity removes only the generated side's 1/N bias; the reference's own ~c/M (ref. bias, "
                     "a model estimate; ? = unknown) remains in it")
    if spec.prdc:
        notes.append(f"PRDC: k={spec.nearest_k}, <= {spec.prdc_max:,} rows each")
    if spec.mmd:
        notes.append(f"MMD^2: {spec.mmd_subsets} subsets of <= {spec.mmd_subset_size}")
    click.echo("analysis: " + "; ".join(notes) + " (details in --json)")


# --- `fd-eval ceiling` --------------------------------------------------------------------------------------
def overlap_text(o: dict[str, Any], ref_name: str) -> str:
    """One line: whether the real sample is part of the reference, and what that makes the result."""
    how = {"keys": "by image keys", "fingerprint": "same source fingerprint"}.get(o.get("method") or "", "")
    if o.get("relation") == "subset":
        return (f"overlap ({how}): all {o['n']:,} real images are part of {ref_name}: a subset result, comparable "
                "with published subset floors (GPIC Test-50K); a generator's independent floor is higher")
    if o.get("relation") == "independent":
        return (f"overlap ({how}): none of the {o['n']:,} real images is in {ref_name}: an independent-sample "
                "result, the floor a generator faces")
    if o.get("relation") == "partial":
        return (f"overlap ({how}): {o['in_reference']:,} of {o['n']:,} real images are in {ref_name}: between "
                "a subset and an independent floor")
    return (f"overlap: cannot tell whether the real images are part of {ref_name} (it records no image keys or "
            "source fingerprint)")


def _short_n(n: int) -> str:
    return f"{n // 1000}K" if n >= 1000 and n % 1000 == 0 else f"{n:,}"


@main.command("ceiling")
@click.option("--real", "real", required=True, help="Real images (GPIC val, a held-out test subset, ...).")
@click.option("--ref", "-r", default=None,
              help="Reference: a registry name, a statistics file or an image source [default: gpic-test].")
@click.option("--split-half", is_flag=True,
              help="Real vs real: two disjoint seeded halves of --real against each other (no --ref).")
@click.option("--num", "-n", type=int, default=None,
              help="Real images (per half with --split-half) [default: 50,000; split-half: min(50,000, half)].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample (of the split).")
@model_option()
@weights_option
@click.option("--transform", "image_transform", type=click.Choice(list(SOURCE_TRANSFORMS)), default=None,
              help="Transform the real images first (center-crop-256 = GPIC reference preprocessing, App. B.1).")
@click.option("--ref-transform", type=click.Choice(list(SOURCE_TRANSFORMS)), default=None,
              help="Transform reference images first when REF is an image source.")
@run_options(offline=True)
@click.option("--allow-mismatch", is_flag=True, help="Compare even if the reference was made differently.")
@click.option("--json", "json_path", default=None, help="Write results and provenance as JSON here.")
def ceiling_cmd(real: str, ref: str | None, split_half: bool, num: int | None, seed: int, models: tuple[str, ...],
                weights: tuple[str, ...], image_transform: str | None, ref_transform: str | None,
                options: RunOptions, allow_mismatch: bool, json_path: str | None) -> None:
    """FD of N real images against REF (GPIC Table 2's definition: the sample's statistics against the
    reference's), shown beside the published floors and the independent-sample estimate, and whether the sample is
    part of the reference (then it scores below what a perfect generator can reach); or, with --split-half, two
    disjoint halves of the real images against each other."""
    check_paths({"--real": real, "--ref": ref, "--weights": weights_arg(weights)}, json=json_path)
    opts = dict(weights=weights_arg(weights), image_transform=image_transform, options=options)
    if split_half:
        if ref is not None:
            raise click.UsageError("--split-half compares --real with itself; drop --ref (or drop --split-half)")
        res = real_split_half(real, models, n=num, seed=seed, **opts)
    else:
        res = real_ceiling(real, ref or "gpic-test", models, n=50_000 if num is None else num, seed=seed,
                           ref_image_transform=ref_transform, allow_mismatch=allow_mismatch, **opts)
    for w in res.warnings:
        warn(w)
    render_accounting(res.inputs)
    rows = []
    for model, r in res.results.items():
        floor = "-" if r["floor"] is None else f"{r['floor']:.2f}" + (f" ({r['floor_relation']})"
                                                                        if r.get("floor_relation") else "")
        row = [model, fmt_num(r["fd"]), fmt_num(r["fd_mean"]), fmt_num(r["fd_cov"]), f"{r['n']:,}",
               f"{r['n_ref']:,}" if r["n_ref"] else "?"]
        est = r.get("floor_independent_estimate")
        rows.append(row if split_half else row + [floor, "-" if est is None else f"{est:.2f}"])
    if split_half:
        echo_table(rows, ["model", "FD half a vs b", "mean term", "cov term", "N a", "N b"])
        click.echo("split-half: two disjoint real samples of N images; their FD is about twice the FD of one such "
                   "sample against a much larger reference")
    else:
        echo_table(rows, ["model", "real-vs-ref FD", "mean term", "cov term", "N", "N ref", "published floor",
                          "indep. floor (est.)"])
        name = res.provenance["reference"].get("name") or ref or "gpic-test"
        for model, r in res.results.items():
            if r["floors"]:
                listed = ", ".join(f"{f['fd']:g} at N={_short_n(f['n'])} ({f['label']})" for f in r["floors"])
                click.echo(f"published floors, {name} / {model}: {listed}; {r['floors'][0]['source']}")
        overlap = next(iter(res.results.values()))["overlap"]
        click.echo(overlap_text(overlap, name))
        if overlap.get("relation") in ("subset", "partial"):
            click.echo("real-vs-ref FD: these real images share the reference's sampling noise, so they score lower "
                       "than an independent sample; a generator's floor is about the independent estimate "
                       "(indep. floor, docs/floors.md)")
        else:
            click.echo("real-vs-ref FD: what a generator indistinguishable from these real images scores at this "
                       "N; compare generated sets at the same N")
    if json_path:
        doc = res.to_dict()
        doc["provenance"]["command"] = ["fd-eval", *sys.argv[1:]]
        write_json(json_path, doc)

