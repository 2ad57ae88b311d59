"""What an LLM replica reports to Ray Serve: routing stats for the router, numeric metrics for the autoscaler.

Ray-free on purpose. The LLM deployment implements::

    def record_routing_stats(self) -> dict:
        return routing_stats(self.engine.stats())

    def record_autoscaling_stats(self) -> dict[str, float]:
        return autoscaling_stats(self.engine.stats())

Serve polls ``record_routing_stats`` every ``request_routing_stats_period_s`` and hands the dict to every
router as ``replica.routing_stats``; it aggregates ``record_autoscaling_stats`` over
``look_back_period_s`` and hands it to the autoscaling policy as ``ctx.aggregated_metrics[name][replica]``
(a non-numeric value there disables custom metrics, hence floats only).
"""

from __future__ import annotations

import math
import time
from typing import Any

from zipvl_ray.engine.types import EngineStats
from zipvl_ray.routing.footprint import KVProfile

ROUTING_STATS_SCHEMA = 1
"""Version of the :func:`routing_stats` dict; bumped when a key changes meaning."""

STATS_TIMESTAMP_KEY = "stats_timestamp"
"""Wall-clock time (``time.time()``, seconds) at which the replica took the snapshot."""

AUTOSCALING_METRIC_NAMES = (
    "kv_bytes_used",
    "kv_bytes_reserved",
    "kv_bytes_capacity",
    "kv_bytes_demand",
    "kv_bytes_committed",
    "kv_utilization",
    "mean_request_kv_bytes",
    "num_running",
    "num_waiting",
    "mean_kept_fraction",
    "prediction_error_mean",
    "num_preemptions",
    "waiting_prompt_tokens",
)
"""Keys of :func:`autoscaling_stats`, in a fixed order (the autoscaling policy reads them by name)."""


def routing_stats(stats: EngineStats, *, now: float | None = None) -> dict[str, Any]:
    """The dict ``record_routing_stats`` returns: the engine snapshot plus a timestamp.

    Parameters
    ----------
    stats : EngineStats
        The engine's current snapshot.
    now : float, optional
        Wall-clock time of the snapshot (default ``time.time()``). The router compares it with its own
        ``time.time()`` to judge staleness and to tell which of its reservations the snapshot already
        contains, so replicas and routers need roughly synchronised clocks (NTP on a cluster).

    Returns
    -------
    dict
        JSON-able: every ``EngineStats`` field, ``kv_utilization``, ``stats_timestamp`` and
        ``stats_schema``. :func:`profile_from_routing_stats` reads it back.
    """
    out = stats.to_dict()
    out[STATS_TIMESTAMP_KEY] = float(time.time() if now is None else now)
    out["stats_schema"] = ROUTING_STATS_SCHEMA
    return out


def autoscaling_stats(stats: EngineStats) -> dict[str, float]:
    """The dict ``record_autoscaling_stats`` returns: KV demand and queue figures, floats only.

    Parameters
    ----------
    stats : EngineStats
        The engine's current snapshot.

    Returns
    -------
    dict[str, float]
        ``kv_bytes_demand`` is what the replica holds plus what admission promised
        (``kv_bytes_used + reserved_bytes``); ``mean_request_kv_bytes`` is that demand per running
        sequence (0 when none runs), which the policy uses to price requests still waiting.
        ``kv_bytes_committed`` is the end-of-generation demand of every running and waiting request
        (``max(demand, committed_lifetime_bytes)``, 0 when the engine does not report a lifetime), the
        size the router packs with.
        Keys: :data:`AUTOSCALING_METRIC_NAMES`.
    """
    demand = stats.kv_bytes_used + stats.reserved_bytes
    per_request = demand / stats.num_running if stats.num_running > 0 else 0.0
    values = {
        "kv_bytes_used": stats.kv_bytes_used,
        "kv_bytes_reserved": stats.reserved_bytes,
        "kv_bytes_capacity": stats.kv_bytes_capacity,
        "kv_bytes_demand": demand,
        # 0 = not reported (an engine without the figure), so the policy falls back to the held demand.
        "kv_bytes_committed": max(demand, stats.committed_lifetime_bytes)
        if stats.committed_lifetime_bytes
        else 0,
        "kv_utilization": stats.kv_utilization,
        "mean_request_kv_bytes": per_request,
        "num_running": stats.num_running,
        "num_waiting": stats.num_waiting,
        "mean_kept_fraction": stats.mean_kept_fraction,
        "prediction_error_mean": stats.prediction_error_mean,
        "num_preemptions": stats.num_preemptions,
        "waiting_prompt_tokens": stats.waiting_prompt_tokens,
    }
    # Serve rejects the whole dict if one value is not a finite number: never let a NaN through.
    return {name: _finite_float(values[name]) for name in AUTOSCALING_METRIC_NAMES}


def profile_from_routing_stats(data: dict[str, Any] | None) -> tuple[KVProfile | None, float | None]:
    """Read a :func:`routing_stats` dict back (what the router sees as ``replica.routing_stats``).

    Parameters
    ----------
    data : dict or None
        The dict, or ``None`` / ``{}`` when the replica has not reported yet.

    Returns
    -------
    profile : KVProfile or None
        ``None`` when the dict is empty or reports no KV capacity (nothing to pack against).
    timestamp : float or None
        The snapshot's wall-clock time, ``None`` when absent.
    """
    if not data:
        return None, None
    timestamp = data.get(STATS_TIMESTAMP_KEY)
    timestamp = float(timestamp) if isinstance(timestamp, int | float) else None
    if timestamp is not None and not math.isfinite(timestamp):
        timestamp = None
    try:
        profile = KVProfile.from_stats(data)
    except (TypeError, ValueError, OverflowError):
        return None, timestamp
    if profile.capacity_bytes <= 0 or not _plausible(profile):
        return None, timestamp
    return profile, timestamp


#: A KV pool larger than this (an exabyte) is a wrong report, not a GPU.
MAX_PLAUSIBLE_BYTES = 10**18


def _plausible(profile: KVProfile) -> bool:
    """Whether every figure the router computes with is in range (another engine class, or a version skew
    between replicas, could report anything; one bad report must not break routing to every replica)."""
    counts = (
        profile.used_bytes,
        profile.reserved_bytes,
        profile.block_bytes,
        profile.num_running,
        profile.num_waiting,
        profile.lifetime_bytes,
    )
    fractions = profile.kept_fraction_per_layer
    return (
        profile.block_size >= 1
        and profile.num_layers >= 1
        and profile.block_bytes >= 1  # 0 would predict every request at 0 bytes: the first choice always
        and profile.block_bytes <= profile.capacity_bytes  # a pool holds at least one block
        and profile.capacity_bytes <= MAX_PLAUSIBLE_BYTES
        and (not fractions or len(fractions) == profile.num_layers)  # else the prediction mis-sizes layers
        and all(c >= 0 for c in counts)
        and all(isinstance(f, int | float) and math.isfinite(f) and 0.0 <= f <= 1.0 for f in fractions)
        and (profile.zipvl_tau is None or 0.0 < profile.zipvl_tau <= 1.0)
        and (profile.zipvl_max_keep_ratio is None or 0.0 <= profile.zipvl_max_keep_ratio <= 1.0)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in profile.zipvl_dense_layers)
    )


def _finite_float(value: Any) -> float:
    number = float(value)
    return number if math.isfinite(number) else 0.0


__all__ = [
    "AUTOSCALING_METRIC_NAMES",
    "ROUTING_STATS_SCHEMA",
    "STATS_TIMESTAMP_KEY",
    "autoscaling_stats",
    "profile_from_routing_stats",
    "routing_stats",
]
