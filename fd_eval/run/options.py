"""How a run executes: one frozen :class:`RunOptions`, taken by every entry point and made by one CLI decorator.

    opts = fd_eval.RunOptions(device="cuda", batch_size=128, precision="fast")
    fd_eval.compute_fd("gen_dir", ref="gpic-test", options=opts)
    fd_eval.compute_fd("gen_dir", ref="gpic-test", device="cuda", batch_size=128)   # the same, as keywords

Every default is decided in one place, :meth:`RunOptions.resolve`, at the API layer: it returns a frozen
:class:`ResolvedRun` (a concrete device, batch size, workers, rank and world size) that is passed down whole to
the pipeline, the unit engine, ``build`` and ``copies``; no layer below re-derives a default.

What is evaluated (sources, reference, models, weights, ``num``/``seed``, transforms) stays in each function's
signature; how it runs lives here, validated once (a bad value is a one-line :class:`FDEvalError` before any
model loads). Keyword arguments of an entry point that name a field build the options (:func:`make_options`);
any other unknown keyword is a ``TypeError`` listing the fields.

Option defaults (in the spirit of torch-fidelity's defaults table; :data:`OPTION_HELP` is also the CLI's help):

=============  ========  ==================================================================================
field          default   meaning
=============  ========  ==================================================================================
device         None      "auto"/None: cuda (``cuda:LOCAL_RANK`` under torchrun) when available, else cpu
batch_size     None      images per model batch: 256 on a GPU (128 below 20 GiB), 32 on a CPU
num_workers    None      decode workers: all cores but one on a GPU machine, half of them on a CPU
precision      None      "exact" (float32, TF32 off; the protocol) or "fast"; None: exact / the extractors' own
compile        None      torch.compile in fast mode; None: auto (GPU passes of >= 200K images)
decode         "pil"     "pil" (reference) or "gpu" (nvJPEG for RGB JPEGs)
resize         None      DINOv2's resize: "pil" (reference, default) or "torch" (EDM2's)
skip_bad       False     skip unreadable images (counted and listed) instead of stopping
progress       True      progress bars
offline        None      cached references and weights only, no remote source (None: $FD_EVAL_OFFLINE / $HF_HUB_OFFLINE)
rank           None      this process's rank (None: torch.distributed / torchrun's environment)
world_size     None      number of processes (None: as rank; 1 forces a single-process run)
=============  ========  ==================================================================================
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..errors import FDEvalError
from ..extractors.precision import PRECISIONS  # exact, fast, fp32, fp8: one list
from .distributed import default_device, env_world, get_rank, get_world_size, is_initialized, launched_distributed

DECODES = ("pil", "gpu")
RESIZES = ("pil", "torch")

OPTION_HELP: dict[str, str] = {
    "device": "cuda, cuda:1, cpu, or auto.",
    "batch_size": "Images per batch (default 256 on a GPU, 128 below 20 GiB; 32 on a CPU).",
    "num_workers": "Decode workers (default from the CPU count).",
    "precision": "exact: float32-accurate (the protocol's numbers; DINOv2 on CUDA by 3xTF32 tensor-core products); "
                 "fp32: IEEE float32 everywhere (bitwise comparable with a CPU run); fast: bfloat16 autocast for "
                 "DINOv2, TF32 for Inception; fp8: DINOv2 e4m3 linear layers (Hopper). fast and fp8 are refused "
                 "against exact references unless --allow-mismatch.",
    "compile": "torch.compile the network [default: only with --precision fast/fp8 on a GPU for passes of >= 200K "
               "images; --compile also compiles exact].",
    "decode": "gpu: decode JPEGs on the GPU (nvJPEG). Needs extractors that resize on the device (Inception; "
              "DINOv2 with --resize torch, or --precision fast on a GPU) and no --transform/--ref-transform; PNGs, "
              "other formats and CPU runs use PIL. Recorded: refused against PIL-decoded statistics (GPIC's) "
              "unless --allow-mismatch.",
    "resize": "DINOv2 resize: pil (reference protocol, default) or torch (EDM2's fast variant).",
    "skip_bad": "Skip unreadable images (counted and listed) instead of stopping.",
    "progress": "No progress bars.",  # the CLI flag is --quiet/-q
    "offline": "Use cached references and weights only; refuse remote (hf://, https://) sources.",
}


@dataclass(frozen=True)
class CliFlag:
    """How one :class:`RunOptions` field appears on the command line (the CLI's options are generated from
    :data:`CLI_FLAGS`; help texts from :data:`OPTION_HELP`)."""

    field: str
    decls: tuple[str, ...]  # click declarations, e.g. ("--quiet", "-q") or ("--compile/--no-compile",)
    type: Any = None  # int, or a tuple of choices; None: a flag (bool)
    default: Any = None  # the CLI's default (shown when show_default)
    show_default: bool = False
    inverted: bool = False  # the flag sets the field to False (--quiet -> progress=False)


CLI_FLAGS: tuple[CliFlag, ...] = (
    CliFlag("device", ("--device",), str, "auto", True),
    CliFlag("batch_size", ("--batch-size",), int),
    CliFlag("num_workers", ("--num-workers",), int),
    CliFlag("resize", ("--resize",), RESIZES),
    CliFlag("precision", ("--precision",), PRECISIONS, "exact", True),
    CliFlag("compile", ("--compile/--no-compile",)),
    CliFlag("decode", ("--decode",), DECODES, "pil", True),
    CliFlag("skip_bad", ("--skip-bad",), default=False),
    CliFlag("progress", ("--quiet", "-q"), default=False, inverted=True),
    CliFlag("offline", ("--offline",)),
)


def _check_device(device: Any) -> None:
    if device is None or isinstance(device, torch.device) and device.type == "cpu":
        return
    if isinstance(device, str) and device.strip() == "auto":
        return
    if not isinstance(device, (str, torch.device)):
        raise FDEvalError(f"device must be a string such as 'cuda', 'cuda:1', 'cpu' or 'auto', got {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise FDEvalError(f"unknown device {str(device)!r}; use cuda, cuda:N, cpu or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FDEvalError(f"device {str(device)!r}: no usable CUDA GPU here (torch.cuda.is_available() is "
                              "False); use --device cpu (device='cpu') or auto")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise FDEvalError(f"device {str(device)!r}: this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise FDEvalError(f"device {str(device)!r}: MPS is not available here; use --device cpu or auto")
    elif dev.type != "cpu":
        raise FDEvalError(f"unsupported device {str(device)!r}; use cuda, cuda:N, cpu or auto")


def _check_int(name: str, value: Any, minimum: int, flag: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive" if minimum > 0 else "a non-negative"
        raise FDEvalError(f"{flag} ({name}) must be {what} integer, got {value!r}")


@dataclass(frozen=True)
class RunOptions:
    """How a run executes (see the module docstring's table); validated on construction."""

    device: str | torch.device | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    precision: str | None = None
    compile: bool | None = None
    decode: str = "pil"
    resize: str | None = None
    skip_bad: bool = False
    progress: bool = True
    offline: bool | None = None
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        _check_device(self.device)
        _check_int("batch_size", self.batch_size, 1, "--batch-size")
        _check_int("num_workers", self.num_workers, 0, "--num-workers")
        _check_int("world_size", self.world_size, 1, "world_size")
        _check_int("rank", self.rank, 0, "rank")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise FDEvalError(f"unknown precision {self.precision!r}; choose 'exact' (the protocol's numbers), "
                              "'fp32' (IEEE float32), 'fast' (bfloat16/TF32) or 'fp8' (DINOv2 e4m3)")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise FDEvalError(f"compile must be True, False or None (auto), got {self.compile!r}")
        if self.decode not in DECODES:
            raise FDEvalError(f"unknown decode mode {self.decode!r}; choose 'pil' (PIL in the workers: the reference) "
                              "or 'gpu' (JPEGs decoded on the GPU with nvJPEG)")
        if self.resize is not None and self.resize not in RESIZES:
            raise FDEvalError(f"unknown resize {self.resize!r}; choose 'pil' (the reference protocol) or 'torch'")

    def torch_device(self) -> torch.device:
        """The device this run uses (``None``/"auto" resolved; see :func:`auto_device`)."""
        return auto_device(self.device)

    def resolve(self, *, collectives: bool = True) -> "ResolvedRun":
        """Every default decided, once: the :class:`ResolvedRun` the layers below the API take as one argument.

        ``collectives``: the run merges over ranks with torch.distributed collectives, so rank and world size are
        the process group's (initialised from torchrun's environment when it names a world larger than one; see
        :func:`fd_eval.run.distributed.resolve_world`). False (``build_stats``: ranks share a checkpoint folder):
        explicit ``rank``/``world_size`` need no process group, else an initialised group's, else torchrun's
        ``RANK``/``WORLD_SIZE`` without initialising one. A ResolvedRun resolves to itself.
        """
        dev = auto_device(self.device)
        if collectives:
            from .distributed import resolve_world

            rank, world = resolve_world(self.rank, self.world_size, device=dev)
            group = world > 1
        else:
            rank, world, group = _shared_folder_world(self.rank, self.world_size)
        if world > 1 and dev.type == "cuda" and dev.index is None:  # one GPU per local process
            dev = default_device()
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)}
        fields.update(device=dev, rank=rank, world_size=world,
                      batch_size=self.batch_size or default_batch_size(dev),
                      num_workers=default_num_workers(dev) if self.num_workers is None else self.num_workers)
        return ResolvedRun(**fields, group=group)

    def replace(self, **changes: Any) -> "RunOptions":
        """A copy with ``changes`` (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), torch.device) else v)
                for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ResolvedRun(RunOptions):
    """A :class:`RunOptions` with every default decided (:meth:`RunOptions.resolve`): ``device`` a
    ``torch.device``, ``batch_size``/``num_workers``/``rank``/``world_size`` integers; ``group``: ranks merge
    through a torch.distributed process group (False: one process, or ranks sharing a checkpoint folder).
    ``precision``/``compile`` stay the requested ones (None: each extractor's own mode, see :meth:`precisions`).

    Made once at the API layer and passed down whole to the pipeline, the unit engine, ``build`` and ``copies``;
    nothing below the API derives a default again. ``replace`` keeps the other resolved values as they are.
    """

    group: bool = False

    def resolve(self, *, collectives: bool = True) -> "ResolvedRun":
        return self

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @staticmethod
    def precisions(extractors: Sequence[Any]) -> dict[str, str]:
        """{extractor name: its precision mode} (what the run uses, per extractor, once they are loaded)."""
        return {ex.name: ex.precision.mode for ex in extractors}


OPTION_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunOptions))


def make_options(options: RunOptions | None, kw: Mapping[str, Any], where: str) -> RunOptions:
    """``options`` (default :class:`RunOptions()`) with the run-option keywords ``kw`` applied.

    Raises ``TypeError`` naming ``where`` for a keyword that is not a field, and :class:`FDEvalError` for a bad
    value.
    """
    unknown = sorted(set(kw) - set(OPTION_FIELDS))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; its run "
                        f"options are the fields of fd_eval.RunOptions: {', '.join(OPTION_FIELDS)}")
    if options is not None and not isinstance(options, RunOptions):
        raise TypeError(f"{where}(): options must be an fd_eval.RunOptions, got {type(options).__name__}")
    base = options if options is not None else RunOptions()
    if kw and isinstance(base, ResolvedRun):  # a change may move a default (e.g. another device): resolve again
        base = RunOptions(**{f.name: getattr(base, f.name) for f in dataclasses.fields(RunOptions)})
    return dataclasses.replace(base, **kw) if kw else base


# --- defaults that depend on the machine (decided only in RunOptions.resolve) --------------------------------------
def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """Decode workers: all cores but one on a GPU machine (the model runs elsewhere; PIL decodes+resizes about
    500 256x256 PNGs/s per core, so 8 workers feed ~4,000 img/s); on a CPU the model competes for the same
    cores, so half of them."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(1, min(cpus - 1, 32))
    return max(1, cpus // 2)


def default_batch_size(device: torch.device) -> int:
    """256 images on a GPU with >= 20 GiB (ViT-L/14 at 224 px is compute-bound well below that), 128 on smaller
    GPUs; 32 on a CPU."""
    if device.type == "cuda":
        try:
            total = torch.cuda.get_device_properties(device).total_memory
        except (RuntimeError, AssertionError):
            total = 0
        return 256 if total >= 20 * 2**30 else 128
    return 32


def auto_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda when available (``cuda:LOCAL_RANK`` under torchrun), else cpu."""
    if device is None or str(device) == "auto":
        if launched_distributed():
            return default_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _shared_folder_world(rank: int | None, world_size: int | None) -> tuple[int, int, bool]:
    """(rank, world size, whether a process group is used): explicit values (no group needed), else an
    initialised group's, else torchrun's ``RANK``/``WORLD_SIZE`` (units are shared through the checkpoint folder)."""
    if rank is not None or world_size is not None:
        r, w, group = int(rank or 0), int(world_size or 1), False
    elif is_initialized():
        r, w, group = get_rank(), get_world_size(), True
    else:
        (r, w), group = env_world() or (0, 1), False
    if w < 1 or not 0 <= r < w:
        raise FDEvalError(f"rank {r} is not within world size {w}; check RANK/WORLD_SIZE or rank=/world_size=")
    return r, w, group
