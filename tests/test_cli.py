"""The command line: one-line errors for bad input, the traceback behind --debug / DUALREF_DEBUG."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dualref import cli


def test_errors_are_one_line_unless_debugging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "nothing.yaml")
    assert cli.main(["adapt", missing]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"dualref: error: config file {missing} does not exist"
    assert cli.main(["--debug", "adapt", missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("does not exist")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(["adapt", missing]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"), [("--rerank-k1", "0"), ("--rerank-k2", "-1"), ("--rerank-lambda", "1.5")]
)
def test_evaluate_rejects_bad_reranking_before_loading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    # The checkpoint does not exist either: the option is checked first, so its error is the one shown,
    # and it names the flag the user typed, not the config key behind it.
    argv = ["evaluate", str(tmp_path / "none.pt"), "--dataset", "market1501", "--root", str(tmp_path)]
    assert cli.main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"dualref: error: {flag}={value}" in err and "evaluation." not in err


@pytest.mark.parametrize("command", ["evaluate", "extract", "release", "cluster"])
def test_threads_flag_sets_torch_threads_and_rejects_negative(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    # Recorded, not applied: the test process keeps its own thread count.
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    missing = str(tmp_path / "none.pt")
    data = ["--dataset", "market1501", "--root", str(tmp_path)]
    argv = {
        "evaluate": ["evaluate", missing, *data],
        "extract": ["extract", missing, *data, "--out", str(tmp_path)],
        "release": ["release", missing, "--out", str(tmp_path / "m.pt")],
        "cluster": ["cluster", str(tmp_path / "none.npy")],
    }[command]
    assert cli.main([*argv, "--threads", "1"]) == 2  # the missing input is still refused
    assert calls == [1]
    assert cli.main([*argv, "--threads", "-1"]) == 2
    assert calls == [1]
    assert "--threads=-1: expected 0" in capsys.readouterr().err
    assert cli.main(argv) == 2  # 0, the default: torch's own count, left alone
    assert calls == [1]
