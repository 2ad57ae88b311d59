"""Custom Ray Serve autoscaling policies: LLM replicas on KV demand, the vision stage on its queue.

Wire them under a deployment's ``autoscaling_config``::

    autoscaling_config:
      min_replicas: 1
      max_replicas: 8
      upscale_delay_s: 5
      downscale_delay_s: 60
      metrics_interval_s: 1
      look_back_period_s: 5
      policy:
        policy_function: zipvl_ray.routing.autoscaling:KVDemandPolicy
        policy_kwargs: {target_kv_utilization: 0.5}

Serve builds the class once with ``policy_kwargs`` and calls it about ten times a second with an
``AutoscalingContext``; the policies return the *raw* desired replica count and Serve applies the
scaling factors, delays and ``min_replicas`` / ``max_replicas``. They do no logging and no I/O per call.

The LLM replicas' metrics come from :func:`zipvl_ray.routing.replica_stats.autoscaling_stats`
(``record_autoscaling_stats``), read as ``ctx.aggregated_metrics[name][replica_id]``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.config import AutoscalingContext


class KVDemandPolicyConfig(BaseModel):
    """Knobs of :class:`KVDemandPolicy`, given as ``policy_kwargs`` (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_kv_utilization: float = Field(
        default=0.5,
        ge=0.01,
        le=1.0,
        description="Fraction of each replica's KV pool the fleet should run at: desired replicas = "
        "KV demand / (target_kv_utilization x per-replica capacity). The rest absorbs arrivals and decode "
        "growth while new replicas start (docs/routing.md: 0.5 on held demand won the simulation's study).",
    )
    demand: Literal["held", "committed"] = Field(
        default="held",
        description="What a replica's KV demand is. held: bytes held now plus admission's decode headroom "
        "(kv_bytes_demand), with waiting requests priced at the mean running request. committed: the "
        "end-of-generation bytes of every request it runs or queues (kv_bytes_committed, the sizes the "
        "router packs with; a replica that does not report it counts as held), which scales up earlier: "
        "in the simulation it cost as much as held at a lower target with a worse tail, and on the small "
        "real cluster it scaled on single requests.",
    )
    queued_request_kv_bytes: float = Field(
        default=0.0,
        ge=0.0,
        description="Bytes a waiting request is assumed to need when no replica runs a request to measure "
        "the mean from; 0 prices such requests with queued_requests_per_replica instead.",
    )
    queued_requests_per_replica: float = Field(
        default=8.0,
        gt=0.0,
        description="When no request size is known, this many waiting requests ask for one replica.",
    )
    include_handle_queue: bool = Field(
        default=True,
        description="Count requests queued at the handles (not yet routed: ctx.total_queued_requests) as "
        "waiting demand, besides those waiting inside the engines.",
    )
    spare_replicas: float = Field(
        default=0.0,
        ge=0.0,
        description="Replicas kept beyond the demand while there is any: desired = demand / "
        "(target_kv_utilization x capacity) + this. Headroom that does not grow with the load absorbs the "
        "start of a burst while new replicas start, so the target can run the fleet fuller at the peak "
        "(docs/routing.md: with forecast_s 20, 0.9 plus 1 spare cost 4-9% less than 0.5 with neither in "
        "the simulation of 2-16 GPU replicas; on a 1-3 replica CPU fleet one spare doubled the cost). "
        "With no request held or waiting it adds nothing, so min_replicas 0 still scales to zero.",
    )
    forecast_s: float = Field(
        default=0.0,
        ge=0.0,
        description="Scale for the demand expected this many seconds ahead: the desired count grows by its "
        "rise per second over the last trend_window_s times forecast_s. Only a rise is projected, never a "
        "fall, so it starts replicas earlier in a burst and never stops them earlier. About the time a new "
        "replica takes to serve (upscale_delay_s plus start-up) is the natural horizon; 0 turns it off.",
    )
    trend_window_s: float = Field(
        default=20.0,
        gt=0.0,
        description="Window over which forecast_s measures the rise of the desired count (a rise is only "
        "projected once half a window of history exists).",
    )


@dataclass(frozen=True, slots=True)
class ReplicaKVMetrics:
    """One replica's KV figures as the policy reads them (from ``autoscaling_stats``).

    Attributes
    ----------
    capacity_bytes : float
        KV pool size.
    demand_bytes : float
        Held plus promised bytes (``kv_bytes_used + reserved_bytes``).
    num_running, num_waiting : float
        Requests decoding / waiting for admission in the engine.
    committed_bytes : float
        End-of-generation bytes of the running and waiting requests (``kv_bytes_committed``; 0 when not
        reported).
    """

    capacity_bytes: float
    demand_bytes: float
    num_running: float = 0.0
    num_waiting: float = 0.0
    committed_bytes: float = 0.0


@dataclass(frozen=True, slots=True)
class KVDemand:
    """How :func:`desired_replicas_for_kv` arrived at its answer (kept in the policy state).

    Attributes
    ----------
    desired_replicas : float
        Unrounded desired count.
    held_bytes : float
        Sum of the replicas' demand bytes (committed or held, see ``KVDemandPolicyConfig.demand``).
    waiting_requests : float
        Requests whose size the demand does not include yet, priced at ``mean_request_bytes``: those
        queued at the handles (when counted) and, in ``held`` mode, those waiting in engines.
    mean_request_bytes : float
        Demand per request it includes, used to price the waiting ones (0 when unknown).
    replica_capacity_bytes : float
        Mean KV pool size of the reporting replicas.
    """

    desired_replicas: float
    held_bytes: float
    waiting_requests: float
    mean_request_bytes: float
    replica_capacity_bytes: float


def desired_replicas_for_kv(
    replicas: Iterable[ReplicaKVMetrics], handle_queued_requests: float, config: KVDemandPolicyConfig
) -> KVDemand | None:
    """Replicas needed to serve the held (or committed) and waiting KV demand at ``target_kv_utilization``.

    ``desired = (demand + waiting x mean_request_bytes) / (target_kv_utilization x capacity)``. In
    ``committed`` mode a replica's demand is ``max(kv_bytes_demand, kv_bytes_committed)``, which already
    prices the requests waiting in its engine, and ``mean_request_bytes = demand / (running + waiting)``;
    in ``held`` mode (or for a replica that does not report a committed figure) it is
    ``kv_bytes_demand``, its waiting requests count as waiting and ``mean_request_bytes = demand /
    running``. With no request to measure one by, waiting requests are priced at
    ``queued_request_kv_bytes`` or, if that is 0, at ``1 / queued_requests_per_replica`` replica each.

    Parameters
    ----------
    replicas : iterable of ReplicaKVMetrics
        Replicas that reported metrics.
    handle_queued_requests : float
        Requests queued at handles (added when ``include_handle_queue``).
    config : KVDemandPolicyConfig

    Returns
    -------
    KVDemand or None
        ``None`` when no replica reports a KV capacity (nothing to decide from).
    """
    committed_mode = config.demand == "committed"
    capacity_sum = held = priced = waiting = 0.0
    reporting = 0
    for r in replicas:
        if r.capacity_bytes < 1:  # no pool (or a figure no pool has): nothing to divide by
            continue
        reporting += 1
        capacity_sum += r.capacity_bytes
        running, queued = max(0.0, r.num_running), max(0.0, r.num_waiting)
        if committed_mode and r.committed_bytes > 0:
            held += max(0.0, r.demand_bytes, r.committed_bytes)
            priced += running + queued
        else:
            held += max(0.0, r.demand_bytes)
            priced += running
            waiting += queued
    if reporting == 0:
        return None
    if config.include_handle_queue:
        waiting += max(0.0, handle_queued_requests)
    capacity = capacity_sum / reporting
    per_replica = config.target_kv_utilization * capacity
    mean_request = held / priced if priced > 0 else config.queued_request_kv_bytes
    if mean_request > 0:
        desired = (held + waiting * mean_request) / per_replica
    else:
        desired = held / per_replica + waiting / config.queued_requests_per_replica
    return KVDemand(desired, held, waiting, mean_request, capacity)


def kv_metrics_from_context(
    aggregated_metrics: Mapping[str, Mapping[Any, float]] | None,
) -> list[ReplicaKVMetrics]:
    """Per-replica :class:`ReplicaKVMetrics` from ``ctx.aggregated_metrics`` (replicas with a capacity)."""
    metrics = aggregated_metrics or {}
    capacity = metrics.get("kv_bytes_capacity") or {}
    demand = metrics.get("kv_bytes_demand") or {}
    committed = metrics.get("kv_bytes_committed") or {}
    running = metrics.get("num_running") or {}
    waiting = metrics.get("num_waiting") or {}
    # A replica of another version could send anything finite-looking to Serve's first check; a NaN or
    # infinite figure here would make the decision NaN (math.ceil raises on the controller): read it as 0.
    return [
        ReplicaKVMetrics(
            capacity_bytes=_finite(cap),
            demand_bytes=_finite(demand.get(replica, 0.0)),
            num_running=_finite(running.get(replica, 0.0)),
            num_waiting=_finite(waiting.get(replica, 0.0)),
            committed_bytes=_finite(committed.get(replica, 0.0)),
        )
        for replica, cap in capacity.items()
    ]


#: The largest figure a replica metric is taken at (an exabyte, or 10^18 requests): sums and quotients
#: of a few thousand such figures stay finite, so the decision never overflows.
METRIC_CEILING = 1e18


def _finite(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(max(number, -METRIC_CEILING), METRIC_CEILING) if math.isfinite(number) else 0.0


def unreported_running_replicas(ctx: AutoscalingContext, metric: str) -> int:
    """Running replicas without a ``metric`` figure in ``ctx.aggregated_metrics``.

    Serve's replica sends its report without the custom metrics when ``record_autoscaling_stats`` raises or
    times out; once that lasts a look-back window, a busy replica drops out of the figures. Missing metrics
    are no evidence that its load fell: the policies count each such replica as needed.
    """
    reported = (ctx.aggregated_metrics or {}).get(metric) or {}
    return sum(1 for replica in ctx.running_replicas or () if replica not in reported)


class Trend:
    """Rise per second of a value over a sliding time window (the forecast of :class:`KVDemandPolicy`).

    Parameters
    ----------
    window_s : float
        How far back the rise is measured.

    Notes
    -----
    Amortised O(1) per call: samples older than the window are dropped as new ones arrive.
    """

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque()

    def rise_per_s(self, now: float, value: float) -> float:
        """Record ``value`` at ``now``; ``(value - oldest in the window) / elapsed``, at least 0.

        0 until half a window of history exists, and when time went backwards (the history restarts).
        """
        samples = self.samples
        if samples and now < samples[-1][0]:
            samples.clear()
        samples.append((now, value))
        while len(samples) > 1 and samples[1][0] <= now - self.window_s:
            samples.popleft()
        then, before = samples[0]
        if now - then < 0.5 * self.window_s:
            return 0.0
        return max(0.0, (value - before) / (now - then))


def _without_metrics(ctx: AutoscalingContext, queued_per_replica: float) -> tuple[int, dict[str, Any]]:
    """The decision while no replica reports the policy's metrics (replicas starting, ``record_autoscaling_stats``
    failing, a misspelt ``metric``): the running replicas plus one per ``queued_per_replica`` requests
    waiting at the handles (no replica took them: the fleet is short), and never under the current target:
    no metrics is no evidence that load fell, and running requests say nothing about how many more a
    replica takes. Counted from the running replicas, not from the target: a target raised on account of a
    queue must not be raised again for the same queue at every decision while the new replicas start.
    Only whole queued requests count: the queue is a mean over the look-back window, and a trace of one
    request that waited briefly (a mean of 0.05) would otherwise add a replica every time the running
    replicas caught up with the target, up to ``max_replicas``."""
    queued = _finite(ctx.total_queued_requests or 0.0)
    whole = math.floor(queued + 1e-6)
    desired = max(ctx.target_num_replicas, ctx.current_num_replicas + _ceil(whole / queued_per_replica))
    return desired, {"metrics_missing": 1.0, "queued_requests": queued}


def _ceil(value: float) -> int:
    # Aggregated floats land a hair above whole numbers (2.0000000001 must not become 3). A figure too
    # large for any fleet (or not a number) is capped: math.ceil raises on it, inside Serve's controller.
    if not value <= 1e9:
        return 10**9
    return max(0, math.ceil(value - 1e-6))


class KVDemandPolicy:
    """``autoscaling_config.policy`` for LLM replicas: desired replicas from KV demand.

    Parameters
    ----------
    **policy_kwargs
        :class:`KVDemandPolicyConfig` fields.

    Notes
    -----
    Until a replica has reported metrics it keeps the current target, plus one replica per
    ``queued_requests_per_replica`` requests waiting at the handles. The returned state carries only
    the figures behind the decision (``kv_demand_bytes``, ``kv_waiting_requests``, ``kv_desired_raw``,
    and ``kv_rise_per_s`` with a forecast), for inspection; Serve merges its own delay counters into it.
    The forecast's history lives in the instance (Serve builds one per deployment and keeps it), so a
    restarted controller starts without one and projects nothing for half a ``trend_window_s``.
    """

    def __init__(self, **policy_kwargs: Any) -> None:
        self.config = KVDemandPolicyConfig(**policy_kwargs)
        self._trend = Trend(self.config.trend_window_s)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        demand = desired_replicas_for_kv(
            kv_metrics_from_context(ctx.aggregated_metrics),
            _finite(ctx.total_queued_requests or 0.0),
            self.config,
        )
        if demand is None:
            return _without_metrics(ctx, self.config.queued_requests_per_replica)
        desired = demand.desired_replicas
        state = {"kv_demand_bytes": demand.held_bytes, "kv_waiting_requests": demand.waiting_requests}
        if self.config.forecast_s > 0:
            now = ctx.current_time if ctx.current_time is not None else time.time()
            rise = self._trend.rise_per_s(now, desired)
            desired += rise * self.config.forecast_s
            state["kv_rise_per_s"] = rise
        unreported = unreported_running_replicas(ctx, "kv_bytes_capacity")
        if unreported:  # their load is unknown: each is taken as needed (never a scale-down on its account)
            desired += unreported
            state["kv_unreported_replicas"] = unreported
        if demand.held_bytes > 0 or demand.waiting_requests > 0:
            desired += self.config.spare_replicas
        state["kv_desired_raw"] = desired
        return _ceil(desired), state


class QueuePolicyConfig(BaseModel):
    """Knobs of :class:`QueueLengthPolicy`, given as ``policy_kwargs``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_per_replica: float = Field(
        default=4.0,
        gt=0.0,
        description="Load one replica should carry: desired replicas = load / target_per_replica.",
    )
    metric: str | None = Field(
        default=None,
        description="Replica metric to sum as the load (e.g. pending image tokens reported by "
        "record_autoscaling_stats); None uses Serve's ongoing requests (running + queued).",
    )
    queued_request_load: float = Field(
        default=1.0,
        ge=0.0,
        description="With a custom metric, load added per request queued at the handles.",
    )


def desired_replicas_for_queue(load: float, config: QueuePolicyConfig) -> float:
    """``load / target_per_replica`` (unrounded)."""
    return max(0.0, load) / config.target_per_replica


class QueueLengthPolicy:
    """``autoscaling_config.policy`` for the vision stage: replicas from its queue.

    Parameters
    ----------
    **policy_kwargs
        :class:`QueuePolicyConfig` fields. Without ``metric`` the load is Serve's ongoing-request count
        (what the default policy uses, but with a target of its own); with ``metric`` it is the sum over
        replicas of that ``record_autoscaling_stats`` value plus ``queued_request_load`` per request
        queued at the handles, which lets the encoder scale on image tokens rather than requests.
    """

    def __init__(self, **policy_kwargs: Any) -> None:
        self.config = QueuePolicyConfig(**policy_kwargs)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        if self.config.metric is None:
            load = _finite(ctx.total_num_requests or 0.0)
        else:
            values = (ctx.aggregated_metrics or {}).get(self.config.metric)
            if not values:  # queued requests priced in the metric's unit, as below
                per_replica = self.config.target_per_replica / max(self.config.queued_request_load, 1e-9)
                return _without_metrics(ctx, per_replica)
            queued = _finite(ctx.total_queued_requests or 0.0)
            load = sum(_finite(v) for v in values.values()) + queued * self.config.queued_request_load
            # A running replica without the figure (its record_autoscaling_stats failing): taken as full.
            load += unreported_running_replicas(ctx, self.config.metric) * self.config.target_per_replica
        return _ceil(desired_replicas_for_queue(load, self.config)), {"queue_load": load}


__all__ = [
    "KVDemand",
    "KVDemandPolicy",
    "KVDemandPolicyConfig",
    "QueueLengthPolicy",
    "QueuePolicyConfig",
    "ReplicaKVMetrics",
    "Trend",
    "desired_replicas_for_kv",
    "desired_replicas_for_queue",
    "kv_metrics_from_context",
]
