"""CMMD: the google-research formula (reimplemented here in numpy float64) on the same embeddings, to 1e-9
relative; blocked sums; the reference's stored self-term; one decode pass for FD and CMMD; resume and torchrun.

Reference formula (google-research ``cmmd/distance.py``, written independently here): sigma = 10,
gamma = 1 / (2 sigma^2), squared distances ``-2 x.y + |x|^2 + |y|^2``, means over all pairs (diagonal included),
``1000 * (k_xx + k_yy - 2 k_xy)``.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fd_eval
import fd_eval.extractors.clip as cl
import fd_eval.extractors.dinov2 as dv
import fd_eval.metrics.build as build
from _checkpoints import save_dinov2_checkpoint
from _clip_models import save_hf_vision
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.metrics.cmmd import cmmd, kernel_sum

DEPTH = 2
TESTS = Path(__file__).parent


def reference_cmmd(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.astype(np.float64), y.astype(np.float64)
    gamma = 1 / (2 * 10 ** 2)
    xs, ys = np.diag(x @ x.T), np.diag(y @ y.T)
    k_xx = np.mean(np.exp(-gamma * (-2 * x @ x.T + xs[:, None] + xs[None, :])))
    k_xy = np.mean(np.exp(-gamma * (-2 * x @ y.T + xs[:, None] + ys[None, :])))
    k_yy = np.mean(np.exp(-gamma * (-2 * y @ y.T + ys[:, None] + ys[None, :])))
    return 1000 * (k_xx + k_yy - 2 * k_xy)


def _unit_rows(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, d)) + shift
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_equals_the_reference_formula(block):
    ref, gen = _unit_rows(150, 768, 0), _unit_rows(97, 768, 1, shift=0.05)
    want = reference_cmmd(ref, gen)
    got = cmmd(gen, ref, block=block)
    assert want > 0.1 and abs(got.cmmd - want) <= 1e-9 * abs(want)
    # the self-term by symmetry (upper blocks counted twice) equals the full double sum
    full = kernel_sum(ref, ref, block=block)
    assert abs(kernel_sum(ref, block=block) - full) <= 1e-12 * full


def test_closed_forms():
    x = _unit_rows(40, 768, 2)
    assert abs(cmmd(x, x).cmmd) < 1e-10  # same set: zero
    # one point each at distance d: 1000 * (1 + 1 - 2 exp(-d^2 / 200))
    a, b = np.zeros((1, 3)), np.array([[3.0, 4.0, 0.0]])
    assert abs(cmmd(a, b).cmmd - 1000 * (2 - 2 * np.exp(-25 / 200))) < 1e-12
    # the stored self-term is what the reference's own sum gives
    ref = _unit_rows(30, 768, 3)
    assert cmmd(x, ref, ref_kernel_sum=kernel_sum(ref)).cmmd == cmmd(x, ref).cmmd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmmd")
    _, clip_w = save_hf_vision(root / "hf", 336, DEPTH, seed=4)
    dino_w, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3,
                                       depth=DEPTH)
    gen = save_images(photo_crops(6, 256, 256, seed=1), root / "gen")
    for i, im in enumerate(photo_crops(2, 201, 262, seed=5)):  # non-square: CMMD's centre crop applies
        Image.fromarray(im).save(gen / f"{6 + i:03d}.png")
    ref = save_images(photo_crops(8, 256, 256, seed=2), root / "ref")
    return {"root": root, "clip": clip_w, "dino": dino_w, "gen": gen, "ref": ref}


@pytest.fixture
def shallow(monkeypatch):
    monkeypatch.setattr(cl, "_build", functools.partial(cl._build, _depth=DEPTH))
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))


def _weights(world):
    return ["--weights", f"clip-vitl14-336={world['clip']}", "--weights", f"dinov2-vits14={world['dino']}"]


def _cli(args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def test_stats_and_compute_report_fd_and_cmmd_from_one_pass(world, shallow, tmp_path, monkeypatch):
    ref_file = tmp_path / "ref.safetensors"
    _cli(["stats", world["ref"], "-o", ref_file, "-m", "clip-vitl14-336", "-m", "dinov2-vits14", *_weights(world),
          "--batch-size", 3,
          "--num-workers", 0, "-q"])
    ref = fd_eval.load_stats(ref_file, model="clip-vitl14-336")
    assert ref.features.shape == (8, 768) and ref.metadata["cmmd"]["n"] == 8  # self-term stored with the rows
    # count decodes: one per generated image for both models
    from fd_eval.sources import base as sbase

    calls, real = [], sbase.decode_image
    monkeypatch.setattr(sbase, "decode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    out, saved = tmp_path / "r.json", tmp_path / "gen.safetensors"
    r = _cli(["compute", world["gen"], "--ref", ref_file, "-m", "dinov2-vits14", "-m", "clip-vitl14-336",
              *_weights(world), "--json", out, "--save-stats", saved, "--batch-size", 4, "--num-workers", 0])
    assert "CMMD" in r.output
    assert len(calls) == 8  # each generated image decoded once for both models
    doc = json.loads(out.read_text())
    res = doc["results"]["clip-vitl14-336"]
    gen = fd_eval.load_stats(saved, model="clip-vitl14-336")
    want = reference_cmmd(ref.features, gen.features)
    assert abs(res["cmmd"] - want) <= 1e-9 * abs(want) and res["cmmd_detail"]["n_ref"] == 8
    # the saved generated set carries its own self-term (computed once, during compute)
    assert gen.metadata["cmmd"]["kernel_sum"] == kernel_sum(gen.features)
    assert "cmmd" not in doc["results"]["dinov2-vits14"] and np.isfinite(doc["results"]["dinov2-vits14"]["fd"])
    from fd_eval.outputs.report import _num, build_report

    page = build_report([doc])  # the HTML report shows CMMD beside FD
    assert "<th>CMMD</th>" in page.replace(' class="num"', "") or "CMMD" in page
    assert _num(res["cmmd"]) in page
    # the generated embeddings are the extractor's (CMMD's preprocessing: floor crop, PIL bicubic 336)
    ex = cl._build("clip-vitl14-336", world["clip"], "cpu", {})
    direct = fd_eval.compute_stats(world["gen"], extractors=[ex], keep_features=True, batch_size=6, num_workers=0,
                                   progress=False)["clip-vitl14-336"]
    assert np.array_equal(direct.features, gen.features)


def test_api_and_fdmetric(world, shallow, tmp_path):
    ex = cl._build("clip-vitl14-336", world["clip"], "cpu", {})
    ref = fd_eval.compute_stats(world["ref"], extractors=[ex], keep_features=True, num_workers=0, progress=False)
    res = fd_eval.compute_fd(world["gen"], ref, "clip-vitl14-336", weights=world["clip"], num_workers=0,
                             progress=False)
    r = ref["clip-vitl14-336"]
    want = reference_cmmd(r.features, res.stats["clip-vitl14-336"].features)
    assert abs(res["clip-vitl14-336"]["cmmd"] - want) <= 1e-9 * abs(want)
    # FDMetric on uint8 tensors (a training loop): the same images in two updates give the same CMMD
    import torch

    imgs = torch.from_numpy(photo_crops(5, 230, 250, seed=8)).permute(0, 3, 1, 2)
    metric = fd_eval.FDMetric("clip-vitl14-336", ref=ref, extractors=[ex])
    metric.update(imgs[:2])
    metric.update(imgs[2:])
    doc = metric.compute()
    gen = metric.stats()["clip-vitl14-336"].features
    assert np.array_equal(gen, ex(imgs).numpy())  # crop + Pillow resize as the decode path does
    want = reference_cmmd(r.features, gen)
    assert abs(doc["results"]["clip-vitl14-336"]["cmmd"] - want) <= 1e-9 * abs(want)


def test_resume_is_bit_identical(world, shallow, tmp_path, monkeypatch):
    args = dict(models="clip-vitl14-336", weights=world["clip"], checkpoint_every=3, num_workers=0,
                batch_size=2, progress=False)
    whole = build.build_stats(world["ref"], tmp_path / "whole.safetensors", **args)["clip-vitl14-336"]
    real, calls = build.save_unit_file, []

    def save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(*a, **k)

    monkeypatch.setattr(build, "save_unit_file", save)
    with pytest.raises(KeyboardInterrupt):
        build.build_stats(world["ref"], tmp_path / "resumed.safetensors", **args)
    monkeypatch.setattr(build, "save_unit_file", real)
    resumed = build.build_stats(world["ref"], tmp_path / "resumed.safetensors", **args)["clip-vitl14-336"]
    assert resumed.metadata["source"]["build"]["resumed_units"] == 1
    assert np.array_equal(resumed.features, whole.features)
    assert resumed.metadata["cmmd"]["kernel_sum"] == whole.metadata["cmmd"]["kernel_sum"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(world, tmp_path, one_thread):
    def run(nproc, out):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(TESTS / "_shallow_cli.py"), str(DEPTH),
               "compute", str(world["gen"]), "--ref", str(world["ref"]), "-m", "clip-vitl14-336", "--weights",
               str(world["clip"]), "--json", str(out), "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
               "-q"]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
        return json.loads(out.read_text())["results"]["clip-vitl14-336"]

    one, two = run(1, tmp_path / "one.json"), run(2, tmp_path / "two.json")
    assert abs(one["cmmd"] - two["cmmd"]) <= 1e-12 * abs(one["cmmd"])
    assert one["n"] == two["n"] == 8 and two["n_ref"] == 8
