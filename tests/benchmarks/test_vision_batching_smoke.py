"""benchmarks/vision_batching.py: the summary without a cluster, and the ``--smoke`` run on a real local
Ray cluster (both vision deployments, Serve's ``@serve.batch`` included, answer every load point)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.vision_batching import ARMS, summarize
from tests.deployments.conftest import REPO_ROOT, ray_test_env


def test_summary_compares_the_arms_point_by_point():
    samples = {("busy", "sequential"): [10.0, 12.0, 11.0], ("window", "sequential"): [15.0, 16.0, 17.0]}
    batches = {("busy", "sequential"): (3, 3), ("window", "sequential"): (1, 3)}
    rows, summary = summarize(samples, batches)
    assert [(r["arm"], r["point"]) for r in rows] == [("busy", "sequential"), ("window", "sequential")]
    assert rows[0]["p50_ms"] == 11.0 and rows[1]["requests_per_forward"] == 3.0
    assert summary["sequential_p50_window_minus_busy_ms"] == 5.0


@pytest.mark.ray
@pytest.mark.slow
def test_vision_batching_smoke_on_a_local_cluster(tmp_path):
    env = {**os.environ, **ray_test_env()}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "benchmarks.vision_batching", "--smoke", "--out-dir", str(tmp_path)]
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, timeout=300)
    payload = json.loads((tmp_path / "vision_batching-smoke.json").read_text())
    rows = {(row["arm"], row["point"]): row for row in payload["rows"]}
    points = {"sequential", "poisson 100/s", "burst 4"}
    assert set(rows) == {(arm, point) for arm in ARMS for point in points}
    assert all(row["requests"] == 4 and row["p50_ms"] > 0 for row in rows.values())
    # one request at a time cannot be batched, by either design; every request was encoded
    assert all(rows[(arm, "sequential")]["requests_per_forward"] == 1.0 for arm in ARMS)
    assert all(row["requests_per_forward"] >= 1.0 for row in rows.values())
    assert "sequential_p50_window_minus_busy_ms" in payload["summary"]
