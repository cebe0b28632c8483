"""`dualref demo`: folder handling, the comparison table, and a --quick end-to-end run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dualref.pipelines import demo


def _row(method: str, maps: list[float], epochs: dict[str, list[list[float | None]]]) -> demo.ResultRow:
    mean = sum(maps) / len(maps)
    spread = len(maps) > 1  # one seed: no std (None), as report.mean_std gives it
    std = (sum((m - mean) ** 2 for m in maps) / (len(maps) - 1)) ** 0.5 if spread else None
    seeds = tuple(range(1, len(maps) + 1))
    flat = 0.0 if spread else None
    return demo.ResultRow(method, seeds, (mean, std), (0.5, flat), (0.25, flat), epochs)


def test_format_table_golden() -> None:
    # mAP 0.50, 0.60, 0.70 over 3 seeds: mean 60.0, sample std 10.0. Epoch-1 figures are means over seeds.
    epochs = {
        "coarse_fscore": [[0.2, 0.9], [0.4, 0.9], [0.3, 0.9]],
        "refined_fscore": [[0.25, 0.9], [0.45, 0.9], [0.35, 0.9]],
        "refined_changed": [[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]],
    }
    baseline = {"coarse_fscore": [[0.5]], "refined_fscore": [[None]], "refined_changed": [[0.0]]}
    rows = [
        _row("direct transfer", [0.1234], {}),
        _row("baseline", [0.5], baseline),
        _row("Dual-Refinement", [0.5, 0.6, 0.7], epochs),
    ]
    assert demo.format_table(rows).splitlines() == [
        "| method | seeds | mAP | R1 | mINP | epoch 1: F coarse | F refined | labels moved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        "| direct transfer | 1 | 12.3 | 50.0 | 25.0 | - | - | - |",
        "| baseline | 1 | 50.0 | 50.0 | 25.0 | 0.500 | - | - |",
        "| Dual-Refinement | 3 | 60.0 ± 10.0 | 50.0 ± 0.0 | 25.0 ± 0.0 | 0.300 | 0.350 | 0.200 |",
    ]


def test_report_record_has_every_field() -> None:
    epochs: dict[str, list[list[float | None]]] = {key: [[0.5], [0.6]] for key in demo.EPOCH_KEYS}
    rows = [_row("Dual-Refinement", [0.5, 0.7], epochs)]
    record = json.loads(json.dumps(demo.report_record(rows, demo.QUICK)))  # as report.json holds it
    (row,) = record["rows"]
    assert row["seeds"] == [1, 2]
    assert row["mAP_mean"] == pytest.approx(0.6) and row["mAP_std"] == pytest.approx(0.02**0.5, abs=1e-6)
    assert {"rank1_mean", "rank1_std", "mINP_mean", "mINP_std"} <= row.keys()
    assert row["per_epoch"] == epochs
    assert record["plan"]["seeds"] == [1]


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


def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The smoke test: one seed, seconds; every file of the report, and report.json's fields."""
    threads = torch.get_num_threads()
    try:
        assert demo.run_demo(tmp_path / "demo", quick=True) == 0
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    for method in ("direct transfer", "baseline", "Dual-Refinement"):
        assert f"| {method} | 1 |" in printed
    for name in (demo.MAP_PLOT, demo.FSCORE_PLOT):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    record = json.loads((out / demo.REPORT_JSON).read_text())
    rows = {row["method"]: row for row in record["rows"]}
    assert list(rows) == ["direct transfer", "baseline", "Dual-Refinement"]
    transfer = json.loads((out / "source" / "results.json").read_text())["direct_transfer"]
    assert rows["direct transfer"]["mAP_mean"] == pytest.approx(transfer["mAP"], abs=1e-6)  # rounded
    for name, folder in (("baseline", "baseline"), ("Dual-Refinement", "dual_refinement")):
        epochs = rows[name]["per_epoch"]
        assert set(epochs) == set(demo.EPOCH_KEYS)
        assert [len(seed) for seed in epochs["mAP"]] == [demo.QUICK.adapt_epochs]
        lines = (out / folder / "seed_1" / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(line) for line in lines]
        last = [r for r in logged if r["kind"] == "eval_target"][-1]
        assert rows[name]["mAP_mean"] == pytest.approx(last["mAP"], abs=1e-6)
        assert epochs["mAP"][0][-1] == last["mAP"]
    # The baseline computes no refined labels; Dual-Refinement does, and its bank drift is recorded.
    assert rows["baseline"]["per_epoch"]["refined_fscore"] == [[None, None]]
    assert all(v is not None for v in rows["Dual-Refinement"]["per_epoch"]["refined_fscore"][0])
    assert 0 < rows["Dual-Refinement"]["per_epoch"]["bank_cosine_to_initial"][0][-1] < 1
