"""One Markdown report of every benchmark result, with PNG plots.

Reads each ``<name>.json`` that :func:`benchmarks.common.write_results` wrote under
``benchmarks/results/`` (``{"name", "meta", "summary", "rows"}``) and writes ``report.md`` beside
them: a header stamped with the machine, versions and commit of the report run, then per benchmark
the machine / commit it ran on, its summary, its table and a plot (``report-<name>.png``).

The prefill benchmark gets a dedicated plot (TTFT and speedup against the physical limit per prompt
length); any other benchmark gets a generic one: x = a size-like numeric column (prompt tokens,
concurrency, ...), one line per value of its first text column, one panel per measured column.

    python -m benchmarks.report                         # benchmarks/results/report.md
    python -m benchmarks.report --results-dir DIR       # another results folder
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, fmt, markdown_table, run_metadata

#: Numeric columns preferred as the x axis of the generic plot, in order.
X_CANDIDATES = (
    "n_tokens",
    "prompt_tokens",
    "tokens",
    "seq_len",
    "concurrency",
    "num_requests",
    "requests",
    "image_size",
    "images",
    "batch",
    "batch_size",
    "keep_ratio",
    "tau",
)
MAX_PANELS = 4
MAX_SERIES = 12


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every benchmark JSON under ``results_dir`` and its subfolders (``{"rows": [...], ...}``), by path.

    Each result's ``_key`` is its path relative to ``results_dir`` without ``.json``: two files whose
    ``name`` fields agree (``serve.json`` and ``serve_overhead.json`` are both ``serve``) keep their own
    section and plot. A file without a ``name`` (older scripts) is named by its key.
    """
    results = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(payload, dict) and isinstance(payload.get("rows"), list):
            key = path.relative_to(results_dir).with_suffix("").as_posix()
            payload["_path"], payload["_key"] = path, key
            payload.setdefault("name", key)
            results.append(payload)
    return results


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def scalar_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns of ``rows`` (first-seen order) whose values are scalars (lists and dicts are left out)."""
    columns: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in columns and not isinstance(value, list | dict):
                columns.append(key)
    return [c for c in columns if all(not isinstance(r.get(c), list | dict) for r in rows)]


def numeric_columns(rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in scalar_columns(rows) if all(is_number(r.get(c)) for r in rows)]


def distinct(rows: Iterable[dict[str, Any]], column: str) -> list[Any]:
    seen: list[Any] = []
    for row in rows:
        if row.get(column) not in seen:
            seen.append(row.get(column))
    return seen


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_prefill(result: dict[str, Any], path: Path) -> Path | None:
    """TTFT per configuration and speedup vs the r^2 limit, both against the prompt length."""
    rows = result["rows"]
    if not rows or "ttft_s" not in rows[0]:
        return None
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    fig, (ax_ttft, ax_speed) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in distinct(rows, "config"):
        series = sorted((r for r in rows if r["config"] == config), key=lambda r: r["n_tokens"])
        x = [r["n_tokens"] for r in series]
        line = ax_ttft.plot(x, [r["ttft_s"] for r in series], marker="o", label=config)[0]
        if config == "dense":
            continue
        ax_speed.plot(x, [r["speedup"] for r in series], marker="o", color=line.get_color(), label=config)
        ax_speed.plot(x, [r["limit_speedup"] for r in series], ls="--", color=line.get_color(), alpha=0.6)
    ax_ttft.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="TTFT (s)", title="Prefill time")
    ax_speed.set(
        xscale="log", xlabel="prompt tokens", ylabel="speedup vs dense", title="Speedup (dashed: r² limit)"
    )
    ax_speed.axhline(1.0, color="grey", lw=0.8)
    sizes = sorted(distinct(rows, "n_tokens"))
    for ax in (ax_ttft, ax_speed):
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sizes, [f"{n // 1024}K" if n >= 1024 else str(n) for n in sizes])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['name']}: {result.get('summary', {}).get('layout', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_generic(result: dict[str, Any], path: Path) -> Path | None:
    """Measured columns against a size-like column, one line per value of the first text column."""
    rows = result["rows"]
    numeric = numeric_columns(rows)
    varying = [c for c in numeric if len(distinct(rows, c)) > 1]
    x_col = next((c for c in X_CANDIDATES if c in varying), varying[0] if varying else None)
    if x_col is None:
        return None
    text = [c for c in scalar_columns(rows) if c not in numeric]
    series_col = next((c for c in text if 1 < len(distinct(rows, c)) <= MAX_SERIES), None)
    y_cols = [c for c in varying if c != x_col][:MAX_PANELS]
    if not y_cols:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(y_cols), figsize=(4.2 * len(y_cols), 3.8), squeeze=False)
    groups = distinct(rows, series_col) if series_col else [None]
    for ax, y_col in zip(axes[0], y_cols, strict=True):
        for group in groups:
            series = [r for r in rows if series_col is None or r.get(series_col) == group]
            series = sorted(series, key=lambda r: r[x_col])
            ax.plot([r[x_col] for r in series], [r[y_col] for r in series], marker="o", label=str(group))
        ax.set(xlabel=x_col, ylabel=y_col, title=y_col)
        ax.grid(True, alpha=0.3)
        if series_col:
            ax.legend(fontsize=7)
    fig.suptitle(result["name"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTTERS = {"prefill": plot_prefill}


def plot(result: dict[str, Any], out_dir: Path) -> Path | None:
    """The plot of one result (its name's dedicated plotter or the generic one), or None when nothing varies."""
    name = str(result["name"])
    plotter = next((fn for prefix, fn in PLOTTERS.items() if name.startswith(prefix)), plot_generic)
    return plotter(result, out_dir / f"report-{safe_name(str(result.get('_key', name)))}.png")


def safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------


def stamp(meta: dict[str, Any]) -> str:
    """One line: machine, versions, commit of a run."""
    machine = f"{meta.get('cpu', '?')} ({meta.get('cpu_count', '?')} CPUs"
    if meta.get("torch_threads"):
        machine += f", {meta['torch_threads']} torch threads"
    if meta.get("gpu"):
        machine += f", {meta['gpu']}, CUDA {meta.get('cuda')}"
    machine += ")"
    versions = ", ".join(
        f"{name} {meta[name]}"
        for name in ("python", "torch", "transformers", "ray", "flash_attn")
        if meta.get(name)
    )
    return f"{meta.get('timestamp', '?')} on {machine}; {versions}; commit {meta.get('commit')}"


def section(result: dict[str, Any], image: Path | None, head_commit: str | None) -> str:
    meta = result.get("meta", {})
    key = str(result.get("_key", result["name"]))
    title = key if key == result["name"] else f"{key} ({result['name']})"
    lines = [f"## {title}", "", f'<a id="{safe_name(key).lower()}"></a>', "", f"_Run {stamp(meta)}._", ""]
    if head_commit and meta.get("commit") and meta["commit"] != head_commit:
        lines += [f"> Measured at commit {meta['commit']}; the report is at {head_commit}.", ""]
    summary = result.get("summary") or {}
    if summary:
        lines += ["| summary | value |", "|---|---|"]
        lines += [
            f"| {key} | {fmt(value)} |"
            for key, value in summary.items()
            if not isinstance(value, list | dict)
        ]
        lines.append("")
    rows = result["rows"]
    lines.append(markdown_table(rows, scalar_columns(rows)) if rows else "_no rows_\n")
    if image is not None:
        lines += [f"![{result['name']}]({image.name})", ""]
    return "\n".join(lines)


def build_report(results_dir: Path | str = RESULTS_DIR, out_name: str = "report.md") -> Path:
    """Write ``results_dir/out_name`` (and the PNGs beside it); returns its path."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = run_metadata()
    results = load_results(results_dir)
    parts = [
        "# Benchmark report",
        "",
        f"_Generated {stamp(meta)}._",
        "",
        f"{len(results)} result file(s) from `{results_dir}`. Each benchmark runs its baseline and ZipVL side by "
        "side in one process; ratios are the robust figures on a shared machine.",
        "",
    ]
    if results:
        parts += ["| benchmark | rows | run at | commit |", "|---|---|---|---|"]
        parts += [
            f"| [{r['_key']}](#{safe_name(str(r['_key'])).lower()}) | {len(r['rows'])} | "
            f"{r.get('meta', {}).get('timestamp', '?')} | {r.get('meta', {}).get('commit')} |"
            for r in results
        ]
        parts.append("")
    for result in results:
        image = plot(result, results_dir)
        parts.append(section(result, image, meta.get("commit")))
    path = results_dir / out_name
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Collect benchmark results into one Markdown report.")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="folder of <name>.json results")
    parser.add_argument("--out", default="report.md", help="report file name inside the results folder")
    args = parser.parse_args(argv)
    path = build_report(args.results_dir, args.out)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
