"""The command line: one-line errors for bad input, the traceback behind --debug / DUALREF_DEBUG."""

from __future__ import annotations

from pathlib import Path

import pytest

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
