"""Bad values, bad data and degenerate states (issue 13): refused before anything is written, in one line.

Rows 2-5 of the issue: config values and data are checked before the run folder exists (so a retry into the
same folder works and a resumed run's config.yaml never takes a bad value); OS errors the user can fix are
one line naming the path; empty splits and degenerate clusterings name the split or the config key; a
diverging loss is reported. Tiny model and synthetic data; a few seconds in all.
"""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from dualref import cli, pseudo_labels, steps
from dualref.config import AdaptConfig, PretrainConfig, load_config
from dualref.pipelines import adapt, pretrain
from dualref.pseudo_labels import PseudoLabels
from tiny_adapt import TINY_OVERRIDES, tiny_config
from tiny_model import write_checkpoint, write_target


@pytest.fixture(autouse=True)
def _restore_threads() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("synth"))


def market_tree(root: Path, *, train: int = 4, query: int = 2, gallery: int = 4) -> Path:
    """A Market-1501 layout of empty files: enough for every check made before an image is opened."""
    counts = {"bounding_box_train": train, "query": query, "bounding_box_test": gallery}
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            (root / folder / f"{i % 2 + 1:04d}_c{i % 2 + 1}s1_{i:06d}_00.jpg").write_bytes(b"")
    return root


def pretrain_config(run_dir: Path, source: Path, target: Path, *extra: str) -> PretrainConfig:
    sets = ["data.source=market1501", f"data.source_root={source}", "data.target=market1501"]
    sets += [
        f"data.target_root={target}",
        "model.arch=tiny",
        "model.pretrained=null",
        f"run.run_dir={run_dir}",
    ]
    return load_config(PretrainConfig, None, [*sets, *extra])


# --- row 2: config values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.warmup_factor=-0.5", "optim.warmup_factor=-0.5 is not valid; expected 0 < value <= 1"),
        ("optim.gamma=-0.1", "optim.gamma=-0.1 is not valid; expected 0 < value <= 1"),
        ("optim.gamma=0", "optim.gamma=0.0 is not valid"),
        ("optim.lr=nan", "optim.lr=nan is not valid; expected a finite number > 0"),
        ("optim.lr=.inf", "optim.lr=inf is not valid; expected a finite number > 0"),
        ("optim.weight_decay=nan", "optim.weight_decay=nan is not valid"),
        ("optim.milestones=[-1]", "optim.milestones=(-1,)"),
        ("clustering.dbscan_eps=1.0", "clustering.dbscan_eps=1.0; expected 0 < eps < 1"),
        ("clustering.dbscan_rho=nan", "clustering.dbscan_rho=nan"),
        (
            "data.height=100000",
            "data.height=100000 x data.width=128 with data.batch_size=64 needs about 3,125 GiB",
        ),
        ("data.source=Market", "data.source='Market' is not valid; expected one of"),
        ("data.target=duke", "data.target='duke' is not valid"),
        ("data.batch_size=4", "the triplet loss needs at least 2 identities per batch"),
        ("loss.label_smoothing=1.0", "loss.label_smoothing=1.0; expected 0 <= epsilon < 1"),
        ("loss.triplet_margin=-0.3", "loss.triplet_margin=-0.3 is not valid"),
        ("loss.invariance_temperature=0", "loss.invariance_temperature=0.0 is not valid"),
        ("run.seed=-1", "run.seed=-1 is not valid"),
    ],
)
def test_config_values_are_refused_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(AdaptConfig, None, [override])


def test_bad_yaml_in_set_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["adapt", "--set", "optim.milestones=[40,", "--set", f"run.run_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        "dualref: error: override 'optim.milestones=[40,': the value '[40,' is not valid YAML"
    )
    assert "\n" not in err and not (tmp_path / "r").exists()


# --- row 2: data and checkpoints, before the run folder -------------------------------------------------


def test_adaptation_checks_data_and_source_before_writing_and_a_retry_works(
    target_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    fresh = ("optim.epochs=0",)  # direct transfer: the retry below is one evaluation
    with pytest.raises(FileNotFoundError, match=f"data set folder {tmp_path / 'nowhere'} does not exist"):
        adapt.adapt_to_target(tiny_config(tmp_path / "nowhere", run_dir, *fresh))
    missing = tmp_path / "missing.pt"
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"source_checkpoint={str(missing)!r} does not exist")
    ):
        adapt.adapt_to_target(tiny_config(target_root, run_dir, *fresh, f"source_checkpoint={missing}"))
    odd = write_checkpoint(tmp_path / "odd.pt", kind="export")
    with pytest.raises(
        ValueError, match="is a 'export' checkpoint; expected one written by `dualref pretrain`"
    ):
        adapt.adapt_to_target(tiny_config(target_root, run_dir, *fresh, f"source_checkpoint={odd}"))
    source = write_checkpoint(tmp_path / "source.pt")
    wrong_arch = "holds arch 'tiny' but model.arch='resnet18'; set model.arch=tiny"
    with pytest.raises(ValueError, match=re.escape(wrong_arch)):
        adapt.adapt_to_target(
            tiny_config(target_root, run_dir, *fresh, f"source_checkpoint={source}", "model.arch=resnet18")
        )
    assert not run_dir.exists()  # nothing written: the retry into the same folder is a fresh run
    adapt.adapt_to_target(tiny_config(target_root, run_dir, *fresh, f"source_checkpoint={source}"))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["source_checkpoint"] == str(source)
    # A resume with a changed value runs with it, and config.yaml (read by summary.md) says so.
    adapt.adapt_to_target(
        tiny_config(target_root, run_dir, *fresh, f"source_checkpoint={source}", "data.test_batch_size=32"),
        resume=run_dir,
    )
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["test_batch_size"] == 32
    assert "data.test_batch_size: 64 -> 32" in (run_dir / "run.log").read_text()


def test_too_few_target_images_for_k1_are_refused_before_writing(target_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=r"training images .* are too few for clustering.k1=100000"):
        adapt.adapt_to_target(tiny_config(target_root, run_dir, "clustering.k1=100000"))
    assert not run_dir.exists()


def test_a_problem_at_epoch_0_says_how_to_go_on(
    target_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found once the run folder exists (no cluster at epoch 0): the message names the --resume that goes
    on, and that command with the fix does go on in the same folder."""
    run_dir = tmp_path / "run"
    sets = [*TINY_OVERRIDES, f"data.target_root={target_root}", f"run.run_dir={run_dir}", "optim.epochs=1"]
    argv = ["adapt", *(arg for item in sets for arg in ("--set", item))]
    assert cli.main([*argv, "--set", "clustering.dbscan_eps=1e-9"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the lines before it are the run's log
    assert error.startswith("dualref: error: DBSCAN found no cluster at epoch 0")
    assert f"; {run_dir} holds this run's config and no epoch yet" in error
    assert f"`dualref adapt --resume {run_dir} --set KEY=VALUE`" in error
    assert cli.main(["adapt", "--resume", str(run_dir), "--set", "clustering.dbscan_eps=null"]) == 0
    assert (run_dir / "checkpoint.pt").is_file()


def test_adapt_resume_of_a_pretraining_folder_names_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "pre"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"forward_target_batches": True}))
    assert cli.main(["adapt", "--resume", str(run_dir)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dualref: error: {run_dir} is a `dualref pretrain` run folder; "
        f"resume it with `dualref pretrain --resume {run_dir}`"
    )


@pytest.mark.parametrize(
    ("counts", "role", "message"),
    [
        (
            {"query": 0},
            "target",
            "the query split of the target data set 'market1501' (data.target_root) is empty; "
            "the direct-transfer evaluation",
        ),
        (
            {"train": 0},
            "source",
            "the train split of the source data set 'market1501' (data.source_root) is empty; "
            "source training needs it",
        ),
        ({"gallery": 0}, "source", "the gallery split of the source data set"),
    ],
)
def test_pretraining_refuses_empty_splits_before_training(
    tmp_path: Path, counts: dict[str, int], role: str, message: str
) -> None:
    good = market_tree(tmp_path / "good")
    bad = market_tree(tmp_path / "bad", **counts)
    source, target = (bad, good) if role == "source" else (good, bad)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(message)):
        pretrain.pretrain_on_source(pretrain_config(run_dir, source, target))
    assert not run_dir.exists()


def test_pretraining_refuses_an_unlabelled_source_and_a_missing_root(tmp_path: Path) -> None:
    good = market_tree(tmp_path / "good")
    with pytest.raises(ValueError, match=re.escape("data.source='unlabelled' has no identities to train on")):
        pretrain.pretrain_on_source(pretrain_config(tmp_path / "run", good, good, "data.source=unlabelled"))
    with pytest.raises(FileNotFoundError, match="no market1501 data set found at"):
        pretrain.pretrain_on_source(pretrain_config(tmp_path / "run", tmp_path, good))
    assert not (tmp_path / "run").exists()


def test_adaptation_refuses_a_query_without_gallery(tmp_path: Path) -> None:
    target = market_tree(tmp_path / "t", gallery=0)
    with pytest.raises(
        ValueError, match=r"the gallery split of the target .*\(a query split needs a gallery"
    ):
        adapt.adapt_to_target(tiny_config(target, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --- row 3: one-line errors -----------------------------------------------------------------------------


def _adapt_cli(target_root: Path, run_dir: Path | str, *extra: str) -> list[str]:
    sets = [*TINY_OVERRIDES, f"data.target_root={target_root}", f"run.run_dir={run_dir}", *extra]
    return ["adapt", *(f"--set={item}" for item in sets)]


def test_run_folder_that_is_a_file_or_a_link_loop_is_one_line(
    target_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    assert cli.main(_adapt_cli(target_root, a_file, "optim.epochs=0")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dualref: error: run folder {a_file} is a file, not a folder; choose another run.run_dir"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert cli.main(_adapt_cli(target_root, loop / "run", "optim.epochs=0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"dualref: error: cannot create run folder {loop / 'run'}: Too many levels of symbolic"
    )
    assert "\n" not in err
    assert cli.main(_adapt_cli(loop, tmp_path / "r2", "optim.epochs=0")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dualref: error: data set folder {loop} is a symbolic link that leads nowhere")


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "/d/x"), "/d/x: a symbolic link loop"),
        (OSError(errno.ENOSPC, "No space left on device", "/d/x"), "no space left on /d; free space there"),
        (OSError(errno.EACCES, "Permission denied", "/d/x"), "/d/x: permission denied"),
    ],
)
def test_os_errors_the_user_can_fix_are_one_line(
    error: OSError, line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fails(_args: object) -> int:
        raise error

    monkeypatch.setattr(cli, "_cmd_adapt", fails)
    assert cli.main(["adapt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dualref: error: {line}") and "\n" not in err


def test_other_os_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(_args: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "_cmd_adapt", fails)
    with pytest.raises(OSError, match="Input/output error"):
        cli.main(["adapt"])


# --- row 4: degenerate clusterings ----------------------------------------------------------------------


def test_one_giant_cluster_names_the_cause_and_the_keys(target_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(target_root, tmp_path / "giant", "clustering.dbscan_eps=0.9", "optim.epochs=1")
    with pytest.raises(ValueError) as info:
        adapt.adapt_to_target(cfg)
    message = str(info.value)
    assert "single cluster at epoch 0 (it holds 100.0% of the 156 images" in message
    assert "no training batch can be formed" in message
    for key in ("dbscan_eps", "max_cluster_share", "dbscan_rho", "min_samples"):
        assert f"clustering.{key}" in message


def test_all_outliers_with_a_fixed_eps_hints_at_dbscan_eps(target_root: Path, tmp_path: Path) -> None:
    cfg = tiny_config(target_root, tmp_path / "outliers", "clustering.dbscan_eps=0.001", "optim.epochs=1")
    with pytest.raises(ValueError, match="all 156 images are outliers") as info:
        adapt.adapt_to_target(cfg)
    assert "raise clustering.dbscan_eps" in str(info.value) and "dbscan_rho" not in str(info.value)
    labels = PseudoLabels(np.full(10, -1), None, 0, 0.3)
    capped = tiny_config(target_root, tmp_path / "x", "clustering.max_cluster_share=0.1")
    hint = "raise clustering.dbscan_rho or clustering.max_cluster_share"
    with pytest.raises(ValueError, match=re.escape(hint)):
        adapt._check_clusters(labels, {}, 0, capped)  # no cluster: refused before the profile is read


def test_degenerate_clusterings_are_warned_each_epoch_with_numbers_and_keys(
    target_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    giant = {"num_clusters": 3, "largest_cluster_share": 0.4, "outlier_share": 0.1}
    (warning,) = pseudo_labels.degenerate_clustering(giant, identities_per_batch=2, fixed_eps=False)
    assert "3 clusters, largest 40.0% of the images, outliers 10.0%" in warning
    assert "clustering.max_cluster_share (e.g. 0.01)" in warning
    (warning,) = pseudo_labels.degenerate_clustering(giant, identities_per_batch=2, fixed_eps=True)
    assert warning.endswith("lower clustering.dbscan_eps")
    lonely = {"num_clusters": 5, "largest_cluster_share": 0.01, "outlier_share": 0.95}
    (outliers, few) = pseudo_labels.degenerate_clustering(lonely, identities_per_batch=16, fixed_eps=False)
    assert "more than 80% of the images are outliers" in outliers and "clustering.min_samples" in outliers
    assert "fewer clusters than the 16 identities of a P x K batch" in few
    healthy = {"num_clusters": 700, "largest_cluster_share": 0.004, "outlier_share": 0.3}
    assert pseudo_labels.degenerate_clustering(healthy, identities_per_batch=16, fixed_eps=False) == []
    # In the loop: the tiny random model chains a fifth of the target into one cluster.
    coarse = np.array([0] * 40 + [1] * 10 + [2] * 10 + [-1] * 40)
    profile = pseudo_labels.cluster_profile(coarse, num_instances=4)
    cfg = tiny_config(target_root, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dualref"):
        adapt._check_clusters(PseudoLabels(coarse, None, 3, 0.4), profile, 0, cfg)
    assert "epoch 1/2: degenerate clustering (3 clusters, largest 40.0% of the images" in caplog.text


# --- row 5: a diverging loss ----------------------------------------------------------------------------


def test_an_exploding_loss_is_warned_once_per_epoch(caplog: pytest.LogCaptureFixture) -> None:
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=1e6)
    values = iter([2.0, 3.0, 5e3, 1e13, 1e14])

    def step(_batch: Any, _iteration: int) -> steps.StepResult:
        return steps.StepResult(
            torch.tensor(next(values)) + 0 * weight.sum(), {}, 1
        )  # the weight never moves

    with caplog.at_level(logging.WARNING, logger="dualref"):
        steps.run_epoch(
            [()] * 5,
            optimizer,
            step,
            model=torch.nn.Linear(1, 1),
            device=torch.device("cpu"),
            amp_dtype=None,
            progress=False,
            epoch=3,
        )
    warnings = [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]
    assert warnings == [
        "loss 5e+03 at epoch 3 iteration 2 (the epoch started at 2): the training is diverging; "
        "lower optim.lr (this epoch: 1e+06)"
    ]
