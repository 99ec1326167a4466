"""Feature extractors: one module per backbone family, registered by name."""
from .base import (
    ALIASES,
    DEFAULT_EXTRACTOR,
    Extractor,
    ExtractorEntry,
    extractor_entry,
    list_extractors,
    load_extractor,
    register_extractor,
    resolve_name,
)

__all__ = [
    "ALIASES", "DEFAULT_EXTRACTOR", "Extractor", "ExtractorEntry", "extractor_entry", "list_extractors",
    "load_extractor", "register_extractor", "resolve_name",
]
