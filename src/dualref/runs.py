"""A run folder: resolved config, log file, metrics as JSON lines, TensorBoard scalars when installed.

Layout of ``run_dir``::

    config.yaml      the resolved config (written once, when the run starts)
    run.log          everything the "dualref" logger said during the run (and its resumes)
    metrics.jsonl    one JSON object per `log_metrics` call: {"epoch", "kind", "time", ...metrics}
    checkpoint.pt    the latest training state (`checkpoint.save_checkpoint`)
    tensorboard/     event files, only when the `tensorboard` package is importable

A fresh run never reuses a folder that already holds one, so results are never overwritten.
"""

from __future__ import annotations

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

from dualref.config import config_to_dict, save_config

LOGGER_NAME = "dualref"
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
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


class Run:
    """An open run folder. Create it with `open_run`; close it (or use it as a context manager).

    Attributes:
        path: the run folder.
        logger: the "dualref" logger, writing to the console and to ``run.log`` while the run is open.
        checkpoint_path: ``path / "checkpoint.pt"``.
        resumed: whether the run continues an earlier one.
        config_differences: on resume, the differences between the stored and the current config.
    """

    def __init__(self, path: Path, *, resumed: bool, config_differences: list[str]) -> None:
        self.path = path
        self.resumed = resumed
        self.config_differences = config_differences
        self.checkpoint_path = path / CHECKPOINT_FILE
        self.metrics_path = path / METRICS_FILE
        self.logger = logging.getLogger(LOGGER_NAME)
        self._previous_level = self.logger.level
        if self.logger.getEffectiveLevel() > logging.INFO:
            self.logger.setLevel(logging.INFO)
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._file_handler = logging.FileHandler(path / LOG_FILE, encoding="utf-8")
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

        The line is written in one call, flushed and fsynced, so a crash leaves whole lines only.
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
        line = json.dumps(record, allow_nan=False) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if self._tensorboard is not None:
            for name, value in record.items():
                numeric = isinstance(value, int | float) and not isinstance(value, bool)
                if numeric and name not in ("epoch", "kind", "time"):
                    self._tensorboard.add_scalar(f"{kind}/{name}", value, int(epoch))
            self._tensorboard.flush()

    def close(self) -> None:
        """Detach the log handlers and close TensorBoard; idempotent."""
        if self._closed:
            return
        self._closed = True
        for handler in (self._file_handler, self._console_handler):
            self.logger.removeHandler(handler)
            handler.close()
        self.logger.setLevel(self._previous_level)
        if self._tensorboard is not None:
            self._tensorboard.close()

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


def open_run(run_dir: str | Path, config: Any, *, resume: bool) -> Run:
    """Open a fresh run folder, or reopen one to resume it.

    Args:
        run_dir: the run folder (created when absent).
        config: the resolved config dataclass (PretrainConfig / AdaptConfig).
        resume: False: start a new run, refusing a folder that already holds one. True: continue the
            run in `run_dir`; the stored config.yaml is kept and its differences from `config` are
            recorded in the log (e.g. a longer `optim.epochs`).

    Returns:
        The open Run.

    Raises:
        ValueError: a fresh run in a folder that holds a run.
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
        stored = yaml.safe_load(stored_path.read_text()) or {}
        differences = config_differences(stored, current)
        run = Run(path, resumed=True, config_differences=differences)
        run.logger.info("resuming run %s", path)
        for line in differences:
            run.logger.warning("config differs from the stored %s: %s", CONFIG_FILE, line)
        return run
    existing = [name for name in _RUN_MARKERS if (path / name).exists()]
    if existing:
        raise ValueError(
            f"run folder {path} already holds a run ({', '.join(existing)}); pass --resume {path} to "
            "continue it, or choose another run.run_dir (results are never overwritten)"
        )
    path.mkdir(parents=True, exist_ok=True)
    save_config(config, path / CONFIG_FILE)
    run = Run(path, resumed=False, config_differences=[])
    run.logger.info("run folder %s", path.resolve())
    return run
