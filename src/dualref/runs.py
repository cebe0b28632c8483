"""A run folder: resolved config, log file, metrics as JSON lines, TensorBoard scalars when installed.

Layout of ``run_dir``::

    config.yaml      the resolved config (written when the run starts; a resume with changes rewrites it)
    run.log          everything the "dualref" logger said during the run (and its resumes)
    metrics.jsonl    one JSON object per `log_metrics` call: {"epoch", "kind", "time", ...metrics}
    checkpoint.pt    the latest training state (`checkpoint.save_checkpoint`)
    run.lock         while a process uses the folder: its pid (a lock the kernel releases when it dies)
    tensorboard/     event files, only when the `tensorboard` package is importable

A fresh run never reuses a folder that already holds one, so results are never overwritten. Only one
process at a time uses a run folder; opening it cleans up after a killed one (a torn last metrics line,
the temporaries of interrupted atomic writes, a lock whose holder is dead).

Size: over 400 lines: the run folder's whole life (lock, config, log, metrics append / repair / read,
TensorBoard) in one place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import yaml

from dualref import io
from dualref.config import config_to_dict, save_config

LOGGER_NAME = "dualref"
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = "run.lock"
_RUN_MARKERS = (CONFIG_FILE, METRICS_FILE, CHECKPOINT_FILE)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two nested config dicts, one ``key: old -> new`` per line.

    Args:
        stored: the config the run started with (e.g. read from config.yaml).
        current: the config of the resumed process (`config_to_dict`).

    Returns:
        Sorted list of differences; empty when the configs agree.
    """
    # A YAML round trip puts both sides in the same form (tuples as lists, floats as YAML reads them).
    old = _flatten(yaml.safe_load(yaml.safe_dump(dict(stored))) or {})
    new = _flatten(yaml.safe_load(yaml.safe_dump(dict(current))) or {})
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            shown_before = "<absent>" if before is missing else repr(before)
            shown_after = "<absent>" if after is missing else repr(after)
            lines.append(f"{key}: {shown_before} -> {shown_after}")
    return lines


def _json_value(value: Any) -> Any:
    """Plain JSON value of a metric: integers stay integers, non-finite floats become null."""
    if isinstance(value, bool | str | int) or value is None:
        return value
    if isinstance(value, np.integer):
        return int(value)
    try:
        number = float(value)  # floats, numpy floats, 0-d tensors
    except (TypeError, ValueError):
        raise ValueError(
            f"metric value {value!r} of type {type(value).__name__}; expected a number or a string"
        ) from None
    return number if math.isfinite(number) else None


def read_records(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order (only those of `kind` when given).

    A torn last line (a crash or a full disk while appending) is skipped with a warning; a bad line
    anywhere else is an error naming the file and line.

    Args:
        run_dir: the run folder.
        kind: e.g. "adapt", "eval_target"; None = every record.

    Returns:
        The records; empty when the file does not exist yet.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                logging.getLogger(LOGGER_NAME).warning("%s:%d is a torn line; skipped", path, number)
                continue
            raise ValueError(f"{path}:{number} is not a JSON line ({err})") from None
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records


class _LogFile(logging.FileHandler):
    """run.log. A failed write (a full disk) stops it quietly instead of printing a traceback for every
    message: the console keeps showing them, and the command reports the disk itself in one line."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.failed = True


class Run:
    """An open run folder. Create it with `open_run`; close it (or use it as a context manager).

    Attributes:
        path: the run folder.
        logger: the "dualref" logger, writing to the console and to ``run.log`` while the run is open.
        checkpoint_path: ``path / "checkpoint.pt"``.
        resumed: whether the run continues an earlier one.
        config_differences: on resume, the differences between the stored and the current config.
    """

    def __init__(
        self,
        path: Path,
        *,
        resumed: bool,
        config_differences: list[str],
        lock: RunLock | None = None,
    ) -> None:
        self.path = path
        self._lock = lock
        self.resumed = resumed
        self.config_differences = config_differences
        self.checkpoint_path = path / CHECKPOINT_FILE
        self.metrics_path = path / METRICS_FILE
        self.logger = logging.getLogger(LOGGER_NAME)
        self._previous_level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._file_handler = _LogFile(path / LOG_FILE, encoding="utf-8")
        self._file_handler.setFormatter(formatter)
        self._console_handler = logging.StreamHandler(sys.stderr)
        self._console_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        self.logger.addHandler(self._file_handler)
        self.logger.addHandler(self._console_handler)
        self._tensorboard = self._open_tensorboard()
        self._closed = False

    def _open_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the optional `tensorboard` package is absent: JSON lines only
            return None
        return SummaryWriter(log_dir=str(self.path / "tensorboard"))

    def log_metrics(self, epoch: int, metrics: Mapping[str, float | int | str], kind: str) -> None:
        """Append one JSON line ``{"epoch", "kind", "time", **metrics}`` to metrics.jsonl.

        The line is appended and fsynced; a failed write (a full disk) is cut off again, so the file
        holds whole lines only (a kill can still tear the last one: `open_run` repairs it on resume).
        Numeric metrics also go to TensorBoard as ``{kind}/{name}`` at step `epoch` when available.

        Args:
            epoch: the epoch the metrics belong to (0-based, or the number completed; the caller's
                convention, stated in its docs).
            metrics: name -> number or string. Non-finite numbers are written as null.
            kind: what the metrics are, e.g. "train", "eval_source", "direct_transfer".
        """
        if self._closed:
            raise ValueError(f"run {self.path} is closed; cannot log metrics")
        reserved = {"epoch", "kind", "time"} & set(metrics)
        if reserved:
            raise ValueError(f"metric names {sorted(reserved)} are reserved in metrics.jsonl")
        record: dict[str, Any] = {"epoch": int(epoch), "kind": kind, "time": round(time.time(), 3)}
        record.update({name: _json_value(value) for name, value in metrics.items()})
        _append_line(self.metrics_path, json.dumps(record, allow_nan=False) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if numeric and name not in ("epoch", "kind", "time"):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, int(epoch))
            self._tensorboard.flush()

    def discard_records_after(self, epoch: int) -> None:
        """Drop the records of epochs after `epoch`, the one the checkpoint holds.

        A process killed between logging an epoch's records and saving its checkpoint left them; the
        resumed run trains that epoch again and logs them again, so the file ends as an uninterrupted
        run's would.
        """
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, start=1):
            try:
                if not line.strip() or int(json.loads(line)["epoch"]) <= epoch:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                where = f"{self.metrics_path}:{number}"
                raise ValueError(f"{where} is not a metrics record: {line[:80]!r}") from None
        if len(kept) < len(lines):
            io.write_text(self.metrics_path, "".join(kept))
            self.logger.warning(
                "%s: dropped %d record(s) of the epochs after %d (logged after the last checkpoint, "
                "before the previous process stopped); they are logged again when those epochs rerun",
                self.metrics_path,
                len(lines) - len(kept),
                epoch,
            )

    def close(self) -> None:
        """Detach the log handlers, close TensorBoard and release the folder; idempotent."""
        if self._closed:
            return
        self._closed = True
        for handler in (self._file_handler, self._console_handler):
            self.logger.removeHandler(handler)
            with contextlib.suppress(OSError):  # a full disk: the unwritten rest of run.log is lost
                handler.close()
        self.logger.setLevel(self._previous_level)
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.logger.error("run stopped: %s: %s", type(exc).__name__, exc)
        self.close()


class FollowerRun:
    """The run folder as the ranks other than 0 see it under torchrun: its paths, and no writes.

    Rank 0 holds the `Run` (lock, config.yaml, run.log, metrics.jsonl, checkpoints); the others only read
    the checkpoint when resuming. Their warnings still reach the console, prefixed with the rank.
    """

    def __init__(self, path: Path, *, resumed: bool, rank: int) -> None:
        self.path = path
        self.resumed = resumed
        self.checkpoint_path = path / CHECKPOINT_FILE
        self.logger = logging.getLogger(LOGGER_NAME)
        self._handler = logging.StreamHandler(sys.stderr)
        self._handler.setLevel(logging.WARNING)
        self._handler.setFormatter(logging.Formatter(f"%(asctime)s rank {rank}: %(message)s", "%H:%M:%S"))
        self.logger.addHandler(self._handler)

    def log_metrics(self, epoch: int, metrics: Mapping[str, float | int | str], kind: str) -> None:
        """Nothing: rank 0 logs."""

    def discard_records_after(self, epoch: int) -> None:
        """Nothing: rank 0 owns metrics.jsonl."""

    def close(self) -> None:
        self.logger.removeHandler(self._handler)

    def __enter__(self) -> FollowerRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


AnyRun = Run | FollowerRun  # what the pipelines hold: rank 0's run, or another rank's view of it


def open_run(run_dir: str | Path, config: Any, *, resume: bool) -> Run:
    """Open a fresh run folder, or reopen one to resume it; the folder is locked until `Run.close`.

    Args:
        run_dir: the run folder (created when absent).
        config: the resolved config dataclass (PretrainConfig / AdaptConfig).
        resume: False: start a new run, refusing a folder that already holds one. True: continue the
            run in `run_dir`; differences between the stored config.yaml and `config` (e.g. a longer
            `optim.epochs`) are logged and config.yaml is rewritten to `config`, the one the run
            continues with (call this after validating `config`). A torn last line of metrics.jsonl
            is cut off, saying so.

    Returns:
        The open Run.

    Raises:
        ValueError: a fresh run in a folder that holds a run; a folder in use by another process
            (naming its pid); a run folder that is a file or cannot be created.
        FileNotFoundError: resuming a folder without config.yaml.
    """
    path = Path(run_dir)
    current = config_to_dict(config)
    if resume:
        stored_path = path / CONFIG_FILE
        if not stored_path.is_file():
            raise FileNotFoundError(
                f"cannot resume {path}: it holds no {CONFIG_FILE}; expected the folder of an earlier run"
            )
    else:
        _make_folder(path)
    lock, previous_holder = _lock_folder(path)
    try:
        notes: list[str] = []
        if previous_holder is not None:
            notes.append(f"took over the lock of process {previous_holder}, which is no longer running")
        stale = io.remove_stale_temporaries(path)
        if stale:
            names = ", ".join(p.name for p in stale)
            notes.append(f"removed {len(stale)} temporary file(s) of interrupted writes: {names}")
        if resume:
            stored = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
            differences = config_differences(stored, current)
            torn = _repair_last_line(path / METRICS_FILE)
            if torn:
                notes.append(f"{METRICS_FILE}: removed a torn last line ({torn} bytes) of a killed write")
            if differences:
                save_config(config, path / CONFIG_FILE)  # the config the run continues with
        else:
            existing = [name for name in _RUN_MARKERS if (path / name).exists()]
            if existing:
                raise ValueError(
                    f"run folder {path} already holds a run ({', '.join(existing)}); pass --resume {path} "
                    "to continue it, or choose another run.run_dir (results are never overwritten)"
                )
            differences = []
            save_config(config, path / CONFIG_FILE)
        run = Run(path, resumed=resume, config_differences=differences, lock=lock)
    except BaseException:
        lock.release()
        raise
    if resume:
        run.logger.info("resuming run %s", path)
    else:
        run.logger.info("run folder %s", path.resolve())
    for note in notes:
        run.logger.warning("%s", note)
    for line in differences:
        run.logger.warning("config differs from the stored %s: %s", CONFIG_FILE, line)
    if differences:
        run.logger.info("%s now holds the config this run continues with", CONFIG_FILE)
    return run


def _make_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"run folder {path} is a file, not a folder; choose another run.run_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if io.disk_full_cause(err) is not None:
            raise io.DiskFullError(path.parent, path.name) from err
        # A parent that is a file, a symbolic link loop, no permission: the user's path, named.
        raise ValueError(
            f"cannot create run folder {path}: {err.strerror or err}; choose another run.run_dir"
        ) from None


class RunLock:
    """An exclusive lock on RUN/run.lock, which holds the holder's pid for the refusal message.

    A POSIX record lock (`fcntl.lockf`): the kernel releases it when its process dies, however it dies,
    so a lock left by a killed run is free and the next process takes it over (saying whose it was);
    and, unlike `flock`, forked children (data-loader workers) do not hold it, so it is free as soon
    as the killed process is gone. POSIX locks do not exclude the process's own second lock, hence
    the in-process registry.
    """

    def __init__(self, path: Path, fd: int, key: tuple[int, int]) -> None:
        self.path, self._fd, self._key = path, fd, key

    def release(self) -> None:
        """Remove the lock file and unlock; idempotent."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing releases the lock
        self._fd = -1
        _HELD.discard(self._key)


_HELD: set[tuple[int, int]] = set()  # (device, inode) of the run folders this process has locked


def _holder(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _in_use(folder: Path, path: Path, holder: int | None) -> ValueError:
    return ValueError(
        f"run folder {folder} is in use by process {holder} (lock file {path}); wait for that process "
        "to end or stop it, then run the command again"
    )


def _lock_folder(folder: Path) -> tuple[RunLock, int | None]:
    """Lock `folder`; also the pid of a previous holder that died without releasing it (or None)."""
    path = folder / LOCK_FILE
    stat = os.stat(folder)
    key = (stat.st_dev, stat.st_ino)
    if key in _HELD:  # checked first: opening and closing the file would drop this process's lock
        raise _in_use(folder, path, os.getpid())
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ValueError(f"cannot lock run folder {folder}: {err.strerror or err} ({path})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(folder, path, holder) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock: retry
            os.close(fd)
            continue
        previous = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD.add(key)
        dead = previous if previous is not None and previous != os.getpid() else None
        return RunLock(path, fd, key), dead


def _repair_last_line(path: Path) -> int:
    """Cut an unterminated, unparsable last line off `path` (a kill mid-append); the bytes removed.

    A complete JSON object that only lacks its newline gets the newline instead.
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    if not tail:
        return 0
    try:
        complete = isinstance(json.loads(tail), dict)
    except ValueError:
        complete = False
    if complete:
        _append_line(path, "\n")
        return 0
    os.truncate(path, start)
    return len(tail)


def _append_line(path: Path, line: str) -> None:
    """Append `line` and fsync; on a failed write cut the file back, so no partial line stays behind."""
    data = memoryview(line.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if io.disk_full_cause(err) is not None:
                raise io.DiskFullError(path.parent, path.name) from err
            raise
    finally:
        os.close(fd)
