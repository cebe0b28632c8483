"""The one atomic file write of the project: a temporary file in the same folder, fsync, then rename.

Every output of a run (config.yaml, checkpoint.pt, summary.md, plots, results.json, label arrays) goes
through `atomic_write`, so a reader, a crash or a full disk only ever sees the old file or the complete new
one, never a torn one. Files are created with mode 0666 minus the process umask (0644 under the usual
umask 022), like any `open(path, "w")`: readable by others, unlike `tempfile.mkstemp`'s owner-only 0600.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DiskFullError",
    "atomic_write",
    "disk_full_cause",
    "remove_stale_temporaries",
    "write_bytes",
    "write_json",
    "write_text",
]

# The temporary of `atomic_write`: ".NAME.<8 hex>.tmp" beside NAME.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left on the device of `folder`; the message names the folder and the file being written."""

    def __init__(self, folder: Path, name: str) -> None:
        super().__init__(
            errno.ENOSPC,
            f"no space left on {folder} (writing {name}); free space there, then run the command again "
            "(a training run continues with --resume RUN_DIR; the files it had written are intact)",
        )
        self.folder = folder

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full_cause(err: BaseException) -> OSError | None:
    """The "no space left" OSError behind `err`, if any.

    torch.save reports a failed write as a RuntimeError of its C++ writer ("inline_container.cc");
    the OSError of the Python handle is only its context, so the chain is searched.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return current
        current = current.__cause__ or current.__context__
    return None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries of `atomic_write` left in `folder` by a killed process; returns them.

    Only call it while no other process writes into `folder` (a run folder is locked: `runs.open_run`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_write(path: str | Path, *, binary: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    The data is flushed and fsynced before the rename, and the folder entry after it (where the
    platform allows), so the new file survives a power cut once the block returns. On any error the
    temporary file is removed and `path` keeps its previous content; a full disk is raised as
    `DiskFullError`, which names the folder.

    Args:
        path: destination file; its folder is created if needed.
        binary: open in binary mode (else text, UTF-8).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # 0666 filtered by the process umask (as open() does), not mkstemp's owner-only 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, DiskFullError) and disk_full_cause(err) is not None:
            raise DiskFullError(path.parent, path.name) from err
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
