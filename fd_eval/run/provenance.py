"""Versions and environment facts recorded in statistics files and result JSON."""
from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import numpy as np
import torch

from .._version import __version__


def versions() -> dict[str, str]:
    """Versions of fd-eval and the numerical stack."""
    import PIL
    import scipy
    import timm

    return {
        "fd_eval": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pillow": PIL.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def device_name(device: str | torch.device | None) -> str:
    """Human name of a device: the GPU model for CUDA, the CPU architecture otherwise."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    return {"versions": versions(), "device": device_name(device), "created": now_utc()}


def result_provenance(extractors: Any, device: str | torch.device | None, *,
                      preprocess: Any = None, **parts: Any) -> dict[str, Any]:
    """The ``provenance`` document of every result (``compute``, ``FDMetric.compute``, ``ceiling``, ``copies``,
    the training index): ``versions`` (fd-eval's included), ``device``, ``created``, ``extractors`` ({name:
    {weights_sha256, preprocess}}; ``preprocess[name]`` overrides a model's: what the statistics record),
    ``precision``, then the result's ``parts`` in order -- its inputs as ``{"spec": ..., ...}`` under the side's
    name (``generated``, ``reference``, ``real``, ``train``, ``test``) and what else the result records."""
    from ..extractors.precision import precision_provenance

    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "versions": versions(),
        "device": device_name(dev),
        "created": now_utc(),
        "extractors": {ex.name: {"weights_sha256": ex.weights_sha256,
                                 "preprocess": dict((preprocess or {}).get(ex.name) or ex.preprocess_spec.to_dict())}
                       for ex in extractors},
        "precision": precision_provenance(extractors, dev),
        **parts,
    }
