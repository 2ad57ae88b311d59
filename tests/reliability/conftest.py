"""Fixtures of the reliability tests: figures recorded for docs/reliability.md.

Set ``ZIPVL_RELIABILITY_REPORT=/path/report.json`` to collect every figure the tests measure (cases
tried, errors, load held, latencies, memory) into one JSON file; without it they are only printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

REPORT_ENV = "ZIPVL_RELIABILITY_REPORT"


@pytest.fixture(scope="session")
def record_figures():
    """``record(section, figures)``: print the figures and merge them into the report file if one is set."""

    def record(section: str, figures: dict[str, Any]) -> None:
        print(f"\n[reliability] {section}: {json.dumps(figures, sort_keys=True)}")
        path = os.environ.get(REPORT_ENV)
        if not path:
            return
        target = Path(path)
        report = json.loads(target.read_text()) if target.exists() else {}
        report[section] = figures
        target.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    return record
