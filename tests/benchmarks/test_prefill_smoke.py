"""The prefill benchmark: its limit arithmetic, and its smoke mode end to end (seconds)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import prefill
from zipvl_ray.config import ZipVLConfig


def test_summary_computes_speedup_and_the_r2_limit():
    configs = [
        prefill.RunConfig("dense", None),
        prefill.RunConfig("zipvl r=0.3", ZipVLConfig(tau=0.999, max_keep_ratio=0.3), forced_ratio=0.3),
    ]
    ttfts = {"dense": [10.0, 12.0], "zipvl r=0.3": [5.5, 5.0]}
    # Best runs: dense spends 6 s of 10 in attention; ZipVL 0.2 s selecting, 0.5 s in the kernel.
    splits = {
        "dense": {"attention": 6.0, "kernel": 5.5, "total": 10.0},
        "zipvl r=0.3": {"attention": 1.0, "select": 0.2, "kernel": 0.5, "total": 5.0},
    }
    counts = {"dense": [], "zipvl r=0.3": [30, 30]}
    rows = prefill.summarise(configs, 100, ttfts, splits, counts, {"dense": None, "zipvl r=0.3": None})
    dense, sparse = rows
    assert dense["speedup"] == 1.0 and dense["pct_of_limit"] == pytest.approx(1.0)
    limit = 4.0 + 6.0 * 0.3**2  # non-attention + attention x r^2
    assert sparse["limit_s"] == pytest.approx(limit)
    assert sparse["speedup"] == pytest.approx(2.0)
    assert sparse["limit_speedup"] == pytest.approx(10.0 / limit)
    assert sparse["pct_of_limit"] == pytest.approx(limit / 5.0)
    assert sparse["overhead_pct"] == pytest.approx(2.0)  # 0.2 s of a 10 s dense prefill
    assert sparse["gather_s"] == pytest.approx(0.3)
    assert sparse["kernel_vs_r2"] == pytest.approx(0.5 / (6.0 * 0.09))
    assert not sparse["tau_binds"]
    counts["zipvl r=0.3"] = [30, 12]  # a layer kept fewer than the cap: tau did bind
    assert prefill.summarise(configs, 100, ttfts, splits, counts, {"dense": None, "zipvl r=0.3": None})[1][
        "tau_binds"
    ]


def test_prefill_benchmark_smoke(tmp_path):
    json_path, md_path = prefill.main(["--smoke", "--threads", "1", "--out-dir", str(tmp_path)])
    assert json_path == tmp_path / "prefill_smoke.json"
    data = json.loads(json_path.read_text())
    assert data["meta"]["torch"] and data["summary"]["shape"] == "smoke"
    rows = {(r["n_tokens"], r["config"]): r for r in data["rows"]}
    configs = ["dense", "zipvl r=0.5", "zipvl r=0.3", "zipvl r=0.1", "zipvl tau=0.975"]
    assert set(rows) == {(n, c) for n in (256, 512) for c in configs}
    layers = prefill.SHAPES["smoke"].num_layers
    for (n, config), row in rows.items():
        assert row["ttft_s"] > 0 and 0 < row["attention_share"] <= 1
        if config == "dense":
            assert row["speedup"] == 1.0 and row["keep_ratio"] == 1.0 and row["select_s"] == 0
            continue
        assert len(row["kept_per_layer"]) == layers and row["select_s"] > 0 and row["kernel_s"] > 0
        dense = rows[(n, "dense")]
        assert row["limit_s"] <= dense["ttft_s"] + 1e-12  # keeping fewer tokens can only lower the limit
        if config.startswith("zipvl r="):
            ratio = float(config.split("=")[1])
            assert row["kept_per_layer"] == [math.ceil(ratio * n - 1e-9)] * layers
            assert not row["tau_binds"]
    assert "| n_tokens | config |" in md_path.read_text()


def test_prefill_benchmark_separate_breakdown_path(tmp_path):
    """The GPU-mode flow (bare timed rounds, then one instrumented run per config) on CPU."""
    argv = [
        "--smoke",
        "--threads",
        "1",
        "--sizes",
        "256",
        "--ratios",
        "0.25",
        "--no-adaptive",
        "--separate-breakdown",
    ]
    json_path, _ = prefill.main([*argv, "--name", "sep", "--out-dir", str(tmp_path)])
    rows = {r["config"]: r for r in json.loads(json_path.read_text())["rows"]}
    assert set(rows) == {"dense", "zipvl r=0.25"}
    assert rows["zipvl r=0.25"]["kept_per_layer"] == [64] * prefill.SHAPES["smoke"].num_layers
    for row in rows.values():
        assert 0 < row["attention_share"] <= 1 and row["limit_s"] > 0
