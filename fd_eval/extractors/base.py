"""The extractor interface shared by every backbone family, and the registry of names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import FDEvalError, InputRangeError
from ..preprocess import HostPrepare, PreprocessSpec, tensor_to_pil


class Extractor:
    """A feature extractor: uint8 RGB images in, float32 features (N, D) out.

    Work is split so the reference-exact preprocessing can run in DataLoader workers:

    * :meth:`prepare` (host, per image, in workers): decoded PIL RGB image -> uint8 (3, H', W') tensor. For
      protocols that resize with Pillow this is the resize to the model size; for protocols that resize with
      torch (on the device) it returns the image unchanged.
    * :meth:`forward_prepared` (device, per batch): uint8 (N, 3, H', W') -> float32 (N, D): any device-side
      resize, scaling, normalisation and the network, under ``torch.inference_mode``.

    ``extractor(images)`` runs both on a uint8 (N, 3, H, W) tensor of any size.

    Attributes:
        name: registry name, e.g. ``"dinov2-vitl14"``.
        feature_dim: D.
        preprocess_spec: :class:`PreprocessSpec`, saved into statistics metadata.
        model: the ``torch.nn.Module`` (eval mode).
        weights_sha256: sha256 of the weights file loaded (None for random init in tests).
        device: where ``model`` lives.
    """

    def __init__(self, name: str, feature_dim: int, preprocess_spec: PreprocessSpec, model: torch.nn.Module,
                 weights_sha256: str | None, device: str | torch.device | None = None):
        self.name = name
        self.feature_dim = int(feature_dim)
        self.preprocess_spec = preprocess_spec
        self.model = model.eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256
        self.device = torch.device("cpu")
        self.to(device if device is not None else "cpu")

    # --- placement -----------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "Extractor":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @property
    def resizes_on_host(self) -> bool:
        """True when :meth:`prepare` resizes (Pillow); batches of prepared images then share one size."""
        return self.preprocess_spec.resize_library == "pil"

    # --- the two halves ----------------------------------------------------------------------------------
    def host_transform(self) -> HostPrepare:
        """:meth:`prepare` as a small picklable callable (DataLoader workers must not carry the model)."""
        spec = self.preprocess_spec
        return HostPrepare(tuple(spec.size) if self.resizes_on_host else None, spec.resize_filter)

    def prepare(self, img: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 (3, H', W'); Pillow resize for host-resizing protocols, else unchanged."""
        return self.host_transform()(img)

    def forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H', W') on ``self.device`` -> float32 (N, D). Implemented per family."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) images of any size, on any device -> float32 features (N, D) on ``device``.

        Host-resizing protocols move the images to the CPU for the exact Pillow resize.
        """
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise InputRangeError(
                f"{self.name}: expects a uint8 tensor (N, 3, H, W) with values 0..255, got "
                f"{getattr(images, 'dtype', type(images).__name__)}; convert floats with fd_eval.to_uint8"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputRangeError(f"{self.name}: expects shape (N, 3, H, W) RGB, got {tuple(images.shape)}")
        if self.resizes_on_host and tuple(images.shape[-2:]) != tuple(self.preprocess_spec.size):
            images = torch.stack([self.prepare(tensor_to_pil(im)) for im in images.cpu()])
        return self.forward_prepared(images.to(self.device, non_blocking=True))

    # --- provenance ---------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """What a statistics file records about how its features were made."""
        return {
            "extractor": self.name,
            "feature_dim": self.feature_dim,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess_spec.to_dict(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, device={self.device})"


# --- registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractorEntry:
    name: str
    factory: Callable[..., Extractor]  # factory(weights=None, device=None, **options) -> Extractor
    feature_dim: int
    description: str


_REGISTRY: dict[str, ExtractorEntry] = {}
ALIASES: dict[str, str] = {"fid": "inception-v3-tf", "dinov2": "dinov2-vitl14"}
DEFAULT_EXTRACTOR = "dinov2-vitl14"


def register_extractor(name: str, feature_dim: int, description: str) -> Callable:
    """Decorator registering ``factory(weights=None, device=None, **options) -> Extractor`` under ``name``."""

    def deco(factory: Callable[..., Extractor]) -> Callable[..., Extractor]:
        _REGISTRY[name] = ExtractorEntry(name, factory, feature_dim, description)
        return factory

    return deco


def resolve_name(name: str) -> str:
    """Canonical registry name (aliases such as ``fid`` resolved); raises on unknown names."""
    _ensure_loaded()
    canon = ALIASES.get(name, name)
    if canon not in _REGISTRY:
        raise FDEvalError(f"unknown extractor {name!r}; choose one of {', '.join(list_extractors())} (or 'fid')")
    return canon


def list_extractors() -> list[str]:
    """Registered extractor names, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def extractor_entry(name: str) -> ExtractorEntry:
    return _REGISTRY[resolve_name(name)]


def load_extractor(name: str = DEFAULT_EXTRACTOR, weights: str | None = None,
                   device: str | torch.device | None = None, **options: Any) -> Extractor:
    """Build an extractor by name.

    Args:
        name: a name from :func:`list_extractors` or an alias (``fid`` = ``inception-v3-tf``).
        weights: local checkpoint path (format detected by its keys); None downloads the official weights on
            first use into ``$FD_EVAL_CACHE``.
        device: torch device for the model (default CPU).
        options: family-specific options, e.g. ``resize="pil"|"torch"`` for DINOv2.
    """
    return extractor_entry(name).factory(weights=weights, device=device, **options)


def _ensure_loaded() -> None:
    # Importing the family modules registers their names; done lazily to keep `import fd_eval` light.
    from . import dinov2, inception  # noqa: F401
