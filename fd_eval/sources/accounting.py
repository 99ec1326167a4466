"""What happened to every candidate entry of an image source: used, skipped (no usable image: a bad image, a null
Parquet image) or ignored (never indexed: not an image entry).

Invariant: ``found == used + len(skipped) + sum(ignored.values()) + not_selected``. Every run records one
:class:`InputAccounting` per image source (statistics metadata ``["source"]["inputs"]``, ``EvalResult.to_dict()
["inputs"]``) and the CLI prints its :meth:`~InputAccounting.summary` line, so no input is dropped unlisted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .base import ImageSource, SkippedItem

MAX_LISTED = 20  # items kept per ignore reason (the counts are always complete)


@dataclass
class InputAccounting:
    """Counts and lists for one image source.

    Attributes:
        spec: the source as given.
        found: candidate entries: indexed images plus ignored entries (files, members, folders).
        used: images whose features entered the statistics.
        skipped: entries with no usable image, one dict per item (``index``, ``name``, ``reason``, ``message``):
            the source's ``skipped_at_open`` (a null Parquet image, ``index`` None; listed with or without
            ``--skip-bad``), then the indexed images that did not decode (``--skip-bad``).
        ignored: entries never indexed, counted by reason (e.g. ``"not an image file extension": 3``).
        ignored_items: the first :data:`MAX_LISTED` entry names per reason.
        not_selected: indexed images left out by ``num`` (a subset), not a loss.
        warnings: one-line notes about odd but usable input (absolute tar member names, a cut-off shard).
        per_shard: tar shards (local or streamed): the same counts per shard (``shard``, ``found``, ``used``,
            ``skipped``, ``ignored``, ``not_selected``), in shard order; None for other sources.
    """

    spec: str
    found: int
    used: int
    skipped: list[dict[str, Any]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    ignored_items: dict[str, list[str]] = field(default_factory=dict)
    not_selected: int = 0
    warnings: list[str] = field(default_factory=list)
    per_shard: list[dict[str, Any]] | None = None

    @classmethod
    def build(cls, source: ImageSource, skipped: Iterable[SkippedItem | Mapping[str, Any]], used: int,
              n_total: int | None = None) -> "InputAccounting":
        """From an opened source (a subset counts its parent's other images as ``not_selected``), the extraction's
        skipped items and the number of images used. ``n_total``: indexed images of the whole source (default: the
        source's, or its parent's for a subset)."""
        parent = getattr(source, "parent", None)
        indexed = n_total if n_total is not None else len(parent if parent is not None else source)
        ignored: dict[str, int] = {}
        items: dict[str, list[str]] = {}
        for s in source.ignored:
            ignored[s.reason] = ignored.get(s.reason, 0) + 1
            lst = items.setdefault(s.reason, [])
            if len(lst) < MAX_LISTED:
                lst.append(s.name)
        at_open = list(getattr(source, "skipped_at_open", []))
        sk = [s.to_dict() if isinstance(s, SkippedItem) else dict(s) for s in [*at_open, *skipped]]
        return cls(str(source.spec), indexed + len(source.ignored) + len(at_open), int(used), sk, ignored, items,
                   indexed - len(source), list(source.warnings), shard_counts(source, sk[len(at_open):]))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputAccounting":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self, label: str | None = None) -> str:
        """One line, e.g. ``generated samples/: 1,000 found, 998 used, 1 skipped (corrupt), 1 ignored (not an image
        file extension: 1)``."""
        parts = [f"{self.found:,} found", f"{self.used:,} used"]
        if self.not_selected:
            parts.append(f"{self.not_selected:,} not selected (--num)")
        if self.skipped:
            reasons: dict[str, int] = {}
            for s in self.skipped:
                r = short_reason(str(s.get("reason", "")))
                reasons[r] = reasons.get(r, 0) + 1
            why = ", ".join(f"{k}: {v:,}" if len(reasons) > 1 else k for k, v in reasons.items())
            parts.append(f"{len(self.skipped):,} skipped ({why})")
        n_ign = sum(self.ignored.values())
        if n_ign:
            parts.append(f"{n_ign:,} ignored ({', '.join(f'{k}: {v:,}' for k, v in self.ignored.items())})")
        return f"{label + ' ' if label else ''}{self.spec}: " + ", ".join(parts)

    def listing(self, limit: int = MAX_LISTED) -> list[str]:
        """Lines naming the skipped items (first ``limit``) and the ignored entries (first few per reason)."""
        out = [f"skipped {s['name']}: {s['reason']}" for s in self.skipped[:limit]]
        if len(self.skipped) > limit:
            out.append(f"... and {len(self.skipped) - limit:,} more skipped (see --json)")
        for reason, names in self.ignored_items.items():
            n = self.ignored.get(reason, len(names))
            shown = ", ".join(names[:3])
            more = f" and {n - 3:,} more" if n > 3 else ""
            out.append(f"ignored ({reason}): {shown}{more}")
        return out


def short_reason(reason: str) -> str:
    """The kind of a skip reason, for counting (``"corrupt image data (OSError: ...)"`` -> ``"corrupt"``)."""
    low = reason.lower()
    for key in ("truncated", "corrupt", "empty file", "too many pixels", "not an image", "exceeds the per-item limit",
                "cannot read"):
        if key in low:
            return {"too many pixels": "too many pixels", "not an image": "not an image",
                    "exceeds the per-item limit": "too large"}.get(key, key)
    return reason.split(" (")[0][:60]


def shard_counts(source: ImageSource, skipped: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per tar shard of ``source`` (or of its parent, for a subset): found, used, skipped (the extraction's
    ``skipped`` plus the source's ``skipped_at_open``), ignored, not selected; items are matched to shards by name
    (``shard.tar:member``, or the shard itself when it was unreadable)."""
    parent = getattr(source, "parent", None) or source
    shards, starts = getattr(parent, "shards", None), getattr(parent, "shard_starts", None)
    if not isinstance(shards, list) or starts is None or not all(str(x).lower().endswith(".tar") for x in shards):
        return None
    pos = {str(x): k for k, x in enumerate(shards)}

    def shard(name: str) -> int | None:
        head = name if name.lower().endswith(".tar") else name.rsplit(".tar:", 1)[0] + ".tar"
        return pos.get(head)

    indexed = np.diff(np.asarray(starts)).astype(np.int64)
    selection = getattr(source, "indices", None) if parent is not source else None
    selected = indexed.copy() if selection is None else np.bincount(parent.shard_of(selection), minlength=len(shards))
    n_skipped, n_ignored, n_open = (np.zeros(len(shards), np.int64) for _ in range(3))
    for counts, names in ((n_skipped, [str(s.get("name", "")) for s in skipped]),
                          (n_ignored, [s.name for s in parent.ignored]),
                          (n_open, [s.name for s in getattr(parent, "skipped_at_open", [])])):
        for name in names:
            k = shard(name)
            if k is not None:
                counts[k] += 1
    return [{"shard": str(x), "found": int(indexed[k] + n_ignored[k] + n_open[k]),
             "used": int(selected[k] - n_skipped[k]), "skipped": int(n_skipped[k] + n_open[k]),
             "ignored": int(n_ignored[k]), "not_selected": int(indexed[k] - selected[k])} for k, x in enumerate(shards)]
