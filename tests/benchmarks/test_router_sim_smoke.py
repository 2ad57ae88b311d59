"""benchmarks/router_sim.py --smoke: output files and basic sanity (not the performance targets)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import router_sim


def test_router_sim_smoke_writes_sane_results(tmp_path):
    out = router_sim.main(["--smoke", "--out-dir", str(tmp_path), "--name", "smoke"])

    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"smoke.{suffix}").stat().st_size > 0
    payload = json.loads((tmp_path / "smoke.json").read_text())
    assert payload["name"] == "smoke" and payload["meta"]["ray"]
    rows = payload["rows"]
    assert {r["strategy"] for r in rows} == {"pow2+queue(12)", "spread+kv(0.6)", "pack+kvheld(0.9+1@20)"}
    for row in rows:
        # every request is accounted for, and the clock and the cost are physical
        assert row["completed"] + row["failed"] == row["requests"] > 50
        assert row["replica_seconds"] > 0
        assert row["mean_replicas"] >= 1.0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["ttft_p99_s"]
        assert 0.0 <= row["mean_kv_utilization"] <= 1.0
    kv_rows = [r for r in rows if r["router"] != "pow2"]
    assert all(r["router_fits"] + r["router_overflow"] > 0 for r in kv_rows)  # the real ranking code ran
    assert "| pack+kvheld(0.9+1@20) |" in (tmp_path / "smoke.md").read_text()
    assert isinstance(out["summary"]["kept~0.45: target_met"], bool)
    assert "kept~0.45: pack+kvheld(0.9+1@20): saving_conservative" in out["summary"]
    assert out["summary"]["kept~0.45: headline"] == "pack+kvheld(0.9+1@20)"
    headline = next(r for r in rows if r["strategy"] == "pack+kvheld(0.9+1@20)")
    assert (headline["spare_replicas"], headline["forecast_s"]) == (1.0, 20.0)


def test_same_seed_same_trace_and_every_strategy_sees_it():
    model = router_sim.ReplicaModel()
    retention = router_sim.RetentionModel(model.num_layers)
    trace = router_sim.TraceModel(duration_s=60.0, mean_low_s=20.0, mean_high_s=20.0)
    first = router_sim.make_trace(trace, retention, seed=3)
    again = router_sim.make_trace(trace, retention, seed=3)
    other = router_sim.make_trace(trace, retention, seed=4)
    assert [(r.arrival, r.prompt_tokens, r.kept) for r in first] == [
        (r.arrival, r.prompt_tokens, r.kept) for r in again
    ]
    assert [r.arrival for r in first] != [r.arrival for r in other]
    assert all(0.0 < f <= 1.0 for r in first for f in r.kept) and len(first[0].kept) == model.num_layers


def test_retention_json_is_mapped_onto_the_simulated_layers(tmp_path):
    samples = {"image": [[0.3, 0.2, 0.1]], "video": [[0.9, 0.8, 0.7]], "meta": {"model": "x"}}
    path = tmp_path / "kept.json"
    path.write_text(json.dumps(samples))
    retention = router_sim.RetentionModel.from_json(path, num_layers=5)
    assert retention.num_layers == 5
    rng = router_sim.random.Random(0)
    assert retention.draw("image", rng) == pytest.approx([0.3, 0.25, 0.2, 0.15, 0.1])
    assert retention.draw("long_video", rng) == pytest.approx([0.9, 0.85, 0.8, 0.75, 0.7])  # its family
    assert retention.mean_kept() == pytest.approx({"image": 0.2, "video": 0.8})

    path.write_text(json.dumps({"kept_fraction_per_layer": [0.8, 0.4, 0.3, 0.3]}))
    profile = router_sim.RetentionModel.from_json(path, num_layers=32)
    resampled = router_sim.resample_layers([0.8, 0.4, 0.3, 0.3], 32)
    assert profile.num_layers == 32 and math.isclose(profile.means["video"], sum(resampled) / 32)
    assert profile.shape[0] == max(profile.shape)  # the first layer keeps the most, as measured


@pytest.mark.parametrize(
    ("values", "layers", "expected"),
    [
        ([0.5, 0.7], 2, [0.5, 0.7]),
        ([0.4], 3, [0.4, 0.4, 0.4]),
        ([0.0, 1.0], 5, [0.0, 0.25, 0.5, 0.75, 1.0]),
        ([0.2, 0.4, 0.6, 0.8, 1.0], 3, [0.2, 0.6, 1.0]),
    ],
)
def test_resample_layers_by_relative_depth(values, layers, expected):
    assert router_sim.resample_layers(values, layers) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("pow2+queue(8)", ("pow2", "queue", 8.0, "committed", 0.0)),
        ("pack+kv(0.6)", ("pack", "kv", 0.6, "committed", 0.0)),
        ("pack+kvheld(0.5)", ("pack", "kv", 0.5, "held", 0.0)),
        ("pack+kvheld(0.7+1)", ("pack", "kv", 0.7, "held", 1.0)),
        ("spread+kv(0.75+2.5)", ("spread", "kv", 0.75, "committed", 2.5)),
    ],
)
def test_parse_strategy(label, expected):
    strategy = router_sim.parse_strategy(label)
    assert (
        strategy.router,
        strategy.autoscaler,
        strategy.target,
        strategy.demand,
        strategy.spare,
    ) == expected
    assert strategy.label == label


def test_spare_replicas_reach_the_policy_and_cost_replicas():
    """The same trace under one spare replica holds more replicas and no fewer finished requests."""
    model = router_sim.ReplicaModel()
    trace = router_sim.TraceModel(duration_s=120.0, mean_low_s=30.0, mean_high_s=30.0, ramp_s=10.0)
    scaling = router_sim.ScalingModel(startup_s=10.0, upscale_delay_s=3.0, downscale_delay_s=15.0)
    requests = router_sim.make_trace(trace, router_sim.RetentionModel(model.num_layers), seed=1)
    rows = {}
    for label in ("pack+kvheld(0.7)", "pack+kvheld(0.7+2)"):
        sim = router_sim.Simulation(requests, router_sim.parse_strategy(label), model, scaling, seed=1)
        assert sim.policy.config.spare_replicas == sim.strategy.spare
        assert sim.policy.config.forecast_s == sim.strategy.forecast_s == 0.0
        rows[label] = sim.run().row()
    assert rows["pack+kvheld(0.7+2)"]["replica_seconds"] > rows["pack+kvheld(0.7)"]["replica_seconds"]
    assert rows["pack+kvheld(0.7+2)"]["failed"] == rows["pack+kvheld(0.7)"]["failed"] == 0


@pytest.mark.parametrize(
    "label",
    ["pack+queue(8)", "pow2+kv", "random+kv(0.5)", "pow2+queue(8+1)", "pow2+queue(8@20)", "pack+kv(0.5@)"],
)
def test_parse_strategy_refuses_what_is_not_simulated(label):
    with pytest.raises(ValueError):
        router_sim.parse_strategy(label)


def test_simulated_engine_reports_committed_lifetime_like_the_engine():
    model = router_sim.ReplicaModel(num_layers=2, kv_heads=1, head_dim=8, kv_pool_gib=0.001)
    replica = router_sim.Replica(0, model, 0.0, 0.0)
    running = router_sim.Request(0, 0.0, "image", 40, 32, 20, [0.5, 0.25])
    waiting = router_sim.Request(1, 0.0, "image", 64, 32, 8, [0.5, 0.5])
    seq = router_sim.Seq(running, model.block_size)
    seq.generated = 5
    replica.running.append(seq)
    replica.waiting.append(router_sim.Seq(waiting, model.block_size))
    replica.kept_ema = [0.5, 0.5]
    stats = replica.engine_stats()
    # running: kept 20 and 10 tokens + its whole 20 tokens -> 3 + 2 blocks; waiting: 32 + 8 per layer -> 3 + 3
    assert stats.committed_lifetime_bytes == (5 + 6) * model.block_bytes
    assert stats.waiting_prompt_tokens == 64


def test_iso_p95_cost_interpolates_between_bracketing_rows():
    frontier = [
        {"ttft_p95_s": 2.0, "replica_seconds": 1000.0},
        {"ttft_p95_s": 10.0, "replica_seconds": 600.0},
        {"ttft_p95_s": 30.0, "replica_seconds": 400.0},
    ]
    assert router_sim.iso_p95_cost(frontier, 6.0) == 800.0
    assert router_sim.iso_p95_cost(frontier, 20.0) == 500.0
    assert router_sim.iso_p95_cost(frontier, 1.0) is None  # outside what power-of-two reached


def test_max_ongoing_suffix_sets_the_strategys_replica_limit():
    strategy = router_sim.parse_strategy("pow2+queue(10)/24")
    assert (strategy.target, strategy.max_ongoing) == (10.0, 24)
    assert router_sim.parse_strategy("pow2+queue(10)").max_ongoing is None
    with pytest.raises(ValueError, match="at least 1"):
        router_sim.parse_strategy("pow2+queue(10)/0")
    model = router_sim.ReplicaModel()
    scaling = router_sim.ScalingModel()
    sim = router_sim.Simulation([], strategy, model, scaling)
    assert sim.model.max_ongoing_requests == 24 and model.max_ongoing_requests == 64  # a copy, per strategy


def test_dominated_power_of_two_rows_are_no_baseline():
    """A row dearer and slower than another one is not what anyone runs: with it, the row just above
    packing's p95 would have been the dominated one, and the saving inflated."""

    def row(name, p95, cost):
        return {
            "strategy": name,
            "router": "pow2",
            "autoscaler": "queue",
            "failed": 0,
            "ttft_p95_s": p95,
            "replica_seconds": cost,
        }

    efficient, dominated, cheap = row("a", 9.0, 1000.0), row("b", 12.0, 1100.0), row("c", 20.0, 700.0)
    assert router_sim.efficient_rows([efficient, dominated, cheap]) == [efficient, cheap]
    pack = {
        **row("pack+kvheld(0.9)", 10.0, 750.0),
        "router": "pack",
        "autoscaler": "kv",
        "ttft_p99_s": 0.0,
        "preemptions": 0,
    }
    summary = router_sim.summarize([efficient, dominated, cheap, pack], headline="pack+kvheld(0.9)")
    # Against c (the next efficient row at a worse p95), not against the dominated b.
    assert summary["pack+kvheld(0.9): vs"] == "c"
    assert summary["pack+kvheld(0.9): saving_conservative"] == pytest.approx(1 - 750 / 700)


def test_retention_models_see_the_same_arrivals():
    model = router_sim.ReplicaModel()
    trace = router_sim.TraceModel(duration_s=60.0, mean_low_s=20.0, mean_high_s=20.0)
    light = router_sim.make_trace(trace, router_sim.RetentionModel(model.num_layers), seed=1)
    heavy = router_sim.make_trace(trace, router_sim.RetentionModel(model.num_layers, mean_kept=0.8), seed=1)
    assert [(r.arrival, r.kind, r.prompt_tokens, r.max_tokens) for r in light] == [
        (r.arrival, r.kind, r.prompt_tokens, r.max_tokens) for r in heavy
    ]
    mean = lambda reqs: sum(sum(r.kept) / len(r.kept) for r in reqs) / len(reqs)  # noqa: E731
    assert mean(light) < 0.55 < 0.7 < mean(heavy)


def test_no_lag_flags_reach_the_scaling_model(tmp_path):
    """``--startup-s 0 --upscale-delay-s 0`` (the no-lag check of docs/routing.md): every replica the
    autoscaler adds is ready when it is added, and the summary records the setting."""
    out = router_sim.main(
        [
            "--duration-s", "150", "--seeds", "1", "--strategy", "pack+kvheld(0.5)",
            "--startup-s", "0", "--upscale-delay-s", "0", "--out-dir", str(tmp_path), "--name", "nolag",
        ]
    )  # fmt: skip
    assert out["summary"]["startup_s"] == 0.0 and out["summary"]["upscale_delay_s"] == 0.0
    model, trace = router_sim.ReplicaModel(), router_sim.TraceModel(duration_s=150.0)
    scaling = router_sim.ScalingModel(startup_s=0.0, upscale_delay_s=0.0)
    requests = router_sim.make_trace(trace, router_sim.RetentionModel(model.num_layers), seed=0)
    sim = router_sim.Simulation(requests, router_sim.parse_strategy("pack+kvheld(0.5)"), model, scaling)
    result = sim.run()
    assert len(result.replicas) > scaling.min_replicas  # it scaled up, and no replica waited to start
    assert all(r.ready_at == r.started_at for r in result.replicas)


def test_retention_prompts_from_the_built_in_models_splits():
    prompts, kinds = router_sim.retention_prompts("splits", 2, seed=0)
    assert kinds == [k for k in router_sim.RETENTION_SPLITS for _ in range(2)]
    for prompt, kind in zip(prompts, kinds, strict=True):
        low, high = router_sim.RETENTION_SPLITS[kind][1]
        assert low <= len(prompt["images"]) <= high
        parts = prompt["messages"][0]["content"]
        assert sum(p["type"] == "image" for p in parts) == len(prompt["images"])
        assert parts[-1]["type"] == "text" and parts[-1]["text"].endswith("?")
    with pytest.raises(ValueError, match="unknown retention data"):
        router_sim.retention_prompts("webcam", 1, seed=0)


def test_measure_retention_of_the_built_in_model_respects_the_served_cap(tmp_path):
    out = tmp_path / "kept.json"
    result = router_sim.measure_retention("zipvl-tiny", 0.975, 1, out, max_keep_ratio=0.6, data="splits")
    written = json.loads(out.read_text())
    assert written["meta"]["max_keep_ratio"] == 0.6 and written["meta"]["data"] == "splits"
    for kind in router_sim.RETENTION_SPLITS:
        (layers,) = result[kind]
        assert len(layers) == 8  # zipvl-tiny's decoder layers
        assert all(0.0 < f <= 0.6 + 0.02 for f in layers), layers  # the cap, up to rounding of counts
    # the file reads back as a simulation workload
    assert router_sim.RetentionModel.from_json(out, 32).num_layers == 32
