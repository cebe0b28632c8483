"""Tests of the run infrastructure: atomic checkpoints, RNG state capture, run folders."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml

from dualref import checkpoint, runs, seeding
from dualref.config import PretrainConfig, load_config


def sample_state(value: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((3,), value)}, "epoch": int(value), "kind": "pretrain"}


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "checkpoint.pt"
    checkpoint.save_checkpoint(path, {**sample_state(2.0), "rng": seeding.rng_state()})
    state = checkpoint.load_checkpoint(path)
    torch.testing.assert_close(state["model"]["w"], torch.full((3,), 2.0))
    assert state["epoch"] == 2 and state["kind"] == "pretrain"
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]  # no temp file left


def test_failing_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, sample_state(1.0))
    real_save = torch.save

    def half_written_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, sample_state(7.0))
    monkeypatch.setattr(torch, "save", real_save)
    state = checkpoint.load_checkpoint(path)
    assert state["epoch"] == 1
    torch.testing.assert_close(state["model"]["w"], torch.full((3,), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_load_checkpoint_names_the_file_when_missing_corrupt_or_foreign(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape("nope.pt")):
        checkpoint.load_checkpoint(missing)
    good = tmp_path / "good.pt"
    checkpoint.save_checkpoint(good, sample_state(1.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape("truncated.pt")):
        checkpoint.load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match=re.escape("garbage.pt")):
        checkpoint.load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match=re.escape("foreign.pt is not a dualref checkpoint")):
        checkpoint.load_checkpoint(foreign)


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_seed_everything_repeats() -> None:
    seeding.seed_everything(5)
    first = draws()
    seeding.seed_everything(5)
    assert draws() == first
    seeding.seed_everything(6)
    assert draws() != first
    with pytest.raises(ValueError, match="seed=-1"):
        seeding.seed_everything(-1)


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path: Path) -> None:
    seeding.seed_everything(11)
    draws()
    checkpoint.save_checkpoint(tmp_path / "c.pt", {"rng": seeding.rng_state()})
    expected = draws()
    seeding.seed_everything(999)  # scramble everything
    seeding.set_rng_state(checkpoint.load_checkpoint(tmp_path / "c.pt")["rng"])
    assert draws() == expected
    with pytest.raises(ValueError, match="missing"):
        seeding.set_rng_state({"python": random.getstate()})


def tiny_config(run_dir: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"run.run_dir={run_dir}", *extra])


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_open_run_writes_config_log_and_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "a"
    config = tiny_config(run_dir)
    with runs.open_run(run_dir, config, resume=False) as run:
        assert run.path == run_dir and run.checkpoint_path == run_dir / "checkpoint.pt"
        run.logger.info("hello from the test")
        run.log_metrics(0, {"loss": 1.5, "iterations": 3, "note": "x"}, kind="train")
        run.log_metrics(1, {"loss": float("nan"), "mAP": np.float32(0.25)}, kind="eval")
        with pytest.raises(ValueError, match="reserved"):
            run.log_metrics(2, {"epoch": 1}, kind="train")
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["run"]["run_dir"] == str(run_dir) and stored["optim"]["milestones"] == [40, 70]
    assert "hello from the test" in (run_dir / "run.log").read_text()
    lines = read_metrics(run_dir)
    assert [(m["epoch"], m["kind"]) for m in lines] == [(0, "train"), (1, "eval")]
    assert lines[0]["loss"] == 1.5 and lines[0]["iterations"] == 3 and lines[0]["note"] == "x"
    assert lines[1]["loss"] is None and lines[1]["mAP"] == 0.25
    # Closing detaches the handlers: later messages do not reach this run's log.
    logging.getLogger("dualref").info("after close")
    assert "after close" not in (run_dir / "run.log").read_text()
    assert not any(
        getattr(h, "baseFilename", "").startswith(str(run_dir)) for h in logging.getLogger("dualref").handlers
    )


def test_fresh_run_refuses_a_folder_holding_a_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    runs.open_run(run_dir, tiny_config(run_dir), resume=False).close()
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ValueError, match=re.escape(f"run folder {run_dir} already holds a run")):
        runs.open_run(run_dir, tiny_config(run_dir, "optim.lr=1.0"), resume=False)
    assert (run_dir / "config.yaml").read_text() == before  # nothing overwritten


def test_resume_records_config_differences(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    runs.open_run(run_dir, tiny_config(run_dir), resume=False).close()
    with runs.open_run(run_dir, tiny_config(run_dir), resume=True) as run:
        assert run.resumed and run.config_differences == []
    with runs.open_run(run_dir, tiny_config(run_dir, "optim.epochs=90"), resume=True) as run:
        assert run.config_differences == ["optim.epochs: 80 -> 90"]
    assert "optim.epochs: 80 -> 90" in (run_dir / "run.log").read_text()
    with pytest.raises(FileNotFoundError, match=re.escape("holds no config.yaml")):
        runs.open_run(tmp_path / "empty", tiny_config(run_dir), resume=True)


def test_config_differences_lists_added_and_removed_keys() -> None:
    diff = runs.config_differences({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": (1, 3), "d": 0}})
    assert diff == ["a.c: [1, 2] -> [1, 3]", "a.d: <absent> -> 0"]


class FakeSummaryWriter:
    """Records add_scalar calls; stands in for torch.utils.tensorboard.SummaryWriter."""

    instances: ClassVar[list[FakeSummaryWriter]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_scalars_when_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_module = types.ModuleType("torch.utils.tensorboard")
    fake_module.SummaryWriter = FakeSummaryWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_module)
    run_dir = tmp_path / "r"
    with runs.open_run(run_dir, tiny_config(run_dir), resume=False) as run:
        run.log_metrics(3, {"loss": 0.5, "iterations": 2, "dataset": "market1501"}, kind="train")
    writer = FakeSummaryWriter.instances[-1]
    assert writer.log_dir == str(run_dir / "tensorboard") and writer.closed
    # Strings are not scalars; epoch/kind/time are bookkeeping, not curves.
    assert writer.scalars == [("train/loss", 0.5, 3), ("train/iterations", 2, 3)]


def test_a_folder_given_as_a_checkpoint_is_named_as_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"is a folder; expected a checkpoint file"):
        checkpoint.load_checkpoint(tmp_path)
    checkpoint.save_checkpoint(tmp_path / "checkpoint.pt", {"epoch": 1})
    with pytest.raises(ValueError, match=r"is a folder \(it holds checkpoint\.pt\)"):
        checkpoint.load_checkpoint(tmp_path)
