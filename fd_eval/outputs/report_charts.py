"""The report's pictures and number formats: inline-SVG charts drawn with matplotlib (FD by model, FD-infinity
fits, FD over training steps), sample thumbnails as ``data:`` URIs, and the number formatting every table uses.
The page itself is :mod:`fd_eval.outputs.report`. SVGs are deterministic (fixed hash salt, text kept as text).
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..errors import FDEvalError

GPIC_BASELINE = 76.25  # GPIC's baseline: JiT-style 1.1B pixel flow model, 50-step Euler, CFG 6.25 (FD-DINOv2)
GPIC_BASELINE_MODEL = "dinov2-vitl14"  # the baseline is an FD-DINOv2 ViT-L/14 number; other extractors differ
THUMB_PX = 128


class ReportDependencyError(FDEvalError):
    """matplotlib, which draws the report's charts, is not installed."""


# --- number formatting ----------------------------------------------------------------------------------------
def _one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def _num(x: Any, digits: int = 4) -> str:
    """Fixed notation with ``digits`` decimals for ordinary magnitudes, scientific for tiny ones; "-" for none."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if x == 0 or abs(x) >= 10 ** (-digits + 1) else f"{x:.3e}"


def _int(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "-"


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _float(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None



# --- matplotlib -----------------------------------------------------------------------------------------------
def require_matplotlib() -> Any:
    """The matplotlib module, or :class:`ReportDependencyError` (one line: how to install it). `fd-eval compute
    --report` calls it before extracting anything, so a missing extra costs no computation."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (backend-free: no pyplot, no display)
    except ImportError:
        raise ReportDependencyError("fd-eval report draws its charts with matplotlib, which is not installed: "
                                    "pip install 'fd-eval[report]'") from None
    return matplotlib


_RC = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
       "font.family": "sans-serif", "axes.titlesize": 10}


def _svg(draw, salt: str, size: tuple[float, float] = (7.0, 3.2), tight: bool = True) -> str:
    """``draw(fig)`` on a new figure, returned as inline SVG (no XML prolog; deterministic ids and no date)."""
    mpl = require_matplotlib()
    from matplotlib.figure import Figure

    with mpl.rc_context({**_RC, "svg.hashsalt": f"fd-eval-{salt}"}):
        fig = Figure(figsize=size)
        if not tight:  # the figure places its own legend; only the axes' left and bottom margins adapt
            fig.set_layout_engine("constrained", rect=(0, 0, 0.68, 1))
        draw(fig)
        if tight:
            fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": f"fd-eval {__version__}"})
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF namespaces; nothing to show
    return re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"', r'<svg class="chart" \1', text, count=1)


def _fd_chart(rows: list[dict[str, Any]], salt: str) -> str:
    """One bar per model, each on its own axis (extractors' FDs are not comparable): mean + covariance terms,
    bootstrap interval, published floor, independent-sample estimate, and the GPIC baseline where it applies
    (FD-DINOv2 ViT-L/14)."""
    def draw(fig):
        axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
        uniq: dict[str, Any] = {}
        for ax, r in zip(axes, rows):
            fd, mean, cov = _float(r.get("fd")), _float(r.get("fd_mean")), _float(r.get("fd_cov"))
            if mean is not None and cov is not None:
                ax.barh(0, mean, color="#4477aa", height=0.6, label="mean term")
                ax.barh(0, cov, left=mean, color="#88ccee", height=0.6, label="covariance term")
            elif fd is not None:
                ax.barh(0, fd, color="#4477aa", height=0.6, label="FD")
            boot = (r.get("analysis") or {}).get("bootstrap") or {}
            lo, hi = _float(boot.get("low")), _float(boot.get("high"))
            if fd is not None and lo is not None and hi is not None:
                ax.errorbar(fd, 0, xerr=[[max(fd - lo, 0)], [max(hi - fd, 0)]], fmt="o", color="black", ms=3,
                            capsize=4, label=f"FD, {_num(boot.get('ci', 0.95) * 100, 0)}% bootstrap interval")
            floor, ind = _float(r.get("floor")), _float(r.get("floor_independent_estimate"))
            if floor is not None:
                rel = r.get("floor_relation")
                ax.vlines(floor, -0.45, 0.45, color="#228833", lw=2.5,
                          label="published floor" + (f" ({rel})" if rel else ""))
            if ind is not None:
                ax.vlines(ind, -0.45, 0.45, color="#ccbb44", lw=2.5, label="independent-sample floor (est.)")
            if r["model"] == GPIC_BASELINE_MODEL:
                ax.axvline(GPIC_BASELINE, color="#ee6677", ls="--", lw=1.2, label=f"GPIC baseline {GPIC_BASELINE}")
            ax.set_yticks([0], [r["model"]])
            ax.set_ylim(-0.6, 0.6)
            ax.set_xlim(left=0)
            ax.set_xlabel(f"FD-{r['model']} (lower is better)", fontsize=8)
            for h, lab in zip(*ax.get_legend_handles_labels()):
                uniq.setdefault(lab, h)
        fig.legend(uniq.values(), uniq.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(0.7, 0.98),
                   frameon=False)
    return _svg(draw, salt, (7.5, 0.4 + 1.1 * len(rows)), tight=False)


def _fd_infinity_chart(model: str, r: dict[str, Any], salt: str) -> str | None:
    """FD against 1/N: every repetition, their means, the fitted line and its intercept FD-infinity."""
    fi = (r.get("analysis") or {}).get("fd_infinity") or {}
    ns, means = fi.get("ns") or [], fi.get("fd_mean") or []
    if not ns or len(ns) != len(means):
        return None

    def draw(fig):
        ax = fig.add_subplot()
        inv = np.array([1.0 / n for n in ns])
        for x, pts in zip(inv, fi.get("fd_points") or []):
            ax.plot([x] * len(pts), pts, ".", color="#bbbbbb", ms=4, label="FD of one repetition")
        ax.plot(inv, means, "o", color="#4477aa", ms=4, label="mean over repetitions")
        fdi, slope = _float(fi.get("fd_infinity")), _float(fi.get("slope"))
        if fdi is not None and slope is not None:
            xs = np.array([0.0, inv.max()])
            ax.plot(xs, fdi + slope * xs, "-", color="#ee6677", lw=1.2,
                    label=f"fit FD = FD∞ + c/N (R² = {_num(fi.get('r2'), 3)})")
            ax.plot([0.0], [fdi], "*", color="#ee6677", ms=10, label=f"FD∞ = {_num(fdi)}")
        ax.set_xlabel("1 / N  (N generated images)")
        ax.set_ylabel("FD")
        ax.set_title(f"{model}: FD against N")
        ticks = [n for n in ns if n in (ns[0], ns[len(ns) // 2], ns[-1])]
        sec = ax.secondary_xaxis("top")
        sec.set_xticks([1.0 / n for n in ticks], [f"N={n:,}" for n in ticks])
        ax.set_xlim(left=-0.04 * inv.max())
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, frameon=False)
    return _svg(draw, salt)


def _series_chart(points: list[dict[str, Any]], by_step: bool, title: str, salt: str) -> str:
    """FD of several results of one identity: against the step (line) or by name (points), with intervals."""
    def draw(fig):
        ax = fig.add_subplot()
        xs = [p["step"] for p in points] if by_step else list(range(len(points)))
        fd = [p["fd"] if p["fd"] is not None else np.nan for p in points]
        lo = [p["low"] if p["low"] is not None else np.nan for p in points]
        hi = [p["high"] if p["high"] is not None else np.nan for p in points]
        if by_step:
            ax.plot(xs, fd, "o-", color="#4477aa", ms=4, lw=1.2, label="FD")
            if any(not math.isnan(v) for v in lo):
                ax.fill_between(xs, lo, hi, color="#4477aa", alpha=0.2, lw=0, label="bootstrap interval")
            ax.set_xlabel("training step")
        else:
            err = [[f - low if not math.isnan(low) else 0 for f, low in zip(fd, lo)],
                   [h - f if not math.isnan(h) else 0 for f, h in zip(fd, hi)]]
            ax.errorbar(xs, fd, yerr=err, fmt="o", color="#4477aa", capsize=4, ms=5, label="FD (bootstrap interval)")
            ax.set_xticks(xs, [p["label"] for p in points], rotation=30 if len(points) > 4 else 0, ha="right"
                          if len(points) > 4 else "center")
        floors = {p["floor"] for p in points if p["floor"] is not None}
        if len(floors) == 1:
            ax.axhline(floors.pop(), color="#228833", lw=1, ls=":", label="published floor")
        if points and points[0]["model"] == GPIC_BASELINE_MODEL:
            ax.axhline(GPIC_BASELINE, color="#ee6677", ls="--", lw=1, label=f"GPIC baseline {GPIC_BASELINE}")
        ax.set_ylabel("FD")
        ax.set_title(title)
        ax.legend(fontsize=7, frameon=False)
    return _svg(draw, salt)


# --- images ---------------------------------------------------------------------------------------------------
def _resolve_spec(spec: Any, base: Path | None) -> str | None:
    """An image spec as recorded (relative to where the run started), tried as given and beside the JSON."""
    if not isinstance(spec, str) or not spec or spec.startswith("<"):
        return None
    cands = [spec] + ([str(base / spec)] if base is not None and not os.path.isabs(spec) else [])
    for c in cands:
        if os.path.exists(c) or any(ch in c for ch in "*?{["):
            return c
    return None


def _thumb_uri(img: Any) -> str:
    """A PIL image fitted into THUMB_PX x THUMB_PX (Pillow bicubic, never enlarged), as a JPEG data: URI."""
    from PIL import Image

    img = img.convert("RGB")
    scale = THUMB_PX / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, subsampling=0)  # 4:4:4: thin colour detail survives
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _open(spec: Any, base: Path | None) -> tuple[Any, str]:
    """(ImageSource, "") or (None, one-line reason)."""
    from ..sources import open_source

    if not isinstance(spec, str) or not spec:
        return None, "the result records no image location"
    if spec.startswith("<"):
        return None, f"the images were passed in memory ({spec}), so the result records no files to show"
    path = _resolve_spec(spec, base)
    if path is None:
        where = f" or {base}" if base is not None and not os.path.isabs(spec) else ""
        return None, f"the images at {spec!r} are not reachable from here (looked in the current directory{where})"
    try:
        return open_source(path), ""
    except FDEvalError as e:
        return None, f"the images at {spec!r} could not be opened: {_one_line(e)}"


def sample_thumbnails(spec: Any, base: Path | None = None, n: int = 16, seed: int = 0
                      ) -> tuple[list[tuple[str, str]], str]:
    """A seeded choice of up to ``n`` images of ``spec`` as (caption, data URI), sorted by index; or ([], reason)
    when the images are not reachable. The same (source, n, seed) always gives the same images."""
    src, why = _open(spec, base)
    if src is None:
        return [], why
    with src:
        k = min(n, len(src))
        idx = sorted(np.random.default_rng(seed).choice(len(src), size=k, replace=False).tolist())
        out = []
        for i in idx:
            img, err = src.load_checked(i)
            if img is not None:
                out.append((_short_name(src.describe(i)), _thumb_uri(img)))
    return out, "" if out else f"none of the {k} chosen images of {spec!r} decoded"


def _short_name(desc: str) -> str:
    """The file or member name of a source item: ``a/b/001.png`` and ``shard.tar:KEY.jpg`` -> ``001.png``,
    ``KEY.jpg``."""
    return desc.replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]


