"""The DataLoader side of a pass: :class:`ExtractorDataset` (decode + host transforms in the workers),
:class:`Batch` and :func:`collate`. GPU decoding's dataset and collate live in :mod:`fd_eval.sources.gpu_decode`."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.utils.data
from PIL import Image

from ..errors import BadImageError
from .base import ImageSource, SkippedItem


class ExtractorDataset(torch.utils.data.Dataset):
    """Item ``i``: ``(i, [t(image) for t in transforms])``, or a :class:`SkippedItem` for a bad image.

    Bad images never raise inside a worker (torch would re-raise them with a multi-line traceback); they come
    back as :class:`SkippedItem` and :meth:`check` raises the one-line :class:`BadImageError` in the main
    process unless ``skip_bad``. Transforms are pickled to workers under the spawn start method, so pass
    light callables (e.g. ``functools.partial(pil_resize, size=...)`` + ``pil_to_tensor``), not models.
    """

    def __init__(self, source: ImageSource, transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
                 skip_bad: bool | None = None, image_transform: Callable[[Image.Image], Image.Image] | None = None):
        self.source = source
        self.transforms = list(transforms)
        self.skip_bad = source.skip_bad if skip_bad is None else bool(skip_bad)
        self.image_transform = image_transform  # applied once, before the per-extractor transforms

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> "tuple[int, list[torch.Tensor]] | SkippedItem":
        img, err = self.source.load_or_error(i)
        if err is not None:
            return SkippedItem(int(i), getattr(err, "item", self.source.describe(i)),
                               getattr(err, "reason", str(err)), str(err))
        if self.image_transform is not None:
            img = self.image_transform(img)
        return int(i), [t(img) for t in self.transforms]

    def check(self, batch: "Batch") -> list[SkippedItem]:
        """The batch's skipped items; raises the first one's :class:`BadImageError` unless ``skip_bad``."""
        if batch.skipped and not self.skip_bad:
            s = batch.skipped[0]
            err = BadImageError(s.message or f"{s.name}: {s.reason}")
            err.item, err.reason = s.name, s.reason  # type: ignore[attr-defined]
            raise err
        return batch.skipped


@dataclass
class Batch:
    """A collated batch.

    indices: int64 (B,) source indices of the decoded items, in batch order.
    inputs: one entry per transform: a stacked tensor (B, ...) when every item's shape agrees, else a list of
        B tensors; ``[]`` when every item of the batch was skipped.
    skipped: the batch's bad items (index, name, reason, message).
    """

    indices: torch.Tensor
    inputs: list[torch.Tensor | list[torch.Tensor]]
    skipped: list[SkippedItem] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        def pin(x: Any) -> Any:
            return x.pin_memory() if isinstance(x, torch.Tensor) else [t.pin_memory() for t in x]

        return Batch(self.indices.pin_memory(), [pin(x) for x in self.inputs], self.skipped)


def collate(items: Sequence["tuple[int, list[torch.Tensor]] | SkippedItem"]) -> Batch:
    """Collate :class:`ExtractorDataset` items into a :class:`Batch` (use as ``DataLoader(collate_fn=collate)``)."""
    ok = [it for it in items if not isinstance(it, SkippedItem)]
    skipped = [it for it in items if isinstance(it, SkippedItem)]
    indices = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    inputs: list[torch.Tensor | list[torch.Tensor]] = []
    if ok:
        for k in range(len(ok[0][1])):
            ts = [t[k] for _, t in ok]
            same = all(t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts)
            # default_collate stacks into shared memory inside workers, saving a copy on the way back
            inputs.append(torch.utils.data.default_collate(ts) if same else ts)
    return Batch(indices, inputs, skipped)

def h2d(x: torch.Tensor, device: torch.device, stream: "torch.cuda.Stream | None") -> torch.Tensor:
    """Non-blocking copy to ``device``; on a CUDA side stream when given, so it overlaps the compute already
    queued on the current stream (which then waits for the copy, and owns the memory: record_stream)."""
    if stream is None or x.device.type != "cpu":
        return x.to(device, non_blocking=True)
    with torch.cuda.stream(stream):
        y = x.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    y.record_stream(current)
    return y


def worker_init(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=...)``: a decode worker ends quietly (exit status 0) on any SIGTERM, as torch ends
    one on its main process's SIGTERM.

    Why: a job scheduler (SLURM) stops a job by signalling each of its processes. torch's worker handler lets a
    SIGTERM from anyone but the main process kill the worker, and the main process, stopping in order on its own
    SIGTERM, then failed with "DataLoader worker ... is killed by signal: Terminated" instead of its one line.
    """
    signal.signal(signal.SIGTERM, _worker_exit)


def _worker_exit(signum: int, frame: Any) -> None:
    os._exit(0)  # what torch's own handler does on the main process's SIGTERM: no cleanup, the main one shuts down
