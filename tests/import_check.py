"""Which heavy modules a fresh interpreter loads for one import statement (for the import-cost tests)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers")


def heavy_modules_loaded_by(statement: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """Run ``statement`` in a new Python process and return the modules of ``heavy`` it imported."""
    code = f"import sys; {statement}; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return [m for m in result.stdout.strip().split(",") if m]
