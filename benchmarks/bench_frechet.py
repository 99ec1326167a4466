"""Fréchet distance time at d = 1024 and 2048: fd-eval vs scipy.linalg.sqrtm (pytorch-fid's route) vs
torch.linalg.eigvals(S1 S2), in one run, on the same matrices.

    python benchmarks/bench_frechet.py [--dims 1024 2048] [--device cpu|cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import torch

from fd_eval import frechet_distance
from fd_eval.run.provenance import device_name, versions


def _covs(d: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Two full-rank covariances with power-law spectra and different eigenbases (like DINOv2 features)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(2):
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        w = np.arange(1, d + 1, dtype=np.float64) ** -1.2 * (1 + 0.1 * k)
        out += [rng.standard_normal(d) * 0.1, (q * w) @ q.T]
    return tuple(out)


def fd_sqrtm(mu1, s1, mu2, s2) -> float:
    """pytorch-fid / TTUR route: scipy.linalg.sqrtm(S1 S2), real part."""
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    covmean = covmean[0] if isinstance(covmean, tuple) else covmean
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def fd_eigvals(mu1, s1, mu2, s2) -> float:
    """torchmetrics-style route: sum of sqrt of eigenvalues of S1 S2 (imaginary parts dropped)."""
    t1, t2 = torch.from_numpy(s1), torch.from_numpy(s2)
    ev = torch.linalg.eigvals(t1 @ t2).sqrt().real.sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * ev)


def _time(fn, repeats: int) -> tuple[float, float]:
    times, val = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        val = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/frechet.json")
    args = ap.parse_args()
    rows = []
    for d in args.dims:
        mu1, s1, mu2, s2 = _covs(d)
        t_ours, v_ours = _time(lambda: frechet_distance(mu1, s1, mu2, s2, device=args.device), args.repeats)
        t_sqrtm, v_sqrtm = _time(lambda: fd_sqrtm(mu1, s1, mu2, s2), 1)
        t_eig, v_eig = _time(lambda: fd_eigvals(mu1, s1, mu2, s2), 1)
        rows.append({"d": d, "fd_eval_s": t_ours, "scipy_sqrtm_s": t_sqrtm, "torch_eigvals_s": t_eig,
                     "speedup_vs_sqrtm": t_sqrtm / t_ours, "fd": v_ours, "fd_sqrtm": v_sqrtm, "fd_eigvals": v_eig})
        print(f"d={d:5d}  fd-eval {t_ours:7.3f} s   scipy sqrtm {t_sqrtm:7.3f} s   torch eigvals {t_eig:7.3f} s   "
              f"speed-up vs sqrtm {t_sqrtm / t_ours:5.1f}x   "
              f"FD {v_ours:.6f} (sqrtm {v_sqrtm:.6f}, eigvals {v_eig:.6f})")
    out = {"benchmark": "frechet", "device": device_name(args.device), "torch_threads": torch.get_num_threads(),
           "versions": versions(), "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
