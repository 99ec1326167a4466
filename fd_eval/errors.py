"""Exception classes. Every message is one line that names the file (or tensor) and the fix.

The CLI prints ``error: <message>`` for any :class:`FDEvalError` and exits with status 1; Python
callers catch the specific class.
"""
from __future__ import annotations


class FDEvalError(Exception):
    """Base class of every error fd-eval raises on purpose."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0], type(self).__name__),)
        super().__init__(*args)


def _unwrap_worker_message(msg: str, cls: str) -> str:
    """The original one-line message of an error raised in a DataLoader worker.

    torch re-raises a worker's exception in the main process as ``type(e)("Caught X in DataLoader worker process
    0.\nOriginal Traceback ... X: <message>")``, which would print a traceback inside our one-line error; the
    message is the text after ``X: `` on the traceback's last line.
    """
    if not (msg.startswith("Caught ") and "DataLoader worker" in msg and "\nOriginal Traceback" in msg):
        return msg
    for line in reversed(msg.rstrip().splitlines()):
        for marker in (f"fd_eval.errors.{cls}: ", f"{cls}: "):
            if line.startswith(marker):
                return line[len(marker):]
    return msg


# --- inputs -------------------------------------------------------------------------------------
class InputError(FDEvalError, ValueError):
    """Images, arrays or tensors that cannot be evaluated as given."""


class BadImageError(InputError):
    """An image file that does not decode (corrupt, truncated, not an image, too large)."""


class BadArrayError(InputError):
    """An .npy/.npz image array of the wrong dtype, shape or value range."""


class InputRangeError(InputError):
    """A tensor whose values, dtype or channel count contradict its declared value range."""


class EmptySourceError(InputError):
    """A source that holds no images (empty directory, empty tar, empty array)."""


class TooFewImagesError(EmptySourceError):
    """Fewer usable images than the statistics need (a covariance needs 2), e.g. once ``--skip-bad`` skipped the
    rest. The message names the source and its accounting; ``inputs`` holds the accounting as a dict (found, used,
    skipped with every skipped item's name and reason, ignored), which the CLI prints before the error."""

    def __init__(self, message: str, inputs: dict | None = None) -> None:
        super().__init__(message)
        self.inputs = inputs


class SourceError(InputError):
    """A source spec that cannot be opened: missing path or shard, unknown format, not a (plain) tar/zip."""


class RemoteReadError(SourceError):
    """A remote file (``hf://``, ``http(s)://``, fsspec) whose connection kept failing after the retries: ``url``,
    ``offset`` (the byte reached) and ``reason`` are attributes; the message names the file and the byte."""

    def __init__(self, url: str, offset: int, reason: str):
        super().__init__(f"{url}: {reason} at byte {offset:,}; check the network or the URL and run again (a "
                         "resumable `fd-eval stats` keeps every finished shard), or pass --skip-bad to list the shard "
                         "as skipped")
        self.url, self.offset, self.reason = url, offset, reason

    def __reduce__(self) -> tuple:  # picklable (DataLoader workers) although __init__ takes three arguments
        return type(self), (self.url, self.offset, self.reason)


# --- statistics ----------------------------------------------------------------------------------
class StatsError(FDEvalError, ValueError):
    """Base class of statistics-file problems."""


class StatsFormatError(StatsError):
    """Unknown or unsupported format, missing keys, or a file that would need unpickling."""


class InvalidStatsError(StatsError):
    """Statistics with NaN/Inf, wrong shapes, non-symmetric or non-PSD covariance."""


class StatsMismatchError(StatsError):
    """Two statistics that were made differently (extractor, weights, preprocessing, dimension)."""


class MissingFeaturesError(StatsError):
    """Statistics without the (N, D) feature rows that PRDC, MMD, the bootstrap or FD-infinity need."""


class CheckpointError(FDEvalError):
    """A resume checkpoint (``fd-eval stats`` unit files) made with other settings, from changed data, or damaged."""


# --- files fd-eval writes ---------------------------------------------------------------------------
class OutputError(FDEvalError, OSError):
    """An output that cannot be written (disk full, read-only, a file where a folder should be); nothing partial is
    left. Also an :class:`OSError`, so ``except OSError`` around optional writes keeps working; ``errno`` is the
    original one."""


class CacheError(OutputError):
    """``$FD_EVAL_CACHE`` (default ``~/.cache/fd_eval``) is unusable where a file must be written there (weights)."""


# --- weights, downloads, references ---------------------------------------------------------------
class WeightsError(FDEvalError):
    """A checkpoint that cannot be loaded into the extractor (format, keys, shapes)."""


class DownloadError(FDEvalError):
    """A download that failed (network, offline mode, HTTP error)."""


class ChecksumError(DownloadError):
    """A file whose sha256 differs from the expected one (the file has been deleted)."""


class GatedRepoError(DownloadError):
    """Access to a gated Hugging Face repository was refused (401/403)."""


class UnknownReferenceError(FDEvalError, LookupError):
    """An unknown reference name or a bad registry entry."""

    def __str__(self) -> str:  # LookupError would print the repr (quoted) of the message
        return str(self.args[0]) if self.args else ""
