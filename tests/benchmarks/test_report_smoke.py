"""The benchmark report collects every result JSON into one Markdown file with PNG plots."""

from __future__ import annotations

import json

from benchmarks import report
from benchmarks.common import write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_fixtures(out_dir):
    prefill_rows = [
        {"n_tokens": n, "config": c, "ttft_s": t, "speedup": s, "limit_speedup": ls, "kept_per_layer": [1, 2]}
        for n, scale in ((4096, 1.0), (8192, 3.0))
        for c, t, s, ls in (("dense", 2.0 * scale, 1.0, 1.0), ("zipvl r=0.3", 1.0 * scale, 2.0, 2.2))
    ]
    write_results("prefill", prefill_rows, summary={"layout": "test"}, out_dir=out_dir)
    serve_rows = [
        {"zipvl": z, "concurrency": c, "ttft_p50_ms": 10.0 * c * (0.5 if z == "on" else 1.0), "errors": 0}
        for z in ("on", "off")
        for c in (1, 4, 16)
    ]
    write_results("serve", serve_rows, summary={"requests": 48}, out_dir=out_dir)
    write_results("flat", [{"metric": "x", "value": 1.0}], out_dir=out_dir)  # nothing varies: no plot
    (out_dir / "not-a-benchmark.json").write_text(json.dumps({"hello": 1}))
    (out_dir / "broken.json").write_text("{")


def test_report_collects_every_result_with_plots(tmp_path):
    write_fixtures(tmp_path)
    path = report.main(["--results-dir", str(tmp_path)])
    text = path.read_text()
    assert path == tmp_path / "report.md"
    for name in ("prefill", "serve", "flat"):
        assert f"## {name}" in text
    assert "not-a-benchmark" not in text and "broken" not in text
    assert "torch" in text and "commit" in text  # stamped with versions and commit
    assert "kept_per_layer" not in text  # list-valued columns stay out of the tables
    assert "| zipvl r=0.3 |" in text or "| 4096 | zipvl r=0.3 |" in text
    for name in ("prefill", "serve"):
        image = tmp_path / f"report-{name}.png"
        assert f"]({image.name})" in text
        assert image.read_bytes()[:8] == PNG_MAGIC
    assert not (tmp_path / "report-flat.png").exists()


def test_generic_plot_picks_a_size_column_and_series(tmp_path):
    rows = [{"mode": m, "concurrency": c, "tps": float(c)} for m in ("a", "b") for c in (1, 2)]
    assert report.numeric_columns(rows) == ["concurrency", "tps"]
    image = report.plot_generic({"name": "x", "rows": rows}, tmp_path / "x.png")
    assert image is not None and image.read_bytes()[:8] == PNG_MAGIC
    assert report.plot_generic({"name": "y", "rows": [{"mode": "a", "tps": 1.0}]}, tmp_path / "y.png") is None


def test_results_that_share_a_name_keep_their_own_section_and_plot(tmp_path):
    """serve.json and serve_overhead.json both say ``"name": "serve"``: the second plot overwrote the
    first; older scripts' files without a name, and results in subfolders, were left out."""
    rows = [{"zipvl": z, "concurrency": c, "ttft_p50_ms": float(c)} for z in ("on", "off") for c in (1, 4)]
    write_results("serve", rows, out_dir=tmp_path)
    payload = json.loads((tmp_path / "serve.json").read_text())
    (tmp_path / "serve_overhead.json").write_text(json.dumps({**payload, "rows": rows[:2]}))
    (tmp_path / "fidelity_select.json").write_text(json.dumps({"rows": [{"setting": "plain", "acc": 0.5}]}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "low.json").write_text(
        json.dumps({"rows": [{"tau": t, "acc": t} for t in (0.5, 0.7)]})
    )
    text = report.main(["--results-dir", str(tmp_path)]).read_text()
    assert "## serve\n" in text and "## serve_overhead (serve)" in text
    assert "## fidelity_select" in text and "## sub/low" in text
    assert (tmp_path / "report-serve.png").exists() and (tmp_path / "report-serve_overhead.png").exists()
