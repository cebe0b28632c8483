"""Run report: merging metrics.jsonl records, last-epoch result, optimistic best epoch, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dualref import report


def _write_metrics(run_dir: Path, records: list[dict[str, object]]) -> None:
    lines = [json.dumps({"time": 0.0, **r}) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


EVAL = "eval_target"
RECORDS: list[dict[str, object]] = [
    {"epoch": 1, "kind": "adapt", "eps": 0.5, "num_clusters": 10, "coarse_fscore": 0.2, "loss_total": 9.0},
    {"epoch": 1, "kind": EVAL, "mAP": 0.30, "rank1": 0.5, "rank5": 0.6, "rank10": 0.7, "mINP": 0.1},
    {"epoch": 2, "kind": "adapt", "eps": 0.5, "num_clusters": 11, "coarse_fscore": 0.3, "loss_total": 8.0},
    {"epoch": 2, "kind": EVAL, "mAP": 0.50, "rank1": 0.6, "rank5": 0.7, "rank10": 0.8, "mINP": 0.2},
    {"epoch": 3, "kind": "adapt", "eps": 0.5, "num_clusters": 99, "coarse_fscore": 0.1, "loss_total": 7.0},
    # a resumed run logged epoch 3 again: the later line wins
    {"epoch": 3, "kind": "adapt", "eps": 0.5, "num_clusters": 12, "coarse_fscore": 0.4, "loss_total": 7.5},
    {"epoch": 3, "kind": EVAL, "mAP": 0.4, "rank1": 0.55, "rank5": 0.65, "rank10": 0.75, "mINP": 0.15},
    {"epoch": 3, "kind": "train", "ignored": 1.0},
]


def test_read_epochs_merges_kinds_and_keeps_the_later_duplicate(tmp_path: Path) -> None:
    _write_metrics(tmp_path, RECORDS)
    epochs = report.read_epochs(tmp_path)
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert epochs[2]["num_clusters"] == 12 and epochs[2]["mAP"] == 0.40
    assert "ignored" not in epochs[2]


def test_result_is_the_last_epoch_and_best_is_labelled_optimistic(tmp_path: Path) -> None:
    _write_metrics(tmp_path, RECORDS)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"loss": {"ce_weight": 0.5}}))
    epochs = report.read_epochs(tmp_path)
    assert report.final_result(epochs)["epoch"] == 3  # type: ignore[index]
    assert report.best_on_test(epochs)["epoch"] == 2  # type: ignore[index]
    summary_path = report.write_report(tmp_path)
    summary = summary_path.read_text()
    assert "| **result: last epoch** | 3 | 40.0 | 55.0 | 65.0 | 75.0 | 15.0 |" in summary
    assert "| best epoch on the test set (optimistic) | 2 | 50.0 | 60.0 | 70.0 | 80.0 | 20.0 |" in summary
    for name in (report.FSCORE_PLOT, report.RANK_PLOT):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert name in summary
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary file


def test_best_row_is_omitted_when_the_last_epoch_is_best(tmp_path: Path) -> None:
    _write_metrics(tmp_path, RECORDS[:4])
    summary = report.write_report(tmp_path).read_text()
    assert "optimistic" not in summary and "| **result: last epoch** | 2 |" in summary


def test_missing_or_corrupt_metrics_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        report.read_epochs(tmp_path)
    # A torn last line (a crash while appending) is skipped; a bad line before it is an error.
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "kind": "adapt"}\n{"epoch": 2, "ki')
    assert report.read_epochs(tmp_path) == [{"epoch": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "kind": "adapt"}\n{broken\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        report.read_epochs(tmp_path)
