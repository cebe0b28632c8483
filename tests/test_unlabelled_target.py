"""`dualref adapt` on a folder of images with no query/gallery (`data.target=unlabelled`).

The folder is generated from the tiny synthetic target: its training images renamed so that no identity
is left in any name (cameras kept as `_cN`), some in a sub-folder, plus one file that is not an image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dualref import cli, report
from dualref.checkpoint import load_checkpoint
from dualref.data import datasets
from dualref.pipelines import adapt
from tiny_adapt import tiny_config, write_target


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def unlabelled_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~150 images named `img0007_c3.jpg` (no pid), a third of them under `more/`, and one broken file."""
    labelled = datasets.load_dataset("market1501", write_target(tmp_path_factory.mktemp("synth")))
    root = tmp_path_factory.mktemp("unlabelled")
    for number, sample in enumerate(labelled.train):
        folder = root / "more" if number % 3 == 0 else root
        folder.mkdir(exist_ok=True)
        shutil.copy(sample.path, folder / f"img{number:04d}_c{sample.camid + 1}.jpg")
    (root / "broken_c1.jpg").write_bytes(b"not a jpeg")
    return root


def _records(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_adapt_on_an_unlabelled_folder_trains_without_evaluation(
    unlabelled_root: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(
        unlabelled_root,
        tmp_path / "run",
        "data.target=unlabelled",
        "data.skip_unreadable=true",  # the broken file is dropped with a warning
        "optim.epochs=2",
        "optim.iters_per_epoch=2",
        "run.eval_every=1",
    )
    run_dir = adapt.adapt_to_target(cfg)
    records = _records(run_dir)
    assert {r["kind"] for r in records} == {"adapt"}  # no eval_target line
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        # Label-free statistics and diagnostics are recorded; quality against pids cannot be.
        assert record["num_clusters"] >= 1  # type: ignore[operator]
        for key in ("eps", "largest_cluster_share", "loss_total", "bank_cosine_to_initial"):
            assert key in record, key
        assert not any(key.endswith(("_fscore", "_precision")) for key in record), record.keys()
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["kind"] == "adapt" and state["epoch"] == 2
    summary = (run_dir / report.SUMMARY_FILE).read_text()
    assert "no evaluation: unlabelled target" in summary.lower()
    assert "mAP" not in summary.split("## Per epoch")[0]
    assert "skipping unreadable image" in (run_dir / "run.log").read_text()


def test_unreadable_image_is_a_one_line_error_naming_it(
    unlabelled_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        f"{key}={value}"
        for key, value in {
            "data.target": "unlabelled",
            "data.target_root": unlabelled_root,
            "data.height": 32,
            "data.width": 16,
            "data.batch_size": 16,
            "data.num_workers": 0,
            "model.arch": "tiny",
            "model.pretrained": "null",
            "optim.epochs": 1,
            "optim.iters_per_epoch": 1,
            "run.progress": "false",
            "run.threads": 1,
            "run.run_dir": run_dir,
        }.items()
    ]
    assert cli.main(["adapt", *(arg for o in overrides for arg in ("--set", o))]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the lines before are the run's log
    assert last.startswith("dualref: error: cannot read image ") and "broken_c1.jpg" in last
    assert "data.skip_unreadable=true" in last


def test_empty_folder_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images under .*empty"):
        adapt.adapt_to_target(tiny_config(tmp_path / "empty", tmp_path / "run", "data.target=unlabelled"))
