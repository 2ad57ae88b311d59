"""``KVPackingRouter``: a Ray Serve request router that packs requests by their post-pruning KV footprint.

Every replica reports its KV pool and its running mean kept fraction per layer
(:func:`zipvl_ray.routing.replica_stats.routing_stats`); every request carries
:class:`~zipvl_ray.routing.footprint.RoutingHints`. For each request and replica the router predicts
the bytes the request will hold *after* ZipVL pruning, decode growth included
(:func:`~zipvl_ray.routing.footprint.predict_request_bytes`), then ranks the replicas:

- ``pack`` (default): best fit, i.e. the fullest replica (least free KV) that still fits the request, so
  load concentrates and idle replicas can be scaled down; when none fits, the one with the most free KV.
  Ties go to the replica seen first (Serve stops the newest replicas first on downscale).
- ``spread``: the replica with the most free KV (latency first).

Replica stats arrive seconds late, so the router reserves the predicted bytes on its first choice inside
``choose_replicas`` (*select and reserve*, keyed by the internal request id), moves the hold in
``on_request_routed`` to the replica Serve actually used, releases it in ``on_request_completed`` and
expires holds of requests that never completed. A hold routed before a replica's stats snapshot is
*covered* by that snapshot: the replica's committed bytes are
``max(reported committed bytes, covered holds) + uncovered holds``. The ranking itself is plain Python
(:func:`rank_replicas`, :class:`HoldTable`) so the simulation in ``benchmarks/router_sim.py`` runs the
same code.

Configure it per deployment::

    request_router_config:
      request_router_class: zipvl_ray.routing.router:KVPackingRouter
      request_router_kwargs: {strategy: pack, max_queue_len: 8}
      request_routing_stats_period_s: 1

Each process holding a handle (every ingress replica, every proxy) runs its own router instance, so
reservations are per process; the replicas' stats reconcile them within one stats period.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from zipvl_ray.routing.footprint import (
    KVProfile,
    RoutingHints,
    predict_request_bytes,
    predict_request_bytes_many,
)
from zipvl_ray.routing.replica_stats import profile_from_routing_stats

logger = logging.getLogger(__name__)

ROUTING_HINTS_KWARG = "routing_hints"
"""Keyword argument of the LLM deployment's request method that carries ``RoutingHints.to_dict()``."""

StatsState = Literal["fresh", "stale", "missing"]


class KVRouterConfig(BaseModel):
    """Knobs of :class:`KVPackingRouter`, given as ``request_router_kwargs`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["pack", "spread"] = Field(
        default="pack",
        description="pack: best fit by free KV (concentrate load, let idle replicas scale down); "
        "spread: most free KV first (latency first).",
    )
    max_fill_fraction: float = Field(
        default=0.95,
        gt=0.0,
        le=1.0,
        description="A request fits a replica when committed + predicted bytes stay within this fraction of "
        "its KV capacity; the rest is slack for prediction error.",
    )
    max_queue_len: int = Field(
        default=8,
        ge=0,
        description="Queue guard: a replica whose queue (reported waiting requests plus requests routed to "
        "it since its last snapshot) exceeds this is ranked last, whatever its free KV.",
    )
    stats_stale_after_s: float = Field(
        default=5.0,
        gt=0.0,
        description="A snapshot older than this is stale: its used bytes are trusted no more than as a "
        "floor and every reservation is added on top (conservative). Keep it a few times "
        "request_routing_stats_period_s.",
    )
    coverage_margin_s: float = Field(
        default=0.25,
        ge=0.0,
        description="A reservation routed at t counts as included in a snapshot taken after t + this "
        "margin (send latency, admission, clock skew).",
    )
    hold_ttl_s: float = Field(
        default=900.0,
        gt=0.0,
        description="A routed request's hold is dropped this long after routing even if "
        "on_request_completed never came (longest expected request).",
    )
    pending_hold_ttl_s: float = Field(
        default=30.0,
        gt=0.0,
        description="A hold made in choose_replicas but never confirmed by on_request_routed (request "
        "cancelled, or rejected and not retried) is dropped after this long; retries refresh it.",
    )
    fallback_prompt_tokens: int = Field(
        default=4096,
        ge=1,
        description="Prompt tokens assumed for a request that carries no routing hints.",
    )
    fallback_max_tokens: int = Field(
        default=256,
        ge=0,
        description="max_tokens assumed for a request that carries no routing hints.",
    )
    hold_when_saturated: bool = Field(
        default=True,
        description="When every replica is over the queue guard, send nothing: Serve backs off and asks "
        "again (every 0.5 s at most), so the request waits at the handle and goes to whichever replica frees "
        "up or starts first, instead of joining one replica's FIFO queue for good.",
    )
    sweep_interval_s: float = Field(
        default=1.0,
        ge=0.0,
        description="Expired holds are swept at most this often (on the routing path).",
    )
    kv_routed_methods: tuple[str, ...] = Field(
        default=("generate", "__call__"),
        description="Handle methods packed by KV footprint. Calls to any other method (health pings, stats) "
        "go to any replica, with no reservation and no queue guard.",
    )


@dataclass(slots=True)
class RouterCounters:
    """What the router decided since it started (exported by telemetry as counters).

    Attributes
    ----------
    decisions : int
        ``choose_replicas`` calls for a request.
    retries : int
        Of those, calls for a request that already had a hold (all ranks were busy, Serve called again).
    fits, overflow : int
        Decisions whose first choice fits the request / where no replica fits (most-free first).
    no_kv_info : int
        Decisions taken with no replica reporting KV stats (ranked by held requests, spreading).
    stale_replica_views, missing_replica_views : int
        Replica views built from stale / missing stats (one per replica per decision).
    queue_guard_demotions : int
        Replicas moved to the last ranks by the queue guard (one per replica per decision).
    missing_hints : int
        Requests without usable routing hints (the fallback hints were used).
    held_back : int
        Decisions that sent nothing because every replica was over the queue guard
        (``hold_when_saturated``); the request waits at the handle and Serve asks again.
    reservations, moved, routed, released, expired, dropped_dead : int
        Holds created; moved to another replica on routing; confirmed on routing; released on
        completion; dropped by TTL; dropped because their replica left or died.
    released_by_result : int
        Of ``released``, holds released by their accepted attempt's result (the rest by
        ``on_request_completed``, for results that take no callback).
    chosen_rank : dict[int, int]
        Position, in the router's own ranking, of the replica Serve routed to -> count (0 = first choice).
    predicted_bytes_total : int
        Sum of the first choice's predicted bytes over decisions.
    errors : int
        Decisions in which the router itself raised; the request went to Serve's candidates unranked
        (an exception inside ``choose_replicas`` would leave it waiting forever).
    prompt_tokens_total, image_tokens_total, max_tokens_total : int
        Sums of the prediction inputs over decisions.
    """

    decisions: int = 0
    retries: int = 0
    fits: int = 0
    overflow: int = 0
    no_kv_info: int = 0
    stale_replica_views: int = 0
    missing_replica_views: int = 0
    queue_guard_demotions: int = 0
    missing_hints: int = 0
    held_back: int = 0
    reservations: int = 0
    moved: int = 0
    routed: int = 0
    released: int = 0
    expired: int = 0
    dropped_dead: int = 0
    released_by_result: int = 0
    chosen_rank: dict[int, int] = field(default_factory=dict)
    predicted_bytes_total: int = 0
    prompt_tokens_total: int = 0
    image_tokens_total: int = 0
    max_tokens_total: int = 0
    errors: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Hold:
    """Predicted bytes reserved for one request on one replica.

    Attributes
    ----------
    request_id : str
        Serve's internal request id.
    replica : Hashable
        The replica holding it (a ``ReplicaID`` in Serve, any key in the simulation).
    nbytes : int
        Predicted bytes on that replica.
    reserved_at : float
        When ``choose_replicas`` last reserved it (refreshed on every retry).
    routed_at : float or None
        When ``on_request_routed`` confirmed it; ``None`` while only chosen.
    hints : RoutingHints
        The request's hints, to re-predict when the hold moves.
    ranking : tuple
        The router's ranking at decision time (to record the chosen rank).
    predicted : dict
        Predicted bytes on every ranked replica at decision time (to re-size a moved hold).
    abandoned : callable or None
        While only chosen: whether the caller gave up on the request (Serve cancels its future and calls
        no hook); such holds are dropped at the next sweep. Cleared once routed.
    tied_to_result : bool
        Routed, and released by the accepted attempt's own result when it finishes (a done-callback
        on the ``ReplicaResult`` Serve passed to ``on_request_routed``), not by ``on_request_completed``,
        which carries no attempt id and also fires for attempts the same replica rejected.
    """

    request_id: str
    replica: Hashable
    nbytes: int
    reserved_at: float
    routed_at: float | None = None
    hints: RoutingHints | None = None
    ranking: tuple = ()
    predicted: dict = field(default_factory=dict)
    abandoned: Callable[[], bool] | None = None
    tied_to_result: bool = False


@dataclass(frozen=True, slots=True)
class HeldTotals:
    """A replica's holds split by whether a stats snapshot already includes them.

    Attributes
    ----------
    covered_bytes : int
        Holds routed before the snapshot (plus margin): the snapshot should contain them.
    uncovered_bytes, uncovered_count : int
        Holds chosen or routed after it: the snapshot cannot contain them.
    """

    covered_bytes: int = 0
    uncovered_bytes: int = 0
    uncovered_count: int = 0

    @property
    def total_bytes(self) -> int:
        return self.covered_bytes + self.uncovered_bytes


class HoldTable:
    """Reservations of predicted KV bytes, keyed by request id and grouped by replica."""

    def __init__(self) -> None:
        self._by_request: dict[str, Hold] = {}
        self._by_replica: dict[Hashable, dict[str, Hold]] = {}

    def __len__(self) -> int:
        return len(self._by_request)

    def get(self, request_id: str) -> Hold | None:
        return self._by_request.get(request_id)

    def holds_on(self, replica: Hashable) -> list[Hold]:
        return list(self._by_replica.get(replica, {}).values())

    def count_on(self, replica: Hashable) -> int:
        return len(self._by_replica.get(replica, ()))

    def bytes_per_replica(self) -> dict[Hashable, int]:
        return {r: sum(h.nbytes for h in holds.values()) for r, holds in self._by_replica.items() if holds}

    def place(
        self,
        request_id: str,
        replica: Hashable,
        nbytes: int,
        now: float,
        *,
        hints: RoutingHints | None = None,
        ranking: tuple = (),
        predicted: dict | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> tuple[Hold, bool]:
        """Reserve ``nbytes`` for ``request_id`` on ``replica`` (a re-decision replaces the old hold).

        Returns
        -------
        hold : Hold
        existed : bool
            Whether the request already had a hold (a retry).
        """
        existed = self._detach(request_id) is not None
        hold = Hold(
            request_id, replica, int(nbytes), now, None, hints, ranking, dict(predicted or {}), abandoned
        )
        self._attach(hold)
        return hold, existed

    def confirm(self, request_id: str, replica: Hashable, nbytes: int, now: float) -> tuple[Hold, bool]:
        """Mark ``request_id`` as routed to ``replica``, moving (and re-sizing) its hold if needed.

        Returns
        -------
        hold : Hold
        moved : bool
            Whether the hold was on another replica (or missing) before.
        """
        hold = self._by_request.get(request_id)
        if hold is not None and hold.replica == replica:
            hold.routed_at, hold.abandoned = now, None
            return hold, False
        if hold is not None:
            self._detach(request_id)
            hold = Hold(
                request_id,
                replica,
                int(nbytes),
                hold.reserved_at,
                now,
                hold.hints,
                hold.ranking,
                hold.predicted,
            )
        else:
            hold = Hold(request_id, replica, int(nbytes), now, now)
        self._attach(hold)
        return hold, True

    def release(
        self,
        request_id: str,
        replica: Hashable | None = None,
        *,
        routed_only: bool = False,
        untied_only: bool = False,
        only: Hold | None = None,
    ) -> Hold | None:
        """Drop ``request_id``'s hold, only if it sits on ``replica`` (when given), with ``routed_only``
        only once routed, with ``untied_only`` only if no result releases it
        (:attr:`Hold.tied_to_result`), and with ``only`` only if it is that very hold."""
        hold = self._by_request.get(request_id)
        if hold is None or (replica is not None and hold.replica != replica):
            return None
        if (routed_only and hold.routed_at is None) or (untied_only and hold.tied_to_result):
            return None
        if only is not None and hold is not only:
            return None
        return self._detach(request_id)

    def rebase(self, now: float) -> None:
        """Move timestamps later than ``now`` back to ``now`` (after the wall clock stepped back), so that
        TTLs count from here instead of from a future that is an hour away."""
        for hold in self._by_request.values():
            hold.reserved_at = min(hold.reserved_at, now)
            if hold.routed_at is not None:
                hold.routed_at = min(hold.routed_at, now)

    def expire(self, now: float, *, routed_ttl_s: float, pending_ttl_s: float) -> int:
        """Drop holds past their TTL, and chosen-only holds whose caller gave up; returns how many."""
        stale = [
            h.request_id
            for h in list(self._by_request.values())
            if (h.routed_at is not None and now - h.routed_at > routed_ttl_s)
            or (h.routed_at is None and now - h.reserved_at > pending_ttl_s)
            or (h.routed_at is None and h.abandoned is not None and h.abandoned())
        ]
        for request_id in stale:
            self._detach(request_id)
        return len(stale)

    def drop_replicas(self, replicas: Iterable[Hashable]) -> int:
        """Drop every hold on ``replicas``; returns how many."""
        dropped = 0
        for replica in list(replicas):
            for request_id in list(self._by_replica.get(replica, {})):
                self._detach(request_id)
                dropped += 1
            self._by_replica.pop(replica, None)
        return dropped

    def replicas(self) -> list[Hashable]:
        return [r for r, holds in self._by_replica.items() if holds]

    def totals(self, replica: Hashable, snapshot_time: float | None, margin_s: float) -> HeldTotals:
        """Split ``replica``'s holds into covered / uncovered by a snapshot taken at ``snapshot_time``."""
        covered = uncovered = count = 0
        for hold in self._by_replica.get(replica, {}).values():
            if (
                snapshot_time is not None
                and hold.routed_at is not None
                and hold.routed_at + margin_s <= snapshot_time
            ):
                covered += hold.nbytes
            else:
                uncovered += hold.nbytes
                count += 1
        return HeldTotals(covered, uncovered, count)

    def _attach(self, hold: Hold) -> None:
        self._by_request[hold.request_id] = hold
        self._by_replica.setdefault(hold.replica, {})[hold.request_id] = hold

    def _detach(self, request_id: str) -> Hold | None:
        hold = self._by_request.pop(request_id, None)
        if hold is not None:
            on_replica = self._by_replica.get(hold.replica)
            if on_replica is not None:
                on_replica.pop(request_id, None)
                if not on_replica:
                    del self._by_replica[hold.replica]
        return hold


@dataclass(slots=True)
class ReplicaView:
    """What the ranking knows about one replica at decision time.

    Attributes
    ----------
    key : Hashable
        The replica's id.
    profile : KVProfile or None
        Its pool geometry and kept fractions to predict with (a conservative dense profile with
        borrowed geometry when it has not reported; ``None`` when no replica has).
    stats_state : {"fresh", "stale", "missing"}
    capacity_bytes : int
        Pool size (0 when unknown).
    committed_bytes : int
        Used + promised bytes as the router believes them now, reservations included.
    queue_len : int
        Reported waiting requests plus requests sent since the snapshot.
    num_holds : int
        This router's holds on the replica.
    order : int
        When the router first saw it (smaller = older); the tie-break.
    """

    key: Hashable
    profile: KVProfile | None
    stats_state: StatsState
    capacity_bytes: int
    committed_bytes: int
    queue_len: int
    num_holds: int
    order: int


@dataclass(slots=True)
class Ranking:
    """The router's preference order for one request.

    Attributes
    ----------
    order : list[Hashable]
        Replica keys, most preferred first.
    predicted_bytes : dict[Hashable, int]
        Predicted post-pruning bytes of the request on each replica.
    fits : bool
        Whether the first choice fits (committed + predicted within ``max_fill_fraction`` of capacity).
    demoted : int
        Replicas moved last by the queue guard.
    no_kv_info : bool
        No replica had KV stats: ranked by held requests only.
    stale_demoted : int
        Of the ``demoted``, those whose stats are stale.
    """

    order: list[Hashable]
    predicted_bytes: dict[Hashable, int]
    fits: bool
    demoted: int = 0
    no_kv_info: bool = False
    stale_demoted: int = 0

    @property
    def saturated(self) -> bool:
        """Every replica is over the queue guard, none of them on a stale snapshot's word.

        A stale snapshot (a replica whose stats stopped: hung ``record_routing_stats``, a controller down)
        keeps its last ``num_waiting`` and counts every request routed since as queued; holding requests
        at the handle on that evidence could hold them for as long as the stats stay frozen. Such replicas
        still go last in the order, but they never make the router hold a request back.
        """
        return bool(self.order) and self.demoted == len(self.order) and not self.stale_demoted


def build_view(
    key: Hashable,
    profile: KVProfile | None,
    stats_time: float | None,
    holds: HoldTable,
    config: KVRouterConfig,
    now: float,
    order: int,
    fallback_profile: KVProfile | None = None,
) -> ReplicaView:
    """Combine a replica's last report with this router's holds into a :class:`ReplicaView`.

    The replica's own figure is ``reported = max(used + reserved, lifetime)``
    (:attr:`~zipvl_ray.routing.footprint.KVProfile.committed_bytes`): with the engine's committed lifetime
    it covers every running and waiting request at the end of its generation, as the holds do, including
    requests other routers (other ingress processes) sent. Fresh stats:
    ``committed = max(reported, covered holds) + uncovered holds`` (the max guards against requests
    still in flight to the replica, which its snapshot does not show yet). Stale stats (older than
    ``stats_stale_after_s``, or without a timestamp): ``reported + all holds``. Missing stats:
    ``all holds``, predicted with ``fallback_profile`` (borrowed geometry, kept fraction 1).
    """
    if profile is None:
        totals = holds.totals(key, None, config.coverage_margin_s)
        capacity = fallback_profile.capacity_bytes if fallback_profile is not None else 0
        return ReplicaView(
            key,
            fallback_profile,
            "missing",
            capacity,
            totals.total_bytes,
            totals.uncovered_count,
            totals.uncovered_count,
            order,
        )
    # A snapshot from further in the future than the staleness window is no fresher than one as old: the
    # replica's clock or this one stepped (a frozen snapshot must not read as fresh until clocks catch up).
    fresh = stats_time is not None and abs(now - stats_time) <= config.stats_stale_after_s
    # Split by the snapshot's time even when it is stale: the queue is the requests sent since it; only the
    # bytes are counted conservatively (every hold on top of the report).
    totals = holds.totals(key, stats_time, config.coverage_margin_s)
    reported = profile.committed_bytes
    if fresh:
        committed = max(reported, totals.covered_bytes) + totals.uncovered_bytes
    else:
        committed = reported + totals.total_bytes
    return ReplicaView(
        key,
        profile,
        "fresh" if fresh else "stale",
        profile.capacity_bytes,
        committed,
        profile.num_waiting + totals.uncovered_count,
        holds.count_on(key),
        order,
    )


def conservative_profile(profiles: Sequence[KVProfile]) -> KVProfile | None:
    """A profile for a replica that has not reported: the geometry of a reporting one, nothing kept out.

    Replicas of one deployment share model and pool size, so geometry is borrowed from the largest
    reported pool; the kept fraction is 1.0 (dense), an upper bound of the real footprint.
    """
    if not profiles:
        return None
    ref = max(profiles, key=lambda p: p.capacity_bytes)
    return KVProfile(
        capacity_bytes=ref.capacity_bytes,
        block_size=ref.block_size,
        block_bytes=ref.block_bytes,
        num_layers=ref.num_layers,
        kept_fraction_per_layer=[],
    )


def rank_replicas(views: Sequence[ReplicaView], hints: RoutingHints, config: KVRouterConfig) -> Ranking:
    """Order ``views`` for a request with ``hints`` (see the module docstring for the policy).

    Parameters
    ----------
    views : sequence of ReplicaView
        One per candidate replica.
    hints : RoutingHints
        The request.
    config : KVRouterConfig
        ``strategy``, ``max_fill_fraction`` and ``max_queue_len`` are used.

    Returns
    -------
    Ranking
    """
    if not views:
        return Ranking([], {}, False)
    if all(v.profile is None for v in views):
        ordered = sorted(views, key=lambda v: (v.num_holds, v.order))
        return Ranking([v.key for v in ordered], dict.fromkeys((v.key for v in views), 0), False, 0, True)

    free: dict[Hashable, float] = {}
    fits: dict[Hashable, bool] = {}
    known = [v for v in views if v.profile is not None]
    predicted: dict[Hashable, int] = dict.fromkeys((v.key for v in views), 0)
    predicted.update(
        zip(
            (v.key for v in known), predict_request_bytes_many(hints, [v.profile for v in known]), strict=True
        )
    )
    for v in views:
        free[v.key] = v.capacity_bytes * config.max_fill_fraction - v.committed_bytes
        fits[v.key] = free[v.key] - predicted[v.key] >= 0

    # Orders use the free bytes *before* the request: each replica predicts the request with its own kept
    # fractions, and ranking by what is left after it would make a replica that expects the request to be
    # small look emptier (two idle replicas would be ordered by prediction noise, not by age).
    guarded = [v for v in views if v.queue_len > config.max_queue_len]
    open_views = [v for v in views if v.queue_len <= config.max_queue_len]
    if config.strategy == "pack":
        # Replicas that never reported come after every known one that fits: their load is unknown (other
        # routers may be filling them), and best fit would otherwise favour them for their dense estimate.
        fitting = sorted(
            (v for v in open_views if fits[v.key]),
            key=lambda v: (v.stats_state == "missing", free[v.key], v.order),
        )
        overflow = sorted((v for v in open_views if not fits[v.key]), key=lambda v: (-free[v.key], v.order))
        head = fitting + overflow
    else:
        head = sorted(open_views, key=lambda v: (-free[v.key], v.queue_len, v.order))
    tail = sorted(guarded, key=lambda v: (v.queue_len, -free[v.key], v.order))
    ordered = head + tail
    return Ranking(
        order=[v.key for v in ordered],
        predicted_bytes=predicted,
        fits=fits[ordered[0].key],
        demoted=len(guarded),
        stale_demoted=sum(v.stats_state == "stale" for v in guarded),
    )


def hints_from_kwargs(kwargs: dict[str, Any] | None) -> RoutingHints | None:
    """The request's :class:`RoutingHints` from the handle call's kwargs, ``None`` when absent or invalid."""
    raw = (kwargs or {}).get(ROUTING_HINTS_KWARG)
    if isinstance(raw, RoutingHints):
        return raw if _valid_hints(raw) else None
    if not isinstance(raw, dict):
        return None
    try:
        hints = RoutingHints.from_dict(raw)
    except (TypeError, ValueError):
        return None
    if hints is None or not _valid_hints(hints):
        return None
    return hints


def _valid_hints(hints: RoutingHints) -> bool:
    """Counts are non-negative ints, overrides numbers / a bool or None (anything else would raise later,
    inside Serve's routing loop, and leave the request waiting)."""
    counts = (hints.prompt_tokens, hints.image_tokens, hints.max_tokens)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        return False
    ratios = (hints.tau, hints.max_keep_ratio)
    if not all(
        r is None or (isinstance(r, int | float) and not isinstance(r, bool) and r >= 0) for r in ratios
    ):
        return False
    return hints.zipvl_enabled is None or isinstance(hints.zipvl_enabled, bool)


class KVPackingRouter(RequestRouter):
    """Packs requests onto replicas by predicted post-pruning KV bytes, with select-and-reserve.

    Configured by :class:`KVRouterConfig` through ``request_router_kwargs``. Exposes
    :attr:`counters` (:class:`RouterCounters`) and :meth:`telemetry` for export.

    No ``FIFOMixin``: Serve hands the replica found for a request to that very request (matched by
    internal request id), which a size-aware choice needs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = KVRouterConfig()
        self.counters = RouterCounters()
        self._holds = HoldTable()
        self._first_seen: dict[ReplicaID, int] = {}
        self._next_order = 0
        self._last_sweep = -math.inf
        # Each replica's last routing-stats dict and what it parses to: a snapshot changes once per stats
        # period, and parsing and checking it for every decision cost about 40% of a decision at 64 replicas.
        self._parsed: dict[ReplicaID, tuple[Any, tuple[KVProfile | None, float | None]]] = {}
        # Serve calls the hooks on its router thread; telemetry() is read from the ingress's own loop.
        self._lock = threading.RLock()

    # ----------------------------------------------------------------- Serve hooks

    def initialize_state(self, **kwargs: Any) -> None:
        """Read ``request_router_kwargs`` (validated by :class:`KVRouterConfig`, unknown keys rejected)."""
        self.config = KVRouterConfig(**kwargs)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        with self._lock:
            self._update_locked(replicas)

    def _update_locked(self, replicas: list[RunningReplica]) -> None:
        live = {r.replica_id for r in replicas}
        for replica in replicas:
            self._order_of(replica.replica_id)
        gone = [r for r in self._holds.replicas() if r not in live]
        self.counters.dropped_dead += self._holds.drop_replicas(gone)
        for replica_id in [r for r in self._first_seen if r not in live]:
            del self._first_seen[replica_id]
        for replica_id in [r for r in self._parsed if r not in live]:
            del self._parsed[replica_id]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        with self._lock:
            self.counters.dropped_dead += self._holds.drop_replicas([replica_id])

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank ``candidate_replicas`` as singleton ranks and reserve the request on the first.

        Returns
        -------
        list of list of RunningReplica
            ``[[best], [second], ...]``: Serve tries them in order (skipping replicas at
            ``max_ongoing_requests``), then backs off and calls again. Empty when every replica is over
            the queue guard and ``hold_when_saturated``: Serve backs off and calls again.
        """
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [list(candidate_replicas)]
        # Without this Serve retries immediately, in a busy loop, when every rank is full.
        pending_request.routing_context.should_backoff = True
        if pending_request.metadata.call_method not in self.config.kv_routed_methods:
            return [list(candidate_replicas)]  # a health ping or a stats call: holds no KV
        with self._lock:
            try:
                return self._choose_locked(candidate_replicas, pending_request)
            except Exception:
                # Serve has already taken the request off its queue: an exception here would leave its
                # future unresolved for good. Route it unranked instead, and say so.
                self.counters.errors += 1
                if self.counters.errors == 1 or self.counters.errors % 1000 == 0:
                    logger.exception("KVPackingRouter failed to rank a request; routing it unranked")
                return [list(candidate_replicas)]

    def _choose_locked(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest
    ) -> list[list[RunningReplica]]:
        now = self._get_curr_time_s()
        self._maybe_sweep(now)

        hints = hints_from_kwargs(pending_request.kwargs)
        if hints is None:
            self.counters.missing_hints += 1
            hints = self._fallback_hints()
        by_key = {r.replica_id: r for r in candidate_replicas}
        request_id = pending_request.metadata.internal_request_id
        # A re-asked request (backed off, or rejected by a replica) is placed afresh: its own earlier hold
        # must not count as load in the ranking, or its first choice looks one request fuller each time.
        existed = self._holds.release(request_id) is not None
        ranking = rank_replicas(self._views(candidate_replicas, now), hints, self.config)
        if ranking.saturated and self.config.hold_when_saturated:
            self.counters.held_back += 1
            return []  # it is going nowhere yet: no hold

        first = ranking.order[0]
        self._holds.place(
            request_id,
            first,
            ranking.predicted_bytes[first],
            now,
            hints=hints,
            ranking=tuple(ranking.order),
            predicted=ranking.predicted_bytes,
            abandoned=lambda: pending_request.future.cancelled(),
        )
        c = self.counters
        c.decisions += 1
        c.retries += int(existed)
        c.reservations += int(not existed)
        c.no_kv_info += int(ranking.no_kv_info)
        c.fits += int(ranking.fits)
        c.overflow += int(not ranking.fits and not ranking.no_kv_info)
        c.queue_guard_demotions += ranking.demoted
        c.predicted_bytes_total += ranking.predicted_bytes[first]
        c.prompt_tokens_total += hints.prompt_tokens
        c.image_tokens_total += hints.image_tokens
        c.max_tokens_total += hints.max_tokens
        return [[by_key[key]] for key in ranking.order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """Confirm the hold on the replica Serve actually used (moving and re-predicting it if needed)."""
        if pending_request.metadata.call_method not in self.config.kv_routed_methods:
            return
        try:
            self._on_routed(pending_request, replica_id, result)
        except Exception:
            # The replica has accepted the request: an exception here would fail it in the caller while
            # it runs. Its hold (if any) expires or is released on completion.
            logger.exception("KVPackingRouter failed to confirm a routed request's hold")

    def _on_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        with self._lock:
            hold = self._routed_locked(pending_request, replica_id)
            # Tie the hold to this accepted attempt: Serve's on_request_completed carries no attempt id,
            # and a rejected earlier attempt's completion on the same replica can arrive after this.
            add_done_callback = getattr(result, "add_done_callback", None)
            if callable(add_done_callback):
                try:
                    add_done_callback(partial(self._on_result_done, hold))
                except Exception:  # a result type without callbacks: on_request_completed releases it
                    logger.debug("could not tie a hold to its result", exc_info=True)
                else:
                    hold.tied_to_result = True

    def _on_result_done(self, hold: Hold, _result: Any = None) -> None:
        """Release ``hold`` when the attempt it was routed with finishes (any thread; never raises)."""
        try:
            with self._lock:
                if self._holds.release(hold.request_id, hold.replica, only=hold) is not None:
                    self.counters.released += 1
                    self.counters.released_by_result += 1
        except Exception:
            logger.debug("releasing a finished request's hold failed", exc_info=True)

    def _routed_locked(self, pending_request: PendingRequest, replica_id: ReplicaID) -> Hold:
        request_id = pending_request.metadata.internal_request_id
        now = self._get_curr_time_s()
        hold = self._holds.get(request_id)
        if hold is not None and replica_id in hold.predicted:
            nbytes = hold.predicted[replica_id]
        else:  # the hold was released (a rejection's completion) or Serve used an unranked replica
            hints = (hold.hints if hold is not None else None) or hints_from_kwargs(pending_request.kwargs)
            nbytes = self._predict_on(replica_id, hints or self._fallback_hints())
        ranking = hold.ranking if hold is not None else ()
        confirmed, moved = self._holds.confirm(request_id, replica_id, nbytes, now)
        self.counters.routed += 1
        self.counters.moved += int(moved and hold is not None)
        rank = ranking.index(replica_id) if replica_id in ranking else -1
        self.counters.chosen_rank[rank] = self.counters.chosen_rank.get(rank, 0) + 1
        return confirmed

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """Release the request's hold if it sits on ``replica_id``, was routed there and no result of its
        own releases it.

        A request rejected by one replica and retried also "completes" there, possibly after the retry
        reserved again on the same replica (a chosen-only hold: kept) or was even accepted there (a hold
        tied to the accepted attempt's result, :attr:`Hold.tied_to_result`: kept, that result releases
        it). A rejected request whose caller gives up is swept instead (``Hold.abandoned``).
        """
        with self._lock:
            released = self._holds.release(
                internal_request_id, replica_id, routed_only=True, untied_only=True
            )
            if released is not None:
                self.counters.released += 1

    # ----------------------------------------------------------------- telemetry

    def telemetry(self) -> dict[str, Any]:
        """Counters plus the current holds (count and bytes per replica id).

        Safe from any thread: Serve runs the router on its own event loop thread while the ingress
        exports this from its own.
        """
        with self._lock:
            return {
                "counters": self.counters.to_dict(),
                "num_holds": len(self._holds),
                "held_bytes": {
                    getattr(k, "unique_id", str(k)): v for k, v in self._holds.bytes_per_replica().items()
                },
                "config": self.config.model_dump(),
            }

    @property
    def holds(self) -> HoldTable:
        return self._holds

    # ----------------------------------------------------------------- internals

    def _fallback_hints(self) -> RoutingHints:
        return RoutingHints(
            prompt_tokens=self.config.fallback_prompt_tokens, max_tokens=self.config.fallback_max_tokens
        )

    def _order_of(self, replica_id: ReplicaID) -> int:
        order = self._first_seen.get(replica_id)
        if order is None:
            order = self._first_seen[replica_id] = self._next_order
            self._next_order += 1
        return order

    def _maybe_sweep(self, now: float) -> None:
        if 0.0 <= now - self._last_sweep < self.config.sweep_interval_s:
            return
        if now < self._last_sweep:  # the wall clock stepped back: no hold may be younger than now
            self._holds.rebase(now)
        self._last_sweep = now
        self.counters.expired += self._holds.expire(
            now, routed_ttl_s=self.config.hold_ttl_s, pending_ttl_s=self.config.pending_hold_ttl_s
        )

    def _reports(
        self, replicas: Iterable[RunningReplica]
    ) -> dict[ReplicaID, tuple[KVProfile | None, float | None]]:
        out = {}
        for replica in replicas:
            try:
                stats = replica.routing_stats
            except Exception:  # a replica without a snapshot yet
                stats = None
            stats = stats if isinstance(stats, dict) else None
            cached = self._parsed.get(replica.replica_id)
            if cached is not None and cached[0] is stats and stats is not None:
                out[replica.replica_id] = cached[1]  # the same snapshot object as last time
                continue
            parsed = profile_from_routing_stats(stats)
            if stats is not None:
                self._parsed[replica.replica_id] = (stats, parsed)
            out[replica.replica_id] = parsed
        return out

    def _views(self, replicas: list[RunningReplica], now: float) -> list[ReplicaView]:
        reports = self._reports(replicas)
        fallback = conservative_profile([p for p, _ in reports.values() if p is not None])
        views = []
        for replica in replicas:
            profile, stats_time = reports[replica.replica_id]
            view = build_view(
                replica.replica_id,
                profile,
                stats_time,
                self._holds,
                self.config,
                now,
                self._order_of(replica.replica_id),
                fallback,
            )
            self.counters.stale_replica_views += int(view.stats_state == "stale")
            self.counters.missing_replica_views += int(view.stats_state == "missing")
            views.append(view)
        return views

    def _predict_on(self, replica_id: ReplicaID, hints: RoutingHints) -> int:
        replica = self._replicas.get(replica_id)
        profile = None
        if replica is not None:
            profile, _ = self._reports([replica])[replica_id]
        if profile is None:
            profile = conservative_profile([p for p, _ in self._reports(self._replicas_list).values() if p])
        return predict_request_bytes(hints, profile) if profile is not None else 0


__all__ = [
    "ROUTING_HINTS_KWARG",
    "HeldTotals",
    "Hold",
    "HoldTable",
    "KVPackingRouter",
    "KVRouterConfig",
    "Ranking",
    "ReplicaView",
    "RouterCounters",
    "build_view",
    "conservative_profile",
    "hints_from_kwargs",
    "rank_replicas",
]
