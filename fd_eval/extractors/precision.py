"""Named precision modes for feature extraction: ``exact`` (the protocol's numbers), ``fp32``, ``fast``, ``fp8``.

Modes: ``exact`` (default) is float32-accurate; on CUDA, DINOv2's Linear layers and patch embedding run as
3xTF32 split matmuls on tensor cores (:mod:`fd_eval.core.splitmm`; ``$FD_EVAL_MATMUL=ieee`` forces IEEE float32),
elsewhere IEEE float32. ``fp32`` is IEEE float32 everywhere (bitwise comparison with a CPU run). Both record
``model_dtype="float32"`` and compare with each other and with GPIC's statistics without a flag; provenance
records the matmul path (``precision.matmul``). ``fast`` and ``fp8`` (DINOv2: e4m3 Linear layers with row-wise
scales, opt-in) are reduced precision and refused against exact statistics.

``exact`` (default) runs every extractor network in float32 with TF32 switched off for both cuDNN convolutions
and matmuls (:func:`exact_numerics`), the numerics of the reference implementations run on a CPU. PyTorch
runs cuDNN convolutions in TF32 by default on Ampere and newer GPUs, so the reference codes as run there use TF32
for DINOv2's patch embedding and for every Inception convolution; ``exact`` on a GPU matches them as run on a CPU
or with TF32 disabled. The user's flags are restored when the forward pass returns: a training loop calling
:class:`fd_eval.FDMetric` keeps its own TF32 settings.

``fast`` picks, per extractor family, the cheapest numerics whose FD error was measured to be small
(:data:`FAST_VS_EXACT`; ``benchmarks/bench_precision.py``, random weights, trained weights may differ):

* DINOv2 (``fast_compute = "bfloat16"``): bfloat16 autocast (matmul/conv inputs and activations in bfloat16,
  float32 accumulation, the residual stream and the final LayerNorm -- the feature -- in float32), TF32 allowed
  for whatever stays float32, fused ``F.scaled_dot_product_attention`` (flash attention on recent GPUs; timm uses
  it in both modes). Not TF32: ViT-L/14 at 224 px is ~162 GFLOP per image, so the 3,000 img/s target needs
  ~490 TFLOP/s, an H100's whole dense TF32 peak but ~60% of its bfloat16 peak. Measured cost (ViT-L/14, real
  GPU kernels on an H200): FD within ~0.3% when both sides are fast, ~0.4% fast against exact (emulated TF32
  would cost ~0.02%: the price of bfloat16's speed). Measured speed there: 2,160 img/s for the network alone,
  7.7x float32 (278 img/s).
* Inception (``fast_compute = "tf32"``): float32 with TF32 convolutions and matmuls (what cuDNN does by
  default on Ampere+) and ``channels_last``; not bfloat16, which moved FID by up to 1.1% (both sides fast) and
  12% (fast against exact) with random weights on an H200, against 0.14% / 0.9% for TF32. The network is ~15x
  cheaper than ViT-L, so bfloat16 would buy little. On a CPU, TF32 does not exist: fast Inception computes in
  float32 there (its statistics are still labelled fast).

Both may add ``torch.compile`` (:class:`LazyCompiled`). Statistics record the mode (``preprocess.model_dtype`` =
``"float32"``, ``"bfloat16"`` or ``"tf32"``, and ``metadata["precision"]``), and :func:`fd_eval.check_compatible`
refuses to compare ``fast`` statistics with ``exact`` ones (the GPIC reference is ``exact``) unless
``allow_mismatch``; every result's provenance carries the documented expected difference.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..errors import FDEvalError

PRECISIONS = ("exact", "fast", "fp32", "fp8")
EXACT_MODES = ("exact", "fp32")  # float32-accurate: comparable with the protocol's (GPIC's) statistics
DEFAULT_PRECISION = "exact"
# What `exact` computes Linear layers with: "auto" = 3xTF32 ("split3") on CUDA, IEEE float32 elsewhere;
# "ieee" / "split3" force one (split3 on a CPU is the bit-level emulation, for tests and benchmarks).
MATMUL_ENV = "FD_EVAL_MATMUL"
SPLIT3_FORM_ENV = "FD_EVAL_SPLIT3_FORM"  # "cat" (one matmul over the concatenated inner dimension) or "sum"
COMPILE_MODE_ENV = "FD_EVAL_COMPILE_MODE"  # torch.compile mode; default max-autotune-no-cudagraphs on CUDA
FAST_COMPUTES = ("bfloat16", "tf32")  # what `fast` means for an extractor family (Extractor.fast_compute)
# Under compile=None ("auto"), fast mode compiles the network only for passes at least this long on a GPU:
# measured on an H200 (benchmarks/bench_pipeline.py, ViT-L/14, 8,000 PNGs), compiling cost 17.6 s and saved
# 0.18 ms per image end to end (1,302 -> 1,711 img/s), so it pays from ~100K images: a 50K evaluation runs
# eagerly, building 1M-image reference statistics compiles. 200K leaves a margin for slower compilers.
COMPILE_AUTO_MIN_IMAGES = 200_000

# FD(fast) vs FD(exact), measured by `python benchmarks/bench_precision.py` (on an H200 with `--device cuda` where
# "device" says so: cuBLAS bfloat16, flash attention, cuDNN TF32; else on a CPU, where bfloat16 autocast runs in
# oneDNN and TF32 is emulated) with random weights in the real architectures, on pairs of photo-crop sets (the same
# distribution, and against blurred / noisy / JPEG-compressed / colour-shifted versions). "same_mode": both sides in
# fast; "mixed": generated in fast against an exact reference (what `--precision fast --allow-mismatch` against GPIC
# does). Values are max over pairs of |FD_fast - FD_exact| / FD_exact. Real (trained) weights may differ.
# `fp8` (DINOv2 only: e4m3 Linear layers with row-wise scales, the rest as fast) is in the same table.
FAST_VS_EXACT: dict[str, dict[str, Any]] = {
    # bfloat16 autocast; 6 sets of 128 (ViT-S, CPU) / 256 (ViT-L, H200)
    "dinov2-vits14": {"compute": "bfloat16", "device": "cpu", "n_per_set": 128, "pairs": 5,
                      "fd_rel_same_max": 5.4e-4, "fd_rel_same_median": 3.1e-4,
                      "fd_rel_mixed_max": 2.1e-3, "fd_rel_mixed_median": 1.4e-3, "feature_rel_rms_error": 6.7e-3},
    "dinov2-vitl14": {"compute": "bfloat16", "device": "NVIDIA H200", "n_per_set": 256, "pairs": 5,
                      "fd_rel_same_max": 2.8e-3, "fd_rel_same_median": 2.4e-3,
                      "fd_rel_mixed_max": 3.7e-3, "fd_rel_mixed_median": 3.3e-3, "feature_rel_rms_error": 7.4e-3},
    # cuDNN TF32 + channels_last on the H200; -pt (the same network) with TF32 emulated on the CPU (inputs and
    # weights of every convolution rounded to TF32, float32 accumulation)
    "inception-v3-tf": {"compute": "tf32", "device": "NVIDIA H200", "n_per_set": 256, "pairs": 5,
                        "fd_rel_same_max": 1.4e-3, "fd_rel_same_median": 8.8e-5,
                        "fd_rel_mixed_max": 9.4e-3, "fd_rel_mixed_median": 6.4e-3, "feature_rel_rms_error": 4.9e-4},
    "inception-v3-pt": {"compute": "tf32 (emulated)", "device": "cpu", "n_per_set": 128, "pairs": 5,
                        "fd_rel_same_max": 1.4e-3, "fd_rel_same_median": 6.8e-4,
                        "fd_rel_mixed_max": 7.3e-3, "fd_rel_mixed_median": 5.3e-3, "feature_rel_rms_error": 5.0e-4},
}
# FD(fp8) vs FD(exact), same measurement (bench_precision.py --modes fp8); on a CPU the e4m3 rounding is emulated
# (cast to float8_e4m3fn and back, float32 matmul; bfloat16 autocast elsewhere as in fast mode).
# Measured: `python benchmarks/bench_precision.py --models dinov2-vits14 --modes fp8 split3 --n 32` (split3, exact's
# emulated 3xTF32 path, for scale: FD within 8.9e-8, features 8.0e-7 rel. RMS). GPU figure: run_gpu.sh.
FP8_VS_EXACT: dict[str, dict[str, Any]] = {
    "dinov2-vits14": {"compute": "fp8 e4m3 rowwise (emulated)", "device": "cpu", "n_per_set": 32, "pairs": 5,
                      "fd_rel_same_max": 1.6e-2, "fd_rel_same_median": 1.1e-2,
                      "fd_rel_mixed_max": 1.8e-2, "fd_rel_mixed_median": 1.3e-2, "feature_rel_rms_error": 8.2e-2},
}
# What the reference codes compute by default on Ampere+ GPUs (TF32 cuDNN convolutions, float32 matmuls) against
# exact, by the same measurement (for DINOv2 only the patch embedding is a convolution; for Inception it is the
# TF32 row above): the size of the gap between `exact` and the peers' GPU numbers.
REFERENCE_GPU_DEFAULT_VS_EXACT: dict[str, dict[str, float]] = {
    "dinov2-vits14": {"fd_rel_same_max": 4.3e-5, "fd_rel_mixed_max": 1.3e-4},
    "dinov2-vitl14": {"fd_rel_same_max": 6.3e-5, "fd_rel_mixed_max": 1.6e-4},  # H200, patch-embed TF32 emulated
    "inception-v3-tf": {"fd_rel_same_max": 1.4e-3, "fd_rel_mixed_max": 9.4e-3},  # H200, cuDNN TF32
    "inception-v3-pt": {"fd_rel_same_max": 1.4e-3, "fd_rel_mixed_max": 7.3e-3},
}
_MEASUREMENT_NOTE = ("measured with random weights (benchmarks/bench_precision.py, on the device named); trained "
                     "weights may differ: check on your data with --precision exact")


@dataclass(frozen=True)
class Precision:
    """A precision mode.

    Attributes:
        mode: ``"exact"`` (the protocol's float32 numerics; on CUDA, DINOv2's matmuls by float32-accurate 3xTF32,
            see :mod:`fd_eval.core.splitmm`), ``"fp32"`` (plain IEEE float32 everywhere, for bitwise comparison with
            a CPU run), ``"fast"`` (bfloat16 autocast / TF32) or ``"fp8"`` (DINOv2: e4m3 Linear layers, opt-in,
            refused against exact references like fast).
        compile: ``torch.compile`` the network: True, False, or None = auto (fast modes only: on a GPU for passes
            of at least :data:`COMPILE_AUTO_MIN_IMAGES` images). True is allowed in exact modes (DINOv2).
    """

    mode: str = DEFAULT_PRECISION
    compile: bool | None = None

    def __post_init__(self) -> None:
        if self.mode not in PRECISIONS:
            raise FDEvalError(f"unknown precision {self.mode!r}; choose 'exact' (float32-accurate: the protocol's "
                              "numbers), 'fp32' (IEEE float32), 'fast' (bfloat16 autocast) or 'fp8'")

    @property
    def fast(self) -> bool:
        """True for the reduced-precision modes (fast, fp8): not comparable with exact statistics."""
        return self.mode not in EXACT_MODES

    def model_dtype(self, fast_compute: str = "bfloat16") -> str:
        """What :class:`PreprocessSpec.model_dtype` records: ``"float32"`` (exact, fp32), ``"float8_e4m3"`` (fp8),
        or in fast mode the family's ``fast_compute`` (``"bfloat16"``: autocast; ``"tf32"``: TF32 allowed)."""
        return {"fast": fast_compute, "fp8": "float8_e4m3"}.get(self.mode, "float32")

    def numerics(self, device: torch.device | str, fast_compute: str = "bfloat16") -> contextlib.AbstractContextManager:
        """Context for the network's forward pass on ``device`` (see :func:`exact_numerics`, :func:`fast_numerics`)."""
        dev = torch.device(device)
        return fast_numerics(dev.type, fast_compute) if self.fast else exact_numerics()

    def to_dict(self, fast_compute: str = "bfloat16") -> dict[str, Any]:
        """The numerics-defining part (saved with statistics; compile is an implementation detail, not here).
        Extractors add ``"matmul"``: the matmul path that ran (e.g. ``"3xtf32-cat"``, ``"ieee-fp32"``)."""
        if self.mode == "fp8":
            return {"mode": "fp8", "model_dtype": "float8_e4m3", "autocast": "bfloat16", "tf32": True,
                    "fp8": "e4m3 linear layers, per-output-channel weight scales, per-row activation scales"}
        if self.fast:
            return {"mode": "fast", "model_dtype": fast_compute,
                    "autocast": "bfloat16" if fast_compute == "bfloat16" else None, "tf32": True}
        return {"mode": self.mode, "model_dtype": "float32", "autocast": None, "tf32": False}


def exact_matmul_path(device: torch.device | str) -> str:
    """``"split3"`` or ``"ieee"``: what exact mode uses for DINOv2's Linear layers on ``device``
    (``$FD_EVAL_MATMUL``: ``auto`` (default: split3 on CUDA, ieee elsewhere), ``ieee``, ``split3``)."""
    env = (os.environ.get(MATMUL_ENV) or "auto").strip().lower()
    if env not in ("auto", "ieee", "split3"):
        raise FDEvalError(f"{MATMUL_ENV}={env!r} is not one of auto, ieee, split3")
    if env == "auto":
        return "split3" if torch.device(device).type == "cuda" else "ieee"
    return env


def split3_form() -> str:
    """``$FD_EVAL_SPLIT3_FORM``: ``cat`` (default) or ``sum`` (see :class:`fd_eval.core.splitmm.PreparedLinear`)."""
    form = (os.environ.get(SPLIT3_FORM_ENV) or "cat").strip().lower()
    if form not in ("cat", "sum"):
        raise FDEvalError(f"{SPLIT3_FORM_ENV}={form!r} is not 'cat' or 'sum'")
    return form


def resolve_precision(precision: "str | Precision | None", compile: bool | None = None) -> Precision:
    """``"exact"``/``"fp32"``/``"fast"``/``"fp8"``/None (exact)/:class:`Precision` -> :class:`Precision` (raises
    on unknown names). The CLI's ``--precision`` choices (cli/_common.py) list the same names."""
    if isinstance(precision, Precision):
        return precision if compile is None else Precision(precision.mode, compile)
    return Precision(DEFAULT_PRECISION if precision is None else str(precision), compile)


def mode_of(metadata_or_spec: Any) -> str:
    """The mode (:data:`PRECISIONS`) from a statistics' metadata or preprocess dict (absent: exact, the
    protocol; a non-float32 ``model_dtype`` without a recorded mode: fast, or fp8 for float8 types)."""
    if isinstance(metadata_or_spec, dict):
        p = metadata_or_spec.get("precision")
        if isinstance(p, dict) and p.get("mode") in PRECISIONS:
            return p["mode"]
        spec = metadata_or_spec.get("preprocess", metadata_or_spec)
        if isinstance(spec, dict) and spec.get("model_dtype") not in (None, "float32"):
            return "fp8" if str(spec["model_dtype"]).startswith("float8") else "fast"
    return "exact"


def is_exact(metadata_or_spec: Any) -> bool:
    """True when statistics were computed in a float32-accurate mode (:data:`EXACT_MODES`)."""
    return mode_of(metadata_or_spec) in EXACT_MODES


# --- TF32 flags ---------------------------------------------------------------------------------------------
# PyTorch >= 2.9 has per-backend `fp32_precision` settings ("ieee" | "tf32" | "bf16" | "none" = inherit); the
# legacy getters (`allow_tf32`, `get_float32_matmul_precision`) raise once the new API holds a state they cannot
# express, so flags are saved and restored through the new API when it exists, through the legacy one otherwise.
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")
_FLAGS_LOCK = threading.RLock()


def _leaves() -> dict[str, Any]:
    """The leaf settings exact/fast mode touch: CUDA matmuls, cuDNN conv (and RNN, so the legacy cuDNN getter
    stays readable inside the context), oneDNN (CPU) matmul and conv."""
    b = torch.backends
    out = {"cuda.matmul": b.cuda.matmul, "cudnn.conv": b.cudnn.conv, "cudnn.rnn": b.cudnn.rnn}
    mk = getattr(b, "mkldnn", None)
    if mk is not None and hasattr(mk, "matmul") and hasattr(mk, "conv"):
        out.update({"mkldnn.matmul": mk.matmul, "mkldnn.conv": mk.conv})
    return out


def tf32_state() -> dict[str, Any]:
    """The current float32 precision settings (for tests and provenance); never raises."""
    if _NEW_API:
        return {name: getattr(obj, "fp32_precision", None) for name, obj in _leaves().items()}
    return {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextlib.contextmanager
def _set_fp32(want: dict[str, str]) -> Iterator[None]:
    """Set leaf fp32 precisions (new API names), restoring the previous values exactly on exit."""
    with _FLAGS_LOCK:
        if _NEW_API:
            leaves = _leaves()
            saved = {n: leaves[n].fp32_precision for n in want if n in leaves}
            try:
                for n in saved:
                    leaves[n].fp32_precision = want[n]
                yield
            finally:
                for n, v in saved.items():
                    leaves[n].fp32_precision = v
            return
        # legacy PyTorch: one cuDNN flag and the float32 matmul precision
        conv_tf32 = want.get("cudnn.conv") == "tf32"
        mm = "high" if want.get("cuda.matmul") == "tf32" else "highest"
        saved_conv, saved_mm = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
        try:
            torch.backends.cudnn.allow_tf32 = conv_tf32
            torch.set_float32_matmul_precision(mm)
            yield
        finally:
            torch.set_float32_matmul_precision(saved_mm)
            torch.backends.cudnn.allow_tf32 = saved_conv


def ieee_cuda_matmul() -> contextlib.AbstractContextManager:
    """CUDA float32 matmuls in full precision (no TF32) for the block, the caller's flags restored after; through
    the API that PyTorch's getters can read in any state the caller left (the legacy ``allow_tf32`` getter raises
    once the new API holds a state it cannot express)."""
    return _set_fp32({"cuda.matmul": "ieee"})


def exact_numerics() -> contextlib.AbstractContextManager:
    """Float32 without TF32 for CUDA matmuls and cuDNN convolutions (and IEEE float32 for oneDNN on CPUs, where
    ``torch.set_float32_matmul_precision("medium")`` would otherwise allow bfloat16); restores the caller's
    settings on exit, also on an exception. The flags are process-global: another thread running CUDA work at
    the same moment sees them too."""
    return _set_fp32({"cuda.matmul": "ieee", "cudnn.conv": "ieee", "cudnn.rnn": "ieee",
                      "mkldnn.matmul": "ieee", "mkldnn.conv": "ieee"})


@contextlib.contextmanager
def fast_numerics(device_type: str, compute: str = "bfloat16") -> Iterator[None]:
    """TF32 allowed for CUDA matmuls and cuDNN convolutions, plus (``compute="bfloat16"``) bfloat16 autocast on
    ``device_type`` ("cuda" or "cpu"); the caller's flags and autocast state are restored on exit. (oneDNN's
    CPU settings are left alone: CPUs have no TF32.)"""
    if compute not in FAST_COMPUTES:
        raise FDEvalError(f"unknown fast compute {compute!r}; expected one of {FAST_COMPUTES}")
    with _set_fp32({"cuda.matmul": "tf32", "cudnn.conv": "tf32"}):
        if compute == "bfloat16":
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
                yield
        else:
            yield


@contextlib.contextmanager
def split_numerics(device_type: str) -> Iterator[None]:
    """Exact mode's context for the 3xTF32 path: TF32 allowed for CUDA matmuls (every matmul operand is already
    TF32-representable: :mod:`fd_eval.core.splitmm`), cuDNN and oneDNN in IEEE float32, and on CUDA SDPA restricted
    to the memory-efficient kernel (float32-accurate 3xTF32 internally; the math fallback's plain matmuls would
    be TF32 under this flag). Restores the caller's settings on exit."""
    with _set_fp32({"cuda.matmul": "tf32", "cudnn.conv": "ieee", "cudnn.rnn": "ieee", "mkldnn.matmul": "ieee",
                    "mkldnn.conv": "ieee"}):
        if device_type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                yield
        else:
            yield


# --- torch.compile ------------------------------------------------------------------------------------------
# The user's own TORCHINDUCTOR_CACHE_DIR, read at import: once imported, inductor writes its default there itself.
_USER_INDUCTOR_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")


def compile_mode(device_type: str) -> str | None:
    """``torch.compile`` mode: ``$FD_EVAL_COMPILE_MODE`` if set (``default`` = torch's), else
    ``max-autotune-no-cudagraphs`` on CUDA (GEMM autotuning; no CUDA graphs, whose static input buffers would pin
    each batch size) and torch's default elsewhere. Autotuning results land in the inductor cache."""
    env = os.environ.get(COMPILE_MODE_ENV)
    if env:
        return None if env == "default" else env
    return "max-autotune-no-cudagraphs" if device_type == "cuda" else None


def inductor_cache_dir(device_type: str) -> str:
    """Point inductor's on-disk caches (FX graph cache, autotuning, Triton kernels) at
    ``$FD_EVAL_CACHE/inductor/<torch version>/<GPU name or cpu>`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set, so
    a second run with the same torch, GPU, batch size and mode loads compiled code instead of compiling
    (the batch size and mode are part of inductor's own cache keys). Returns the directory in use."""
    from ..util.io_utils import cache_dir

    if _USER_INDUCTOR_DIR:
        return _USER_INDUCTOR_DIR
    dev = torch.cuda.get_device_name() if device_type == "cuda" and torch.cuda.is_available() else "cpu"
    tag = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{torch.__version__}/{dev}")
    path = str(cache_dir("inductor", *tag.split("/")))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path  # inductor reads it whenever it resolves its cache dir
    return path


class _Chain(torch.nn.Module):
    """Calls its functions in order (the compiled blocks; a plain list, so they are not submodules)."""

    def __init__(self, fns: list[Callable[[torch.Tensor], torch.Tensor]]):
        super().__init__()
        self.fns = fns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.fns:
            x = f(x)
        return x


class LazyCompiled:
    """``module(x)`` through ``torch.compile``, compiled on the first call, eager after any compile failure.

    The first call fixes the compiled batch size B; a shorter batch is padded with zeros to B (rows are
    independent in inference: no batch statistics) and a longer one runs in chunks of B, so a varying last batch
    never triggers a recompilation. A failure to compile (no compiler, an unsupported op, a backend bug) warns
    once and falls back to the eager module for good; the batch is rerun eagerly.

    ``regions``: the name of a ``Sequential`` of identical blocks (a ViT's ``"blocks"``) to compile instead of
    the whole module ("regional compilation"): each block is compiled separately, so the one graph is traced and
    code-generated once and reused by every block, and the rest of the module (patch embedding, final norm) runs
    eagerly. DINOv2 ViT-S/14 (12 blocks) on this CPU (``benchmarks/bench_compile.py``), at the same compiled
    speed: 16.2 s to compile against 27.0 s for the whole network with an empty inductor cache (a first run on a
    machine), 3.8 s against 4.2 s with a warm one. The compiled blocks are swapped in for the duration of each
    call only, so ``module`` itself (its state dict, its eager use in exact mode) never changes.
    """

    def __init__(self, module: torch.nn.Module, name: str = "model",
                 compiler: Callable[..., Callable] | None = None, regions: str | None = None,
                 device_type: str = "cpu"):
        self.module = module
        self.device_type = device_type
        self.name = name
        self.regions = regions
        self._compiler = compiler
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.batch: int | None = None
        self.failed: str | None = None  # why compilation was abandoned

    def _compile(self) -> Callable[[torch.Tensor], torch.Tensor]:
        kw: dict[str, Any] = {"dynamic": False}
        if self._compiler is None:
            kw["mode"] = compile_mode(self.device_type)
            inductor_cache_dir(self.device_type)
        compiler = self._compiler or torch.compile
        if self.regions is None:
            return compiler(self.module, **kw)
        blocks = getattr(self.module, self.regions)
        compiled = _Chain([compiler(b, **kw) for b in blocks])

        def run(x: torch.Tensor) -> torch.Tensor:
            setattr(self.module, self.regions, compiled)
            try:
                return self.module(x)
            finally:
                setattr(self.module, self.regions, blocks)

        return run

    def _fail(self, e: BaseException) -> None:
        self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        warnings.warn(f"{self.name}: torch.compile failed ({self.failed}); running eagerly (same precision)",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.module(x)
        try:
            if self._compiled is None:
                self._compiled = self._compile()
                self.batch = int(x.shape[0])
            b = self.batch or int(x.shape[0])
            outs = []
            for s in range(0, x.shape[0], b):
                chunk = x[s:s + b]
                n = chunk.shape[0]
                if n < b:
                    chunk = torch.cat([chunk, chunk.new_zeros((b - n, *chunk.shape[1:]))])
                outs.append(self._compiled(chunk)[:n])
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        except (torch.cuda.OutOfMemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager, same numerics class
            self._fail(e)
            return self.module(x)


# --- provenance ---------------------------------------------------------------------------------------------
def expected_difference(mode: str, extractor: str) -> dict[str, Any]:
    """The documented FD difference of ``mode`` from exact for ``extractor`` (see :data:`FAST_VS_EXACT`)."""
    if mode in EXACT_MODES:
        return {"fd_rel": 0.0, "note": "exact is the protocol's numerics (float32-accurate; on CUDA DINOv2's "
                                       "matmuls by 3xTF32, see fd_eval.core.splitmm); fp32 is IEEE float32"}
    if mode == "fp8":
        basis = extractor if extractor in FP8_VS_EXACT else next(iter(FP8_VS_EXACT), None)
        if basis is None:
            return {"fd_rel": None, "note": "not measured for this extractor"}
        return {**FP8_VS_EXACT[basis], "measured_on": basis, "note": _MEASUREMENT_NOTE}
    m = FAST_VS_EXACT.get(extractor)
    basis = extractor
    if m is None:  # nearest measured model of the family
        family = [k for k in FAST_VS_EXACT if k.split("-")[0] == extractor.split("-")[0]]
        basis = max(family, key=lambda k: FAST_VS_EXACT[k].get("fd_rel_mixed_max", 0.0)) if family else None
        m = FAST_VS_EXACT.get(basis) if basis else None
    if m is None:
        return {"fd_rel": None, "note": "not measured for this extractor"}
    return {**m, "measured_on": basis, "note": _MEASUREMENT_NOTE}


def precision_provenance(extractors: Any, device: torch.device | str | None = None) -> dict[str, Any]:
    """``provenance["precision"]``: the mode, what it means here, and the documented expected FD difference."""
    exs = list(extractors)
    modes = sorted({ex.precision.mode for ex in exs})
    dev = torch.device(device) if device is not None else (exs[0].device if exs else torch.device("cpu"))
    out: dict[str, Any] = {"mode": modes[0] if len(modes) == 1 else modes}
    for ex in exs:
        p = ex.precision
        rec = {**p.to_dict(ex.fast_compute), "compile": ex.compile_status(), "channels_last": ex.channels_last,
               "expected_fd_difference_vs_exact": expected_difference(p.mode, ex.name)}
        describe = getattr(ex, "matmul_description", None)  # DINOv2: which matmul path ran
        if describe is not None:
            rec["matmul"] = describe()
        if p.mode in EXACT_MODES and dev.type == "cuda":
            gap = REFERENCE_GPU_DEFAULT_VS_EXACT.get(ex.name)
            size = (f" (measured with random weights: FD within {100 * gap['fd_rel_same_max']:.2g}% of exact)"
                    if gap else "")
            rec["note"] = ("float32-accurate (TF32 off, or 3xTF32 split matmuls: see 'matmul'): matches the "
                           "reference implementations run on a CPU or with TF32 disabled; as run by default on "
                           f"Ampere+ GPUs they use TF32 convolutions{size}")
        out[ex.name] = rec
    return out
