"""The decode benchmark runs end to end in smoke mode and writes its JSON and Markdown."""

import json

from benchmarks import decode


def test_decode_benchmark_smoke(tmp_path):
    result = decode.main(["--smoke", "--out-dir", str(tmp_path)])
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "zipvl r=0.35", "zipvl adaptive (tau=0.975)"}
    for row in rows.values():
        assert row["finished"] == result["summary"]["requests"]
        assert row["decode_tokens_per_s"] > 0
    # At the same pool, ZipVL r=0.35 never fits fewer sequences than dense.
    assert rows["zipvl r=0.35"]["max_concurrent_seqs"] >= rows["dense"]["max_concurrent_seqs"]
    assert rows["zipvl r=0.35"]["mean_kept_fraction"] < 0.5
    data = json.loads((tmp_path / "decode_smoke.json").read_text())
    assert data["meta"]["torch"] and len(data["rows"]) == 3
    assert "| config |" in (tmp_path / "decode_smoke.md").read_text()
