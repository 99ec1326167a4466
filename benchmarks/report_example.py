"""Make the example screenshots of `fd-eval report` in docs/ from the tests' kind of data (nothing is timed).

    python benchmarks/report_example.py            # writes docs/report_example.png, docs/report_training_example.png
    python benchmarks/report_example.py --keep /tmp/report_example   # also keep the JSON and HTML there

1. ``fd-eval compute gen -r ref -m dinov2-vits14 --weights w.pth --ci 0.95 --bootstrap 50 --fd-infinity --prdc --mmd
   --json res.json`` on 48 seeded 64 px photo crops each, with random ViT-S/14 weights two blocks deep (the tests'
   helpers; no weights can be downloaded here), then ``fd-eval report res.json -o report.html``.
2. A "training run": FDMetric.compute(step=s) saved as step_00XXXX.json for 6 steps whose images blend from noise
   to photos, then one report of all six (FD over training steps).

Each page is opened in headless Chromium (--screenshot) and the PNG's blank bottom is trimmed. The FD values are
those of random weights: the screenshots show the page, not a model's quality.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def screenshot(page: Path, png: Path, width: int = 1000, height: int = 4000) -> None:
    """Headless Chromium screenshot of ``page``, cropped below the last non-white row."""
    from PIL import Image, ImageChops

    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        raise SystemExit("no Chromium on PATH: apt-get install chromium")
    with tempfile.TemporaryDirectory() as prof:
        subprocess.run([exe, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
                        f"--user-data-dir={prof}", f"--window-size={width},{height}", f"--screenshot={png}",
                        page.as_uri()], check=True, capture_output=True, timeout=180)
    im = Image.open(png).convert("RGB")
    box = ImageChops.difference(im, Image.new("RGB", im.size, (255, 255, 255))).getbbox()
    im.crop((0, 0, im.width, min(im.height, box[3] + 24))).save(png, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go")
    ap.add_argument("--keep", default=None, help="keep the inputs, JSON and HTML in this folder")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="report_example_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["FD_EVAL_CACHE"] = str(work / "cache")  # never the user's cache
    torch.set_num_threads(1)

    from click.testing import CliRunner

    import fd_eval
    import fd_eval.extractors.dinov2 as dv
    from _checkpoints import save_dinov2_checkpoint
    from _images import photo_crops, save_images
    from fd_eval.cli import main as cli
    from fd_eval.outputs.report import write_report

    dv._build_extractor = functools.partial(dv._build_extractor, _depth=2)  # real ViT-S/14, two blocks deep
    ckpt, _ = save_dinov2_checkpoint(work / "w.pth", "vits14", "official", seed=3, depth=2)
    photos = photo_crops(48, 64, 64, seed=1)
    for name, arr in (("gen", photos), ("ref", photo_crops(48, 64, 64, seed=2))):
        if not (work / name).exists():
            save_images(arr, work / name)
    os.chdir(work)  # relative specs, as a user types them; the report finds them beside the JSON
    r = CliRunner().invoke(cli, ["compute", "gen", "-r", "ref", "-m", "dinov2-vits14", "--weights", "w.pth",
                                 "--device", "cpu", "-q", "--num-workers", "0", "--json", "res.json", "--ci", "0.95",
                                 "--bootstrap", "50", "--fd-infinity", "--prdc", "--mmd"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    write_report(["res.json"], "report.html")

    metric = fd_eval.FDMetric("dinov2-vits14", ref="ref", weights="w.pth", device="cpu")
    noise = np.random.default_rng(0).integers(0, 256, photos.shape, dtype=np.uint8)
    steps = []
    for k, step in enumerate((1000, 2000, 4000, 8000, 16000, 32000)):
        alpha = (k + 1) / 6
        imgs = np.clip(alpha * photos + (1 - alpha) * noise, 0, 255).astype(np.uint8)
        metric.reset()
        metric.update(torch.from_numpy(imgs))
        path = work / "training" / f"step_{step:06d}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(metric.compute(step=step), indent=2, default=str))
        steps.append(path)
    write_report(steps, "training.html", title="fd-eval report: a training run (FDMetric, 6 evaluations)")

    out = Path(args.out)
    screenshot(work / "report.html", out / "report_example.png")
    screenshot(work / "training.html", out / "report_training_example.png")
    print(f"wrote {out / 'report_example.png'} and {out / 'report_training_example.png'} (inputs in {work})")


if __name__ == "__main__":
    main()
