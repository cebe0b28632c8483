"""Fault injection (issue 13): kills at chosen points, a full disk, a torn metrics line, a concurrent start.

Each killed run is a forked child of the test process (torch is imported once, so a child costs only its
own work) that SIGKILLs itself at the chosen point: no `finally`, no flush, exactly what the kernel does to
an out-of-memory process or a `kill -9`. The points are installed in the child only, by wrapping the
functions the pipelines call (`common.evaluate`, `io.atomic_write`, `runs._append_line`). A chain of
resumes, each killed somewhere else, must end with the records, the final result and the weights of an
uninterrupted run. Tiny model and synthetic data (tests/tiny_adapt.py, the pretraining set-up of
tests/tiny_pretrain.py); the whole file takes about 20 s of CPU (1.5 min of wall time on a busy 2-core
machine).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dualref import checkpoint, cli, io, runs
from dualref.config import PretrainConfig, load_config
from dualref.pipelines import adapt, common, pretrain
from tiny_adapt import TINY_OVERRIDES, tiny_config, write_target
from tiny_model import write_checkpoint
from tiny_pretrain import overrides, write_domains

Install = Callable[[], None]
TIMING = ("time", "images_per_second", "wall_seconds")


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- kill points, installed in the forked child only ---------------------------------------------------


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def in_evaluation(call: int) -> Install:
    """Killed inside the `call`-th evaluation of the process, its scores computed but not yet logged."""

    def install() -> None:
        real, calls = common.evaluate, [0]

        def evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
            record = real(*args, **kwargs)
            calls[0] += 1
            if calls[0] == call:
                _die()
            return record

        common.evaluate = evaluate  # type: ignore[assignment]

    return install


def in_write(name: str, call: int = 1) -> Install:
    """Killed inside the `call`-th atomic write of a file called `name`: its temporary exists, empty."""

    def install() -> None:
        real, calls = io.atomic_write, [0]

        @contextlib.contextmanager
        def atomic_write(path: str | Path, *, binary: bool = True) -> Iterator[Any]:
            with real(path, binary=binary) as handle:
                if Path(path).name == name:
                    calls[0] += 1
                    if calls[0] == call:
                        _die()
                yield handle

        io.atomic_write = atomic_write  # type: ignore[assignment]

    return install


def tearing(kind: str, epoch: int) -> Install:
    """Killed half-way through appending the `kind` record of `epoch` to metrics.jsonl."""

    def install() -> None:
        real = runs._append_line

        def append(path: Path, line: str) -> None:
            record = json.loads(line) if line.strip() else {}
            if record.get("kind") == kind and record.get("epoch") == epoch:
                with open(path, "ab") as handle:
                    handle.write(line.encode()[: len(line) // 2])
                _die()
            real(path, line)

        runs._append_line = append  # type: ignore[assignment]

    return install


def killed(run: Callable[[], object], install: Install) -> None:
    """Run `run` in a forked child with a kill point; the child must die of SIGKILL."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            install()
            run()
        except BaseException:
            traceback.print_exc()
            code = 3
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the child exited with status {os.waitstatus_to_exitcode(status)}: the kill point was not reached"
    )


# --- what must survive ---------------------------------------------------------------------------------


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: without_timing(v) for k, v in value.items() if k not in TIMING and not k.startswith("seconds")
        }
    return value


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [without_timing(r) for r in runs.read_records(run_dir)]


def result_section(run_dir: Path) -> str:
    """summary.md's result table (the per-epoch table below it holds timings)."""
    text = (run_dir / "summary.md").read_text()
    return text[text.index("## Result") : text.index("Total time")]


def assert_same_weights(a: Path, b: Path, name: str = "checkpoint.pt") -> None:
    left, right = checkpoint.load_checkpoint(a / name), checkpoint.load_checkpoint(b / name)
    assert left["epoch"] == right["epoch"]
    for key, tensor in left["model"].items():
        assert torch.equal(tensor, right["model"][key]), key
    if left.get("memory") is not None:
        assert torch.equal(left["memory"]["weight"], right["memory"]["weight"])


def assert_clean(run_dir: Path) -> None:
    leftovers = sorted(
        p.name for p in run_dir.iterdir() if p.name.endswith(".tmp") or p.name == runs.LOCK_FILE
    )
    assert leftovers == []


# --- adaptation -----------------------------------------------------------------------------------------

EVAL_EVERY_EPOCH = "run.eval_every=1"  # an evaluation after each of the 2 epochs, then the report


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("source") / "source.pt")


@pytest.fixture(scope="module")
def straight_adapt(target_root: Path, source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("a") / "straight"
    return adapt.adapt_to_target(
        tiny_config(target_root, run_dir, EVAL_EVERY_EPOCH, f"source_checkpoint={source}")
    )


def test_adaptation_killed_anywhere_resumes_to_the_uninterrupted_result(
    straight_adapt: Path, target_root: Path, source: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "killed"
    own_source = tmp_path / "source.pt"
    shutil.copyfile(source, own_source)
    cfg = tiny_config(target_root, run_dir, EVAL_EVERY_EPOCH, f"source_checkpoint={own_source}")
    killed(lambda: adapt.adapt_to_target(cfg), in_write("checkpoint.pt"))  # epoch 1 logged, not saved
    assert [p.name for p in run_dir.glob(".checkpoint.pt.*.tmp")] != []  # the kill left a temporary
    chain = [
        in_evaluation(call=1),  # epoch 1 saved, its evaluation lost
        tearing("adapt", epoch=2),  # a torn line at the end of metrics.jsonl
        in_evaluation(call=1),  # the last evaluation: the result itself
        in_write("summary.md"),  # the report
    ]
    for step, install in enumerate(chain):
        if step == 2:  # the run's checkpoint now holds the weights: the source may go (row 5)
            own_source.unlink()
        killed(lambda: adapt.adapt_to_target(cfg, resume=run_dir), install)
    adapt.adapt_to_target(cfg, resume=run_dir)

    assert records(run_dir) == records(straight_adapt)
    assert result_section(run_dir) == result_section(straight_adapt)
    assert "| **result: last epoch** | 2 |" in result_section(run_dir)
    assert_same_weights(run_dir, straight_adapt)
    assert_clean(run_dir)
    log = (run_dir / "run.log").read_text()
    assert "took over the lock of process" in log
    assert "removed 1 temporary file(s) of interrupted writes: .checkpoint.pt." in log
    assert "removed a torn last line" in log
    assert "dropped 1 record(s) of the epochs after 0" in log


def test_a_full_disk_stops_in_one_line_and_the_resume_loses_nothing(
    straight_adapt: Path,
    target_root: Path,
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "full"
    real, calls = io.atomic_write, [0]

    @contextlib.contextmanager
    def no_space_for_the_second_checkpoint(path: str | Path, *, binary: bool = True) -> Iterator[Any]:
        with real(path, binary=binary) as handle:
            if Path(path).name == "checkpoint.pt":
                calls[0] += 1
                if calls[0] == 2:
                    handle.write(b"part of it")
                    raise OSError(errno.ENOSPC, "No space left on device")
            yield handle

    monkeypatch.setattr(io, "atomic_write", no_space_for_the_second_checkpoint)
    sets = [*TINY_OVERRIDES, f"data.target_root={target_root}", f"run.run_dir={run_dir}", EVAL_EVERY_EPOCH]
    sets.append(f"source_checkpoint={source}")
    assert cli.main(["adapt", *(f"--set={item}" for item in sets)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"dualref: error: no space left on {run_dir} (writing checkpoint.pt); free space there, then run the "
        "command again (a training run continues with --resume RUN_DIR; the files it had written are intact)"
    )
    assert "Traceback" not in "\n".join(err)
    assert checkpoint.load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1  # the last good one
    assert_clean(run_dir)
    monkeypatch.undo()  # space freed
    assert cli.main(["adapt", "--resume", str(run_dir)]) == 0
    assert records(run_dir) == records(straight_adapt)
    assert_same_weights(run_dir, straight_adapt)


def test_a_run_folder_in_use_is_refused_with_the_holders_pid(target_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "busy"
    cfg = tiny_config(target_root, run_dir)
    ready_read, ready_write = os.pipe()
    holder = os.fork()
    if holder == 0:  # a process that holds the run open until it is killed
        try:
            runs.open_run(run_dir, cfg, resume=False)
            os.write(ready_write, b"x")
            signal.pause()
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"x"
        for resume in (False, True):
            message = f"run folder {run_dir} is in use by process {holder} (lock file {run_dir / 'run.lock'})"
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
                runs.open_run(run_dir, cfg, resume=resume)
    finally:
        os.kill(holder, signal.SIGKILL)  # dies holding the lock: the kernel releases it
        os.waitpid(holder, 0)
    with runs.open_run(run_dir, cfg, resume=True):
        assert (run_dir / "run.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(ValueError, match=f"is in use by process {os.getpid()}"):  # this process too
            runs.open_run(run_dir, cfg, resume=True)
        assert (run_dir / "run.lock").read_text() == f"{os.getpid()}\n"
    assert (
        f"took over the lock of process {holder}, which is no longer running"
        in (run_dir / "run.log").read_text()
    )
    assert not (run_dir / "run.lock").exists()  # released on close


def test_metrics_lines_survive_a_full_disk_and_a_torn_line_is_repaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "r"
    cfg = load_config(PretrainConfig, None, [f"run.run_dir={run_dir}"])
    real_write = os.write

    def half_then_full(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            real_write(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    with runs.open_run(run_dir, cfg, resume=False) as run:
        run.log_metrics(1, {"loss": 1.0}, kind="train")
        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(io.DiskFullError, match=f"no space left on {run_dir} \\(writing metrics.jsonl\\)"):
            run.log_metrics(2, {"loss": 2.0}, kind="train")
        monkeypatch.undo()
        run.log_metrics(2, {"loss": 2.0}, kind="train")  # space freed: the next line starts clean
    assert [r["epoch"] for r in runs.read_records(run_dir)] == [1, 2]
    # A kill mid-append (no chance to cut it) leaves a torn last line: the resume cuts it, saying so.
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "kind": "tr')
    with runs.open_run(run_dir, cfg, resume=True) as run:
        run.log_metrics(3, {"loss": 3.0}, kind="train")
    assert [r["epoch"] for r in runs.read_records(run_dir)] == [1, 2, 3]
    assert "removed a torn last line (24 bytes)" in (run_dir / "run.log").read_text()


# --- pretraining ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_domains(tmp_path_factory.mktemp("pair"))


def pretrain_config(domains: tuple[Path, Path], run_dir: Path) -> PretrainConfig:
    return load_config(PretrainConfig, None, overrides(domains, run_dir))


def test_pretraining_killed_anywhere_resumes_to_the_uninterrupted_result(
    domains: tuple[Path, Path], tmp_path: Path
) -> None:
    straight = pretrain.pretrain_on_source(pretrain_config(domains, tmp_path / "straight"))
    run_dir = tmp_path / "killed"
    cfg = pretrain_config(domains, run_dir)
    killed(lambda: pretrain.pretrain_on_source(cfg), in_write("checkpoint.pt"))  # epoch 1 logged, not saved
    chain = [
        in_evaluation(call=2),  # the source evaluation of the last epoch
        in_evaluation(call=2),  # the direct-transfer evaluation (after the last epoch's source one)
        in_write("results.json"),  # the report
    ]
    for install in chain:
        killed(lambda: pretrain.pretrain_on_source(cfg, resume=run_dir), install)
    pretrain.pretrain_on_source(cfg, resume=run_dir)

    assert records(run_dir) == records(straight)
    assert [(r["kind"], r["epoch"]) for r in records(run_dir)] == [
        ("train", 1),
        ("eval_source", 1),
        ("train", 2),
        ("eval_source", 2),
        ("direct_transfer", 2),
    ]
    results = json.loads((run_dir / "results.json").read_text())
    assert without_timing(results) == without_timing(json.loads((straight / "results.json").read_text()))
    assert_same_weights(run_dir, straight)
    assert_same_weights(run_dir, straight, pretrain.BEST_FILE)
    assert_clean(run_dir)


def test_resuming_a_run_of_the_other_command_is_refused_before_anything_is_written(
    domains: tuple[Path, Path], straight_adapt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in straight_adapt.iterdir()}
    assert cli.main(["pretrain", "--resume", str(straight_adapt)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dualref: error: {straight_adapt} is a `dualref adapt` run folder; "
        f"resume it with `dualref adapt --resume {straight_adapt}`"
    )
    # With a pretraining config given explicitly, the checkpoint's kind is checked before anything is written.
    cfg = pretrain_config(domains, straight_adapt)
    with pytest.raises(ValueError, match="is a 'adapt' checkpoint, not a 'pretrain' one"):
        pretrain.pretrain_on_source(cfg, resume=straight_adapt)
    assert {p.name: p.stat().st_mtime_ns for p in straight_adapt.iterdir()} == before


def test_a_full_disk_under_run_log_adds_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Full:
        def write(self, _text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            self.flush()

    run_dir = tmp_path / "r"
    with runs.open_run(
        run_dir, load_config(PretrainConfig, None, [f"run.run_dir={run_dir}"]), resume=False
    ) as run:
        run._file_handler.stream = Full()  # type: ignore[assignment]
        run.logger.warning("first message after the disk filled up")
        run.logger.warning("second message")
    err = capsys.readouterr().err
    assert "second message" in err and "Logging error" not in err and "Traceback" not in err
