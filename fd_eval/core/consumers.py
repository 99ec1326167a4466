"""Consumers of feature batches that declare their state (torchmetrics' ``add_state``, for a streaming engine).

A consumer is fed ``update(features, index)`` by the extraction loop (features (B, D) float32 on the run's
device, index (B,) int64 source positions; see :class:`fd_eval.run.pipeline.FeatureConsumer`). It declares each piece
of its state once, with the rule that merges two partial states exactly::

    class SumOfSquares(Consumer):
        uses_index = False                       # the loop need not move indices to the device for it

        def __init__(self, dim, device="cpu"):
            super().__init__(device)
            self.add_state("n", 0, merge="sum")                                   # a Python int: no host sync
            self.add_state("total", torch.zeros(dim, dtype=torch.float64), merge="sum")

        def update(self, features, index):
            self.n += features.shape[0]
            self.total += features.double().square().sum(0)

and gets from this base: :meth:`reset`, :meth:`fresh` (same configuration, empty state: one per checkpoint
unit), :meth:`state_dict` / :meth:`load_state_dict` (flat ``name -> CPU tensor`` plus small JSON-able scalars:
what a safetensors unit file holds), :meth:`merge` (exact; the order is the caller's: the engine merges units in
unit order and ranks in rank order) and :func:`merge_over_ranks` (a collective: every rank gets every rank's state
merged in rank order, bit-identical on every rank; nothing pickled).

Merge rules (``merge=``): ``"sum"``, ``"min"``, ``"max"``, ``"cat"`` (rows concatenated along dim 0; the state
is a list of tensors, the default its empty ``(0, ...)`` template), ``"topk"`` (packed int64 lists (Q, K), best
K of both per row: :func:`merge_topk`), or a callable ``(mine, theirs) -> merged`` of one state. States whose
merge depends on each other (Chan's update reads both counts) are merged together by
:meth:`Consumer.add_joint_merge`.
Consumers made of parts (the copies consumer: a top-K search and a C_T cell search) register them with
:meth:`Consumer.add_child`; the parts' states appear under a prefix in the parent's state dict.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import FDEvalError

MERGE_RULES = ("sum", "min", "max", "cat", "topk")
Scalar = int | float | bool


def merge_topk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact merge of two packed top-K lists (Q, K) int64 kept over disjoint parts of the data -> (Q, K), as one
    pass over both parts would have kept (sorted: best first; see :func:`fd_eval.metrics.copies.pack`)."""
    if a.shape != b.shape:
        raise FDEvalError(f"cannot merge top-K lists of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.cat([a, b], 1).topk(a.shape[1], dim=1).values


def _merge_one(rule: str | Callable, a: Any, b: Any) -> Any:
    if callable(rule):
        return rule(a, b)
    if rule == "sum":
        return a + (b.to(a.device) if isinstance(b, torch.Tensor) else b)
    if rule == "min":
        return torch.minimum(a, b.to(a.device)) if isinstance(a, torch.Tensor) else min(a, b)
    if rule == "max":
        return torch.maximum(a, b.to(a.device)) if isinstance(a, torch.Tensor) else max(a, b)
    if rule == "cat":
        return a + [t.to(a[0].device if a else t.device) for t in b]
    if rule == "topk":
        return merge_topk(a, b.to(a.device))
    raise FDEvalError(f"unknown merge rule {rule!r}")


@dataclass(frozen=True)
class StateSpec:
    """One declared piece of a consumer's state.

    default: a tensor (cloned by :meth:`Consumer.reset`; for ``"cat"`` the empty (0, ...) row template), or a
    Python int/float/bool. merge: a rule of :data:`MERGE_RULES` or a callable (ignored for states
    of a joint merge, :meth:`Consumer.add_joint_merge`). persistent: in
    :meth:`Consumer.state_dict` (and merged over ranks); non-persistent states are still merged between units.
    as_tensor: a scalar saved as a (1,) tensor (int64 / float64) instead of a JSON value.
    """

    name: str
    default: Any
    merge: str | Callable
    persistent: bool = True
    as_tensor: bool = False


class Consumer:
    """Base of the feature consumers (see the module docstring). Subclasses call ``super().__init__(device)``,
    declare their states with :meth:`add_state` (they become attributes) and implement :meth:`update`."""

    uses_index: bool = True  # False: update() ignores ``index`` (the loop then leaves it on the host)

    def __init__(self, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._specs: dict[str, StateSpec] = {}
        self._joint: list[tuple[tuple[str, ...], Callable]] = []
        self._children: dict[str, str] = {}  # attribute -> state-name prefix

    # --- declaration -------------------------------------------------------------------------------------------
    def add_state(self, name: str, default: Any, merge: str | Callable = "sum", *, persistent: bool = True,
                  as_tensor: bool = False) -> None:
        """Declare state ``name`` (set as an attribute, holding ``default``) merged by ``merge``."""
        if not callable(merge) and merge not in MERGE_RULES:
            raise FDEvalError(f"state {name!r}: merge must be one of {MERGE_RULES} or a callable, got {merge!r}")
        if name in self._specs or name.startswith("_"):
            raise FDEvalError(f"state {name!r} is declared twice or starts with '_'")
        if merge == "cat" and not (isinstance(default, torch.Tensor) and default.ndim >= 1 and default.shape[0] == 0):
            raise FDEvalError(f"state {name!r}: a 'cat' state's default is its empty (0, ...) row template")
        if isinstance(default, torch.Tensor):
            default = default.to(self.device)
        self._specs[name] = StateSpec(name, default, merge, persistent, as_tensor)
        setattr(self, name, self._default(self._specs[name]))

    def add_joint_merge(self, names: Sequence[str], fn: Callable[[dict, dict], dict]) -> None:
        """Merge the declared states ``names`` together: ``fn(mine, theirs) -> merged`` on {name: value} dicts
        (for rules that read several states, e.g. Chan's update of (n, mean, M2))."""
        missing = [n for n in names if n not in self._specs]
        if missing:
            raise FDEvalError(f"add_joint_merge: states {missing} are not declared")
        self._joint.append((tuple(names), fn))

    def add_child(self, attr: str, child: "Consumer | None", prefix: str) -> None:
        """A part with its own declared state, kept as attribute ``attr`` (None: absent), its states named
        ``prefix + name`` in this consumer's state dict. Not fed by the base: :meth:`update` calls it."""
        setattr(self, attr, child)
        if child is not None:
            self._children[attr] = prefix

    @staticmethod
    def _default(spec: StateSpec) -> Any:
        if spec.merge == "cat":
            return []
        return spec.default.clone() if isinstance(spec.default, torch.Tensor) else spec.default

    def _kids(self) -> list[tuple[str, str, "Consumer"]]:
        return [(a, p, getattr(self, a)) for a, p in self._children.items() if getattr(self, a) is not None]

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Every declared state back to its default (children too)."""
        for spec in self._specs.values():
            setattr(self, spec.name, self._default(spec))
        for _, _, c in self._kids():
            c.reset()

    def fresh(self) -> "Consumer":
        """A copy with the same configuration (large inputs such as queries shared, not copied) and an empty
        state: the engine makes one per checkpoint unit."""
        c = copy.copy(self)
        for a, _, child in self._kids():
            setattr(c, a, child.fresh())
        for spec in self._specs.values():
            setattr(c, spec.name, self._default(spec))
        return c

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        raise NotImplementedError

    def to(self, device: str | torch.device) -> "Consumer":
        self.device = torch.device(device)
        self._specs = {n: StateSpec(n, s.default.to(self.device) if isinstance(s.default, torch.Tensor) else s.default,
                                    s.merge, s.persistent, s.as_tensor) for n, s in self._specs.items()}
        for spec in self._specs.values():
            v = getattr(self, spec.name)
            if isinstance(v, torch.Tensor):
                setattr(self, spec.name, v.to(self.device))
            elif isinstance(v, list):
                setattr(self, spec.name, [t.to(self.device) for t in v])
        for _, _, c in self._kids():
            c.to(device)
        return self

    def cat_state(self, name: str) -> torch.Tensor:
        """A ``"cat"`` state's rows as one tensor (joined once and kept joined; the empty template when none)."""
        v = getattr(self, name)
        if not v:
            return self._specs[name].default.clone()
        if len(v) > 1:
            setattr(self, name, [torch.cat(v)])
        return getattr(self, name)[0]

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """{name: CPU tensor or JSON-able scalar} of the persistent states (children's under their prefix)."""
        out: dict[str, Any] = {}
        for spec in self._specs.values():
            if not spec.persistent:
                continue
            v = self.cat_state(spec.name) if isinstance(getattr(self, spec.name), list) else getattr(self, spec.name)
            if isinstance(v, torch.Tensor):
                out[spec.name] = v.cpu()
            elif spec.as_tensor:
                out[spec.name] = torch.tensor([v], dtype=torch.float64 if isinstance(v, float) else torch.int64)
            else:
                out[spec.name] = v
        for _, prefix, c in self._kids():
            out.update({prefix + k: v for k, v in c.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises ``ValueError`` naming the state whose name, dtype or shape does not
        match this consumer's declaration (a damaged file or another configuration)."""
        want = set(self.state_dict())
        if set(state) != want:
            raise ValueError(f"states {sorted(state)} do not match the consumer's {sorted(want)}")
        for spec in self._specs.values():
            if not spec.persistent:
                continue
            setattr(self, spec.name, self._load_one(spec, state[spec.name]))
        for _, prefix, c in self._kids():
            c.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                               and k[len(prefix):] in c.state_dict()})

    def _load_one(self, spec: StateSpec, v: Any) -> Any:
        d = spec.default
        if isinstance(d, torch.Tensor):
            t = torch.as_tensor(v)
            ok = t.dtype == d.dtype and (t.shape[1:] == d.shape[1:] if spec.merge == "cat" else t.shape == d.shape)
            if not ok:
                raise ValueError(f"state {spec.name!r}: {t.dtype} {tuple(t.shape)}, expected {d.dtype} "
                                 f"{tuple(d.shape)}")
            t = t.to(self.device)
            return [t] if spec.merge == "cat" else t
        if spec.as_tensor:
            t = torch.as_tensor(v)
            if t.numel() != 1:
                raise ValueError(f"state {spec.name!r}: expected one value, got shape {tuple(t.shape)}")
            return type(d)(t.reshape(-1)[0].item())
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"state {spec.name!r}: expected a number, got {v!r}")
        return type(d)(v)

    # --- merging -----------------------------------------------------------------------------------------------
    def merge(self, other: "Consumer") -> "Consumer":
        """Fold ``other`` (the same kind of consumer, over a disjoint part of the data) into ``self``, in place;
        returns self. Exact; merging parts in the same order always gives the same bits."""
        joint = {n for names, _ in self._joint for n in names}
        for spec in self._specs.values():
            if spec.name not in joint:
                setattr(self, spec.name, _merge_one(spec.merge, getattr(self, spec.name), getattr(other, spec.name)))
        for names, fn in self._joint:
            merged = fn({n: getattr(self, n) for n in names}, {n: getattr(other, n) for n in names})
            for n in names:
                setattr(self, n, merged[n])
        for a, _, c in self._kids():
            o = getattr(other, a)
            if o is not None:
                c.merge(o)
        return self


# --- over ranks ---------------------------------------------------------------------------------------------------
def _describe(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ({"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)} if isinstance(v, torch.Tensor)
                else {"value": v}) for k, v in state.items()}


def merge_over_ranks(consumers: Sequence[Consumer], group: Any = None,
                     device: torch.device | None = None) -> list[Consumer]:
    """Collective: per consumer, a :meth:`~Consumer.fresh` copy holding every rank's state merged in rank order
    (bit-identical on every rank; the inputs are not modified). One rank's tensors are broadcast at a time, so
    memory stays that of two states whatever the world size; scalars and shapes travel as JSON. ``device``:
    where NCCL tensors go (default: the consumers' device)."""
    import torch.distributed as dist

    from ..run.distributed import _global_rank, all_gather_json, comm_device, get_rank, get_world_size

    world, me = get_world_size(group), get_rank(group)
    mine = [c.state_dict() for c in consumers]
    tables = all_gather_json([_describe(s) for s in mine], group)  # tables[rank][consumer][name]
    out = []
    for j, c in enumerate(consumers):
        cd = comm_device(group, prefer=device or c.device)
        merged = c.fresh()
        for r in range(world):
            got: dict[str, Any] = {}
            for name, info in tables[r][j].items():  # the same order on every rank: rank r's table
                if "value" in info:
                    got[name] = info["value"]
                    continue
                dtype = getattr(torch, info["dtype"])
                if r == me:
                    buf = mine[j][name].to(cd).contiguous()
                else:
                    buf = torch.empty(info["shape"], dtype=dtype, device=cd)
                if buf.numel():
                    dist.broadcast(buf, src=_global_rank(group, r), group=group)
                got[name] = buf
            part = c.fresh()
            part.load_state_dict(got)
            merged.merge(part)
        out.append(merged)
    return out


def state_header(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a :meth:`Consumer.state_dict` into (tensors, JSON-able scalars): a safetensors file's two parts."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    json.dumps(scalars)  # fails early for a state that is neither
    return tensors, scalars


# --- metrics computed by a consumer: one registration, every path -------------------------------------------------
@dataclass(frozen=True)
class ConsumerMetric:
    """A metric computed in the one pass over the features by a :class:`Consumer`.

    Registered once (:func:`register_consumer_metric`), it runs wherever the moments run: ``compute``/``stats``
    (its value in each statistics' ``metadata["metrics"][name]`` and in ``compute_fd``'s
    ``results[model]["metrics"][name]``), resumable ``build_stats`` (its state saved in every unit file),
    :class:`fd_eval.FDMetric` (``compute()``'s ``results[model]["metrics"]``, its state in ``state_dict``) and
    torchrun (merged over ranks by its declared rules).

    name: the result key. make(extractor, device): a fresh consumer for one extractor's features. result(merged
    consumer): a JSON-able value. applies(extractor): whether it runs for that extractor (default: all).
    """

    name: str
    make: Callable[[Any, torch.device], Consumer]
    result: Callable[[Any], Any]
    applies: Callable[[Any], bool] = lambda ex: True


CONSUMER_METRICS: dict[str, ConsumerMetric] = {}


def register_consumer_metric(metric: ConsumerMetric) -> ConsumerMetric:
    """Add ``metric`` to every run (see :class:`ConsumerMetric`); returns it. A name registered twice is an error."""
    if not metric.name.isidentifier():
        raise FDEvalError(f"a consumer metric's name is an identifier (it names saved states), got {metric.name!r}")
    if metric.name in CONSUMER_METRICS and CONSUMER_METRICS[metric.name] is not metric:
        raise FDEvalError(f"consumer metric {metric.name!r} is already registered")
    CONSUMER_METRICS[metric.name] = metric
    return metric


def unregister_consumer_metric(name: str) -> None:
    CONSUMER_METRICS.pop(name, None)


def metric_consumers(extractors: Sequence[Any], device: torch.device) -> list[dict[str, Consumer]]:
    """Per extractor, ``{metric name: fresh consumer}`` of the registered metrics that apply to it."""
    return [{m.name: m.make(ex, device) for m in CONSUMER_METRICS.values() if m.applies(ex)} for ex in extractors]


def metric_results(consumers: Mapping[str, Consumer]) -> dict[str, Any]:
    """``{metric name: value}`` of one extractor's merged metric consumers."""
    return {name: CONSUMER_METRICS[name].result(c) for name, c in consumers.items()}
