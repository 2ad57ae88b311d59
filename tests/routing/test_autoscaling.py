"""Autoscaling policies: the KV-demand arithmetic, the queue policy, and both inside Serve's own wrapper."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from zipvl_ray.engine.types import EngineStats
from zipvl_ray.routing.autoscaling import (
    KVDemandPolicy,
    KVDemandPolicyConfig,
    QueueLengthPolicy,
    ReplicaKVMetrics,
    Trend,
    desired_replicas_for_kv,
    kv_metrics_from_context,
)
from zipvl_ray.routing.replica_stats import autoscaling_stats

GIB = 1 << 30
#: The figures below are worked out at 75% of a 10 GiB pool per replica (7.5 GiB); the default target is
#: checked on its own.
AT_75 = {"target_kv_utilization": 0.75}
COMMITTED = {"demand": "committed"}


def replica(capacity_gib=10.0, demand_gib=0.0, running=0, waiting=0, committed_gib=0.0) -> ReplicaKVMetrics:
    return ReplicaKVMetrics(capacity_gib * GIB, demand_gib * GIB, running, waiting, committed_gib * GIB)


@pytest.mark.parametrize(
    ("replicas", "handle_queued", "kwargs", "expected"),
    [
        # held demand only: 15 GiB over 0.75 x 10 GiB per replica
        ([replica(demand_gib=7.5, running=3), replica(demand_gib=7.5, running=3)], 0, {}, 2.0),
        ([replica(demand_gib=1.0, running=1), replica(), replica()], 0, {}, 1 / 7.5),
        # waiting requests priced at the mean running request (2.5 GiB): 15 + 4 x 2.5 = 25 GiB
        (
            [replica(demand_gib=7.5, running=3, waiting=2), replica(demand_gib=7.5, running=3, waiting=2)],
            0,
            {},
            25 / 7.5,
        ),
        # handle queue counts too, unless switched off
        ([replica(demand_gib=7.5, running=3)], 3, {}, 15 / 7.5),
        ([replica(demand_gib=7.5, running=3)], 3, {"include_handle_queue": False}, 1.0),
        # target utilisation
        ([replica(demand_gib=5.0, running=2)], 0, {"target_kv_utilization": 0.5}, 1.0),
        ([replica(demand_gib=5.0, running=2)], 0, {"target_kv_utilization": 1.0}, 0.5),
        # nothing running to measure requests by: queued_requests_per_replica, or queued_request_kv_bytes
        ([replica(waiting=4), replica()], 12, {}, 2.0),
        ([replica(waiting=4)], 0, {"queued_requests_per_replica": 2}, 2.0),
        ([replica(waiting=3)], 0, {"queued_request_kv_bytes": 2.5 * GIB}, 1.0),
        # idle fleet
        ([replica(), replica()], 0, {}, 0.0),
        # mixed pool sizes: mean capacity
        ([replica(capacity_gib=20, demand_gib=7.5, running=1), replica(capacity_gib=10)], 0, {}, 7.5 / 11.25),
        # committed (end-of-generation) demand already prices the engine's waiting requests: 15 GiB
        ([replica(demand_gib=5, running=3, waiting=2, committed_gib=15)], 0, COMMITTED, 15 / 7.5),
        # ... and prices the handle's queue at committed / (running + waiting) = 3 GiB: 15 + 2 x 3
        ([replica(demand_gib=5, running=3, waiting=2, committed_gib=15)], 2, COMMITTED, 21 / 7.5),
        # held mode (the default) ignores it: 5 GiB + 2 waiting x 5/3 GiB
        ([replica(demand_gib=5, running=3, waiting=2, committed_gib=15)], 0, {}, (5 + 10 / 3) / 7.5),
        # a replica that does not report a committed figure counts as held, the others as committed
        (
            [
                replica(demand_gib=5, running=3, waiting=2, committed_gib=15),
                replica(demand_gib=3, running=1, waiting=1),
            ],
            0,
            COMMITTED,
            (15 + 3 + 1 * 18 / 6) / 7.5,
        ),
    ],
)
def test_desired_replicas_for_kv(replicas, handle_queued, kwargs, expected):
    demand = desired_replicas_for_kv(replicas, handle_queued, KVDemandPolicyConfig(**{**AT_75, **kwargs}))
    assert demand is not None
    assert demand.desired_replicas == pytest.approx(expected)


def test_default_is_half_the_pool_on_held_demand():
    # 5 GiB held on 10 GiB pools: one replica at the default target; 5.1 GiB asks for a second. The
    # committed figure (15 GiB) is ignored unless asked for.
    config = KVDemandPolicyConfig()
    assert config.target_kv_utilization == 0.5 and config.demand == "held"
    for held_gib, expected in ((5.0, 1.0), (5.1, 5.1 / 5)):
        demand = desired_replicas_for_kv(
            [replica(demand_gib=held_gib, running=2, committed_gib=15)], 0, config
        )
        assert demand.desired_replicas == pytest.approx(expected)


def test_no_capacity_reported_means_no_decision():
    assert desired_replicas_for_kv([], 5, KVDemandPolicyConfig()) is None
    assert desired_replicas_for_kv([replica(capacity_gib=0, demand_gib=1)], 5, KVDemandPolicyConfig()) is None


def context(
    metrics: dict | None, *, current=2, target=2, queued=0.0, total=0.0, config=None, now=None, running=()
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DeploymentID(name="llm"),
        deployment_name="llm",
        app_name="default",
        current_num_replicas=current,
        target_num_replicas=target,
        running_replicas=list(running),
        total_num_requests=total,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=10,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config
        or AutoscalingConfig(min_replicas=1, max_replicas=10, upscale_delay_s=0, downscale_delay_s=0),
    )


def metrics_of(*engine_stats: EngineStats) -> dict[str, dict[str, float]]:
    """``ctx.aggregated_metrics`` as Serve builds it from ``record_autoscaling_stats``."""
    out: dict[str, dict[str, float]] = {}
    for i, stats in enumerate(engine_stats):
        for name, value in autoscaling_stats(stats).items():
            out.setdefault(name, {})[f"replica-{i}"] = value
    return out


def busy(used_gib: float, running: int, waiting: int = 0) -> EngineStats:
    return EngineStats(
        kv_bytes_used=int(used_gib * GIB),
        kv_bytes_capacity=10 * GIB,
        num_running=running,
        num_waiting=waiting,
    )


@pytest.mark.parametrize(
    ("stats", "queued", "expected"),
    [
        ((busy(7.5, 3), busy(7.5, 3)), 0, 2),
        ((busy(7.5, 3), busy(7.6, 3)), 0, 3),  # just above: round up
        ((busy(7.5, 3, waiting=3), busy(7.5, 3)), 0, 3),
        ((busy(9, 3), busy(9, 3), busy(9, 3)), 2, 5),  # 27 + 2 x 3 = 33 GiB / 7.5
        ((busy(1, 1), busy(0, 0), busy(0, 0)), 0, 1),  # load left: scale down to what it needs
        ((busy(0, 0), busy(0, 0)), 0, 0),  # Serve's min_replicas keeps the floor
    ],
)
def test_kv_policy_from_replica_metrics(stats, queued, expected):
    desired, state = KVDemandPolicy(**AT_75)(context(metrics_of(*stats), queued=queued))
    assert desired == expected and isinstance(desired, int)
    assert set(state) == {"kv_demand_bytes", "kv_waiting_requests", "kv_desired_raw"}


@pytest.mark.parametrize(
    ("stats", "queued", "spare", "expected"),
    [
        ((busy(7.5, 3), busy(7.5, 3)), 0, 1.0, 3),  # 15 GiB / 7.5 = 2, plus the spare
        ((busy(7.5, 3), busy(7.5, 3)), 0, 0.5, 3),  # 2.5 rounds up
        ((busy(9, 3), busy(9, 3), busy(9, 3)), 2, 2.0, 7),  # 33 GiB / 7.5 = 4.4, plus 2
        ((busy(1, 1), busy(0, 0), busy(0, 0)), 0, 1.0, 2),  # little load: one replica plus the spare
        ((busy(0, 0), busy(0, 0)), 0, 2.0, 0),  # nothing held or waiting: still free to scale to zero
        ((busy(0, 0), busy(0, 0)), 1, 2.0, 3),  # a queued request is demand: 1 / 8 replica, plus 2
    ],
)
def test_spare_replicas_are_added_while_there_is_demand(stats, queued, spare, expected):
    desired, state = KVDemandPolicy(**AT_75, spare_replicas=spare)(context(metrics_of(*stats), queued=queued))
    without, plain = KVDemandPolicy(**AT_75)(context(metrics_of(*stats), queued=queued))
    assert desired == expected
    added = spare if expected else 0.0
    assert state["kv_desired_raw"] == pytest.approx(plain["kv_desired_raw"] + added)
    assert desired >= without


def test_trend_measures_the_rise_over_its_window():
    trend = Trend(window_s=10.0)
    assert trend.rise_per_s(0.0, 2.0) == 0.0  # no history yet
    assert trend.rise_per_s(4.0, 4.0) == 0.0  # less than half a window
    assert trend.rise_per_s(6.0, 5.0) == pytest.approx(0.5)  # (5 - 2) / 6
    for t in range(7, 31):
        rise = trend.rise_per_s(float(t), 5.0 + 0.25 * (t - 6))
    assert rise == pytest.approx(0.25)  # a steady climb, measured over the last 10 s only
    assert trend.rise_per_s(31.0, 0.0) == 0.0  # a fall is never projected
    assert len(trend.samples) <= 12  # old samples are dropped
    assert trend.rise_per_s(5.0, 9.0) == 0.0  # the clock went back: the history restarts
    assert list(trend.samples) == [(5.0, 9.0)]


def test_forecast_scales_ahead_of_a_rising_demand_and_never_below_it():
    """Held demand climbing 0.5 GiB/s: with a 20 s forecast the policy asks for the replicas 20 s ahead."""
    plain, ahead = KVDemandPolicy(**AT_75), KVDemandPolicy(**AT_75, forecast_s=20.0)
    for t in range(21):
        stats = metrics_of(busy(1 + 0.5 * t, 4))
        without, _ = plain(context(stats, now=float(t)))
        desired, state = ahead(context(stats, now=float(t)))
    assert without == 2  # 11 GiB / 7.5
    assert state["kv_rise_per_s"] == pytest.approx(0.5 / 7.5)
    assert desired == 3  # (11 + 20 x 0.5) GiB / 7.5 = 2.8
    for t in range(21, 61):  # demand falls: once the window holds only the fall, the forecast adds nothing
        stats = metrics_of(busy(11 - 0.2 * (t - 20), 4))
        forecast, _ = ahead(context(stats, now=float(t)))
        assert forecast >= plain(context(stats, now=float(t)))[0]
        if t >= 41:
            assert forecast == plain(context(stats, now=float(t)))[0]


def test_kv_policy_keeps_the_target_until_metrics_arrive():
    assert KVDemandPolicy(**AT_75)(context(None, target=3))[0] == 3
    assert KVDemandPolicy(**AT_75)(context({}, target=3, total=200))[0] == 3  # running: no evidence


def test_without_metrics_requests_queued_at_the_handles_still_scale_up_never_down():
    """Metrics missing (record_autoscaling_stats failing, Serve disabling custom metrics): 1,000 requests
    running and queued must not leave the fleet at its target."""
    desired, state = KVDemandPolicy(**AT_75)(context(None, target=2, total=1064, queued=1000))
    assert desired == 2 + 125 and state["metrics_missing"] == 1.0  # 1000 / queued_requests_per_replica (8)
    assert KVDemandPolicy(**AT_75)(context(None, target=5, total=0))[0] == 5


@pytest.mark.parametrize(
    "make_policy", [lambda: KVDemandPolicy(**AT_75), lambda: QueueLengthPolicy(metric="m")]
)
def test_without_metrics_a_trace_of_a_queue_does_not_climb_to_max_replicas(make_policy):
    """The handle queue is a mean over the look-back window: one request that waited briefly reads as
    0.05. Each time the new replicas are running the next decision must not ask for one more."""
    policy = _apply_autoscaling_config(make_policy())
    config = AutoscalingConfig(min_replicas=1, max_replicas=10, upscale_delay_s=0, downscale_delay_s=0)
    target, seen = 1, []
    for _ in range(6):  # every decision finds the last target running
        target, _ = policy(context(None, current=target, target=target, queued=0.05, config=config))
        seen.append(target)
    assert seen == [1] * 6
    assert policy(context(None, current=1, target=1, queued=1.0, config=config))[0] == 2  # a whole request


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "x"])
def test_a_non_finite_replica_figure_never_breaks_the_decision(bad):
    metrics = metrics_of(busy(3, 1), busy(3, 1))
    for name in ("kv_bytes_capacity", "kv_bytes_demand", "num_waiting"):
        broken = {k: dict(v) for k, v in metrics.items()}
        broken[name]["replica-0"] = bad
        desired, _ = KVDemandPolicy(**AT_75)(context(broken, queued=float("nan")))
        assert isinstance(desired, int) and 1 <= desired <= 3, (name, desired)
    values = {"replica-0": bad, "replica-1": 8.0}
    desired, _ = QueueLengthPolicy(metric="m", target_per_replica=4.0)(context({"m": values}))
    assert desired == 2


def test_without_metrics_the_same_queue_does_not_ratchet_the_target_up():
    """Inside Serve's wrapper the target a decision raised is the next decision's ``target_num_replicas``:
    10 queued requests ask for the running replicas plus 2, once, not 2 more per decision."""
    policy = _apply_autoscaling_config(KVDemandPolicy(**AT_75))
    config = AutoscalingConfig(min_replicas=1, max_replicas=20, upscale_delay_s=0, downscale_delay_s=0)
    target = 2
    for _ in range(5):  # the new replicas are still starting: 2 running
        target, _ = policy(context(None, current=2, target=target, queued=10, config=config))
    assert target == 4  # 2 running + ceil(10 / 8)
    queue = QueueLengthPolicy(metric="image_tokens", target_per_replica=100.0, queued_request_load=50.0)
    assert queue(context({}, current=2, target=8, queued=10))[0] == 8  # never under the target
    assert queue(context({}, current=2, target=2, queued=10))[0] == 2 + 5


def test_kv_policy_inside_serves_wrapper_is_raw_and_delayed_by_serve():
    # _apply_autoscaling_config is what Serve wraps a custom policy with (factors and delays); the
    # min/max bounds are applied after it by Serve's AutoscalingState.
    stats = metrics_of(busy(9, 3), busy(9, 3))  # 18 GiB held, 3 GiB per request, 40 queued: 138 GiB
    immediate = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=0, downscale_delay_s=0)
    delayed = AutoscalingConfig(min_replicas=1, max_replicas=4, upscale_delay_s=60, downscale_delay_s=600)
    up_now, state = _apply_autoscaling_config(KVDemandPolicy(**AT_75))(
        context(stats, queued=40, config=immediate)
    )
    up_later, _ = _apply_autoscaling_config(KVDemandPolicy(**AT_75))(
        context(stats, queued=40, config=delayed)
    )
    assert up_now == 19  # raw: 138 / 7.5 rounded up
    assert up_later == 2  # Serve holds the current target until the delay has passed
    assert state["kv_desired_raw"] == pytest.approx(138 / 7.5)


def test_kv_metrics_from_context_skips_replicas_without_capacity():
    metrics = metrics_of(busy(2, 1))
    metrics["num_running"]["late-replica"] = 4.0  # reported running but no capacity yet
    parsed = kv_metrics_from_context(metrics)
    assert parsed == [ReplicaKVMetrics(10 * GIB, 2 * GIB, 1.0, 0.0, 0.0)]


def test_kv_policy_reads_the_committed_demand_from_replica_metrics():
    # 2 GiB held now, 12 GiB once its 3 running and 1 waiting requests have generated everything.
    stats = EngineStats(
        kv_bytes_used=2 * GIB,
        kv_bytes_capacity=10 * GIB,
        num_running=3,
        num_waiting=1,
        committed_lifetime_bytes=12 * GIB,
    )
    committed, state = KVDemandPolicy(**AT_75, **COMMITTED)(context(metrics_of(stats)))
    held, _ = KVDemandPolicy(**AT_75)(context(metrics_of(stats)))
    assert (committed, held) == (2, 1)  # 12 / 7.5 and (2 + 2 / 3) / 7.5, rounded up
    assert state["kv_demand_bytes"] == 12 * GIB


@pytest.mark.parametrize(
    ("kwargs", "metrics", "total", "queued", "expected"),
    [
        ({"target_per_replica": 4}, None, 10, 0, 3),
        ({"target_per_replica": 4}, None, 8, 0, 2),
        ({"target_per_replica": 4}, None, 0, 0, 0),
        # scale the encoder on pending image tokens instead of requests
        (
            {"target_per_replica": 10_000, "metric": "pending_image_tokens", "queued_request_load": 2_880},
            {"pending_image_tokens": {"r0": 9_000.0, "r1": 6_000.0}},
            99,
            5,
            3,
        ),
    ],
)
def test_queue_policy(kwargs, metrics, total, queued, expected):
    desired, state = QueueLengthPolicy(**kwargs)(context(metrics, total=total, queued=queued))
    assert desired == expected
    assert "queue_load" in state


def test_queue_policy_with_a_missing_metric_scales_on_the_handles_queue():
    policy = QueueLengthPolicy(metric="pending_image_tokens", target_per_replica=400, queued_request_load=100)
    assert policy(context({}, target=2, total=60, queued=50))[0] == 2 + 13  # ceil(50 x 100 / 400)
    assert policy(context({}, target=2, total=3))[0] == 2  # never below the target


@pytest.mark.parametrize(
    ("policy", "kwargs"),
    [
        (KVDemandPolicy, {"target_kv_utilization": 0}),
        (KVDemandPolicy, {"spare_replicas": -1}),
        (KVDemandPolicy, {"forecast_s": -5}),
        (KVDemandPolicy, {"trend_window_s": 0}),
        (KVDemandPolicy, {"target_kv_utilisation": 0.5}),
        (QueueLengthPolicy, {"target_per_replica": 0}),
        (QueueLengthPolicy, {"target": 3}),
    ],
)
def test_bad_policy_kwargs_are_rejected(policy, kwargs):
    with pytest.raises(ValidationError):
        policy(**kwargs)


def test_a_running_replica_that_stopped_reporting_is_counted_as_needed():
    """Serve's replica sends its report without the custom metrics when ``record_autoscaling_stats`` fails;
    after a look-back window the busy replica drops out of the figures. Both policies scaled down on what
    the others reported (4 replicas 70% full, 1 reporting: 2 wanted instead of 6); an unreported running
    replica now counts as needed."""
    busy = EngineStats(kv_bytes_capacity=10 * GIB, kv_bytes_used=7 * GIB, num_running=7)
    all_four = metrics_of(busy, busy, busy, busy)
    running = [f"replica-{i}" for i in range(4)]
    one = {name: {"replica-0": by["replica-0"]} for name, by in all_four.items()}
    policy = KVDemandPolicy(target_kv_utilization=0.5)
    full, _ = policy(context(all_four, current=4, target=4, running=running))
    partial, state = policy(context(one, current=4, target=4, running=running))
    assert full == 6 and partial >= 4 and state["kv_unreported_replicas"] == 3
    queue = QueueLengthPolicy(metric="pending_images", target_per_replica=4)
    images = {"pending_images": {r: 4.0 for r in running}}
    assert queue(context(images, current=4, target=4, running=running))[0] == 4
    assert (
        queue(context({"pending_images": {"replica-0": 4.0}}, current=4, target=4, running=running))[0] == 4
    )


@pytest.mark.parametrize(
    "metrics",
    [
        {"kv_bytes_capacity": {"a": 1e308, "b": 1e308}, "kv_bytes_demand": {"a": 1e308, "b": 1e308}},
        {"kv_bytes_capacity": {"a": 1e-300}, "kv_bytes_demand": {"a": 1e9}, "num_running": {"a": 1}},
        {"kv_bytes_capacity": {"a": 1.0}, "kv_bytes_demand": {"a": 1e308}, "num_running": {"a": 1e-300}},
    ],
)
def test_huge_or_tiny_figures_never_raise_inside_the_controller(metrics):
    """Finite but extreme figures used to overflow the sums (NaN from inf - inf) or the division, and the
    policy raised in Serve's controller, which then skips every application's update on each tick."""
    desired, _ = KVDemandPolicy()(context(metrics))
    assert isinstance(desired, int) and 0 <= desired <= 10**9
    with pytest.raises(ValueError):
        KVDemandPolicyConfig(target_kv_utilization=1e-310)
