"""A consumer-based metric is one new file plus its registration (tests/_norm_metric.py): with no edit in
fd_eval it runs under compute (stats metadata, compute_fd results), FDMetric (and its state dict), a killed and
resumed build_stats (its state in the unit files: bit-identical result) and torchrun (2 gloo processes, merged by
its declared rules)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _norm_metric
import fd_eval
from _images import photo_crops, save_images
from fd_eval.run import engine
from test_copies import PixelExtractor

TESTS = Path(__file__).parent
N = 11
RUN = dict(batch_size=3, num_workers=0, progress=False, device="cpu")


@pytest.fixture()
def registered():
    _norm_metric.register()
    yield
    _norm_metric.unregister()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("norms")
    arr = photo_crops(N, 24, 24, seed=5)
    np.save(root / "images.npy", arr)
    return arr, save_images(arr, root / "folder"), root / "images.npy"


def _expected(features: torch.Tensor) -> dict:
    norms = features.double().norm(dim=1)
    return {"n": len(norms), "mean_norm": float(norms.sum()) / len(norms), "max_norm": float(norms.max())}


def _close(got: dict, want: dict, max_index: int) -> None:
    assert got["n"] == want["n"] and got["max_index"] == max_index
    assert got["max_norm"] == pytest.approx(want["max_norm"], rel=1e-6)
    assert got["mean_norm"] == pytest.approx(want["mean_norm"], rel=1e-6)


def test_compute_and_fdmetric_run_the_registered_metric(registered, images):
    arr, folder, _ = images
    ex = PixelExtractor()
    st = fd_eval.compute_stats(folder, extractors=[ex], keep_features=True, **RUN)[ex.name]
    want = _expected(torch.as_tensor(st.features))
    _close(st.metadata["metrics"][_norm_metric.NAME], want, N - 1)
    # compute_fd's results: the generated side's value in results[model]["metrics"] (evaluate_stats is its step)
    from fd_eval.api import _Ref, evaluate_stats

    results, _ = evaluate_stats({ex.name: st}, _Ref({ex.name: st}, {"kind": "stats"}))
    assert results[ex.name]["metrics"] == st.metadata["metrics"]
    # FDMetric: the same consumer list, fed batch by batch (index = position in the stream)
    metric = fd_eval.FDMetric(extractors=[ex], ref=st, device="cpu")
    metric.update(torch.from_numpy(arr[:4]))
    saved = metric.state_dict()
    metric.update(torch.from_numpy(arr[4:]))
    doc = metric.compute()
    _close(doc["results"][ex.name]["metrics"][_norm_metric.NAME], want, N - 1)
    again = fd_eval.FDMetric(extractors=[ex], ref=st, device="cpu")
    again.load_state_dict(saved)  # its state is in the metric's state dict
    again.update(torch.from_numpy(arr[4:]))
    assert again.compute()["results"][ex.name]["metrics"] == doc["results"][ex.name]["metrics"]


def test_killed_build_resumes_bit_identically(registered, images, tmp_path, monkeypatch):
    _, folder, _ = images
    ex = PixelExtractor()
    whole = fd_eval.build_stats(folder, tmp_path / "a.safetensors", extractors=[ex], checkpoint_every=4, **RUN)
    real, saved = engine.save_unit_file, []

    def save(*a):
        real(*a)
        saved.append(a[0])
        if len(saved) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_unit_file", save)
    with pytest.raises(KeyboardInterrupt):
        fd_eval.build_stats(folder, tmp_path / "b.safetensors", extractors=[ex], checkpoint_every=4, **RUN)
    from safetensors import safe_open

    with safe_open(str(saved[0]), framework="pt") as f:  # the metric's declared state is in the unit file
        assert {f"{ex.name}.norms.total", f"{ex.name}.norms.top", f"{ex.name}.norms.max_index"} <= set(f.keys())
    monkeypatch.undo()
    resumed = fd_eval.build_stats(folder, tmp_path / "b.safetensors", extractors=[ex], checkpoint_every=4, **RUN)
    got, want = resumed[ex.name].metadata["metrics"], whole[ex.name].metadata["metrics"]
    assert got == want and got[_norm_metric.NAME]["n"] == N
    assert resumed[ex.name].metadata["source"]["build"]["resumed_units"] == 2
    # the file written holds it too; a resume without the metric registered is refused, naming it
    assert fd_eval.load_stats(tmp_path / "b.safetensors").metadata["metrics"] == want
    _norm_metric.unregister()
    monkeypatch.setattr(engine, "save_unit_file", save)
    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        fd_eval.build_stats(folder, tmp_path / "c.safetensors", extractors=[ex], checkpoint_every=4, **RUN)
    monkeypatch.undo()
    _norm_metric.register()
    with pytest.raises(fd_eval.CheckpointError, match=r"consumer metrics: then \[\], now \['norms'\]"):
        fd_eval.build_stats(folder, tmp_path / "c.safetensors", extractors=[ex], checkpoint_every=4, **RUN)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(registered, images, tmp_path):
    arr, folder, npy = images
    ex = PixelExtractor()
    st = fd_eval.compute_stats(folder, extractors=[ex], keep_features=True, **RUN)[ex.name]
    want = _expected(torch.as_tensor(st.features))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"folder": str(folder), "images": str(npy), "out": str(tmp_path)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(TESTS / "_metric_worker.py"), str(cfg)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    docs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert docs[0] == docs[1]  # every rank gets the merged result
    _close(docs[0]["stats"][_norm_metric.NAME], want, N - 1)  # indices into the whole source
    # FDMetric: each rank's stream positions; rank 0 saw 6 images, rank 1 five
    _close(docs[0]["fdmetric"][_norm_metric.NAME], want, 5)
