"""Weights files: resolve (local path or cached official download) and load without unpickling code."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CacheError, DownloadError, WeightsError
from ..util.download import download_url, offline_mode
from ..util.io_utils import cache_dir, sniff_format


@dataclass(frozen=True)
class WeightsSource:
    """Where the official weights of an extractor live.

    ``approx_mib``: the file's approximate size in MiB (float32 parameters x 4 bytes; shown by
    ``fd-eval models --urls`` so a user can plan a download elsewhere; not used for verification).
    """

    url: str
    filename: str
    sha256: str | None = None  # full hex digest or a prefix (torch hub names carry one)
    approx_mib: float | None = None


def resolve_weights(weights: str | os.PathLike | None, source: WeightsSource, name: str,
                    offline: bool | None = None) -> Path:
    """A local weights file: ``weights`` if given, else the official file, downloaded once into the cache.

    Args:
        offline: refuse network access (default: :func:`fd_eval.util.download.offline_mode`, i.e. ``--offline`` through
            :func:`~fd_eval.util.download.offline_scope`, ``FD_EVAL_OFFLINE`` or ``HF_HUB_OFFLINE``).

    Raises:
        WeightsError: ``weights`` is not a file.
        DownloadError: offline (or no network) and the official file is not cached; one line naming the file, the
            cache path to put it at, and ``--weights PATH``.
        CacheError: the cache folder cannot hold the download (names the folder and ``$FD_EVAL_CACHE``).
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise WeightsError(f"{path}: is a folder; --weights names the {name} weights file itself (e.g. "
                               f"{path / source.filename})")
        if not path.is_file():
            raise WeightsError(f"{path}: weights file for {name} not found; check the --weights path")
        return path
    use = f"--weights PATH (Python: weights=PATH) for {name}"
    try:
        dest = cache_dir("weights") / source.filename
    except CacheError as e:
        err = CacheError(f"{e}, or download {source.url} yourself and pass {use}")
        err.errno = e.errno
        raise err from e
    offline = offline_mode() if offline is None else offline
    size = f" (~{source.approx_mib:,.0f} MiB)" if source.approx_mib else ""
    if offline and not dest.is_file():
        raise DownloadError(f"offline mode: the {name} weights {source.filename} are not in the cache; put the file "
                            f"from {source.url}{size} at {dest} or pass {use}")
    return download_url(source.url, dest, sha256=source.sha256, offline=offline,
                        hint=f"; or download it yourself{size} to {dest} or pass {use}")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat ``{name: tensor}`` dict: safetensors, or torch.load(weights_only=True).

    Unwraps the usual containers (``{"model": ...}``, ``{"state_dict": ...}``, ``{"teacher": ...}``).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":  # torch.load would only say weights_only=False, which is never the fix
        raise WeightsError(f"{path}: ONNX is not supported; pass the PyTorch weights (.pth/.pt state dict or "
                           ".safetensors) the model was exported from")
    fmt = sniff_format(path)
    if fmt != "safetensors" and is_torchscript_archive(path):  # torch.load would hand it to torch.jit.load
        raise WeightsError(f"{path}: is a TorchScript archive (loading it runs its code); pass the plain state-dict "
                           "weights file instead (e.g. SSCD's .torchvision.pt)")
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every loader failure becomes one clear error
        raise WeightsError(f"{path}: not a weights file fd-eval can read: {_why_unreadable(path, e)}") from e
    for key in ("state_dict", "model", "teacher", "model_ema"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: does not hold a flat dict of tensors; not a weights file")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # else every feature is NaN and the failure surfaces far away, as "statistics" with NaN
        raise WeightsError(f"{path}: {len(bad)} weight tensor(s) hold NaN or Inf (e.g. {bad[0]}); the weights file "
                           "is damaged: download it again (or delete it from the cache) or pass good --weights")
    return sd


def _why_unreadable(path: Path, e: Exception) -> str:
    """Why a weights file did not load, in our words: torch's own messages advise ``weights_only=False`` (which
    would run the file's code), so they are never quoted whole."""
    with open(path, "rb") as f:
        head = f.read(4096)
    fix = "pass the PyTorch state dict (.pth/.pt) or safetensors weights file"
    if not head:
        return f"the file is empty; {fix}"
    # an ONNX model is a protobuf: field 1 (ir_version, a varint: 0x08) first, the producer ("pytorch") near it
    onnx_head = head[:1] == b"\x08" and any(w in head[:256].lower() for w in (b"onnx", b"pytorch"))
    if path.suffix.lower() == ".onnx" or onnx_head:
        return f"ONNX is not supported; {fix}"
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c.isspace() for c in text):
            return f"it is a text file; {fix}"
    except UnicodeDecodeError:
        pass
    if type(e).__name__ == "UnpicklingError":
        return ("it holds Python objects besides tensors, which fd-eval never unpickles (that would run code from "
                "the file); save the state dict alone (torch.save(model.state_dict(), PATH)) or as safetensors")
    first = str(e).split(". ")[0].splitlines()[0] if str(e) else ""
    return f"damaged, truncated or another format ({type(e).__name__}: {first[:200]}); {fix}"


def is_torchscript_archive(path: str | os.PathLike) -> bool:
    """True for a TorchScript zip (it holds ``constants.pkl``; torch.load dispatches those to torch.jit.load)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in z.namelist())


def check_keys(path: str | os.PathLike, expected: Iterable[str], got: Iterable[str]) -> None:
    """Missing or unexpected keys are an error (not a warning), listing a few of each."""
    expected, got = set(expected), set(got)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise WeightsError(f"{path}: keys do not match the model: {'; '.join(parts)}; is it the right checkpoint?")

