"""torch.distributed glue: which rank am I, and merging exact moment triples over ranks.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc_per_node 8 -m fd_eval compute gen_dir --ref gpic-test
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0|1 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m fd_eval compute gen_dir --ref gpic-test

Every rank extracts its own block of the images; the per-rank moment triples (n, mean (D,), M2 (D, D)), all
float64, are then exchanged exactly (no float32 all_reduce of sums) and every rank merges them in rank order with
:meth:`MomentAccumulator.merge` (Chan's update, exact algebra), so every rank holds the same merged statistics
and the result depends on the number of processes only at rounding level (~1e-13 relative).

The exchange broadcasts one rank's triple at a time, so memory stays O(D^2) whatever the world size; it moves
``world * (D^2 + D) * 8`` bytes to every rank (8 MB per rank for D = 1024), a few milliseconds on NVLink.

Nothing here unpickles: variable-length data (error messages, skipped-item lists) travels as UTF-8 JSON in
uint8 tensors, never through ``all_gather_object``.

Single-process runs never import or initialise ``torch.distributed`` state: every helper answers rank 0 of 1
when no process group is initialised and the environment does not name a world larger than one.
"""
from __future__ import annotations

import atexit
import datetime
import importlib
import inspect
import json
import os
from typing import Any, Sequence

import torch

from .. import errors as _errors
from ..core.moments import MomentAccumulator
from ..errors import FDEvalError

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)  # a rank may wait this long for the slowest one to finish


# --- who am I ------------------------------------------------------------------------------------------------
def _dist():
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    """True when a default process group exists (the caller's own, or one :func:`init_distributed` made)."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def env_world() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) from the environment torchrun sets, or None when they are not set."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise FDEvalError(f"RANK={os.environ['RANK']!r} / WORLD_SIZE={os.environ['WORLD_SIZE']!r} are not "
                          "integers; launch with torchrun or unset them") from None


def launched_distributed() -> bool:
    """True under a multi-process launcher (torchrun with more than one process)."""
    env = env_world()
    return env is not None and env[1] > 1


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``; 0 for single-process runs)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def get_rank(group: Any = None) -> int:
    return _dist().get_rank(group) if is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    return _dist().get_world_size(group) if is_initialized() else 1


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (modulo the visible GPUs, for launchers that give each process one GPU) when CUDA is
    available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | torch.device | None = None, backend: str | None = None,
                     timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Initialise the default process group from torchrun's environment (``init_method="env://"``).

    Does nothing (returns False) when a group already exists or the environment names no world larger than
    one. Backend: NCCL when ``device`` (default: :func:`default_device`) is a GPU, else gloo; on a GPU the
    process is bound to ``cuda:LOCAL_RANK`` first. Returns True when this call created the group (the caller
    then owns it: see :func:`destroy`).
    """
    if is_initialized() or not launched_distributed():
        return False
    if not _dist().is_available():
        raise FDEvalError("launched by torchrun (WORLD_SIZE > 1) but this torch build has no torch.distributed; "
                          "run a single process or install a torch build with distributed support")
    dev = default_device() if device is None or str(device) == "auto" else torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = default_device()
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    # torch quirk (2.14): importing torch._dynamo (timm does, when the extractor is built) *after* the group
    # exists leaves a reference to it, so destroy_process_group() no longer joins gloo's worker threads; one of
    # them can then still be releasing a tensor at interpreter exit and abort the process ("terminate called
    # without an active exception", ~1 run in 10 under load). Imported first, the group is freed on destroy.
    importlib.import_module("torch._dynamo")

    kw: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if backend == "nccl" and "device_id" in inspect.signature(_dist().init_process_group).parameters:
            kw["device_id"] = dev  # binds the communicator to this GPU now (no guessing later, no hang at exit)
    _dist().init_process_group(backend=backend, init_method="env://", timeout=timeout, **kw)
    return True


def destroy() -> None:
    """Tear down the default process group (only call it for a group :func:`init_distributed` created)."""
    if is_initialized():
        _dist().destroy_process_group()


def resolve_world(rank: int | None = None, world_size: int | None = None, *, init: bool = True,
                  device: str | torch.device | None = None) -> tuple[int, int]:
    """(rank, world_size) for an evaluation.

    * ``world_size=1``: a single-process evaluation even inside a distributed job (e.g. rank 0 alone).
    * unset: the default process group's, initialising it from torchrun's environment when ``init`` and the
      environment names a world larger than one; else (0, 1).
    * explicit values must agree with the process group (the merge needs one).

    Under a process group, every rank of it must make the same call (the merge is a collective operation).
    """
    if world_size == 1 and rank in (None, 0):
        return 0, 1
    if world_size is not None and world_size < 1 or rank is not None and rank < 0:
        raise FDEvalError(f"rank {rank} / world_size {world_size}: expected 0 <= rank < world_size")
    if init and not is_initialized() and init_distributed(device):
        atexit.register(destroy)  # we made it, so we tear it down (before interpreter shutdown)
    if is_initialized():
        r, w = get_rank(), get_world_size()
        if (rank is not None and rank != r) or (world_size is not None and world_size != w):
            raise FDEvalError(f"rank {rank} / world_size {world_size} disagree with the process group's {r} / {w}; "
                              "leave them unset (or pass world_size=1 for a single-process evaluation)")
        return r, w
    if world_size is not None and world_size > 1:
        raise FDEvalError(f"world_size={world_size} needs an initialised torch.distributed process group to merge "
                          "the ranks' statistics; launch with torchrun (fd-eval initialises the group itself)")
    return 0, 1


def barrier(device: torch.device, group: Any = None) -> None:
    """Wait for every rank of ``group`` (NCCL barriers name this rank's GPU, so none guesses it)."""
    dist = _dist()
    if dist.get_backend(group) == "nccl" and device.type == "cuda":
        dist.barrier(group=group, device_ids=[device.index or 0])
    else:
        dist.barrier(group=group)


# --- communication --------------------------------------------------------------------------------------------
def comm_device(group: Any = None, prefer: torch.device | None = None) -> torch.device:
    """Where tensors must live for collectives on ``group``: a GPU for NCCL (``prefer`` when it is one, else the
    current device), else the CPU."""
    backend = str(_dist().get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        if prefer is not None and prefer.type == "cuda" and prefer.index is not None:
            return prefer
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _global_rank(group: Any, r: int) -> int:
    return r if group is None else _dist().get_global_rank(group, r)


def all_gather_bytes(data: bytes, group: Any = None) -> list[bytes]:
    """Every rank's ``data``, in rank order (no pickling: lengths, then padded uint8 tensors)."""
    dist = _dist()
    dev = comm_device(group)
    world = get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(max(lengths), 1), dtype=torch.uint8)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(dev)
    out = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(out, buf, group=group)
    return [o[:n].cpu().numpy().tobytes() for o, n in zip(out, lengths)]


def all_gather_json(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's JSON-able ``obj``, in rank order."""
    return [json.loads(b.decode()) for b in all_gather_bytes(json.dumps(obj).encode(), group)]


def all_true(flags: Sequence[bool], group: Any = None) -> list[bool]:
    """Element-wise AND of ``flags`` over ranks (e.g. "every rank found this cache entry")."""
    if not flags:
        return []
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=comm_device(group))
    _dist().all_reduce(t, op=_dist().ReduceOp.MIN, group=group)
    return [bool(v) for v in t.cpu().tolist()]


def raise_first_error(error: BaseException | None, group: Any = None) -> None:
    """Collective: if any rank failed, every rank raises the error of the lowest failing rank.

    Without this a rank that hits a bad image would leave the others waiting in the merge until the timeout;
    with it, rank 0 reports the one-line message (naming the file) and every process exits with an error.
    Only :class:`FDEvalError` subclasses are shipped; the class is recreated by name from :mod:`fd_eval.errors`.
    """
    me = get_rank(group)
    mine = None if error is None else {"type": type(error).__name__, "message": str(error), "attrs": {
        k: v for k, v in vars(error).items() if isinstance(v, (str, int, float, bool)) and not k.startswith("_")}}
    for r, info in enumerate(all_gather_json(mine, group)):
        if info is None:
            continue
        if r == me and error is not None:
            raise error
        cls = getattr(_errors, info["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, FDEvalError)):
            cls = FDEvalError
        err = cls.__new__(cls)  # (not cls(message): some take other arguments, e.g. RemoteReadError(url, ...))
        FDEvalError.__init__(err, f"{info['message']} (on rank {r})")
        for k, v in info.get("attrs", {}).items():
            setattr(err, k, v)
        raise err


def merge_accumulators(accs: Sequence[MomentAccumulator], group: Any = None) -> list[MomentAccumulator]:
    """Collective: new accumulators holding every rank's moments merged in rank order (same on every rank).

    The inputs are not modified. Kept feature rows are concatenated in rank order too. The declared merge of
    :class:`MomentAccumulator` (Chan's update) applied by :func:`fd_eval.core.consumers.merge_over_ranks`: each rank's
    state is broadcast in turn (memory O(D^2), not O(world * D^2)).
    """
    from ..core.consumers import merge_over_ranks

    return merge_over_ranks(accs, group)  # type: ignore[return-value]


def merge_extraction(extraction: Any, error: BaseException | None = None, group: Any = None) -> Any:
    """Collective, called by :func:`fd_eval.run.pipeline.extract` when ``world_size > 1``: in place, replace this
    rank's accumulators by the merged ones, ``n_images`` by the total and ``skipped`` by every rank's skipped
    items (rank order; indices already global). If any rank failed (``error``), every rank raises instead."""
    raise_first_error(error, group)
    extraction.accumulators = merge_accumulators(extraction.accumulators, group)
    if any(extraction.metrics):  # the registered consumer metrics, by their declared merge rules
        from ..core.consumers import merge_over_ranks

        flat = merge_over_ranks([c for m in extraction.metrics for c in m.values()], group)
        it = iter(flat)
        extraction.metrics = [{name: next(it) for name in m} for m in extraction.metrics]
    items = all_gather_json([s.to_dict() for s in extraction.skipped], group)
    from ..sources import SkippedItem

    extraction.skipped = [SkippedItem(**d) for part in items for d in part]
    extraction.n_images = sum(n for n in all_gather_json(extraction.n_images, group))
    return extraction
