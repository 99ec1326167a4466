"""One pass over a source: decode once, feed every extractor, accumulate float64 moments on the device.

DataLoader workers decode (``PIL.Image.open(f).convert("RGB")``) and run each extractor's host step (the
reference Pillow resize) in parallel; batches travel to the device through pinned memory with non-blocking
copies; features go straight into :class:`MomentAccumulator`s that live on the device. Nothing in the loop
reads a device value back, so the host never waits for the GPU until the end.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import EmptySourceError, FDEvalError
from .extractors import Extractor
from .moments import MomentAccumulator
from .provenance import environment
from .sources import ExtractorDataset, ImageSource, SkippedItem, SubsetSource, collate
from .stats import Stats


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """Decode workers: all cores but one on a GPU machine (the model runs elsewhere); on CPU the model
    competes for the same cores, so half of them."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(1, min(cpus - 1, 32))
    return max(1, cpus // 2)


def default_batch_size(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32


def auto_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda when available (``cuda:LOCAL_RANK`` under torchrun), else cpu."""
    if device is None or str(device) == "auto":
        from .distributed import default_device, launched_distributed

        if launched_distributed():
            return default_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Extraction:
    """What one pass produced: one accumulator per extractor (same order), and the skipped items."""

    accumulators: list[MomentAccumulator]
    skipped: list[SkippedItem] = field(default_factory=list)
    n_images: int = 0
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")


def _forward(ex: Extractor, x: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Features (B, D) of one collated input; a list (mixed image sizes) runs each run of equal size."""
    if isinstance(x, torch.Tensor):
        return ex.forward_prepared(x.to(device, non_blocking=True))
    out, run = [], [x[0]]
    for t in x[1:]:
        if t.shape == run[0].shape:
            run.append(t)
        else:
            out.append(ex.forward_prepared(torch.stack(run).to(device, non_blocking=True)))
            run = [t]
    out.append(ex.forward_prepared(torch.stack(run).to(device, non_blocking=True)))
    return torch.cat(out)


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous block ``rank`` of ``world_size`` nearly equal blocks of range(n) (sizes differ by <= 1)."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)


def extract(
    source: ImageSource,
    extractors: Sequence[Extractor],
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    keep_features: bool = False,
    skip_bad: bool | None = None,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
    progress: bool = True,
    desc: str = "features",
    rank: int = 0,
    world_size: int = 1,
) -> Extraction:
    """Run every extractor over ``source`` (this rank's block of it) in one decoding pass.

    Returns the per-extractor float64 moment accumulators (on ``device``), merged over ranks when
    ``world_size > 1`` (a collective on the default process group, see :mod:`fd_eval.distributed`: every rank
    must call it; every rank gets the merged result; an :class:`FDEvalError` on any rank is raised on all).
    """
    dev = auto_device(device)
    if len(source) == 0:
        raise EmptySourceError(f"{source.spec}: no images to evaluate")
    part = source if world_size == 1 else SubsetSource(source, shard_indices(len(source), rank, world_size))
    workers = default_num_workers(dev) if num_workers is None else num_workers
    ds = ExtractorDataset(part, [ex.host_transform() for ex in extractors], skip_bad=skip_bad,
                          image_transform=image_transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size or default_batch_size(dev), shuffle=False, num_workers=workers,
        collate_fn=collate, pin_memory=dev.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )
    for ex in extractors:
        ex.to(dev)
    accs = [MomentAccumulator(ex.feature_dim, dev, keep_features=keep_features) for ex in extractors]
    result = Extraction(accs)
    t0 = time.perf_counter()
    error: FDEvalError | None = None
    with tqdm(total=len(part), unit="img", desc=desc, disable=not progress or rank != 0, smoothing=0.1) as bar:
        try:
            for batch in loader:
                result.skipped += ds.check(batch)  # raises the one-line BadImageError unless skip_bad
                if len(batch):
                    for ex, acc, x in zip(extractors, accs, batch.inputs):
                        acc.update(_forward(ex, x, dev))
                result.n_images += len(batch)
                bar.update(len(batch) + len(batch.skipped))
        except FDEvalError as e:
            if world_size == 1:
                raise
            error = e  # the other ranks are about to wait for this one in the merge: tell them instead
    if world_size > 1:
        from .distributed import merge_extraction

        # skipped indices are positions in this rank's block; report them as indices into the source
        result.skipped = [replace(s, index=None if s.index is None else int(part.indices[s.index]))
                          for s in result.skipped]
        merge_extraction(result, error=error)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result.seconds = time.perf_counter() - t0
    if result.n_images == 0:
        raise EmptySourceError(f"{source.spec}: every image was skipped as unreadable ({len(result.skipped)})")
    return result


def extraction_stats(extraction: Extraction, extractors: Sequence[Extractor], source: ImageSource,
                     source_info: dict[str, Any] | None = None) -> dict[str, Stats]:
    """Statistics per extractor name, with full provenance metadata."""
    env = environment(extractors[0].device if extractors else None)
    src = {"spec": source.spec, "n": extraction.n_images, "skipped": len(extraction.skipped),
           **(source_info or {})}
    out = {}
    for ex, acc in zip(extractors, extraction.accumulators):
        meta = {**ex.metadata(), "source": src, **env}
        out[ex.name] = Stats.from_accumulator(acc, meta)
    return out
