"""End-to-end tests of `dualref pretrain` / `dualref evaluate` on a tiny synthetic domain pair."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from dualref import checkpoint, cli, losses, training
from dualref.config import PretrainConfig, load_config
from dualref.pipelines import pretrain
from tiny_pretrain import overrides, write_domains


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_domains(tmp_path_factory.mktemp("synthetic"))


def metrics_lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_and_evaluate_from_the_command_line(
    domains: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    args = ["pretrain"] + [f"--set={item}" for item in overrides(domains, run_dir)]
    assert cli.main(args) == 0
    for name in ("config.yaml", "run.log", "metrics.jsonl", "checkpoint.pt", "model_best.pt"):
        assert (run_dir / name).is_file(), name
    lines = metrics_lines(run_dir)
    assert [(m["kind"], m["epoch"]) for m in lines] == [
        ("train", 1),
        ("eval_source", 1),
        ("train", 2),
        ("eval_source", 2),
        ("direct_transfer", 2),
    ]
    for line in lines:
        if line["kind"] == "train":
            assert math.isfinite(line["total"]) and line["iterations"] == 2 and line["lr"] > 0
        else:
            assert 0.0 <= line["mAP"] <= 1.0 and 0.0 <= line["rank1"] <= line["rank10"] <= 1.0
    # Reference stepping: epoch 0 trains at t=1, half-way through the 2-epoch warm-up:
    # 0.01 x 0.5 + 0.5 = 0.505; epoch 1 at t=2 = the milestone: x0.1.
    assert [m["lr"] for m in lines if m["kind"] == "train"] == pytest.approx([0.505 * 3.5e-4, 3.5e-5])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 2 and results["source"]["mAP"] == lines[3]["mAP"]
    state = checkpoint.load_checkpoint(run_dir / "checkpoint.pt")
    assert (state["epoch"], state["kind"], state["arch"], state["num_classes"]) == (
        2,
        "pretrain",
        "tiny",
        6,
    )
    assert "epoch" in checkpoint.load_checkpoint(run_dir / "model_best.pt")["selected_by"]

    capsys.readouterr()
    target = str(domains[1])
    evaluate = ["evaluate", str(run_dir / "checkpoint.pt"), "--dataset=market1501", f"--root={target}"]
    assert cli.main([*evaluate, "--workers=0"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"mAP\s+R1\s+R5\s+R10\s+mINP\s+valid queries", printed), printed
    values = printed.strip().splitlines()[-1].split()
    transfer = results["direct_transfer"]
    assert float(values[0]) == pytest.approx(100 * transfer["mAP"], abs=0.051)
    assert float(values[1]) == pytest.approx(100 * transfer["rank1"], abs=0.051)
    assert int(values[-1]) == transfer["num_valid_queries"]
    assert cli.main([*evaluate, "--workers=0", "--rerank", "--flip"]) == 0
    assert "with flip, re-ranking" in capsys.readouterr().out

    # A second fresh run in the same folder is refused, and nothing is overwritten.
    before = (run_dir / "metrics.jsonl").read_text()
    assert cli.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("num_workers", "reset_adam"), [(0, False), pytest.param(2, False, marks=pytest.mark.slow), (0, True)]
)
def test_resume_continues_bit_identically(
    domains: tuple[Path, Path], tmp_path: Path, num_workers: int, reset_adam: bool
) -> None:
    extra = [
        f"data.num_workers={num_workers}",
        f"optim.reset_each_epoch={reset_adam}",
        "run.eval_every=0",
        "evaluate_target=false",
    ]
    straight = load_config(PretrainConfig, None, overrides(domains, tmp_path / "straight", *extra))
    pretrain.pretrain_on_source(straight)
    first = load_config(
        PretrainConfig, None, overrides(domains, tmp_path / "split", *extra, "optim.epochs=1")
    )
    pretrain.pretrain_on_source(first)
    after_one = checkpoint.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert after_one["epoch"] == 1
    # The resumed process gets the 2-epoch config; its run_dir is taken from `resume`.
    pretrain.pretrain_on_source(straight, resume=str(tmp_path / "split"))

    a = checkpoint.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["epoch"] == b["epoch"] == 2
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for key, param_state in a["optimizer"]["state"].items():
        for name, value in param_state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][name]))
    log_text = (tmp_path / "split" / "run.log").read_text()
    assert "optim.epochs: 1 -> 2" in log_text
    # The comparison can fail: the second epoch did change the weights.
    assert not all(torch.equal(t, after_one["model"][n]) for n, t in a["model"].items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    domains: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_triplet = losses.batch_hard_triplet_loss
    calls = {"n": 0}

    def triplet_that_fails_in_epoch_two(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        value = real_triplet(*args, **kwargs)
        return value * math.nan if calls["n"] > 2 else value  # 2 iterations per epoch

    monkeypatch.setattr(losses, "batch_hard_triplet_loss", triplet_that_fails_in_epoch_two)
    run_dir = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, overrides(domains, run_dir, "run.eval_every=0"))
    with pytest.raises(training.NonFiniteLossError) as info:
        pretrain.pretrain_on_source(cfg)
    message = str(info.value)
    assert "loss became nan at epoch 1 iteration 0" in message
    assert f"last good checkpoint is kept at {run_dir / 'checkpoint.pt'}" in message
    state = checkpoint.load_checkpoint(run_dir / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [m["epoch"] for m in metrics_lines(run_dir)] == [1]
    assert "loss became nan" in (run_dir / "run.log").read_text()


@pytest.mark.parametrize(
    "setting", ["loss.ce_weight=0.5", "loss.spread_weight=0.1", "loss.triplet_feature=bn_normalized"]
)
def test_unused_loss_settings_are_refused(domains: tuple[Path, Path], tmp_path: Path, setting: str) -> None:
    cfg = load_config(PretrainConfig, None, overrides(domains, tmp_path / "run", setting))
    with pytest.raises(ValueError, match=f"{setting.split('=')[0]}=.* is not supported"):
        pretrain.pretrain_on_source(cfg)
    assert not (tmp_path / "run").exists()  # refused before any run folder is made
