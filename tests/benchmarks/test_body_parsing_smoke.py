"""benchmarks/body_parsing.py: the smoke run (both arms answer, pings measured, output files)."""

from __future__ import annotations

import json

from benchmarks.body_parsing import ARMS, main


def test_body_parsing_benchmark_smoke(tmp_path):
    result = main(["--smoke", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    assert {row["arm"] for row in rows} == set(ARMS)
    # The conversation is parsed and validated, then refused as longer than max_model_len: a 400 on both.
    assert all(row["statuses"] == [400] and row["request_s"] > 0 and row["pings"] >= 1 for row in rows)
    payload = json.loads((tmp_path / "body_parsing-smoke.json").read_text())
    assert payload["rows"] and (tmp_path / "body_parsing-smoke.md").exists()
