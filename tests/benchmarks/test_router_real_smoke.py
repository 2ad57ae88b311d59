"""benchmarks/router_real.py: the per-strategy apps, the trace and the accounting without a cluster; the
``--smoke`` run on a local Ray cluster (output files, every request answered, physical figures)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import router_real
from benchmarks.router_sim import parse_strategy
from deployments.app import AppArgs


@pytest.mark.parametrize(
    ("label", "router_class", "router_strategy", "policy", "policy_kwargs", "target_ongoing"),
    [
        ("pow2+queue(2)", None, None, None, None, 2.0),
        (
            "pack+kv(0.6)",
            "zipvl_ray.routing.router:KVPackingRouter",
            "pack",
            "zipvl_ray.routing.autoscaling:KVDemandPolicy",
            {"target_kv_utilization": 0.6, "demand": "committed"},
            None,
        ),
        (
            "spread+kvheld(0.5)",
            "zipvl_ray.routing.router:KVPackingRouter",
            "spread",
            "zipvl_ray.routing.autoscaling:KVDemandPolicy",
            {"target_kv_utilization": 0.5, "demand": "held"},
            None,
        ),
        (
            "pack+kvheld(0.9+1@20)",
            "zipvl_ray.routing.router:KVPackingRouter",
            "pack",
            "zipvl_ray.routing.autoscaling:KVDemandPolicy",
            {"target_kv_utilization": 0.9, "demand": "held", "spare_replicas": 1.0, "forecast_s": 20.0},
            None,
        ),
    ],
)
def test_each_strategy_gets_its_router_and_policy(
    label, router_class, router_strategy, policy, policy_kwargs, target_ongoing
):
    scaling = router_real.Scaling(max_replicas=2, downscale_delay_s=7.0)
    args = router_real.app_args(parse_strategy(label), scaling)
    llm = AppArgs.model_validate(args).llm  # strict: Serve's own schemas
    router = llm.request_router_config
    assert (router or {}).get("request_router_class") == router_class
    assert (router or {}).get("request_router_kwargs", {}).get("strategy") == router_strategy
    autoscaling = llm.autoscaling_config
    assert (autoscaling["max_replicas"], autoscaling["downscale_delay_s"]) == (2, 7.0)
    assert autoscaling.get("target_ongoing_requests") == target_ongoing
    assert (autoscaling.get("policy") or {}).get("policy_function") == policy
    assert (autoscaling.get("policy") or {}).get("policy_kwargs") == policy_kwargs
    assert llm.num_replicas is None and args["model"] == "tiny-llava"


def test_trace_is_seeded_mixed_and_starts_quiet():
    model = router_real.RealTraceModel(duration_s=120.0)
    trace = router_real.make_real_trace(model, seed=3)
    assert trace == router_real.make_real_trace(model, seed=3)
    assert trace != router_real.make_real_trace(model, seed=4)
    arrivals = [r.arrival_s for r in trace]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0 and arrivals[-1] < model.duration_s
    assert {r.kind for r in trace} <= set(router_real.KIND_PICTURES) and len({r.kind for r in trace}) >= 3
    for r in trace:
        low, high = router_real.KIND_PICTURES[r.kind]
        assert low <= r.pictures <= high and 32 <= r.max_tokens <= model.max_tokens_max
    quiet = [r for r in trace if r.arrival_s < model.first_burst_s]
    assert len(quiet) <= 3 * model.low_rate * model.first_burst_s + 2


@pytest.mark.parametrize(
    ("samples", "window", "expected"),
    [
        ([(0.0, 1), (10.0, 3), (20.0, 1)], (0.0, 30.0), 10 + 30 + 10),
        ([(0.0, 2), (5.0, 2)], (0.0, 5.0), 10),
        ([(2.0, 1), (4.0, 2)], (0.0, 6.0), 2 + 2 + 4),  # the first sample extends back to the start
        ([(0.0, 1), (10.0, 3), (20.0, 1)], (10.0, 20.0), 30),
    ],
)
def test_replica_seconds_integrate_the_status_samples(samples, window, expected):
    sampler = router_real.ServeStatusSampler()
    sampler.samples = [router_real.StatusSample(t, "HEALTHY", {"RUNNING": n}) for t, n in samples]
    assert sampler.replica_seconds(*window) == pytest.approx(expected)


def test_starting_and_stopping_replicas_are_billed():
    sample = router_real.StatusSample(0.0, "UPSCALING", {"RUNNING": 1, "STARTING": 2, "STOPPING": 1})
    assert (sample.running, sample.billed) == (1, 4)


def test_summary_compares_pack_with_every_pow2_row_and_the_simulation():
    rows = [
        {
            "strategy": "pow2+queue(2)",
            "router": "pow2",
            "replica_seconds": 200.0,
            "ttft_p95_s": 4.0,
            "failed": 0,
        },
        {
            "strategy": "pack+kv(0.6)",
            "router": "pack",
            "replica_seconds": 150.0,
            "ttft_p95_s": 5.0,
            "failed": 0,
        },
    ]
    sim = {
        "kept~0.45": {
            "pack": "pack+kv(0.6)",
            "saving_vs_best_p95_pow2": 0.2,
            "p95_ratio_vs_best_p95_pow2": 0.9,
        }
    }
    summary = router_real.summarize(rows, sim)
    assert summary["pack+kv(0.6) vs pow2+queue(2): saving"] == pytest.approx(0.25)
    assert summary["pack+kv(0.6) vs pow2+queue(2): p95_ttft_ratio"] == pytest.approx(1.25)
    assert summary["direction_agrees"] is True
    rows[1]["replica_seconds"] = 250.0
    assert router_real.summarize(rows, sim)["direction_agrees"] is False


@pytest.mark.ray
def test_router_real_smoke_run(tmp_path):
    out = router_real.main(["--smoke", "--out-dir", str(tmp_path), "--name", "smoke"])

    for suffix in ("json", "md"):
        assert (tmp_path / f"smoke.{suffix}").stat().st_size > 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert payload["name"] == "smoke" and payload["meta"]["ray"]
    rows = payload["rows"]
    assert [r["strategy"] for r in rows] == list(router_real.DEFAULT_STRATEGIES)
    for row in rows:
        assert row["requests"] == out["summary"]["trace_requests"] > 10
        assert row["completed"] == row["requests"] and row["failed"] == 0
        assert 1 <= row["peak_replicas"] <= 2
        assert row["replica_seconds"] >= row["window_s"] > 0  # at least one replica all along
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["e2e_p95_s"]
        assert row["preemptions"] >= 0 and 0.0 < row["mean_kv_utilization"] <= 1.0
    assert set(payload["requests"]) == set(router_real.DEFAULT_STRATEGIES)
    assert not math.isnan(out["summary"]["pack+kvheld(0.5) vs pow2+queue(2): saving"])
