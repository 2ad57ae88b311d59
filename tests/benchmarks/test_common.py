"""Result stamps: the commit a benchmark ran at says when the code had uncommitted changes."""

from __future__ import annotations

import pytest

from benchmarks import common


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("", "abc1234"),
        (" M benchmarks/results/decode.json\n", "abc1234"),  # results written by the run itself
        (" M zipvl_ray/sparsity.py\n M benchmarks/results/decode.json\n", "abc1234-dirty"),
    ],
)
def test_commit_stamp_says_dirty_when_code_changed(monkeypatch, status, expected):
    answers = {"rev-parse": "abc1234\n", "status": status}
    monkeypatch.setattr(common, "_git", lambda *args: answers[args[0]])
    assert common.git_commit() == expected


def test_commit_stamp_is_none_outside_git(monkeypatch):
    def fail(*args):
        raise FileNotFoundError("git")

    monkeypatch.setattr(common, "_git", fail)
    assert common.git_commit() is None
