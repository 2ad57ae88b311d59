"""What LLM replicas report: routing stats (JSON, timestamped) and autoscaling stats (floats only)."""

from __future__ import annotations

import json
import math

import pytest

from zipvl_ray.engine.types import EngineStats
from zipvl_ray.routing.replica_stats import (
    AUTOSCALING_METRIC_NAMES,
    STATS_TIMESTAMP_KEY,
    autoscaling_stats,
    profile_from_routing_stats,
    routing_stats,
)


def engine_stats(**overrides) -> EngineStats:
    base = dict(
        kv_bytes_used=6 * 1024,
        kv_bytes_capacity=64 * 1024,
        kv_blocks_used=6,
        kv_blocks_total=64,
        block_size=16,
        block_bytes=1024,
        num_layers=2,
        num_running=3,
        num_waiting=2,
        mean_kept_fraction=0.4,
        kept_fraction_per_layer=[0.5, 0.3],
        reserved_bytes=2 * 1024,
        prediction_error_mean=0.05,
    )
    base.update(overrides)
    return EngineStats(**base)


def test_routing_stats_is_json_and_carries_the_timestamp():
    data = routing_stats(engine_stats(), now=1234.5)
    assert json.loads(json.dumps(data)) == data
    assert data[STATS_TIMESTAMP_KEY] == 1234.5
    assert data["kv_bytes_capacity"] == 64 * 1024


def test_routing_stats_round_trips_into_the_profile_the_router_predicts_with():
    profile, timestamp = profile_from_routing_stats(routing_stats(engine_stats(), now=7.0))
    assert timestamp == 7.0
    assert profile is not None
    assert (profile.capacity_bytes, profile.used_bytes, profile.reserved_bytes) == (
        64 * 1024,
        6 * 1024,
        2 * 1024,
    )
    assert (profile.block_size, profile.block_bytes, profile.num_layers) == (16, 1024, 2)
    assert profile.kept_fraction_per_layer == [0.5, 0.3]
    assert (profile.num_running, profile.num_waiting) == (3, 2)


@pytest.mark.parametrize(
    ("data", "expect_profile", "expect_timestamp"),
    [
        (None, False, None),
        ({}, False, None),
        ({"kv_bytes_capacity": 0, STATS_TIMESTAMP_KEY: 3.0}, False, 3.0),  # no pool: nothing to pack against
        ({"kv_bytes_capacity": 4096, "block_bytes": 256}, True, None),  # no timestamp: treated as stale
        # figures that would mis-predict every request on that replica (a review): refused
        ({"kv_bytes_capacity": 4096, "block_bytes": 0, STATS_TIMESTAMP_KEY: 1.0}, False, 1.0),
        (
            {
                "kv_bytes_capacity": 4096,
                "block_bytes": 256,
                "num_layers": 32,
                "kept_fraction_per_layer": [0.5],
            },
            False,
            None,
        ),
        ({"kv_bytes_capacity": 10**19, "block_bytes": 256}, False, None),
        ({"kv_bytes_capacity": "many", STATS_TIMESTAMP_KEY: 1.0}, False, 1.0),  # malformed
    ],
)
def test_profile_from_routing_stats_edge_cases(data, expect_profile, expect_timestamp):
    profile, timestamp = profile_from_routing_stats(data)
    assert (profile is not None) == expect_profile
    assert timestamp == expect_timestamp


def test_autoscaling_stats_are_finite_floats_with_fixed_keys():
    out = autoscaling_stats(engine_stats())
    assert tuple(out) == AUTOSCALING_METRIC_NAMES
    assert all(type(v) is float and math.isfinite(v) for v in out.values())


@pytest.mark.parametrize(
    ("overrides", "demand", "per_request"),
    [
        ({}, 8 * 1024, 8 * 1024 / 3),
        ({"num_running": 0, "kv_bytes_used": 0, "reserved_bytes": 0}, 0, 0),  # idle: no division by zero
        ({"reserved_bytes": 0, "num_running": 1}, 6 * 1024, 6 * 1024),
    ],
)
def test_autoscaling_demand_is_used_plus_reserved(overrides, demand, per_request):
    out = autoscaling_stats(engine_stats(**overrides))
    assert out["kv_bytes_demand"] == pytest.approx(demand)
    assert out["mean_request_kv_bytes"] == pytest.approx(per_request)


def test_autoscaling_stats_replace_nan_with_zero():
    # Serve disables custom metrics for the whole deployment on one bad value.
    out = autoscaling_stats(engine_stats(prediction_error_mean=float("nan"), mean_kept_fraction=float("inf")))
    assert out["prediction_error_mean"] == 0.0
    assert out["mean_kept_fraction"] == 0.0


@pytest.mark.parametrize(
    ("lifetime_kib", "committed_kib"),
    [
        (0, 0),  # not reported (an engine without the figure): the policy falls back to the held demand
        (20, 20),  # end-of-generation demand of running + waiting requests
        (5, 8),  # never below what is held and promised now
    ],
)
def test_autoscaling_committed_is_the_lifetime_demand(lifetime_kib, committed_kib):
    out = autoscaling_stats(
        engine_stats(committed_lifetime_bytes=lifetime_kib * 1024, waiting_prompt_tokens=77)
    )
    assert out["kv_bytes_committed"] == committed_kib * 1024
    assert out["waiting_prompt_tokens"] == 77.0


@pytest.mark.parametrize(("lifetime_kib", "committed_kib"), [(0, 8), (20, 20), (5, 8)])
def test_profile_committed_bytes_prefer_the_lifetime(lifetime_kib, committed_kib):
    data = routing_stats(engine_stats(committed_lifetime_bytes=lifetime_kib * 1024), now=1.0)
    profile, _ = profile_from_routing_stats(data)
    assert profile.lifetime_bytes == lifetime_kib * 1024
    assert profile.committed_bytes == committed_kib * 1024  # used 6 + reserved 2 KiB at least


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, [0.5, 0.1]),  # the replica's defaults: what it observed
        ({"tau": 0.8}, [0.5, 0.1]),  # keeps fewer: observed fractions stay an upper estimate
        ({"max_keep_ratio": 0.3}, [0.3, 0.1]),  # a tighter cap: capped
        ({"tau": 1.0, "max_keep_ratio": 0.8}, [0.8, 0.8]),  # keeps exactly the cap in every layer
        ({"tau": 1.0}, [0.6, 0.6]),  # the request inherits the default cap
        ({"tau": 0.99}, [0.6, 0.6]),  # keeps more than the default: dense up to the default cap
        ({"tau": 0.99, "max_keep_ratio": 0.7}, [0.7, 0.7]),
        ({"max_keep_ratio": 0.9}, [0.9, 0.9]),  # a looser cap than the default's 0.6
        ({"zipvl_enabled": False}, [1.0, 1.0]),
    ],
)
def test_prediction_for_overrides_never_trusts_fractions_measured_under_a_tighter_setting(
    overrides, expected
):
    from zipvl_ray.routing.footprint import effective_keep_fractions

    got = effective_keep_fractions([0.5, 0.1], 2, default_tau=0.9, default_max_keep_ratio=0.6, **overrides)
    assert got == expected


def test_profile_carries_the_replicas_default_zipvl_setting():
    profile, _ = profile_from_routing_stats(
        routing_stats(engine_stats(zipvl_tau=0.95, zipvl_max_keep_ratio=0.5), now=1.0)
    )
    assert (profile.zipvl_tau, profile.zipvl_max_keep_ratio) == (0.95, 0.5)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, [1.0, 0.5]),  # the dense layer observed whole stays whole under the default cap
        ({"max_keep_ratio": 0.3}, [1.0, 0.3]),
        ({"tau": 1.0, "max_keep_ratio": 0.8}, [1.0, 0.8]),
        ({"zipvl_enabled": False}, [1.0, 1.0]),
    ],
)
def test_dense_layers_are_never_capped(overrides, expected):
    from zipvl_ray.routing.footprint import effective_keep_fractions

    got = effective_keep_fractions(
        [1.0, 0.5], 2, default_tau=0.9, default_max_keep_ratio=0.6, dense_layers=[0], **overrides
    )
    assert got == expected


def test_profile_carries_the_replicas_dense_layers_and_refuses_bad_ones():
    profile, _ = profile_from_routing_stats(routing_stats(engine_stats(zipvl_dense_layers=[0, 3]), now=1.0))
    assert profile.zipvl_dense_layers == (0, 3)
    bad = routing_stats(engine_stats(), now=1.0) | {"zipvl_dense_layers": [-1]}
    assert profile_from_routing_stats(bad)[0] is None
