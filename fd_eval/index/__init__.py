"""The training index: features of the training images extracted once (``fd-eval index build``), then searched
by every copy check (``fd-eval copies GEN --train-index DIR``) without decoding a training image.

* :mod:`fd_eval.index.store`: the on-disk format (manifest, sharded safetensors units) and :class:`TrainingIndex`.
* :mod:`fd_eval.index.build`: :func:`build_index` (one resumable pass, torchrun-parallel, appendable).
* :mod:`fd_eval.index.scan`: the exact blocked scan (:class:`ExactScan`, :func:`scan_index`).
* :mod:`fd_eval.index.copies_pass`: ``find_copies(train_index=...)``'s passes.
* :mod:`fd_eval.index.approx`: FAISS IVF search (``--approximate``), candidates re-scored exactly.
"""
from .build import build_index
from .scan import ExactScan, scan_index
from .store import INDEX_FORMAT, TrainingIndex, open_index

__all__ = ["build_index", "open_index", "TrainingIndex", "ExactScan", "scan_index", "INDEX_FORMAT"]
