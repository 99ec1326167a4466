"""`fd-eval copies` runs: resumable per unit (an interrupted run resumes to the identical result), the same result
for any unit size and for 2 torchrun processes (gloo, CPU) as for 1, the CLI's table and JSON.

The interruption is deterministic: ``fd_eval.run.engine.save_unit_file`` raises KeyboardInterrupt once K training
units are saved (no timing). The equality checks are exact (==), not approximate: the top-K lists and the C_T
distances of a partition of the training set merge exactly, and a unit's features depend only on its images and
the batch size.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fd_eval
import fd_eval.extractors.dinov2 as dv
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import CheckpointError, InputError
from fd_eval.metrics import copies as cp
from fd_eval.run import engine
from test_copies import PixelExtractor, jpeg75

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """gen: JPEG re-encodes of training images 0..11 + 40 novel crops; train: 40 crops (units of 7: a short last
    unit); test: 30 held-out crops (C_T, not null on these seeds). PNG folders, for the torchrun workers too."""
    root = tmp_path_factory.mktemp("copies_run")
    train = photo_crops(40, 32, 32, seed=1)
    gen = np.concatenate([np.stack([jpeg75(a) for a in train[:12]]), photo_crops(40, 32, 32, seed=2)])
    test = photo_crops(30, 32, 32, seed=3)
    return {k: save_images(v, root / k) for k, v in (("gen", gen), ("train", train), ("test", test))}


UNIT, N_UNITS = 7, 6  # 40 training images
KW = dict(top_k=3, threshold=0.9, num_workers=0, batch_size=3, progress=False)


def run(sets, **kw):
    return fd_eval.find_copies(sets["gen"], sets["train"], extractors=[PixelExtractor()], test=sets["test"],
                               **{**KW, **kw})


@pytest.fixture(scope="module")
def reference(sets):
    """One uninterrupted pass over the training set as a single unit, no checkpoints."""
    return run(sets, checkpoint_every=10_000).to_dict()["results"]


def same(a, b):
    assert a["pixels-16"]["per_image"] == b["pixels-16"]["per_image"]
    for k in ("authpct", "ct", "n_copies", "n_train", "quantiles", "histogram"):
        assert a["pixels-16"][k] == b["pixels-16"][k], k


def interrupt_after(monkeypatch, kind, k, sig=None):
    """KeyboardInterrupt (or the signal ``sig``, sent to this process) right after the k-th ``kind`` unit file is
    saved; returns the saved file names."""
    real, saved = engine.save_unit_file, []

    def save(path, header, tensors, *meta_key):
        real(path, header, tensors, *meta_key)
        if Path(path).name.startswith(kind + "-"):
            saved.append(Path(path).name)
            if len(saved) == k:
                if sig is None:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), sig)  # delivered at once (os.kill checks pending signals on return)
                raise AssertionError(f"{sig.name} did not stop the command")

    monkeypatch.setattr(engine, "save_unit_file", save)
    return saved


def test_reference_finds_the_planted_copies(reference):
    r = reference["pixels-16"]
    assert [p["nearest"][0]["index"] for p in r["per_image"][:12]] == list(range(12))
    assert r["n_train"] == 40 and r["ct"] is not None and r["authpct"] is not None


def test_unit_size_does_not_change_the_result(sets, reference):
    same(run(sets, checkpoint_every=UNIT).to_dict()["results"], reference)


@pytest.mark.parametrize("kind,k", [("train", 2), ("authpct", 1)])
def test_interrupted_run_resumes_to_the_identical_result(sets, reference, tmp_path, monkeypatch, kind, k):
    ck = tmp_path / "ck"
    saved = interrupt_after(monkeypatch, kind, k)
    with pytest.raises(KeyboardInterrupt):
        run(sets, checkpoint_dir=ck, checkpoint_every=UNIT)
    assert len(saved) == k
    names = sorted(p.name for p in ck.iterdir())
    assert "queries.safetensors" in names and not [n for n in names if n.endswith(".tmp")]
    assert len([n for n in names if n.startswith("train-")]) == (k if kind == "train" else N_UNITS)
    monkeypatch.undo()
    saved = interrupt_after(monkeypatch, "train", 99)
    res = run(sets, checkpoint_dir=ck, checkpoint_every=UNIT)
    # only the missing training units are recomputed; the queries are read back
    assert len(saved) == (N_UNITS - k if kind == "train" else 0)
    assert res.provenance["run"]["resumed_units"] == (k if kind == "train" else N_UNITS)
    same(res.to_dict()["results"], reference)
    assert not ck.exists()  # removed once the result is complete


def test_resume_with_other_settings_is_refused(sets, tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    interrupt_after(monkeypatch, "train", 1)
    with pytest.raises(KeyboardInterrupt):
        run(sets, checkpoint_dir=ck, checkpoint_every=UNIT)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"cannot resume: .*\(--top differ\); rerun with the original"):
        run(sets, checkpoint_dir=ck, checkpoint_every=UNIT, top_k=2)
    with pytest.raises(CheckpointError, match=r"--train source or its units \(--checkpoint-every\) differ"):
        run(sets, checkpoint_dir=ck, checkpoint_every=UNIT + 1)


def test_saved_features_per_unit_feed_the_authpct_pass(sets, reference, tmp_path):
    res = run(sets, checkpoint_every=UNIT, save_features=tmp_path / "f")
    same(res.to_dict()["results"], reference)
    names = sorted(p.name for p in (tmp_path / "f" / "pixels-16").iterdir())
    assert names == [f"features-{u:06d}-000000.safetensors" for u in range(N_UNITS)]
    with pytest.raises(InputError, match="already holds saved features"):
        run(sets, checkpoint_every=UNIT, save_features=tmp_path / "f")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(sets, reference, tmp_path):
    """2 gloo ranks on the CPU: each takes every other unit (some ranks none of GEN's), with checkpoints; both
    ranks return the result of one process, exactly; rank 0 alone writes the JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**{k: str(v) for k, v in sets.items()}, "out": str(tmp_path), "unit": UNIT, **KW}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(TESTS / "_copies_worker.py"), str(cfg)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    docs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for d in docs:
        same(d["results"], reference)
        assert d["provenance"]["run"]["world_size"] == 2
    assert json.loads((tmp_path / "copies.json").read_text())["results"] == docs[0]["results"]
    assert not (tmp_path / "ck").exists()


# --- the command line ----------------------------------------------------------------------------------------
DEPTH = 2


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    ckpt, _ = save_dinov2_checkpoint(tmp_path_factory.mktemp("w") / "dinov2_vits14_pretrain.pth", "vits14",
                                     "official", seed=3, depth=DEPTH)
    return ckpt


def cli_args(sets, vit, out, *extra):
    return ["copies", str(sets["gen"]), "--train", str(sets["train"]), "-m", "dinov2-vits14", "--weights", str(vit),
            "--top", "2", "--threshold", "0.95", "--no-authpct", "--checkpoint-every", "8", "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "-q", "--json", str(out), *extra]


@pytest.fixture(scope="module")
def cli_reference(sets, vit, tmp_path_factory):
    """An uninterrupted `fd-eval copies` run: (output, JSON document, folder)."""
    out = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, cli_args(sets, vit, out / "a.json", "--sheet", str(out / "a.png")))
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output, json.loads((out / "a.json").read_text()), out


def test_cli_table_and_json(cli_reference):
    output, a, out = cli_reference
    lines = output.splitlines()
    # first, on stderr, each source's accounting line (as compute prints it), then the table
    head = next(i for i, ln in enumerate(lines) if ln.startswith("model"))
    assert [ln.split(":")[0].split()[0] for ln in lines[:head]] == ["generated", "train"]
    assert "52 found, 52 used" in lines[0] and "40 found, 40 used" in lines[1]
    lines = lines[head:]
    assert lines[0].split()[:6] == ["model", "N", "gen", "N", "train", "copies"]
    res = a["results"]["dinov2-vits14"]
    row = lines[2].split()
    assert row[:4] == ["dinov2-vits14", "52", "40", str(res["n_copies"])]
    assert f"{res['quantiles']['0.5']:.4f}" in row and res["authpct"] is None
    assert [len(p["nearest"]) for p in res["per_image"]] == [2] * 52 and res["top_k"] == 2
    assert (out / "a.png").exists() and not (out / "a.json.partial").exists()  # checkpoints removed when done


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_interrupted_then_resumed(sets, vit, cli_reference, tmp_path, monkeypatch, one_thread, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM after 1 of 5 units (in process), then the same command: the identical
    JSON results."""
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    interrupt_after(monkeypatch, "train", 1, sig)
    previous = signal.signal(sig, signal.SIG_IGN)  # a SIGTERM the CLI failed to catch must not end pytest
    try:
        r = CliRunner().invoke(main, cli_args(sets, vit, tmp_path / "b.json"))
    finally:
        signal.signal(sig, previous)
    assert r.exit_code == 128 + sig and "Aborted" not in r.output, r.output + repr(r.exception)
    assert r.output.strip().splitlines()[-1] == f"Error: interrupted ({sig.name}); nothing half-written was left"
    assert "run the same command again to resume" in r.output and (tmp_path / "b.json.partial").is_dir()
    assert not (tmp_path / "b.json").exists()
    assert not [q for q in tmp_path.rglob("*") if q.name.endswith(".tmp")]
    monkeypatch.undo()
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    r = CliRunner().invoke(main, cli_args(sets, vit, tmp_path / "b.json"))
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "resuming from" in r.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["results"] == cli_reference[1]["results"] and b["provenance"]["run"]["resumed_units"] == 1


@pytest.mark.slow
def test_cli_killed_then_resumed(sets, vit, cli_reference, tmp_path, monkeypatch, one_thread):
    """SIGKILL right after the 2nd unit file (a subprocess of the real CLI), then the same command resumes."""
    out = tmp_path / "c.json"
    env = {**os.environ, "FD_EVAL_TEST_KILL_AFTER_COPIES_UNITS": "2", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(TESTS / "_copies_cli.py"), str(DEPTH), *cli_args(sets, vit, out)],
                       capture_output=True, env=env, timeout=600)
    assert p.returncode == -9, p.stderr[-3000:]
    ck = tmp_path / "c.json.partial"
    assert sorted(x.name for x in ck.iterdir()) == ["queries.safetensors", "train-000000.safetensors",
                                                    "train-000001.safetensors"] and not out.exists()
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    r = CliRunner().invoke(main, cli_args(sets, vit, out))
    assert r.exit_code == 0, r.output + repr(r.exception)
    c = json.loads(out.read_text())
    assert c["results"] == cli_reference[1]["results"] and c["provenance"]["run"]["resumed_units"] == 2
    assert os.listdir(tmp_path) == ["c.json"]


def test_skipped_training_image_is_listed_with_its_position(sets, tmp_path, monkeypatch):
    """--skip-bad: an unreadable training image in unit 1 is listed (by its position in the whole source) in a
    resumed run too, and is never a neighbour; a strict run stops on it with the one-line error."""
    import shutil

    train = tmp_path / "train"
    shutil.copytree(sets["train"], train)
    (train / "009.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    kw = dict(checkpoint_every=UNIT, checkpoint_dir=tmp_path / "ck", skip_bad=True)
    interrupt_after(monkeypatch, "train", 2)
    with pytest.raises(KeyboardInterrupt):
        run({**sets, "train": train}, **kw)
    monkeypatch.undo()
    res = run({**sets, "train": train}, **kw)
    assert [(s["index"], Path(s["name"]).name) for s in res.provenance["skipped"]["train"]] == [(9, "009.png")]
    # the training side's accounting (as compute's): 40 found, 39 used, the bad one listed, also after a resume
    tr = res.inputs["train"]
    assert (tr["found"], tr["used"], [s["index"] for s in tr["skipped"]]) == (40, 39, [9])
    assert (res.inputs["generated"]["used"], res.inputs["test"]["used"]) == (52, 30)
    r = res.results["pixels-16"]
    assert r["n_train"] == 39 and all(n["index"] != 9 for p in r["per_image"] for n in p["nearest"])
    with pytest.raises(fd_eval.BadImageError, match="009.png"):
        run({**sets, "train": train}, compute_authpct=False)


def test_a_unit_with_no_readable_image_still_feeds_the_authpct_pass(sets, reference, tmp_path):
    """Training unit 1 (images 7..13) all unreadable under --skip-bad, features saved: its empty feature shard is
    read back by the AuthPct pass; the result equals a run over the other 33 images."""
    import shutil

    train, good = tmp_path / "train", tmp_path / "good"
    shutil.copytree(sets["train"], train)
    shutil.copytree(sets["train"], good)
    for i in range(7, 14):
        (train / f"{i:03d}.png").write_bytes(b"not an image")
        (good / f"{i:03d}.png").unlink()
    res = run({**sets, "train": train}, checkpoint_every=UNIT, skip_bad=True, save_features=tmp_path / "f")
    empty = list(cp.read_feature_shards(tmp_path / "f" / "pixels-16", unit=1))
    assert [tuple(f.shape) for f, _ in empty] == [(0, 768)]
    ref = run({**sets, "train": good}).results["pixels-16"]
    got = res.results["pixels-16"]
    assert got["n_train"] == 33 and got["authpct"] == ref["authpct"] and got["ct"] == ref["ct"]
    # same neighbours; keys differ by the 7 missing files (positions in each source)
    shift = lambda i: i + 7 * (i >= 7)  # noqa: E731
    assert [[shift(n["index"]) for n in p["nearest"]] for p in ref["per_image"]] == \
        [[n["index"] for n in p["nearest"]] for p in got["per_image"]]
