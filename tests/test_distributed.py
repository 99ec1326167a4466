"""torch.distributed: `torchrun --nproc_per_node 2` (gloo, CPU) gives the single-process numbers.

Two launches: the real `fd-eval compute` CLI under torchrun, and tests/_dist_worker.py for the API (FDMetric,
evaluate_generator, compute_stats with features, the exact moment merge, errors raised on every rank). Both are
compared with single-process runs in this process at 1e-10 relative (the merge is exact algebra; the batches of
each image are the same in both runs, so the features are too).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _dist_worker import noise_sampler
from _images import photo_crops, save_images
from fd_eval.core.moments import MomentAccumulator
from fd_eval.errors import FDEvalError
from fd_eval.metrics.metric import FDMetric, batch_seed, evaluate_generator, generator_batches
from fd_eval.run.distributed import resolve_world

N = 8  # per set; blocks of 4 per rank = two batches of 2, as in the single-process run
GEN_N, GEN_BS = 7, 2  # evaluate_generator: batches 0..3, the last of size 1
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=5)
    gen = np.concatenate([photo_crops(N // 2, 48, 64, seed=1), photo_crops(N // 2, 48, 64, seed=11)])
    ref = photo_crops(N, 64, 64, seed=2)
    dirs = {}
    for name, arr in (("gen", gen), ("ref", ref)):
        dirs[name] = save_images(arr, root / name)
    bad = save_images(gen[:3], root / "bad")
    (bad / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")  # in rank 1's block
    np.save(root / "gen.npy", gen)
    exs = fd_eval.load_extractors("dinov2-vits14", ckpt, "cpu")
    ref_stats = fd_eval.compute_stats(dirs["ref"], extractors=exs, batch_size=2, num_workers=0,
                                      progress=False)["dinov2-vits14"]
    ref_stats.save(root / "ref.safetensors")
    return {"root": root, "ckpt": ckpt, "gen_arr": gen, "exs": exs, "ref_stats": ref_stats, **dirs, "bad": bad}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, cwd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-12000:]
    return p


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.slow
def test_torchrun_cli_equals_one_process(world, tmp_path, one_thread):
    """`torchrun -m fd_eval compute` with a reference image source: both sets sharded, merged, written once."""
    out, saved = tmp_path / "r.json", tmp_path / "gen.safetensors"
    p = _torchrun(["-m", "fd_eval", "compute", world["gen"], "--ref", world["ref"], "-m", "dinov2-vits14",
                   "--weights", world["ckpt"], "--json", out, "--save-stats", saved, "--batch-size", 2,
                   "--num-workers", 0, "--device", "cpu", "-q"], cwd=tmp_path)
    assert p.stdout.count("dinov2-vits14 ") == 1  # only rank 0 prints the table
    doc = json.loads(out.read_text())
    single = fd_eval.compute_fd(world["gen"], world["ref"], "dinov2-vits14", weights=world["ckpt"], device="cpu",
                                batch_size=2, num_workers=0, progress=False)
    r, s = doc["results"]["dinov2-vits14"], single["dinov2-vits14"]
    assert (r["n"], r["n_ref"]) == (N, N) and doc["provenance"]["world_size"] == 2
    assert single.provenance["world_size"] == 1
    for k in ("fd", "fd_mean", "fd_cov"):
        assert _rel(r[k], s[k]) <= 1e-10, (k, r[k], s[k])
    st = fd_eval.load_stats(saved)
    g = single.stats["dinov2-vits14"]
    assert st.n == N and st.metadata["source"]["world_size"] == 2
    np.testing.assert_allclose(st.mu, g.mu, rtol=0, atol=1e-12 * np.abs(g.mu).max())
    np.testing.assert_allclose(st.sigma, g.sigma, rtol=0, atol=1e-12 * np.abs(g.sigma).max())
    # the sharded reference statistics were cached once (local rank 0 writes) and equal one process's
    cached = list((Path(os.environ["FD_EVAL_CACHE"]) / "ref_stats").glob("*.safetensors"))
    assert len(cached) == 1
    ref1 = fd_eval.load_stats(cached[0])
    assert ref1.n == N
    np.testing.assert_allclose(ref1.sigma, world["ref_stats"].sigma, rtol=0,
                               atol=1e-12 * np.abs(world["ref_stats"].sigma).max())


@pytest.fixture(scope="module")
def api_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_api")
    cfg = {"out": str(out), "ckpt": str(world["ckpt"]), "gen_npy": str(world["root"] / "gen.npy"),
           "gen_dir": str(world["gen"]), "bad_dir": str(world["bad"]),
           "ref_stats": str(world["root"] / "ref.safetensors"), "gen_n": GEN_N, "gen_bs": GEN_BS}
    (out / "cfg.json").write_text(json.dumps(cfg))
    _torchrun([TESTS / "_dist_worker.py", out / "cfg.json"], cwd=out)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


@pytest.mark.slow
def test_fdmetric_under_torchrun_equals_one_process(world, api_run, one_thread):
    _, ranks = api_run
    m = FDMetric(extractors=world["exs"], ref=world["ref_stats"])
    m.update(torch.from_numpy(world["gen_arr"]))
    single = m.compute()["results"]["dinov2-vits14"]
    assert [r["metric_local_n"] for r in ranks] == [N // 2, N // 2]
    for r in ranks:  # every rank returns the merged result
        assert r["metric"]["n"] == N
        for k in ("fd", "fd_mean", "fd_cov"):
            assert _rel(r["metric"][k], single[k]) <= 1e-10, (k, r["metric"][k], single[k])


@pytest.mark.slow
def test_evaluate_generator_under_torchrun(world, api_run, one_thread):
    _, ranks = api_run
    calls: list = []
    single = evaluate_generator(noise_sampler(calls), GEN_N, GEN_BS, seed=7,
                                metric=FDMetric(extractors=world["exs"], ref=world["ref_stats"]))
    assert [c[:2] for c in calls] == [[0, 2], [1, 2], [2, 2], [3, 1]]
    # rank 0 drew batches 0, 1 and rank 1 batches 2, 3: exactly the single run's batches and random draws
    assert [c[0] for c in ranks[0]["generator_calls"]] == [0, 1]
    assert ranks[0]["generator_calls"] + ranks[1]["generator_calls"] == calls
    assert single["provenance"]["generated"]["n"] == GEN_N == ranks[0]["generator_prov"]["n"]
    for r in ranks:
        assert _rel(r["generator"]["fd"], single["results"]["dinov2-vits14"]["fd"]) <= 1e-10


@pytest.mark.slow
def test_compute_stats_features_merged_in_rank_order(world, api_run, one_thread):
    out, _ = api_run
    st = fd_eval.compute_stats(world["gen"], extractors=world["exs"], batch_size=2, num_workers=0,
                               keep_features=True, progress=False)["dinov2-vits14"]
    for r in range(2):
        f = np.load(out / f"features{r}.npy")
        assert f.shape == st.features.shape == (N, 384)
        np.testing.assert_allclose(f, st.features, rtol=0, atol=1e-5 * np.abs(st.features).max())
        np.testing.assert_allclose(np.load(out / f"mu{r}.npy"), st.mu, rtol=0, atol=1e-12 * np.abs(st.mu).max())


@pytest.mark.slow
def test_moment_merge_is_exact_and_identical_on_every_rank(api_run):
    out, _ = api_run
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(n, 6, generator=g, dtype=torch.float64) * 3 + 1 for n in (5, 7, 0, 4)]
    merged = [np.load(out / f"merged{r}.npy") for r in range(2)]
    assert np.array_equal(merged[0], merged[1])  # bit-identical on both ranks
    for j, parts in enumerate([(rows[0], rows[2]), (rows[1], rows[3])]):
        x = torch.cat(parts).numpy()
        n, mean, m2 = merged[0][j][0], merged[0][j][1:7], merged[0][j][7:].reshape(6, 6)
        assert n == len(x)
        np.testing.assert_allclose(mean, x.mean(0), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(m2 / (n - 1), np.cov(x, rowvar=False), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.load(out / "merged_feats0.npy"), torch.cat([rows[1], rows[3]]).float().numpy())


@pytest.mark.slow
def test_errors_reach_every_rank(api_run):
    _, ranks = api_run
    for r in ranks:  # rank 1 hit the corrupt file; both ranks raise its one-line message
        cls, msg = r["bad_image"]
        assert cls == "BadImageError" and "003.png" in msg
        assert ("(on rank 1)" in msg) == (r["rank"] == 0)
        cls, msg = r["deferred"]
        assert cls == "InputRangeError"
        assert "update #0 on rank 1" in msg and "value_range=(-1, 1)" in msg and "reset()" in msg


# --- no processes needed ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,bs", [(1, 1), (7, 2), (10, 5), (50_000, 256), (13, 100)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8, 64])
def test_generator_batches_partition_exactly(n, bs, world_size):
    parts = [generator_batches(n, bs, r, world_size) for r in range(world_size)]
    flat = [b for p in parts for b in p]
    nb = -(-n // bs)
    assert [b for b, _ in flat] == list(range(nb))  # each batch once, in rank order
    assert [s for _, s in flat] == [bs] * (nb - 1) + [n - (nb - 1) * bs]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batch_seed_depends_on_seed_and_batch_only():
    seeds = {batch_seed(s, b) for s in range(3) for b in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    assert batch_seed(0, 5) == batch_seed(0, 5)


@pytest.mark.slow
def test_evaluate_generator_restores_the_callers_rng(world):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    evaluate_generator(lambda b, s: torch.randint(0, 256, (s, 3, 16, 16), dtype=torch.uint8), 4, 2,
                       metric=FDMetric(extractors=world["exs"], ref=world["ref_stats"]))
    assert torch.equal(torch.rand(3), expected)


def test_evaluate_generator_checks_the_batch_it_gets(world):
    m = FDMetric(extractors=world["exs"], ref=world["ref_stats"])
    with pytest.raises(fd_eval.InputError, match=r"fn\(1, 1\) returned 2 images; it must return exactly"):
        evaluate_generator(lambda b, s: torch.zeros(2, 3, 16, 16, dtype=torch.uint8), 3, 2, metric=m)


def test_resolve_world_single_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert resolve_world() == (0, 1)
    assert resolve_world(world_size=1) == (0, 1)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1: no process group needed
    assert resolve_world() == (0, 1)
    with pytest.raises(FDEvalError, match="needs an initialised torch.distributed process group"):
        resolve_world(rank=0, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "x")
    with pytest.raises(FDEvalError, match="not integers"):
        resolve_world()


def test_merge_accumulators_reference_single_rank():
    """The merge sequence the ranks run, replayed in one process: Chan's merge of blocks equals one pass."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) * 10 + 100  # a large mean stresses cancellation
    whole = MomentAccumulator(5)
    whole.update(x)
    for world_size in (2, 3, 7):
        merged = MomentAccumulator(5)
        for r in range(world_size):
            part = MomentAccumulator(5)
            idx = np.array_split(np.arange(40), world_size)[r]
            part.update(x[idx])
            merged.merge(part)
        assert merged.n == 40
        torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-12, atol=0)
