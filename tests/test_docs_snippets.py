"""The Python examples of README.md and docs/engine.md run as written (a new user copies them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SNIPPETS = [
    (path, index, code)
    for path in ("README.md", "docs/engine.md")
    for index, code in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S))
]


@pytest.mark.parametrize(("path", "index", "code"), SNIPPETS, ids=[f"{p}#{i}" for p, i, _ in SNIPPETS])
def test_the_example_runs_as_written(path, index, code, capsys):
    exec(compile(code, f"{path} python block {index}", "exec"), {"__name__": "__main__"})
    if path == "README.md":  # the held-out picture's answer, both paths
        assert capsys.readouterr().out.count("purple") == 2
