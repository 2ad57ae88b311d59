"""Smoke run of ``benchmarks/serve.py`` (in-process server, real tiny engine, no Ray) so it never rots."""

from __future__ import annotations

import json

from benchmarks.serve import main


def test_serve_benchmark_smoke(tmp_path):
    result = main(["--smoke", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    # ZipVL on and off alternate which goes first, point by point
    assert [(r["concurrency"], r["zipvl"]) for r in rows] == [(1, "on"), (1, "off"), (2, "off"), (2, "on")]
    assert all(r["errors"] == 0 and r["ttft_p50_ms"] > 0 and r["output_tok_per_s"] > 0 for r in rows)
    summary = result["summary"]
    assert summary["http_p50_ms"] > 0 and summary["direct_p50_ms"] > 0
    assert summary["direct_torch_threads"] == 1 and summary["direct_config"] == "none"
    # the in-process app arm splits the overhead: its two parts add up to it
    assert summary["in_process_app_p50_ms"] > 0
    parts = summary["api_layer_p50_ms"] + summary["ray_serve_p50_ms"]
    assert abs(parts - summary["serving_overhead_p50_ms"]) < 1e-6
    # the paired overhead (median of per-round differences) and the --compare-url arm (the same server here)
    assert summary["serving_overhead_paired_p50_ms"] is not None
    # Fresh pictures every run: the service never answers a timed request from its encoder cache.
    assert summary["encoder_cache_hits_during_overhead"] in (0, None)
    assert isinstance(summary["picture_seed_base"], int)
    assert summary["compare_url"] == summary["url"] and summary["compare_http_p50_ms"] > 0
    assert (
        abs(
            summary["compare_serving_overhead_p50_ms"]
            - (summary["compare_http_p50_ms"] - summary["direct_p50_ms"])
        )
        < 1e-6
    )
    payload = json.loads((tmp_path / "serve-smoke.json").read_text())
    assert payload["rows"] == json.loads(json.dumps(rows)) and (tmp_path / "serve-smoke.md").exists()
