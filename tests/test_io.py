"""The one atomic write: complete file or the old one, readable by others (0644 under umask 022)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dualref import io


@pytest.fixture
def umask_022() -> object:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_write_creates_0644_and_replaces(tmp_path: Path, umask_022: object) -> None:
    path = tmp_path / "sub" / "file.txt"
    io.write_text(path, "one")
    assert path.read_text() == "one"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    io.write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["file.txt"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.bin"
    io.write_bytes(path, lambda handle: handle.write(b"old"))

    def broken(handle: object) -> None:
        handle.write(b"half")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.write_bytes(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_umask_is_respected(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        io.write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
