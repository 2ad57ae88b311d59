"""benchmarks/serve_floor.py: the summary's arithmetic without a cluster, and the ``--smoke`` run on a
real local Ray cluster with direct ingress (the no-work application answers every arm over HTTP, through
Serve's proxy and through the ingress replica's own port)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.serve_floor import ARMS, parse_shape, summarize
from tests.deployments.conftest import REPO_ROOT, free_ports, ray_test_env


def test_summary_splits_the_floor_into_its_hops():
    times = {
        "proxy-unread": [10.0, 12.0, 11.0],
        "proxy": [15.0, 17.0, 16.0],
        "proxy+vision": [25.0, 27.0, 26.0],
        "full": [40.0, 38.0, 39.0],
    }
    rows, summary = summarize(times)
    assert [row["arm"] for row in rows] == list(ARMS)
    assert summary["floor_p50_ms"] == 39.0 and summary["proxy_unread_p50_ms"] == 11.0
    assert summary["body_read_p50_ms"] == 5.0
    assert summary["vision_hop_p50_ms"] == 10.0 and summary["llm_hops_p50_ms"] == 13.0
    # the parts add up to the floor
    parts = ("proxy_unread_p50_ms", "body_read_p50_ms", "vision_hop_p50_ms", "llm_hops_p50_ms")
    assert sum(summary[key] for key in parts) == pytest.approx(summary["floor_p50_ms"])
    assert parse_shape("1x3x112X112") == (1, 3, 112, 112)
    # a second path's keys carry its prefix, its rows its name
    rows, direct = summarize(times, "direct_", path="direct ingress")
    assert direct["direct_floor_p50_ms"] == 39.0 and {row["path"] for row in rows} == {"direct ingress"}


@pytest.mark.ray
@pytest.mark.slow
def test_serve_floor_smoke_on_a_local_cluster(tmp_path):
    env = {**os.environ, **ray_test_env()}
    env.pop("RAY_ADDRESS", None)
    proxy_port, direct_port = free_ports(2)
    command = [sys.executable, "-m", "benchmarks.serve_floor", "--smoke", "--port", str(proxy_port)]
    command += ["--direct-ingress", "--direct-port", str(direct_port)]
    subprocess.run([*command, "--out-dir", str(tmp_path)], cwd=REPO_ROOT, env=env, check=True, timeout=300)
    payload = json.loads((tmp_path / "serve_floor-smoke.json").read_text())
    rows = {(row["path"], row["arm"]): row for row in payload["rows"]}
    assert set(rows) == {(path, arm) for path in ("proxy", "direct ingress") for arm in ARMS}
    assert all(row["requests"] == 3 and row["p50_ms"] > 0 for row in rows.values())
    summary = payload["summary"]
    # every hop costs something: the full chain is slower than the proxy alone, on either path
    assert summary["floor_p50_ms"] > summary["proxy_unread_p50_ms"]
    assert summary["direct_floor_p50_ms"] > summary["direct_proxy_unread_p50_ms"]
    assert direct_port <= summary["direct_port"] <= direct_port + 9
    assert (tmp_path / "serve_floor-smoke.md").exists()
