"""benchmarks/router_cost.py: the smoke run (both predictions, identical rankings, output files)."""

from __future__ import annotations

import json

from benchmarks.router_cost import main


def test_router_cost_benchmark_smoke(tmp_path):
    result = main(["--smoke", "--out-dir", str(tmp_path)])
    assert result["summary"]["identical_rankings"] is True
    assert all(row["one_at_a_time_ms"] > 0 and row["batched_ms"] > 0 for row in result["rows"])
    payload = json.loads((tmp_path / "router_cost-smoke.json").read_text())
    assert payload["rows"] and (tmp_path / "router_cost-smoke.md").exists()
