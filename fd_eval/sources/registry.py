"""The source-format registry: which :class:`ImageSource` class opens a spec string.

A format is a :class:`SourceFormat` (a name, a ``claims(spec)`` test, an ``open(spec, options)`` function, an
``order``). :func:`fd_eval.sources.open_source` asks the registered formats in ``order`` and opens the spec with the
first that claims it; a new format is one module that calls :func:`register_format` (this module imports no format,
so formats and :mod:`.opening` both import it without a circle). Arrays and :class:`ImageSource` objects are
handled by ``open_source`` itself, before the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .base import ImageSource


@dataclass(frozen=True)
class OpenOptions:
    """What ``open_source`` passes every format.

    ``common``: the :class:`ImageSource` keyword arguments (``skip_bad``, ``max_image_pixels``, ``max_item_bytes``);
    ``npz_key``: the array inside an ``.npz``; ``image_column``/``key_column``: Parquet columns (None: found by type
    / name); ``offline``: refuse remote sources (None: :func:`fd_eval.util.download.offline_mode`).
    """

    common: dict[str, Any] = field(default_factory=dict)
    npz_key: str = "arr_0"
    image_column: str | None = None
    key_column: str | None = None
    offline: bool | None = None


@dataclass(frozen=True)
class SourceFormat:
    """One input format.

    Attributes:
        name: short name (``"directory"``, ``"tar"``, ``"remote"``, ``"parquet"``...), for messages and docs.
        claims: ``claims(spec) -> bool``: whether this format opens the spec string (cheap: a suffix, a stat).
        open: ``open(spec, options) -> ImageSource``; raises :class:`fd_eval.errors.SourceError` for what it
            claimed but cannot open.
        order: formats are asked in ascending order (remote URLs first, then file types, then patterns).
        describe: one line for the unknown-format error and the docs.
    """

    name: str
    claims: Callable[[str], bool]
    open: Callable[[str, OpenOptions], "ImageSource"]
    order: int = 100
    describe: str = ""


_FORMATS: dict[str, SourceFormat] = {}


def register_format(fmt: SourceFormat, *, replace: bool = False) -> SourceFormat:
    """Add ``fmt`` to the registry (``replace``: allow re-registering a name, e.g. in tests)."""
    if fmt.name in _FORMATS and not replace:
        raise ValueError(f"source format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def source_formats() -> list[SourceFormat]:
    """The registered formats in the order ``open_source`` asks them."""
    return sorted(_FORMATS.values(), key=lambda f: (f.order, f.name))


def find_format(spec: str) -> SourceFormat | None:
    """The first registered format that claims ``spec``, or None."""
    return next((f for f in source_formats() if f.claims(spec)), None)
