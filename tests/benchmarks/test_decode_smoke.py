"""The decode benchmark runs end to end in smoke mode and writes its JSON and Markdown."""

import json

import pytest
import torch

from benchmarks import decode


@pytest.mark.parametrize("timing", [[], ["--threads", "1", "--clock", "cpu"]], ids=["wall", "cpu-clock"])
def test_decode_benchmark_smoke(tmp_path, timing):
    threads = torch.get_num_threads()
    result = decode.main(["--smoke", "--out-dir", str(tmp_path), *timing])
    assert torch.get_num_threads() == threads  # restored for whatever runs next
    assert result["summary"]["clock"] == ("cpu" if timing else "wall")
    rows = {r["config"]: r for r in result["rows"]}
    assert set(rows) == {"dense", "zipvl r=0.35", "zipvl adaptive (tau=0.975)"}
    for row in rows.values():
        assert row["finished"] == result["summary"]["requests"]
        assert row["rounds"] == 2  # interleaved rounds: the median, between the rounds' min and max
        assert (
            0 < row["decode_tokens_per_s_min"] <= row["decode_tokens_per_s"] <= row["decode_tokens_per_s_max"]
        )
    assert len(result["summary"]["decode_throughput_x_at_r0.35_rounds"]) == 2
    # At the same pool, ZipVL r=0.35 never fits fewer sequences than dense.
    assert rows["zipvl r=0.35"]["max_concurrent_seqs"] >= rows["dense"]["max_concurrent_seqs"]
    assert rows["zipvl r=0.35"]["mean_kept_fraction"] < 0.5
    data = json.loads((tmp_path / "decode_smoke.json").read_text())
    assert data["meta"]["torch"] and len(data["rows"]) == 3
    assert "| config |" in (tmp_path / "decode_smoke.md").read_text()
