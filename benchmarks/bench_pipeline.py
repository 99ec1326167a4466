"""End-to-end speed of fd-eval against a gpic-eval/dgm-eval-style loop, on the same images and weights, in one run.

    python benchmarks/bench_pipeline.py                 # CPU: dinov2-vits14; GPU: dinov2-vitl14
    python benchmarks/bench_pipeline.py --n 20000 --model dinov2-vitl14 --json out.json
    python benchmarks/bench_pipeline.py --quick         # seconds; what the tests run

Parts (all written to one JSON, default ``benchmarks/results/pipeline_{cpu,gpu}.json``):

1. **Throughput**, images/s over a folder of 256x256 PNGs (GPIC's generated size; photo crops, random weights in
   the official checkpoint layout): the *baseline* written like gpic-eval / dgm-eval (torch.hub DINOv2 code from
   the ``dinov2`` package in float32 with PyTorch's default flags, torchvision ``Resize((224, 224), BICUBIC)`` +
   ``ToTensor`` + ``Normalize`` on PIL images, a DataLoader with the same batch size and workers as fd-eval,
   ``model(x.to(device)).cpu().numpy()`` per batch into a list, then ``np.cov``), fd-eval ``exact`` and fd-eval
   ``fast`` (on a GPU also: the baseline with dgm-eval's defaults, batch 50 and min(8, cpus) workers;
   ``fast`` with the Pillow resize in the workers instead of on the device; ``fast`` with torch.compile; and on
   a JPEG copy of the folder ``fast`` with PIL decode+resize and with
   ``--decode gpu --resize torch``), plus the network alone on ready 224x224 batches (the bound the pipeline
   can reach) and, on a GPU, the float32 FLOP bound of the card when its peak is known.
2. **Decode + resize alone**: a raw single-process PIL loop (open, convert RGB, Pillow bicubic to 224, to tensor)
   against fd-eval's DataLoader path with a no-op model (16 pixel values as features, ``--feature-dim``) at
   0, 1, 2, ... workers (pipeline overhead = the 0-worker time over the raw loop's, minus 1; the target is below
   10%); and the same with the workers only decoding (``pil_resize_on="device"``, fast mode's default on a GPU):
   the images/s the host can feed a GPU.
3. **Memory** of building statistics from N = 10K and 100K synthetic 1024-d feature rows with
   MomentAccumulator (peak RSS of a fresh process, and torch.cuda.max_memory_allocated on a GPU), beside the
   baseline's collect-then-np.cov; it must not grow with N.
4. **FD time** at d = 1024 and 2048 (bench_frechet's matrices and routes): fd-eval vs scipy.linalg.sqrtm.
5. **Fill and drain** (runs after part 2): a simulated accelerator (``time.sleep`` per model batch, at 80% of the
   workers' decode rate) fed by fd-eval's pipeline, with DataLoader items of a whole model batch and of 32
   images (what a GPU device gets): the share of the device-bound time lost to starting and ending the pass.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402

from fd_eval import compute_stats, frechet_distance, load_extractor, open_source  # noqa: E402
from fd_eval.core.moments import MomentAccumulator  # noqa: E402
from fd_eval.extractors import Extractor  # noqa: E402
from fd_eval.extractors.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec, pil_resize, pil_to_tensor  # noqa: E402
from fd_eval.run.pipeline import auto_device, available_cpus, default_batch_size, default_num_workers, extract  # noqa: E402
from fd_eval.run.provenance import device_name, versions  # noqa: E402
from fd_eval.util.io_utils import atomic_write  # noqa: E402

# Dense float32 (non-tensor-core) peaks in TFLOP/s, from the vendors' data sheets, for the "fp32 bound".
FP32_PEAK_TFLOPS = {"H100 SXM": 67.0, "H100 NVL": 60.0, "H100 PCIe": 51.0, "H100": 67.0, "H200": 67.0,
                    "A100": 19.5, "L40S": 91.6, "L4": 30.3, "RTX 4090": 82.6}


def vit_gflop(name: str) -> float:
    """Forward GFLOP per 224x224 image of a DINOv2 ViT/14 (2 FLOP per MAC): blocks, attention, patch embed."""
    from fd_eval.extractors.dinov2 import ARCHS

    a = ARCHS[bu.arch_of(name)]
    t, d = 257, a.embed_dim
    mlp = 2 * d * (2 * a.ffn_hidden if a.swiglu else a.ffn_hidden) + (a.ffn_hidden * d if a.swiglu else 0)
    macs = a.depth * (t * (4 * d * d + mlp) + 2 * t * t * d) + 256 * 588 * d
    return 2 * macs / 1e9


# --- 1. throughput ------------------------------------------------------------------------------------------
class _Folder(torch.utils.data.Dataset):
    """dgm-eval's ImagePathDataset: PIL open + convert("RGB") + the transform."""

    def __init__(self, files: list[str], transform: Any):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        return self.transform(Image.open(self.files[i]).convert("RGB"))


def baseline(files: list[str], model: torch.nn.Module, device: torch.device, batch_size: int,
             workers: int) -> tuple[float, np.ndarray, np.ndarray]:
    """gpic-eval / dgm-eval style: seconds, mu, sigma."""
    import torchvision.transforms as T

    tf = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = torch.utils.data.DataLoader(_Folder(files, tf), batch_size=batch_size, shuffle=False,
                                         drop_last=False, num_workers=workers)
    t0 = time.perf_counter()
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(model(x.to(device)).cpu().numpy())
    f = np.concatenate(feats).astype(np.float64)
    mu, sigma = f.mean(axis=0), np.cov(f, rowvar=False)
    return time.perf_counter() - t0, mu, sigma


def fd_eval_run(folder: Path, ex: Extractor, device: torch.device, batch_size: int, workers: int,
                **kw: Any) -> tuple[float, np.ndarray, np.ndarray, dict]:
    """fd-eval's compute_stats end to end (source scan, DataLoader, device, moments): seconds, mu, sigma, meta."""
    t0 = time.perf_counter()
    s = compute_stats(folder, extractors=[ex], device=device, batch_size=batch_size, num_workers=workers,
                      progress=False, world_size=1, **kw)[ex.name]
    bu.sync(device)
    return time.perf_counter() - t0, s.mu, s.sigma, s.metadata


def model_only(ex: Extractor, device: torch.device, batch_size: int, batches: int) -> float:
    """Images/s of the network alone on a ready float32 224x224 batch on the device (no data pipeline)."""
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    ex.forward_input(x)
    bu.sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        ex.forward_input(x)
    bu.sync(device)
    return batches * batch_size / (time.perf_counter() - t0)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def throughput(args: argparse.Namespace, dev: torch.device, tmp: Path) -> dict:
    gpu = dev.type == "cuda"
    arr = bu.images(args.n, 256, seed=0)
    folder = bu.write_pngs(arr, tmp / "png")
    files = sorted(str(p) for p in folder.iterdir())
    weights = bu.random_dinov2_official(args.model, tmp / f"dinov2_{bu.arch_of(args.model)}_pretrain.pth")
    bs = args.batch_size or default_batch_size(dev)
    workers = default_num_workers(dev) if args.num_workers is None else args.num_workers
    hub = bu.hub_dinov2(args.model, weights)
    ex = load_extractor(args.model, weights=weights, device=dev)
    rows: dict[str, dict] = {}

    # warm-up (CUDA context, cuDNN/oneDNN kernel choice, worker start-up paths) outside the clocks
    warm = torch.zeros(min(bs, 8), 3, 224, 224, device=dev)
    with torch.no_grad():
        if hub is not None:
            hub.to(dev)(warm)
    ex.forward_input(warm)

    def record(name: str, seconds: float, extra: dict | None = None) -> None:
        rows[name] = {"seconds": seconds, "images_per_s": args.n / seconds, **(extra or {})}
        if gpu:
            rows[name]["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        print(f"  {name:34s} {args.n / seconds:9.1f} img/s  ({seconds:.2f} s)", flush=True)

    if gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    if hub is not None:
        t, mu_b, sig_b = baseline(files, hub, dev, bs, workers)
        record("baseline (gpic-eval/dgm-eval style)", t, {"note": "torch.hub dinov2 code (dinov2 package), fp32, "
                                                           "PyTorch default TF32 flags, same batch size/workers"})
        if gpu:  # as users run it: dgm-eval's / pytorch-fid's defaults, batch 50 and min(8, cpus) workers
            dgm_workers = min(8, available_cpus())
            t, *_ = baseline(files, hub, dev, 50, dgm_workers)
            record("baseline, dgm-eval defaults", t, {"batch_size": 50, "num_workers": dgm_workers})
    else:
        mu_b = sig_b = None
        print("  baseline skipped: the dinov2 package (hub model code) is not installed")
    runs = [("fd-eval exact", {}), ("fd-eval fast", {"precision": "fast", "compile": False})]
    if gpu:  # fast mode's default on a GPU resizes on the device; the same with Pillow in the workers
        runs.append(("fd-eval fast, Pillow resize in the workers", {"precision": "fast", "compile": False,
                                                                   "pil_resize_on": "host"}))
    if gpu or args.compile:
        runs.append(("fd-eval fast + torch.compile", {"precision": "fast", "compile": True}))
    for name, kw in runs:
        if gpu:
            torch.cuda.reset_peak_memory_stats(dev)
        ex.set_precision(kw.get("precision", "exact"), kw.get("compile"))
        ex.set_pil_resize_on(kw.get("pil_resize_on", "auto"))
        t, mu, sig, meta = fd_eval_run(folder, ex, dev, bs, workers)
        extra = {"precision": meta["precision"]["mode"], "compile": ex.compile_status(),
                 "pil_resize_on": meta["pil_resize_on"]}
        if mu_b is not None:
            extra.update(mu_rel_diff_vs_baseline=_rel(mu, mu_b), sigma_rel_diff_vs_baseline=_rel(sig, sig_b))
        record(name, t, extra)
        if kw.get("compile"):  # a second pass: compiled graph already built
            t2, *_ = fd_eval_run(folder, ex, dev, bs, workers)
            record(name + " (warm)", t2, {"compile": ex.compile_status()})
    ex.set_pil_resize_on("auto")
    if gpu:  # the GPU input path on a JPEG copy of the same images
        jfolder = bu.write_pngs(arr, tmp / "jpg", fmt="jpg")
        ex.set_precision("fast", compile=False)
        t, *_ = fd_eval_run(jfolder, ex, dev, bs, workers)
        record("fd-eval fast, JPEG (PIL decode+resize)", t)
        exg = load_extractor(args.model, weights=weights, device=dev, resize="torch", precision="fast")
        t, _, _, meta = fd_eval_run(jfolder, exg, dev, bs, workers, decode="gpu")
        record("fd-eval fast, JPEG, --decode gpu --resize torch", t, {"decode": meta["preprocess"]["decode"]})
    ex.set_precision("exact")
    bound = {"exact": model_only(ex, dev, bs, args.model_batches)}
    ex.set_precision("fast", compile=False)
    bound["fast"] = model_only(ex, dev, bs, args.model_batches)
    ex.set_precision("exact")
    print(f"  network alone on ready 224x224 batches: exact {bound['exact']:.1f} img/s, fast {bound['fast']:.1f} img/s")
    out: dict[str, Any] = {"model": args.model, "n_images": args.n, "batch_size": bs, "num_workers": workers,
                           "rows": rows, "network_only_images_per_s": bound, "gflop_per_image": vit_gflop(args.model)}
    ratios = {}
    for bname, label in (("baseline (gpic-eval/dgm-eval style)", "baseline"),
                         ("baseline, dgm-eval defaults", "baseline dgm-eval defaults")):
        base = rows.get(bname)
        for name, r in rows.items():
            if base is not None and not name.startswith("baseline"):
                ratios[f"{name} / {label}"] = r["images_per_s"] / base["images_per_s"]
    if "fd-eval fast" in rows:
        ratios["fast / exact"] = rows["fd-eval fast"]["images_per_s"] / rows["fd-eval exact"]["images_per_s"]
    ratios["exact / network-only exact"] = rows["fd-eval exact"]["images_per_s"] / bound["exact"]
    out["ratios"] = ratios
    if gpu:
        name = torch.cuda.get_device_name(dev)
        peak = next((v for k, v in FP32_PEAK_TFLOPS.items() if k in name), None)
        if peak:
            fp32_bound = peak * 1e3 / out["gflop_per_image"]
            out["fp32_bound_images_per_s"] = fp32_bound
            ratios["exact / fp32 FLOP bound"] = rows["fd-eval exact"]["images_per_s"] / fp32_bound
    for k, v in ratios.items():
        print(f"  {k:44s} {v:6.2f}")
    return out


# --- 2. decode + resize alone ------------------------------------------------------------------------------
class NoOpExtractor(Extractor):
    """The DINOv2 reference host step (Pillow bicubic to 224) with no network: features are D pixel values."""

    def __init__(self, dim: int):
        spec = PreprocessSpec(resize_library="pil", resize_filter="bicubic", antialias=True, size=(224, 224),
                              scale=255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        super().__init__("no-op", dim, spec, torch.nn.Identity(), None, "cpu")

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :self.feature_dim].float()  # the network (Identity) passes these through


def decode_resize(args: argparse.Namespace, tmp: Path) -> dict:
    from PIL import Image

    folder = tmp / "png"
    if not folder.is_dir():
        bu.write_pngs(bu.images(args.n, 256, seed=0), folder)
    files = sorted(str(p) for p in folder.iterdir())[:args.decode_images]  # a GPU run's folder is larger
    reps = max(1, args.decode_images // len(files))
    src = open_source(str(folder))
    n = len(files) * reps

    def raw(resize: bool = True) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            for f in files:
                with Image.open(f) as im:
                    img = im.convert("RGB")
                    pil_to_tensor(pil_resize(img, (224, 224), "bicubic") if resize else img)
        return time.perf_counter() - t0

    noop = NoOpExtractor(args.feature_dim)
    from fd_eval.sources import SubsetSource

    rep_src = SubsetSource(src, np.tile(np.arange(len(files)), reps))
    cpus = available_cpus()
    counts = [w for w in (0, 1, 2, 4, 8, 16) if w <= max(2, cpus)] if not args.quick else [0, 1]

    def pipeline(w: int, where: str) -> float:
        noop.set_pil_resize_on(where)  # "device": the workers only decode (fast mode on a GPU)
        t0 = time.perf_counter()
        ext = extract(rep_src, [noop], device="cpu", batch_size=32, num_workers=w, progress=False)
        assert ext.n_images == n
        return time.perf_counter() - t0

    raw()  # page cache, Pillow's lazy initialisation
    # interleaved repeats, best of each: a VM's speed drifts by 10-20% over a minute, which would otherwise
    # land on whichever configuration ran in the slow stretch
    configs = [(w, where) for where in ("host", "device") for w in counts]
    times: dict[Any, list[float]] = {"raw": [], "raw decode": [], **{c: [] for c in configs}}
    for _ in range(args.repeats):
        times["raw"].append(raw())
        times["raw decode"].append(raw(resize=False))
        for c in configs:
            times[c].append(pipeline(*c))
    t_raw, t_dec = min(times["raw"]), min(times["raw decode"])
    print(f"  raw single-process PIL decode+resize       {n / t_raw:9.1f} img/s", flush=True)
    print(f"  raw single-process PIL decode only         {n / t_dec:9.1f} img/s", flush=True)
    rows = []
    for w, where in configs:
        t = min(times[(w, where)])
        rows.append({"num_workers": w, "pil_resize_on": where, "images_per_s": n / t, "seconds": t,
                     "vs_raw": t_raw / t})
        what = "decode+resize" if where == "host" else "decode only (resize on the device)"
        print(f"  fd-eval DataLoader path, no-op model, {w:2d} workers, {what:34s} {n / t:9.1f} img/s "
              f"({t_raw / t:4.2f}x raw decode+resize)", flush=True)
    overhead = rows[0]["seconds"] / t_raw - 1
    print(f"  pipeline overhead (0 workers vs raw loop)   {100 * overhead:+.1f}%  (target < 10%)")
    return {"images": n, "raw_images_per_s": n / t_raw, "raw_seconds": t_raw, "raw_decode_only_images_per_s":
            n / t_dec, "pipeline": rows, "pipeline_overhead": overhead, "cpus": cpus,
            "feature_dim": args.feature_dim}


class SimulatedAccelerator(NoOpExtractor):
    """A device that takes ``n / rate`` seconds per model batch without using a CPU core (``time.sleep``
    releases the GIL), to time the pipeline's start-up, overlap and tail on a machine without a GPU."""

    def __init__(self, dim: int, rate: float):
        super().__init__(dim)
        self.rate = rate

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(x.shape[0] / self.rate)
        return x


def fill(args: argparse.Namespace, tmp: Path) -> dict:
    """End-to-end time of a pass against a simulated accelerator slower than the host's decode rate, with
    DataLoader items the size of the model batch (what every device got before ``loader_chunk``) and of 32 images
    (a GPU's ``loader_chunk``): the difference is the pipeline's fill and drain (a worker must finish a whole
    item before the device starts). Workers only decode (``pil_resize_on="device"``, fast mode on a GPU)."""
    import fd_eval.run.pipeline as pl
    from fd_eval.sources import SubsetSource

    folder = tmp / "png"
    if not folder.is_dir():
        bu.write_pngs(bu.images(args.n, 256, seed=0), folder)
    src = open_source(str(folder))
    m = min(len(src), args.decode_images)  # a GPU run's folder is larger than the images this part needs
    rep_src = SubsetSource(src, np.tile(np.arange(m), max(1, args.decode_images // m)))
    n, bs = len(rep_src), args.fill_batch
    workers = args.num_workers or max(1, available_cpus())
    dev = SimulatedAccelerator(args.feature_dim, args.fill_rate).set_pil_resize_on("device")
    real = pl.loader_chunk
    rows = []
    try:
        for item in (bs, 32):
            pl.loader_chunk = lambda b, d, item=item: item  # noqa: E731 - what a GPU device gets
            best = min(_timed(lambda: extract(rep_src, [dev], device="cpu", batch_size=bs, num_workers=workers,
                                              progress=False)) for _ in range(args.repeats))
            rows.append({"item_images": item, "seconds": best, "images_per_s": n / best,
                         "vs_device_bound": (n / args.fill_rate) / best})
            print(f"  items of {item:3d} images: {n / best:7.1f} img/s, {best:.2f} s "
                  f"({100 * rows[-1]['vs_device_bound']:.0f}% of the simulated device's {args.fill_rate:.0f} img/s)",
                  flush=True)
    finally:
        pl.loader_chunk = real
    return {"images": n, "batch_size": bs, "num_workers": workers, "device_images_per_s": args.fill_rate,
            "rows": rows}


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --- 3. memory ---------------------------------------------------------------------------------------------
def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM (peak) of this process in MiB, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_child(n: int, d: int, device: str, how: str) -> dict:
    """In a fresh process: stream n synthetic rows (batches of 512) into a MomentAccumulator ("moments"), or
    collect them and np.cov ("collect", the baseline); peak RSS and CUDA allocation. The peak-RSS mark is reset
    just before, so the imports' own peak does not hide what building the statistics costs."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    reset = _reset_peak_rss()
    rss0 = _rss_mb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if how == "moments":
        acc = MomentAccumulator(d, dev)
        for s in range(0, n, 512):
            acc.update(torch.randn(min(512, n - s), d, device=dev, generator=g))
        acc.covariance().cpu()
    else:
        feats = [torch.randn(min(512, n - s), d, device=dev, generator=g).cpu().numpy() for s in range(0, n, 512)]
        f = np.concatenate(feats).astype(np.float64)
        f.mean(axis=0), np.cov(f, rowvar=False)
    peak = _rss_mb("VmHWM") if reset else None
    out = {"n": n, "d": d, "how": how, "seconds": time.perf_counter() - t0,
           "peak_rss_mb": peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "rss_before_mb": rss0, "peak_reset": reset}
    if dev.type == "cuda":
        out["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def memory(args: argparse.Namespace, dev: torch.device) -> dict:
    rows = []
    for how in ("moments", "collect"):
        for n in args.memory_n:
            if args.quick:  # in-process: no interpreter start-ups (the numbers include this process's history)
                r = _memory_child(n, args.memory_d, str(dev), how)
            else:
                cmd = [sys.executable, __file__, "--_memory-child", str(n), str(args.memory_d), str(dev), how]
                r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            r["peak_rss_growth_mb"] = r["peak_rss_mb"] - r["rss_before_mb"]  # what building the statistics took
            rows.append(r)
            cuda = r.get("cuda_max_memory_allocated_mb")
            gpu = f", CUDA peak {cuda:.0f} MiB" if cuda is not None else ""
            print(f"  {how:8s} N={n:7d} d={args.memory_d}: peak RSS {r['peak_rss_mb']:7.0f} MiB "
                  f"(+{r['peak_rss_growth_mb']:.0f} while streaming){gpu}, {r['seconds']:.1f} s", flush=True)
    m = [r for r in rows if r["how"] == "moments"]
    out = {"rows": rows, "moments_peak_growth_mb_by_n": {r["n"]: r["peak_rss_growth_mb"] for r in m}}
    if len(m) >= 2:
        out["moments_growth_difference_mb_largest_vs_smallest_n"] = (m[-1]["peak_rss_growth_mb"]
                                                                     - m[0]["peak_rss_growth_mb"])
    return out


# --- 4. FD time --------------------------------------------------------------------------------------------
def fd_time(args: argparse.Namespace, dev: torch.device) -> list[dict]:
    import bench_frechet as bf

    rows = []
    for d in args.fd_dims:
        mu1, s1, mu2, s2 = bf._covs(d)
        t_ours, v_ours = bf._time(lambda: frechet_distance(mu1, s1, mu2, s2, device=str(dev)), 3)
        t_sqrtm, v_sqrtm = bf._time(lambda: bf.fd_sqrtm(mu1, s1, mu2, s2), 1)
        rows.append({"d": d, "fd_eval_s": t_ours, "scipy_sqrtm_s": t_sqrtm, "speedup_vs_sqrtm": t_sqrtm / t_ours,
                     "fd": v_ours, "fd_sqrtm": v_sqrtm})
        print(f"  d={d:5d}  fd-eval {t_ours:7.3f} s   scipy sqrtm {t_sqrtm:7.3f} s   {t_sqrtm / t_ours:5.1f}x",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="default: dinov2-vitl14 on a GPU, dinov2-vits14 on a CPU")
    ap.add_argument("--n", type=int, default=None, help="images (default 10,000 GPU / 128 CPU)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also time fast + torch.compile on a CPU")
    ap.add_argument("--model-batches", type=int, default=None)
    ap.add_argument("--decode-images", type=int, default=None, help="images decoded per decode+resize timing")
    ap.add_argument("--feature-dim", type=int, default=None, help="the no-op model's features (default 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--memory-d", type=int, default=1024)
    ap.add_argument("--fd-dims", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "decode", "fill", "memory",
                                                                         "fd"])
    ap.add_argument("--fill-rate", type=float, default=None,
                    help="the simulated accelerator's images/s in part 5 (default: 80%% of the host's decode rate)")
    ap.add_argument("--fill-batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (seconds; for the tests)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_memory-child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        n, d, device, how = args._memory_child
        print(json.dumps(_memory_child(int(n), int(d), device, how)))
        return {}
    dev = auto_device(args.device)
    gpu = dev.type == "cuda"
    args.model = args.model or ("dinov2-vitl14" if gpu else "dinov2-vits14")
    if args.quick:
        args.n, args.repeats, args.memory_n, args.memory_d, args.fd_dims = 6, 1, [512, 2048], 32, [64]
        args.decode_images, args.model_batches, args.batch_size = 12, 1, args.batch_size or 3
        args.fill_batch = 4
        args.num_workers = 0 if args.num_workers is None else args.num_workers
    args.n = args.n or (10_000 if gpu else 128)
    args.model_batches = args.model_batches or (20 if gpu else 2)
    # enough images that a DataLoader's worker start-up (~0.1-0.3 s) is not what gets measured
    args.decode_images = args.decode_images or 2048
    # the no-op model's feature size: small, so part 2 times the data path and not a float64 d x d accumulator
    # on the host (which on a GPU run lives on the device; part 3 times it)
    args.feature_dim = args.feature_dim or 16
    doc: dict[str, Any] = {"benchmark": "fd-eval pipeline", "device": device_name(dev), "cpus": available_cpus(),
                           "torch_threads": torch.get_num_threads(), "load_average_start": bu.load_average(),
                           "quick": args.quick, "random_weights": True, "versions": versions()}
    print(f"device: {doc['device']}, {doc['cpus']} CPUs, load average {doc['load_average_start']}")
    default = f"benchmarks/results/pipeline_{'gpu' if gpu else 'cpu'}{'_quick' if args.quick else ''}.json"
    path = Path(args.json or default)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a run cut short keeps what it measured
        doc["load_average_end"] = bu.load_average()
        with atomic_write(path, "w") as f:
            json.dump(doc, f, indent=2, default=str)
            f.write("\n")

    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" not in args.skip:
            print(f"1. throughput, {args.model}, {args.n} 256x256 PNGs")
            doc["throughput"] = throughput(args, dev, Path(tmp))
            save()
        if "decode" not in args.skip:
            print("2. decode + resize alone (host)")
            doc["decode_resize"] = decode_resize(args, Path(tmp))
            save()
        if "fill" not in args.skip:
            print("5. fill and drain: a simulated accelerator fed by the decode workers")
            if args.fill_rate is None:  # a device just slower than what the workers can feed
                dr = doc.get("decode_resize", {}).get("pipeline", [])
                feed = max((r["images_per_s"] for r in dr if r["pil_resize_on"] == "device"), default=400.0)
                args.fill_rate = 0.8 * feed
            doc["fill"] = fill(args, Path(tmp))
            save()
    if "memory" not in args.skip:
        print("3. memory of building statistics")
        doc["memory"] = memory(args, dev)
        save()
    if "fd" not in args.skip:
        print("4. Frechet distance time")
        doc["fd_time"] = fd_time(args, dev)
    save()
    print(f"wrote {path} (load average at the end {doc['load_average_end']})")
    return doc


if __name__ == "__main__":
    main()
