"""Runs that travel (issue 24, item 7): file modes, the recorded manifest path, `view` exec,
progress of long steps, TensorBoard curves."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cxrdebias import fileio
from cxrdebias.training.runs import staging_folder


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_give_plain_file_modes(tmp_path, umask_022):
    """mkstemp makes 0600 files and mkdtemp 0700 folders; what cxrdebias writes is 0644 / 0755."""
    fileio.write_text_atomic(tmp_path / "a.txt", "x")
    fileio.write_json_atomic(tmp_path / "sub" / "b.json", {"a": 1})
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "sub" / "b.json") == 0o644
    assert _mode(tmp_path / "sub") == 0o755
    assert _mode(staging_folder(tmp_path / "report")) == 0o755


def test_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        fileio.write_text_atomic(tmp_path / "private.txt", "x")
        assert _mode(tmp_path / "private.txt") == 0o600
    finally:
        os.umask(old)
