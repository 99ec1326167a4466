"""The training-loop API: :class:`FDMetric` (torchmetrics-style) and :func:`evaluate_generator`.

    metric = fd_eval.FDMetric(ref="gpic-test", value_range=(-1, 1))   # once: loads DINOv2 ViT-L/14 + reference
    for images in my_samples():                                         # any chunk size, any number of calls
        metric.update(images)                                           # uint8 or float, NCHW or NHWC, on the GPU
    result = metric.compute()        # {"results": {"dinov2-vitl14": {"fd": ...}}, "provenance": ..., ...}
    metric.reset()

    result = fd_eval.evaluate_generator(lambda i, b: sample(b, seed=i), n=50_000, batch_size=250,
                                        value_range=(-1, 1), metric=metric)

``compute()`` returns the document ``fd-eval compute --json`` writes (:class:`fd_eval.api.EvalResult`), and on the
same images gives the same number: the protocol evaluates uint8 images, so float input is first quantised the
way a saved PNG would be (:func:`to_uint8`), and with ``resize="pil"`` (the default, reference-exact) each image
is resized by Pillow on the host exactly as the CLI's decoder path does.

Under torch.distributed (torchrun) every rank updates with its own images and ``compute()`` merges the exact
float64 moment triples of all ranks (:mod:`fd_eval.run.distributed`); every rank gets the same result, which does not
depend on the number of ranks beyond rounding.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..api import (
    EvalResult,
    ModelsArg,
    WeightsArg,
    evaluate_stats,
    resolve_extractors,
    resolve_reference,
    run_provenance,
)
from ..core.consumers import metric_results
from ..core.moments import MomentAccumulator
from ..errors import FDEvalError, InputError, InputRangeError, StatsMismatchError
from ..extractors import DEFAULT_EXTRACTOR, Extractor
from ..outputs.stats import Stats, check_compatible
from ..run.options import RunOptions, make_options
from ..run.pipeline import available_cpus, feature_consumers, feed, place_extractors, shard_indices
from ..run.provenance import environment
from .cmmd import wants_cmmd

ValueRange = tuple[float, float]
VALUE_RANGES: tuple[ValueRange, ...] = ((0.0, 1.0), (-1.0, 1.0))
DEFAULT_TOLERANCE = 0.05  # fraction of the range width; 0.1 for (-1, 1), about 13 grey levels
STATE_FORMAT = "fd-eval-metric/1"


# --- float -> uint8 ------------------------------------------------------------------------------------------
def _check_range(value_range: Any) -> ValueRange | None:
    if value_range is None:
        return None
    try:
        vr = (float(value_range[0]), float(value_range[1]))
        ok = len(value_range) == 2 and vr in VALUE_RANGES
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise InputRangeError(f"value_range must be (0, 1) or (-1, 1), got {value_range!r}; uint8 images (0..255) "
                              "need no value_range")
    return vr


def _quantise(x: torch.Tensor, value_range: ValueRange) -> torch.Tensor:
    """The PNG-save quantisation (see :func:`to_uint8`), no checks."""
    lo, hi = value_range
    scale = 255.0 / (hi - lo)
    # (0, 1): x * 255 + 0.5 (torchvision.utils.save_image); (-1, 1): x * 127.5 + 128 (EDM2, StyleGAN). Two
    # separately rounded float ops, as those codes do, then clamp and truncate (= round half up).
    return x.mul(scale).add(0.5 - lo * scale).clamp_(0, 255).to(torch.uint8)


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_uint8(images: torch.Tensor, value_range: Sequence[float], *, check: bool = True,
             tolerance: float = DEFAULT_TOLERANCE) -> torch.Tensor:
    """Float images -> the uint8 values a saved PNG would hold (same shape and device).

    ``value_range=(0, 1)``: ``(x * 255 + 0.5).clamp(0, 255).to(uint8)``, torchvision's ``save_image``.
    ``value_range=(-1, 1)``: ``(x * 127.5 + 128).clamp(0, 255).to(uint8)``, EDM2's / StyleGAN's sample saving.
    Both are round-half-up of ``(x - lo) / (hi - lo) * 255`` with values beyond the range clamped; computed in
    float32 (float64 input: float64), half and bfloat16 input is widened first (exactly).

    ``check``: raise :class:`InputRangeError` for NaN/Inf or values more than ``tolerance * (hi - lo)`` outside
    the range (reads the min/max back: a host sync on a GPU).
    """
    vr = _check_range(value_range)
    if vr is None:
        raise InputRangeError("to_uint8 needs value_range=(0, 1) or (-1, 1)")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputRangeError(f"to_uint8 expects a float tensor, got {getattr(images, 'dtype', type(images).__name__)}")
    x = images.detach().to(_float_dtype(images))
    if check and x.numel():
        mn, mx = (float(v) for v in torch.aminmax(x))
        msg = _range_problem(mn, mx, vr, tolerance)
        if msg:
            raise InputRangeError(f"to_uint8: {msg}")
    return _quantise(x, vr)


def _range_problem(mn: float, mx: float, vr: ValueRange, tolerance: float) -> str | None:
    """One-line description of what is wrong with values in [mn, mx] declared as ``vr``; None if nothing."""
    lo, hi = vr
    tol = tolerance * (hi - lo)
    if not (math.isfinite(mn) and math.isfinite(mx)):
        return "float images contain NaN or Inf; check the generator's output (e.g. torch.nan_to_num)"
    if lo - tol <= mn and mx <= hi + tol:
        return None
    seen = f"values in [{mn:.4g}, {mx:.4g}] but value_range=({lo:g}, {hi:g})"
    if mx > 2 * hi + tol:
        fix = "pixel values 0..255 in a float tensor: pass images.round().to(torch.uint8) (no value_range)"
    elif vr == (0.0, 1.0) and mn < lo - tol and mn >= -1 - tol and mx <= hi + tol:
        fix = "images in [-1, 1] need value_range=(-1, 1)"
    else:
        fix = f"clamp them to the range first (values within {tol:g} of it are clamped, as a PNG save would)"
    return f"{seen} (tolerance {tol:g}): {fix}"


def _layout(images: Any, who: str) -> tuple[torch.Tensor, bool]:
    """(tensor, channels_last) after the shape/dtype checks that need no device values."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise InputRangeError(f"{who} expects a torch.Tensor of images (N, 3, H, W) or (N, H, W, 3), got "
                              f"{type(images).__name__}; stack the images into one tensor")
    if images.ndim != 4:
        fix = "; add a batch dimension with images[None]" if images.ndim == 3 else ""
        raise InputRangeError(f"{who} expects a 4-D batch (N, 3, H, W) or (N, H, W, 3), got shape "
                              f"{tuple(images.shape)}{fix}")
    if images.shape[1] == 3:  # NCHW wins the tie (N, 3, H, 3): no one evaluates 3-pixel-wide images
        channels_last = False
    elif images.shape[-1] == 3:
        channels_last = True
    else:
        raise InputRangeError(f"{who} expects RGB images with 3 channels, (N, 3, H, W) or (N, H, W, 3), got shape "
                              f"{tuple(images.shape)}; repeat grayscale with images.expand(-1, 3, -1, -1), drop "
                              "alpha with images[:, :3]")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise InputRangeError(f"{who} expects uint8 images (0..255) or float images with a value_range, got "
                              f"{images.dtype}; convert 0..255 integers with images.to(torch.uint8)")
    return images, channels_last


# --- the metric ----------------------------------------------------------------------------------------------
class FDMetric:
    """Fréchet distance of images fed batch by batch against a reference, torchmetrics-style.

    Args:
        models: extractor names (``fd-eval models``; ``fid`` = inception-v3-tf). Default FD-DINOv2 ViT-L/14.
        ref: reference: a registry name (``"gpic-test"``), a statistics file, a :class:`Stats` (one model), a
            ``{model: Stats}`` mapping, or an image source (its statistics are computed once, sharded over
            the ranks, and cached). Resolved and checked against the extractors at construction, so a wrong
            reference fails before any image is evaluated.
        weights: local weights (one path, or ``{model: path}``); default: the official files (downloaded once).
        options, **kw: how it runs, a :class:`fd_eval.RunOptions` and/or its fields as keywords (``device``,
            ``resize``, ``precision``, ``compile``, ``offline``; ``batch_size``, ``num_workers``, ``decode`` for an
            image-source reference). The ones with a meaning of their own here:
        device: where features and accumulators live; default ``cuda`` (``cuda:LOCAL_RANK`` under torchrun)
            when available, else CPU.
        value_range: ``(0, 1)`` or ``(-1, 1)`` for float images (converted like a PNG save, :func:`to_uint8`);
            uint8 images ignore it. Float input without it is an error.
        resize: DINOv2's resize. ``"pil"`` (default): the reference protocol -- uint8 images are copied to the
            host and resized with Pillow (bicubic, antialiased), bit-identical to ``fd-eval compute`` on the
            saved PNGs; costs a host sync and CPU time per batch. ``"torch"``: EDM2's float ``F.interpolate``
            (bicubic, antialias) on the device, no host round trip; a different protocol (its statistics are
            refused against a PIL-made reference unless ``allow_mismatch``). Inception extractors always resize
            on the device (their reference-exact torch/TF1 resize).
        validate: when float inputs are checked against ``value_range`` (NaN/Inf, values beyond ``tolerance``).
            ``"eager"``: in ``update`` (raises at once, the batch is not accumulated; reads two numbers back: a
            host sync per call on a GPU). ``"deferred"``: min/max/NaN flags are folded into device tensors and
            read once in ``compute()``, which raises naming the first bad ``update`` call (the state is then
            spoiled: ``reset()``). ``None`` (default): eager when it is free -- the input is on the CPU, or a
            host resize (``resize="pil"``) syncs anyway -- else deferred. Shapes, dtypes and a missing
            ``value_range`` are always checked eagerly (no device values needed).
        tolerance: float values up to ``tolerance * (hi - lo)`` beyond the range are accepted and clamped.
        keep_features: keep the (N, D) feature rows (merged over ranks in ``compute``; see :meth:`stats`).
        allow_mismatch: compare against a reference made with other extractor settings (recorded as warnings).
        distributed: None (default): merge over ranks when a torch.distributed process group is initialised
            (or torchrun's environment names one, which is then initialised); False: this process alone (e.g.
            evaluating on rank 0 only). Otherwise every rank of the group must construct the metric and call
            compute() (collectives), and a reference given as an image source is computed sharded over them.
        extractors: already loaded :class:`Extractor` objects to use instead of ``models``/``weights``/``resize``
            (share one model between metrics).
        precision: ``"exact"`` (default: float32 with TF32 off during the metric's forward passes only -- the
            training loop's own TF32 flags are restored after each call) or ``"fast"`` (DINOv2 bfloat16,
            Inception TF32: for monitoring; its statistics are refused against an exact reference such as GPIC's unless
            ``allow_mismatch``, or use an image-source reference, computed in the same mode). With
            ``extractors`` given, None keeps their mode. ``compile``: torch.compile the network in fast mode
            (None: off here, since the metric does not know how many images it will see; True pays off over
            many evaluations of a training run).

    Features and float64 moments stay on ``device``. On a GPU ``update`` never reads a device value back
    (deferred validation), so the host keeps queueing work: the reference ``resize="pil"`` runs there too, as
    Pillow's integer arithmetic (:mod:`fd_eval.extractors.pil_resize`; the same pixels as Pillow, so the same numbers
    as the
    CLI), unless an extractor was set to ``set_pil_resize_on("host")`` (or ``FD_EVAL_PIL_RESIZE_ON=host``): then
    each batch makes one device-to-host copy of its uint8 pixels and Pillow resizes them in a thread pool.
    """

    def __init__(
        self,
        models: ModelsArg = (DEFAULT_EXTRACTOR,),
        ref: Any = "gpic-test",
        *,
        weights: WeightsArg = None,
        value_range: Sequence[float] | None = None,
        validate: str | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        keep_features: bool = False,
        allow_mismatch: bool = False,
        ref_image_transform: str | None = None,
        distributed: bool | None = None,
        extractors: Sequence[Extractor] | None = None,
        options: RunOptions | None = None,
        **kw: Any,
    ):
        if validate not in (None, "eager", "deferred"):
            raise FDEvalError(f"validate must be None, 'eager' or 'deferred', got {validate!r}")
        if not 0 <= tolerance < 1:
            raise FDEvalError(f"tolerance is a fraction of the value range's width, in [0, 1); got {tolerance}")
        self.options = opts = make_options(options, kw, "FDMetric")
        # options.rank/world_size are honoured (they must agree with the process group); distributed=False: alone
        self.run = run = (opts.replace(rank=None, world_size=1) if distributed is False else opts).resolve()
        self.device, self.rank, self.world_size = run.device, run.rank, run.world_size
        self.value_range = _check_range(value_range)
        self.validate = validate
        self.tolerance = float(tolerance)
        self.keep_features = keep_features
        self.allow_mismatch = allow_mismatch
        self.extractors = resolve_extractors(models, extractors, weights, run, self.device)
        place_extractors(self.extractors, self.device, None, streaming=True)
        # the reference (when an image source) is computed with these extractors, sharded over the ranks
        # CMMD (CLIP extractors) needs both sides' rows: kept for those models whatever keep_features says
        self._cmmd = frozenset(ex.name for ex in self.extractors if wants_cmmd(ex.name))
        self._ref = resolve_reference(ref, self.extractors, ref_image_transform=ref_image_transform,
                                      keep_features=True if keep_features else self._cmmd,
                                      options=run.replace(progress=False, precision=None, compile=None))
        self._check_reference()
        self._pool: ThreadPoolExecutor | None = None
        self._last_stats: dict[str, Stats] = {}
        self.reset()

    # --- state -----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every image seen (the extractors and the reference stay loaded)."""
        # the consumer list of every pass (pipeline.feature_consumers): moments (rows kept for CMMD's models too)
        # + registered consumer metrics
        self._accs, self._metrics = feature_consumers(self.extractors, self.device, self.keep_features,
                                                      keep_features_of=self._cmmd)
        self.updates = 0  # update() calls with at least one image
        # [first bad float update (-1: none), its min, its max, global min, global max], float64 on the device
        self._vstate = self._fresh_vstate()

    def _fresh_vstate(self) -> torch.Tensor:
        inf = float("inf")
        return torch.tensor([-1.0, 0.0, 0.0, inf, -inf], dtype=torch.float64, device=self.device)

    @property
    def n(self) -> int:
        """Images accumulated on this rank."""
        return self._accs[0].n

    @property
    def names(self) -> list[str]:
        return [ex.name for ex in self.extractors]

    def _identity(self) -> dict[str, Any]:
        return {ex.name: {"weights_sha256": ex.weights_sha256, "preprocess": ex.preprocess_spec.to_dict()}
                for ex in self.extractors}

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (CPU tensors, Python scalars; ``torch.save``-able, loads with ``weights_only=True``).

        Under torch.distributed each rank saves its own part; resume with the same number of ranks.
        """
        return {
            "format": STATE_FORMAT,
            "extractors": self._identity(),
            "value_range": list(self.value_range) if self.value_range else None,
            "updates": self.updates,
            "validation": self._vstate.cpu(),
            "accumulators": {ex.name: acc.state_dict() for ex, acc in zip(self.extractors, self._accs)},
            **({"metrics": {ex.name: {k: c.state_dict() for k, c in m.items()}
                            for ex, m in zip(self.extractors, self._metrics)}} if any(self._metrics) else {}),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a metric with the same extractors, value range and rank)."""
        if state.get("format") != STATE_FORMAT:
            raise InputError(f"not an FDMetric state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        if state["extractors"] != self._identity():
            raise StatsMismatchError(
                f"FDMetric state was made with extractors {_describe(state['extractors'])}, this metric has "
                f"{_describe(self._identity())}; load it into a metric built with the same models, weights and resize")
        vr = tuple(state["value_range"]) if state["value_range"] is not None else None
        if vr != self.value_range:
            raise InputError(f"FDMetric state was made with value_range={vr}, this metric has {self.value_range}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise InputError(f"FDMetric state of rank {state['rank']} of {state['world_size']} loaded into rank "
                             f"{self.rank} of {self.world_size}; resume with the same number of processes, each "
                             "loading its own rank's state")
        for ex, acc, m in zip(self.extractors, self._accs, self._metrics):
            acc.load_state_dict(state["accumulators"][ex.name])
            saved = (state.get("metrics") or {}).get(ex.name, {})
            if set(saved) != set(m):
                raise InputError(f"FDMetric state has consumer metrics {sorted(saved)} for {ex.name}, this metric "
                                 f"runs {sorted(m)}; load it with the same metrics registered")
            for k, c in m.items():
                c.load_state_dict(saved[k])
        self.updates = int(state["updates"])
        self._vstate = torch.as_tensor(state["validation"], dtype=torch.float64).to(self.device)

    # --- update ------------------------------------------------------------------------------------------------
    def update(self, images: torch.Tensor) -> None:
        """Add a batch: uint8 (0..255) or float (``value_range``) RGB, (N, 3, H, W) or (N, H, W, 3), any size.

        Raises :class:`InputRangeError` for a wrong dtype, shape or channel count, float input without a
        ``value_range``, and (when validating eagerly) NaN/Inf or out-of-range values.
        """
        x, channels_last = _layout(images, "FDMetric.update")
        if x.is_floating_point() and self.value_range is None:
            raise InputRangeError(f"FDMetric.update got {x.dtype} images but the metric has no value_range; build it "
                                  "with FDMetric(..., value_range=(0, 1)) or (-1, 1), or pass uint8 images")
        if x.shape[0] == 0:
            return
        if channels_last:
            x = x.permute(0, 3, 1, 2)
        on_host = x.device.type == "cpu"
        x = x.detach().to(self.device, non_blocking=True)
        if x.is_floating_point():
            x = self._float_to_uint8(x, on_host)
        # the images' positions in this rank's stream (what index-using consumers get; no host sync: n is an int)
        start = self._accs[0].n
        index, on_device = torch.arange(start, start + x.shape[0], dtype=torch.int64), None
        for ex, acc, mets in zip(self.extractors, self._accs, self._metrics):
            if ex.resizes_on_host and tuple(x.shape[-2:]) != ex.preprocess_spec.target_size(*x.shape[-2:]):
                feats = ex.forward_prepared(self._host_prepare(ex, x).to(self.device, non_blocking=True))
            else:
                feats = ex(x)  # resizes on the device (or already at the model size); no host sync
            on_device = feed([acc, *mets.values()], feats, index, self.device, on_device)  # the pipeline's step
        self.updates += 1

    def _eager(self, on_host: bool) -> bool:
        if self.validate is not None:
            return self.validate == "eager"
        return on_host or self.device.type == "cpu" or any(ex.resizes_on_host for ex in self.extractors)

    def _float_to_uint8(self, x: torch.Tensor, on_host: bool) -> torch.Tensor:
        x = x.to(_float_dtype(x))
        mn, mx = torch.aminmax(x)  # NaN propagates into both; +-Inf shows as such
        eager = self._eager(on_host)
        if eager:
            msg = _range_problem(float(mn), float(mx), self.value_range, self.tolerance)
            if msg:  # raised before anything is accumulated
                raise InputRangeError(f"FDMetric.update #{self.updates}: {msg}")
        mn64, mx64 = mn.to(torch.float64), mx.to(torch.float64)
        v = self._vstate
        first, first_min, first_max = v[0], v[1], v[2]
        if not eager:
            lo, hi = self.value_range
            tol = self.tolerance * (hi - lo)
            bad = ~(torch.isfinite(mn64) & torch.isfinite(mx64) & (mn64 >= lo - tol) & (mx64 <= hi + tol))
            is_first = bad & (v[0] < 0)
            # Python scalars enter kernels as arguments: no host->device copy, no sync
            first = torch.where(is_first, float(self.updates), v[0])
            first_min, first_max = torch.where(is_first, mn64, v[1]), torch.where(is_first, mx64, v[2])
        # the overall min/max (fmin/fmax skip NaN) feed compute()'s "[0, 1] data declared (-1, 1)?" warning
        self._vstate = torch.stack([first, first_min, first_max, torch.fmin(v[3], mn64), torch.fmax(v[4], mx64)])
        return _quantise(x, self.value_range)

    def _host_prepare(self, ex: Extractor, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> the extractor's Pillow resize of every image, uint8 (N, 3, H', W') on the host.

        Same pixels as :meth:`Extractor.__call__` / the CLI's decode path (PIL image from the uint8 array, then
        ``Extractor.prepare``); Pillow releases the GIL while resizing, so a thread pool spreads the images.
        """
        arr = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # NHWC, packed on the device before the copy
        prep = ex.host_transform()

        def one(a: np.ndarray) -> torch.Tensor:
            return prep(Image.fromarray(a, mode="RGB"))

        if len(arr) < 4:
            return torch.stack([one(a) for a in arr])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=max(1, min(8, available_cpus())),
                                            thread_name_prefix="fd-eval-resize")
        return torch.stack(list(self._pool.map(one, arr)))

    # --- compute -----------------------------------------------------------------------------------------------
    def _check_reference(self) -> None:
        """Fail at construction, not after 50K images, when the reference cannot be compared."""
        for ex in self.extractors:
            if ex.name not in self._ref.stats:
                raise StatsMismatchError(f"the reference has no statistics for {ex.name} (it holds "
                                         f"{', '.join(self._ref.stats) or 'none'}); pass a reference made with it")
            r = self._ref.stats[ex.name]
            probe = Stats(np.zeros(ex.feature_dim), np.eye(ex.feature_dim), 2, ex.metadata(),
                          origin=f"FDMetric({ex.name})")
            check_compatible(probe, r, allow_mismatch=self.allow_mismatch)

    def _raise_deferred(self) -> list[str]:
        """Raise the first deferred range error (over all ranks); return range warnings."""
        if self.value_range is None:
            return []
        states = [self._vstate.cpu()]
        if self.world_size > 1:
            from ..run.distributed import all_gather_json

            states = [torch.tensor(s, dtype=torch.float64)
                      for s in all_gather_json([float(v) for v in self._vstate.cpu()])]
        for r, s in enumerate(states):
            if s[0] >= 0:
                msg = _range_problem(float(s[1]), float(s[2]), self.value_range, self.tolerance)
                where = f" on rank {r}" if self.world_size > 1 else ""
                raise InputRangeError(f"FDMetric.compute: update #{int(s[0])}{where}: {msg}; the accumulated "
                                      "statistics include that batch: reset() and evaluate again")
        gmin = min(float(s[3]) for s in states)
        if self.value_range == (-1.0, 1.0) and math.isfinite(gmin) and gmin >= 0:
            return [f"value_range=(-1, 1) but no float value below 0 was seen (min {gmin:.4g}): were images in "
                    "[0, 1] passed? They would be evaluated as far too bright; declare value_range=(0, 1)"]
        return []

    def _merged(self) -> tuple[list[MomentAccumulator], list[dict[str, Any]]]:
        """Every rank's consumers merged by their declared rules, in rank order (collective)."""
        if self.world_size == 1:
            return self._accs, self._metrics
        from ..core.consumers import merge_over_ranks

        flat = merge_over_ranks([*self._accs, *(c for m in self._metrics for c in m.values())])
        accs, rest = flat[:len(self._accs)], iter(flat[len(self._accs):])
        return accs, [{k: next(rest) for k in m} for m in self._metrics]  # type: ignore[misc]

    def stats(self) -> dict[str, Stats]:
        """The generated images' statistics (merged over ranks) as of the last :meth:`compute`."""
        return dict(self._last_stats)

    def compute(self, **provenance: Any) -> dict[str, Any]:
        """FD per extractor: the document ``fd-eval compute --json`` writes (``results``, ``provenance``,
        ``warnings``, ``skipped``). Collective under torch.distributed (every rank calls it and gets the same
        result). The state is kept: more updates may follow. Extra keyword arguments go into
        ``provenance["generated"]``."""
        t0 = time.perf_counter()
        warnings = self._raise_deferred()
        accs, mets = self._merged()
        n = accs[0].n
        if n < 2:
            raise InputError(f"FDMetric.compute: {n} image(s) seen over all ranks; FD needs at least 2 (call update)")
        env = environment(self.device)
        src = {"spec": "<tensors>", "kind": "FDMetric", "n": n, "value_range": self.value_range,
               "updates": self.updates, "world_size": self.world_size, **provenance}
        gen = {ex.name: Stats.from_accumulator(acc, {**ex.metadata(), "source": src, **env,
                                                     **({"metrics": metric_results(m)} if m else {})})
               for ex, acc, m in zip(self.extractors, accs, mets)}
        t_fd = time.perf_counter()
        results, w = evaluate_stats(gen, self._ref, allow_mismatch=self.allow_mismatch)
        t_fd = time.perf_counter() - t_fd
        self._last_stats = gen
        prov = run_provenance(self.extractors, self.device, reference=self._ref.identity, generated=src,
                              seed=provenance.get("seed"), world_size=self.world_size,
                              timings={"compute_s": time.perf_counter() - t0, "fd_s": t_fd})
        inputs = {"reference": self._ref.inputs} if self._ref.inputs else {}  # an image-source reference's accounting
        return EvalResult(results, prov, w + warnings, [], gen, inputs=inputs).to_dict()

    def __repr__(self) -> str:
        ref = self._ref.identity.get('name') or self._ref.identity.get('kind')
        return (f"FDMetric(models={self.names}, ref={ref}, device={self.device}, value_range={self.value_range}, "
                f"n={self.n}, rank={self.rank}/{self.world_size})")


def _describe(identity: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} ({(v.get('weights_sha256') or 'random')[:12]}, resize "
                     f"{v.get('preprocess', {}).get('resize_library')})" for k, v in identity.items())


# --- a sampler in, FD out --------------------------------------------------------------------------------------
def batch_seed(seed: int, batch_index: int) -> int:
    """The torch seed set before ``fn(batch_index, ...)``: a function of (seed, batch) only, never of the rank,
    so the images drawn do not depend on how many processes draw them."""
    words = np.random.SeedSequence([int(seed), int(batch_index)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


def generator_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[tuple[int, int]]:
    """This rank's (batch index, size) pairs: a contiguous block of batches 0..ceil(n / batch_size) - 1 (the
    blocks of all ranks partition them, in rank order); the last batch holds the remainder."""
    if n < 1 or batch_size < 1:
        raise FDEvalError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    total = -(-n // batch_size)
    return [(int(b), min(batch_size, n - int(b) * batch_size)) for b in shard_indices(total, rank, world_size)]


def evaluate_generator(
    fn: Callable[[int, int], torch.Tensor],
    n: int,
    batch_size: int,
    ref: Any = "gpic-test",
    models: ModelsArg = (DEFAULT_EXTRACTOR,),
    *,
    seed: int = 0,
    metric: FDMetric | None = None,
    progress: bool = False,
    **metric_kwargs: Any,
) -> dict[str, Any]:
    """FD of ``n`` images drawn from a sampler: ``fn(batch_index, batch_size) -> images`` (what
    :meth:`FDMetric.update` takes), called for batches 0..ceil(n / batch_size) - 1, the last one truncated.

    Under torch.distributed each rank draws its own contiguous block of batch indices (together exactly all of
    them) and the statistics are merged. Before each call the torch CPU generator and the current CUDA device's
    generator are seeded with :func:`batch_seed` (``seed``, batch_index) -- per batch, not per rank, so the
    images and the FD do not depend on the number of processes -- and restored afterwards, leaving the caller's
    training RNG untouched. Other randomness (numpy, ``random``) is ``fn``'s to derive from ``batch_index``.

    ``metric``: an :class:`FDMetric` to reuse (it is reset first; ``ref``/``models``/``metric_kwargs`` are then
    ignored), so the extractor and reference load once per training run. Otherwise one is built from
    ``ref``, ``models`` and ``metric_kwargs`` (``value_range``, ``weights``, ``options``, or run options such as
    ``device``, ``resize``, ...).
    Returns :meth:`FDMetric.compute`'s document; ``provenance["generated"]`` records n, batch_size and seed.
    """
    if metric is None:
        metric = FDMetric(models, ref, **metric_kwargs)
    elif metric_kwargs:
        raise FDEvalError(f"evaluate_generator: {', '.join(sorted(metric_kwargs))} given with metric=; they are the "
                          "metric's settings: pass them to FDMetric(...) instead")
    metric.reset()
    mine = generator_batches(n, batch_size, metric.rank, metric.world_size)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    bar = None
    if progress and metric.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(s for _, s in mine), unit="img", desc="generator (rank 0)")
    for b, size in mine:
        with torch.random.fork_rng(devices=devices):
            s = batch_seed(seed, b)
            torch.random.default_generator.manual_seed(s)
            if devices:
                torch.cuda.manual_seed(s)
            images = fn(b, size)
        got = images.shape[0] if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim else None
        if got != size:
            raise InputError(f"fn({b}, {size}) returned {got if got is not None else type(images).__name__} images; "
                             f"it must return exactly batch_size images (the last batch of n={n} holds {size})")
        metric.update(images)
        if bar is not None:
            bar.update(size)
    if bar is not None:
        bar.close()
    return metric.compute(kind="generator", n_requested=n, batch_size=batch_size, seed=seed,
                          batches=-(-n // batch_size))
