"""CPU threads for the linear algebra: chosen for the problem size and the cores actually free, scoped to the call.

torch runs its CPU linear algebra (MKL/OpenBLAS through OpenMP) on as many threads as the machine has cores. On
a machine that is doing other work (a training loop, data loading, other jobs) those threads wait for each other
at every barrier behind processes they cannot preempt: measured on 2 busy cores, the FD of two 1024-d covariances
took 16.8 s on 2 threads and 1.0 s on 1. Small problems never gain from threads at all (their barriers cost more
than the work). So the FD step asks :func:`choose_threads` and runs inside :func:`limit_threads`:

* one thread below :data:`MIN_PARALLEL_DIM` features (the factorisations of a small covariance take milliseconds);
* otherwise one thread per core that is free right now: the cores this process may run on
  (``os.sched_getaffinity``) minus the other runnable threads on the machine at this instant (``procs_running``
  of ``/proc/loadavg``, sampled a few times; the load average would lag by a minute and count this process's
  own extraction just before), and never more than torch's own setting (``torch.set_num_threads`` by the user);
* ``$FD_EVAL_LINALG_THREADS=N`` overrides the choice (0 = torch's default).

``benchmarks/bench_threads.py`` measures the rule against the default and against every fixed count.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from typing import Any, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")
MIN_PARALLEL_DIM = 256  # below this, threads gain nothing measurable (a 256-d FD takes a few milliseconds)
_SAMPLES, _SAMPLE_GAP_S = 3, 0.001


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; the CPU count where affinity is not available)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def other_runnable() -> int | None:
    """Runnable threads of other processes at this instant (median of a few samples of ``procs_running``, less
    this thread), or None where the kernel does not say (not Linux)."""
    counts = []
    for k in range(_SAMPLES):
        try:
            with open("/proc/loadavg", encoding="ascii") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)  # this thread is running while it reads
        if k + 1 < _SAMPLES:
            time.sleep(_SAMPLE_GAP_S)
    return max(0, sorted(counts)[len(counts) // 2])


def choose_threads(dim: int) -> int:
    """Threads for dense linear algebra on (dim, dim) matrices now (see the module docstring)."""
    env = os.environ.get("FD_EVAL_LINALG_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            from ..errors import FDEvalError

            raise FDEvalError(f"$FD_EVAL_LINALG_THREADS={env!r} is not an integer; set a thread count "
                              "(0 = torch's default)") from None
        return n if n > 0 else torch.get_num_threads()
    ceiling = min(usable_cores(), torch.get_num_threads())
    if dim < MIN_PARALLEL_DIM or ceiling <= 1:
        return 1
    busy = other_runnable()
    if busy is None:
        return ceiling
    return max(1, min(ceiling, usable_cores() - busy))


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[int]:
    """torch's intra-op threads (OpenMP, MKL) set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    if n == before:
        yield n
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def with_linalg_threads(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for feature math taking (N, D) features first (PRDC, MMD, the bootstrap): the call runs under
    :func:`linalg_threads` for D and its ``device=`` keyword."""

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> T:
        shape = getattr(args[0], "shape", ()) if args else ()
        with linalg_threads(int(shape[-1]) if len(shape) else 0, kw.get("device")):
            return fn(*args, **kw)

    return run


def linalg_threads(dim: int, device: torch.device | str | None = None) -> contextlib.AbstractContextManager:
    """:func:`limit_threads` at :func:`choose_threads` for CPU work on (dim, dim) matrices; a no-op elsewhere."""
    if device is not None and torch.device(device).type != "cpu":
        return contextlib.nullcontext()
    return limit_threads(choose_threads(dim))
