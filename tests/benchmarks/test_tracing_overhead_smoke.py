"""The tracing overhead benchmark runs end to end in smoke mode (four child processes) and writes its results."""

import json

import pytest

from benchmarks import tracing_overhead

pytestmark = pytest.mark.slow  # four processes that each load the tiny model: about a minute on 2 cores


def test_tracing_overhead_smoke(tmp_path):
    result = tracing_overhead.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == list(tracing_overhead.MODES)
    for row in rows.values():
        assert row["requests"] == 4 and 0 < row["p50_ms"] <= row["p90_ms"]
    # Only a sampled provider records spans: FastAPI's server span plus the ingress, vision and LLM ones.
    assert rows["baseline"]["spans_per_request"] == rows["off"]["spans_per_request"] == 0
    assert rows["sampled_0"]["spans_per_request"] == 0
    assert rows["sampled_1"]["spans_per_request"] >= 12
    assert rows["baseline"]["p50_vs_baseline"] == 1.0 and rows["off"]["p50_vs_off"] == 1.0
    summary = result["summary"]
    # The telemetry calls a request makes with tracing off are far below 1 % of its latency.
    assert (
        summary["telemetry_calls_when_off_us"] > 0 and summary["telemetry_calls_when_off_share_of_p50"] < 0.01
    )
    data = json.loads((tmp_path / "tracing_overhead_smoke.json").read_text())
    assert data["meta"]["torch"] and len(data["rows"]) == 4
    assert "| mode |" in (tmp_path / "tracing_overhead_smoke.md").read_text()
