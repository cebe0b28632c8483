"""The one atomic file write of the project: a temporary file in the same folder, fsync, then rename.

Every output of a run (config.yaml, checkpoint.pt, summary.md, plots, results.json, label arrays) goes
through `atomic_write`, so a reader, a crash or a full disk only ever sees the old file or the complete new
one, never a torn one. Files are created with mode 0666 minus the process umask (0644 under the usual
umask 022), like any `open(path, "w")`: readable by others, unlike `tempfile.mkstemp`'s owner-only 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_bytes", "write_json", "write_text"]


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no thread creates files meanwhile
    # in this process that could observe the brief 0o022).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, *, binary: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    The data is flushed and fsynced before the rename, and the folder entry after it (where the
    platform allows), so the new file survives a power cut once the block returns. On any error the
    temporary file is removed and `path` keeps its previous content.

    Args:
        path: destination file; its folder is created if needed.
        binary: open in binary mode (else text, UTF-8).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    mode = 0o666 & ~_umask()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_bytes(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Atomically write a binary file produced by `write(handle)` (torch.save, np.save, savefig)."""
    with atomic_write(path, binary=True) as handle:
        write(handle)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    with atomic_write(path, binary=False) as handle:
        handle.write(text)


def write_json(path: str | Path, payload: Any) -> None:
    """Atomically write `payload` as indented JSON with a final newline."""
    write_text(path, json.dumps(payload, indent=2) + "\n")
