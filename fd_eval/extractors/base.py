"""The extractor interface shared by every backbone family, and the registry of names."""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import FDEvalError, InputRangeError
from .pil_resize import pil_resize_checked, pil_resize_host
from .precision import LazyCompiled, Precision, resolve_precision
from .preprocess import HostPrepare, PreprocessSpec, crop_tensor

PIL_RESIZE_ON = ("auto", "host", "device")
RESIZE_LIBRARIES = ("pil", "torch", "tf1")


# --- the one preprocessing interpreter ---------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (3, 1, 1) ``mean`` and ``std`` on ``device``, made once per (values, device): a host-to-GPU copy
    blocks the host until the GPU has finished its queued work."""
    with torch.inference_mode(False):  # cached across calls, so ordinary tensors even when first made in one
        m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1).to(device)
        return m, torch.tensor(std, dtype=torch.float32).view(-1, 1, 1).to(device)


def apply_spec(x: torch.Tensor, spec: PreprocessSpec, name: str = "extractor") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 (N, 3, *spec.target_size(H, W)) model input: every step read from ``spec``
    (``spec.size``, or with ``resize_mode="short-edge"`` the short edge to ``size[0]``, aspect ratio kept).

    In the reference pipelines' op order, so each registered spec reproduces its reference bit for bit:

    * ``crop`` (:data:`fd_eval.extractors.preprocess.CROPS`; a no-op when the host already cropped);
    * ``pil``: Pillow's integer resize (:func:`fd_eval.extractors.pil_resize.pil_resize_checked`; skipped when the host
      resized), then ``float32 / scale`` (ToTensor);
    * ``torch``: ``F.interpolate(resize_filter, align_corners, antialias)`` on float32, with ``/ scale`` before
      it (pytorch-fid: on an NCHW-contiguous batch, as its collate makes) or after it (EDM2) as
      ``spec.scales_before_resize`` says;
    * ``tf1``: TensorFlow 1 ``resize_bilinear`` on 0..255 floats, then ``/ scale``;
    * then ``(x - mean) / std``.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
        raise InputRangeError(f"{name}: expects uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if len(spec.mean) != 3 or len(spec.std) != 3 or not spec.scale:
        raise FDEvalError(f"{name}: preprocess needs 3 means, 3 stds and a non-zero scale, got {spec}")
    x = crop_tensor(x, spec.crop)
    size = spec.target_size(*x.shape[-2:])
    lib = spec.resize_library
    if spec.resize_mode != "exact" and lib != "pil":
        raise FDEvalError(f"{name}: resize mode {spec.resize_mode!r} is implemented for Pillow resizes only")
    if lib == "pil":
        if not spec.antialias:
            raise FDEvalError(f"{name}: Pillow resizes with antialiasing only; set antialias=True or resize 'torch'")
        if tuple(x.shape[-2:]) != size:  # not resized on the host: Pillow's integers, here
            x = pil_resize_checked(x, size, spec.resize_filter)
        x = x.to(torch.float32).div(spec.scale)
    elif lib == "torch":
        x = x.to(torch.float32)
        first = spec.scales_before_resize
        if first:
            x = x.div(spec.scale).contiguous()
        x = F.interpolate(x, size=size, mode=spec.resize_filter, align_corners=spec.align_corners,
                          antialias=spec.antialias)
        if not first:
            x = x.div(spec.scale)
    elif lib == "tf1":
        from .inception import resize_bilinear_tf1

        if spec.resize_filter != "bilinear" or spec.antialias or spec.align_corners:
            raise FDEvalError(f"{name}: the TF1 resize is bilinear without antialias or align_corners, not "
                              f"{spec.resize_filter!r} (antialias={spec.antialias}, "
                              f"align_corners={spec.align_corners})")
        x = resize_bilinear_tf1(x.to(torch.float32), size).div(spec.scale)
    else:
        raise FDEvalError(f"{name}: resize library {lib!r} is not one of {RESIZE_LIBRARIES}")
    mean, std = _mean_std(tuple(spec.mean), tuple(spec.std), x.device)
    return x.sub(mean).div(std)


class Extractor:
    """A feature extractor: uint8 RGB images in, float32 features (N, D) out.

    Work is split so the reference-exact preprocessing can run in DataLoader workers:

    * :meth:`prepare` (host, per image, in workers): decoded PIL RGB image -> uint8 (3, H', W') tensor. For
      protocols that resize with Pillow this is the resize to the model size; for protocols that resize with
      torch (on the device) it returns the image unchanged.
    * :meth:`forward_prepared` (device, per batch): uint8 (N, 3, H', W') -> float32 (N, D): any device-side
      resize, scaling, normalisation (:meth:`model_input`, always float32) and the network (:meth:`forward_input`,
      in the extractor's precision mode), under ``torch.inference_mode``.

    ``extractor(images)`` runs both on a uint8 (N, 3, H, W) tensor of any size.

    Precision (:mod:`fd_eval.extractors.precision`): ``exact`` (default; float32 with TF32 off, the caller's flags
    restored
    after each forward) or ``fast`` (the family's ``fast_compute``: ``"bfloat16"`` autocast or ``"tf32"``;
    optional ``torch.compile``); :meth:`set_precision`. The network is called through ``self.forward_model``
    (``self.model``, or its :class:`LazyCompiled` wrapper).

    Attributes:
        name: registry name, e.g. ``"dinov2-vitl14"``.
        feature_dim: D.
        preprocess_spec: :class:`PreprocessSpec`, saved into statistics metadata.
        model: the ``torch.nn.Module`` (eval mode).
        weights_sha256: sha256 of the weights file loaded (None for random init in tests).
        device: where ``model`` lives.
    """

    fast_compute = "bfloat16"  # what --precision fast means for this family (see fd_eval.extractors.precision)
    compile_regions: str | None = None  # a Sequential of identical blocks to compile one by one (LazyCompiled)

    def __init__(self, name: str, feature_dim: int, preprocess_spec: PreprocessSpec, model: torch.nn.Module,
                 weights_sha256: str | None, device: str | torch.device | None = None):
        self.name = name
        self.feature_dim = int(feature_dim)
        self.preprocess_spec = preprocess_spec
        self.model = model.eval().requires_grad_(False)
        self.weights_sha256 = weights_sha256
        self.device = torch.device("cpu")
        self.precision = Precision()
        self.forward_model: Callable[[torch.Tensor], torch.Tensor] = self.model
        self.channels_last = False  # fast mode sets it for convolutional networks (see _apply_precision)
        self.set_pil_resize_on(os.environ.get("FD_EVAL_PIL_RESIZE_ON") or "auto")
        self.to(device if device is not None else "cpu")

    # --- placement -----------------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "Extractor":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # --- precision -----------------------------------------------------------------------------------------
    def set_precision(self, precision: "str | Precision | None" = None, compile: bool | None = None) -> "Extractor":
        """Switch between ``"exact"`` (default) and ``"fast"``; returns self.

        Updates ``preprocess_spec.model_dtype`` (``"float32"``, or ``fast_compute`` in fast mode), which
        statistics record and comparisons check. ``compile``: see :class:`fd_eval.extractors.precision.Precision`.
        """
        self.precision = resolve_precision(precision, compile)
        dtype = self.precision.model_dtype(self.fast_compute)
        self.preprocess_spec = replace(self.preprocess_spec, model_dtype=dtype)
        self._apply_precision()
        self.plan_run(None)
        return self

    def _apply_precision(self) -> None:
        """Family hook: model layout for the mode (e.g. channels_last for convolutions in fast mode)."""

    def plan_run(self, n_images: int | None) -> None:
        """Called before a pass over ``n_images`` images (None: unknown, e.g. a training-loop metric); resolves
        ``compile=None`` (auto: on a GPU for passes of at least ``COMPILE_AUTO_MIN_IMAGES``)."""
        from .precision import COMPILE_AUTO_MIN_IMAGES

        p = self.precision
        # --compile compiles any mode; auto compiles only the reduced-precision modes (exact's compile cost is
        # unmeasured on a GPU)
        want = p.compile is True or (p.fast and p.compile is None and self.device.type == "cuda"
                                    and n_images is not None and n_images >= COMPILE_AUTO_MIN_IMAGES)
        if want and not isinstance(self.forward_model, LazyCompiled):
            self.forward_model = LazyCompiled(self.model, self.name, regions=self.compile_regions)
        elif not want:
            self.forward_model = self.model

    def compile_status(self) -> str:
        """``"off"``, ``"on"`` or ``"failed, eager: reason"`` (for provenance)."""
        fm = self.forward_model
        if not isinstance(fm, LazyCompiled):
            return "off"
        return f"failed, eager: {fm.failed}" if fm.failed else "on"

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 model input (N, 3, H, W) on ``self.device`` -> float32 features (N, D), in the precision mode."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self.precision.numerics(self.device, self.fast_compute):
            out = self.forward_model(x)
        return out.float()

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H', W') on ``self.device`` -> float32 network input: :func:`apply_spec` of
        ``self.preprocess_spec`` (families add their checks of what their network can run)."""
        return apply_spec(x, self.preprocess_spec, self.name)

    def set_pil_resize_on(self, where: str) -> "Extractor":
        """Where a Pillow-resizing protocol resizes: ``"host"`` (Pillow, in the DataLoader workers), ``"device"``
        (:mod:`fd_eval.extractors.pil_resize`: the same integers as Pillow, computed on the model's device) or
        ``"auto"``
        (default; ``$FD_EVAL_PIL_RESIZE_ON`` overrides it): the device in fast mode on a GPU, where host resizing
        would cost ~40% of each decode worker's time, else the host. The pixels, and so the features, are
        the same either way. Returns self."""
        if where not in PIL_RESIZE_ON:
            raise FDEvalError(f"{self.name}: unknown Pillow-resize placement {where!r} (FD_EVAL_PIL_RESIZE_ON?); "
                              f"choose one of {', '.join(PIL_RESIZE_ON)}")
        self.pil_resize_on = where
        return self

    @property
    def pil_resizes_on_device(self) -> bool:
        """True when this Pillow-resizing protocol's resize runs on ``device`` (see :meth:`set_pil_resize_on`)."""
        if self.preprocess_spec.resize_library != "pil":
            return False
        on = self.pil_resize_on
        return on == "device" or (on == "auto" and self.device.type == "cuda" and self.precision.fast)

    @property
    def resizes_on_host(self) -> bool:
        """True when :meth:`prepare` resizes (Pillow); batches of prepared images then share one size."""
        return self.preprocess_spec.resize_library == "pil" and not self.pil_resizes_on_device

    # --- the two halves ----------------------------------------------------------------------------------
    def host_transform(self) -> HostPrepare:
        """:meth:`prepare` as a small picklable callable (DataLoader workers must not carry the model)."""
        spec = self.preprocess_spec
        return HostPrepare(tuple(spec.size) if self.resizes_on_host else None, spec.resize_filter, spec.crop,
                           spec.resize_mode == "short-edge")

    def prepare(self, img: Image.Image) -> torch.Tensor:
        """PIL RGB image -> uint8 (3, H', W'); Pillow resize for host-resizing protocols, else unchanged."""
        return self.host_transform()(img)

    def forward_prepared(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H', W') on ``self.device`` -> float32 (N, D): :meth:`model_input`, then the network."""
        with torch.inference_mode():
            return self.forward_input(self.model_input(x))

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
        images = crop_tensor(images, self.preprocess_spec.crop)
        target = self.preprocess_spec.target_size(*images.shape[-2:])
        if self.resizes_on_host and tuple(images.shape[-2:]) != target:
            images = pil_resize_host(images, target, self.preprocess_spec.resize_filter)
        return self.forward_prepared(images.to(self.device, non_blocking=True))

    # --- provenance ---------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """What a statistics file records about how its features were made."""
        return {
            "extractor": self.name,
            "feature_dim": self.feature_dim,
            "weights_sha256": self.weights_sha256,
            "preprocess": self.preprocess_spec.to_dict(),
            "precision": self.precision.to_dict(self.fast_compute),
            **({"pil_resize_on": "device" if self.pil_resizes_on_device else "host"}
               if self.preprocess_spec.resize_library == "pil" else {}),
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, feature_dim={self.feature_dim}, device={self.device}, "
                f"precision={self.precision.mode!r})")


# --- registry ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractorEntry:
    name: str
    factory: Callable[..., Extractor]  # factory(weights=None, device=None, **options) -> Extractor
    feature_dim: int
    description: str
    weights: Any = None  # the official WeightsSource (None: no download, e.g. a user-registered extractor)
    options: tuple[str, ...] = ()  # the run options the factory takes (e.g. ("resize",) for DINOv2)
    metrics: tuple[str, ...] = ("fd",)  # what compute reports with its features ("cmmd": CLIP's MMD, fd_eval.cmmd)


_REGISTRY: dict[str, ExtractorEntry] = {}
# The modules that register the built-in families (imported on first use of the registry, to keep `import fd_eval`
# light); a new family is one module here plus its @register_extractor calls.
FAMILY_MODULES: list[str] = [f"{__package__}.{m}" for m in ("dinov2", "inception", "sscd", "clip")]
ALIASES: dict[str, str] = {"fid": "inception-v3-tf", "dinov2": "dinov2-vitl14"}
DEFAULT_EXTRACTOR = "dinov2-vitl14"


def register_extractor(name: str, feature_dim: int, description: str, weights: Any = None,
                       options: tuple[str, ...] = (), metrics: tuple[str, ...] = ("fd",)) -> Callable:
    """Decorator registering ``factory(weights=None, device=None, **options) -> Extractor`` under ``name``;
    ``weights``: where its official weights file lives (a :class:`fd_eval.extractors.weights.WeightsSource`);
    ``options``: the run options (:class:`fd_eval.RunOptions` fields) its factory takes; ``metrics``: what
    ``compute`` reports with its features (``"fd"``; ``"cmmd"`` also keeps the feature rows for CMMD)."""

    def deco(factory: Callable[..., Extractor]) -> Callable[..., Extractor]:
        _REGISTRY[name] = ExtractorEntry(name, factory, feature_dim, description, weights, tuple(options),
                                         tuple(metrics))
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
    """The registry entry of ``name`` (aliases resolved)."""
    return _REGISTRY[resolve_name(name)]


def load_extractor(name: str = DEFAULT_EXTRACTOR, weights: str | None = None,
                   device: str | torch.device | None = None, precision: "str | Precision | None" = None,
                   compile: bool | None = None, **options: Any) -> Extractor:
    """Build an extractor by name.

    Args:
        name: a name from :func:`list_extractors` or an alias (``fid`` = ``inception-v3-tf``).
        weights: local checkpoint path (format detected by its keys); None downloads the official weights on
            first use into ``$FD_EVAL_CACHE``.
        device: torch device for the model (default CPU).
        precision: ``"exact"`` (default: float32, TF32 off; the protocol's numbers) or ``"fast"`` (DINOv2:
            bfloat16 autocast; Inception: TF32); see :mod:`fd_eval.extractors.precision`. ``compile``: torch.compile in
            fast mode (None: auto).
        options: family-specific options, e.g. ``resize="pil"|"torch"`` for DINOv2.
    """
    p = resolve_precision(precision, compile)  # a bad mode fails before any download
    ex = extractor_entry(name).factory(weights=weights, device=device, **options)
    return ex.set_precision(p)


def _ensure_loaded() -> None:
    # Importing the family modules registers their names (idempotent: modules are imported once).
    for module in FAMILY_MODULES:
        importlib.import_module(module)
