"""Ctrl-C (SIGINT) and a job scheduler's SIGTERM always stop a command in order: exit status 130 / 143, one
``Error: interrupted (SIGNAME)`` line and no traceback, no temp file left, the saved units resumable (to
bit-identical statistics), even for a process started with the signal *ignored*; a SIGTERM sent to every process of
the job (the DataLoader workers too, as SLURM does) included.

Why the last part: a background job of a non-interactive shell (``cmd &`` in a script, CI runners, the test suite
started that way) inherits SIGINT as SIG_IGN, and Python keeps an inherited SIG_IGN; the CLI used to run such a
build to the end and exit 0 after a ``kill -INT``. The subprocesses here are started exactly that way
(``preexec_fn`` ignores SIGINT), so the tests fail on the old code on any machine, at any load.

The interruption is deterministic: the CLI signals itself when it saves its K-th unit file (``_shallow_cli.py``,
``_copies_cli.py``), never after a delay.
"""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import fd_eval
import fd_eval.extractors.dinov2 as dv
import fd_eval.metrics.build as build
from _checkpoints import save_dinov2_checkpoint
from _gpic_shards import make_shards
from _images import photo_crops, save_images
from fd_eval.cli import main

TESTS = Path(__file__).parent
DEPTH = 2
MODEL = "dinov2-vits14"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3, depth=DEPTH)
    make_shards(root / "shards", photo_crops(12, 48, 48, seed=7), 3)
    gen = save_images(photo_crops(6, 32, 32, seed=2), root / "gen")
    train = save_images(photo_crops(12, 32, 32, seed=1), root / "train")
    return {"root": root, "ckpt": ckpt, "spec": str(root / "shards" / "gpic_test_{00000..00003}.tar"),
            "gen": gen, "train": train}


def stats_args(world, out):
    return ["stats", world["spec"], "-o", str(out), "-m", MODEL, "--weights", str(world["ckpt"]), "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu", "-q"]


def copies_args(world, out):
    return ["copies", str(world["gen"]), "--train", str(world["train"]), "-m", MODEL, "--weights",
            str(world["ckpt"]), "--top", "2", "--no-authpct", "--checkpoint-every", "3", "--batch-size", "3",
            "--num-workers", "0", "--device", "cpu", "-q", "--json", str(out)]


def _ignore_sigint() -> None:  # what a non-interactive shell does to its background jobs
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted `fd-eval stats` run every resumed one must reproduce bit for bit."""
    out = world["root"] / "reference" / "s.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, stats_args(world, out))
    assert r.exit_code == 0, r.output + repr(r.exception)
    return fd_eval.load_stats(out)


def _same_stats(out: Path, reference) -> None:
    got = fd_eval.load_stats(out)
    assert got.n == reference.n and np.array_equal(got.mu, reference.mu) and np.array_equal(got.sigma, reference.sigma)


def _interrupted_cli(script: str, env_var: str, k: int, args: list[str], sig: signal.Signals = signal.SIGINT,
                     how: str = "", **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, env_var: f"{k}:{sig.name}{how}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(TESTS / script), str(DEPTH), *args], capture_output=True, env=env,
                          timeout=600, preexec_fn=_ignore_sigint, **kw)


def _check_stopped(p: subprocess.CompletedProcess, folder: Path, sig: signal.Signals = signal.SIGINT) -> None:
    err = p.stderr.decode()
    assert p.returncode == 128 + sig, (p.returncode, err[-3000:])
    assert "Traceback" not in err and "Aborted" not in err, err
    assert err.strip().splitlines()[-1] == f"Error: interrupted ({sig.name}); nothing half-written was left", err
    assert "run the same command again to resume" in err
    assert not [q for q in folder.rglob("*") if q.name.endswith(".tmp")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_ignored_by_the_parent_still_stops_in_process(world, reference, tmp_path, monkeypatch, sig):
    """The CLI installs its own SIGINT and SIGTERM handlers: an inherited SIG_IGN does not swallow the signal
    (CliRunner, fast); the same command then resumes to the uninterrupted statistics, bit for bit."""
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    real, calls = build.save_unit_file, []

    def save(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)  # delivered at once (os.kill checks pending signals on return)
        real(*a, **kw)

    monkeypatch.setattr(build, "save_unit_file", save)
    previous = signal.signal(sig, signal.SIG_IGN)  # also keeps a SIGTERM the CLI failed to catch off pytest
    try:
        r = CliRunner().invoke(main, stats_args(world, tmp_path / "s.safetensors"))
        assert signal.getsignal(sig) is signal.SIG_IGN  # the caller's handler is restored
    finally:
        signal.signal(sig, previous)
    assert r.exit_code == 128 + sig, r.output + repr(r.exception)
    assert r.output.strip().splitlines()[-1] == f"Error: interrupted ({sig.name}); nothing half-written was left"
    ck = build.default_checkpoint_dir(tmp_path / "s.safetensors")
    assert sorted(p.name for p in ck.glob("unit-*")) == ["unit-000000.safetensors"]  # stopped before unit 1 was saved
    assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")] and not (tmp_path / "s.safetensors").exists()
    monkeypatch.setattr(build, "save_unit_file", real)
    r = CliRunner().invoke(main, stats_args(world, tmp_path / "s.safetensors"))
    assert r.exit_code == 0 and "1 of 4 units already done" in r.output, r.output + repr(r.exception)
    _same_stats(tmp_path / "s.safetensors", reference)
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]  # the checkpoint folder is gone


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_compute_stops_on_a_signal_and_writes_nothing(world, reference, tmp_path, monkeypatch, sig):
    """`fd-eval compute` (no unit files) stopped after its first batch: 128 + the signal, one line, neither --json
    nor --save-stats written, no temp file."""
    import fd_eval.run.pipeline as pipeline

    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    real, calls = pipeline.collate, []

    def collate(*a, **kw):  # the main process collates each batch (--num-workers 0)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)  # delivered at once (os.kill checks pending signals on return)
            raise AssertionError(f"{sig.name} did not stop the command")
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "collate", collate)
    args = ["compute", str(world["gen"]), "-r", str(reference.origin), "-m", MODEL, "--weights", str(world["ckpt"]),
            "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "-q", "--json", str(tmp_path / "r.json"),
            "--save-stats", str(tmp_path / "g.safetensors")]
    previous = signal.signal(sig, signal.SIG_IGN)  # a SIGTERM the CLI failed to catch must not end pytest
    try:
        r = CliRunner().invoke(main, args)
    finally:
        signal.signal(sig, previous)
    assert r.exit_code == 128 + sig and len(calls) == 2, r.output + repr(r.exception)
    assert r.output.strip().splitlines()[-1] == f"Error: interrupted ({sig.name}); nothing half-written was left"
    assert "Traceback" not in r.output and os.listdir(tmp_path) == []


def test_sigterm_to_every_process_of_the_job_stops_in_order(world, reference, tmp_path, monkeypatch):
    """A scheduler's SIGTERM to every process of the job (SLURM): the DataLoader workers get it from a process that
    is not their parent, and torch lets such a SIGTERM kill a worker, which the main process then reported as
    "DataLoader worker ... killed by signal" instead of stopping in order. The workers now end quietly."""
    out = tmp_path / "s.safetensors"
    args = stats_args(world, out)
    args[args.index("--num-workers") + 1] = "2"  # decode workers, which the signal reaches too
    p = _interrupted_cli("_shallow_cli.py", "FD_EVAL_TEST_SIGNAL_AFTER_UNITS", 1, args, signal.SIGTERM, ":job",
                         start_new_session=True)  # its own process group: the signal reaches it and its workers only
    _check_stopped(p, tmp_path, signal.SIGTERM)
    assert b"DataLoader worker" not in p.stderr, p.stderr
    ck = build.default_checkpoint_dir(out)
    assert sorted(q.name for q in ck.glob("unit-*")) == ["unit-000000.safetensors"] and not out.exists()
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    r = CliRunner().invoke(main, stats_args(world, out))
    assert r.exit_code == 0 and "1 of 4 units already done" in r.output, r.output + repr(r.exception)
    _same_stats(out, reference)


def test_warnings_print_as_one_line():
    """A Python warning inside a command prints ``warning: <first line>`` (no file:line, no source line); a
    subprocess, since pytest records warnings itself (and the CLI then leaves them to it)."""
    code = ("import warnings\nfrom fd_eval.cli._common import _warnings_as_lines\nwith _warnings_as_lines():\n"
            "    warnings.warn('first line of the message\\nsecond line', RuntimeWarning)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert p.returncode == 0 and p.stderr.decode() == "warning: first line of the message\n", p.stderr


@pytest.fixture
def burners(request):
    """``FD_EVAL_TEST_BURNERS`` (default 4) CPU-burning processes beside the test, killed when it ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(int(os.environ.get("FD_EVAL_TEST_BURNERS", 4)))]
    yield procs
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=60)


@pytest.mark.slow
def test_repeated_sigint_at_load_never_exits_0(world, tmp_path, burners):
    """``FD_EVAL_TEST_INTERRUPT_ROUNDS`` (default 2) rounds each of `stats` and `copies`, started with SIGINT ignored
    and CPU-burning processes beside them, interrupted after 1, 2, 3 ... unit files: every one stops with 130
    (never 0), leaves no temp file, and the last resume finishes."""
    rounds = int(os.environ.get("FD_EVAL_TEST_INTERRUPT_ROUNDS", 2))  # ~2.5 min on 2 busy cores
    for i in range(rounds):
        k = 1 + i % 3
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        p = _interrupted_cli("_shallow_cli.py", "FD_EVAL_TEST_SIGNAL_AFTER_UNITS", k,
                             stats_args(world, folder / "s.safetensors"))
        _check_stopped(p, folder)
        assert not (folder / "s.safetensors").exists()
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        p = _interrupted_cli("_copies_cli.py", "FD_EVAL_TEST_KILL_AFTER_COPIES_UNITS", k,
                             copies_args(world, folder / "c.json"))
        _check_stopped(p, folder)
        assert not (folder / "c.json").exists()
    # the last interrupted copies run resumes to the end (plain CLI, no signal)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(TESTS / "_copies_cli.py"), str(DEPTH), *copies_args(world, folder / "c.json")]
    p = subprocess.run(argv, capture_output=True, env=env, timeout=600)
    assert p.returncode == 0 and b"resuming from" in p.stderr, p.stderr[-3000:]
    assert (folder / "c.json").exists()
