"""Shared helpers of the benchmark scripts: run metadata and JSON + Markdown output.

Every benchmark writes ``benchmarks/results/<name>.json`` (all numbers plus the metadata of the run:
machine, versions, commit) and ``benchmarks/results/<name>.md`` (a table a person reads).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent
    ).stdout


def git_commit() -> str | None:
    """The short commit, with ``-dirty`` when code (results files aside) changed since it."""
    try:
        commit = _git("rev-parse", "--short", "HEAD").strip()
        status = _git("status", "--porcelain", "--untracked-files=no")
        changed = [line for line in status.splitlines() if "benchmarks/results/" not in line]
        return f"{commit}-dirty" if changed else commit
    except Exception:
        return None


def run_metadata() -> dict[str, Any]:
    """Machine, versions and commit of this run."""
    meta: dict[str, Any] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "ray": _version("ray"),
        "commit": git_commit(),
    }
    try:
        import torch

        meta["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
            meta["cuda"] = torch.version.cuda
    except Exception:
        pass
    meta["flash_attn"] = _version("flash_attn")
    return meta


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts), in ``columns`` order (default: keys of the first row)."""
    if not rows:
        return "_no rows_\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: list[dict[str, Any]],
    *,
    columns: list[str] | None = None,
    summary: dict[str, Any] | None = None,
    title: str | None = None,
    notes: str | None = None,
    out_dir: Path | str | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir`` (default ``benchmarks/results``)."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    meta = run_metadata()
    payload = {"name": name, "meta": meta, "summary": summary or {}, "rows": rows}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    md = [f"# {title or name}", ""]
    if notes:
        md += [notes.strip(), ""]
    if summary:
        md += (
            ["| summary | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in summary.items()] + [""]
        )
    md += [markdown_table(rows, columns), ""]
    md += [
        f"_Run {meta['timestamp']} on {meta['cpu']} ({meta['cpu_count']} CPUs"
        + (f", {meta['gpu']}" if meta.get("gpu") else "")
        + f"), torch {meta['torch']}, transformers {meta['transformers']}, commit {meta['commit']}._",
        "",
    ]
    md_path = out / f"{name}.md"
    md_path.write_text("\n".join(md))
    return json_path, md_path
