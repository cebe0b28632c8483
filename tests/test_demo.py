"""`dualref demo`: folder handling, the comparison table, and a --quick end-to-end run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualref.pipelines import demo


def test_format_table_golden() -> None:
    rows = [
        demo.ResultRow("direct transfer", 0.1234, 0.5, 0.6, 0.7, 0.05, 0.25, None, 12.4),
        demo.ResultRow("Dual-Refinement", 0.5, 0.75, 0.875, 1.0, 0.3, 0.5, 0.625, 99.6),
    ]
    assert demo.format_table(rows).splitlines() == [
        "| method | mAP | R1 | R5 | R10 | mINP | F coarse | F refined | time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| direct transfer | 12.3 | 50.0 | 60.0 | 70.0 | 5.0 | 0.250 | - | 12 s |",
        "| Dual-Refinement | 50.0 | 75.0 | 87.5 | 100.0 | 30.0 | 0.500 | 0.625 | 100 s |",
    ]


def test_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"DEMO\.json"):
        demo.run_demo(tmp_path, quick=True)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_rerun_clears_old_results_and_keeps_the_data(tmp_path: Path) -> None:
    (tmp_path / demo.MARKER).write_text("{}")
    for name in (*demo.STEP_FOLDERS, "data"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    (tmp_path / demo.REPORT_FILE).write_text("old")
    demo._prepare_folder(tmp_path, seed=3, quick=True)
    assert not any((tmp_path / name).exists() for name in demo.STEP_FOLDERS)
    assert not (tmp_path / demo.REPORT_FILE).exists()
    assert (tmp_path / "data" / "file").is_file()
    assert json.loads((tmp_path / demo.MARKER).read_text()) == {"seed": 3, "quick": True}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    try:
        assert demo.run_demo(tmp_path / "demo", quick=True) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    for method in ("direct transfer", "baseline", "Dual-Refinement"):
        assert f"| {method} |" in printed
    report = (out / demo.REPORT_FILE).read_text()
    assert report.count("\n| ") >= 4  # header + 3 methods
    for name in ("map_per_epoch.png", "fscore_per_epoch.png"):
        assert (out / name).stat().st_size > 1000
    for name in ("baseline", "dual_refinement"):
        assert (out / name / "summary.md").is_file()
        assert (out / name / "checkpoint.pt").is_file()
    assert (out / "source" / "results.json").is_file()
