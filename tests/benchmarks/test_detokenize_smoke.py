"""benchmarks/detokenize.py: the smoke run (both modes, identical texts, output files)."""

from __future__ import annotations

import json

from benchmarks.detokenize import main


def test_detokenize_benchmark_smoke(tmp_path):
    result = main(["--smoke", "--out-dir", str(tmp_path)])
    assert [row["mode"] for row in result["rows"]] == ["whole decode", "incremental"]
    assert result["summary"]["identical_texts"] is True
    assert all(row["decode_steps"] > 0 and row["decode_ms_per_step"] > 0 for row in result["rows"])
    payload = json.loads((tmp_path / "detokenize-smoke.json").read_text())
    assert payload["summary"]["decode_step_speedup_x"] > 0 and (tmp_path / "detokenize-smoke.md").exists()
