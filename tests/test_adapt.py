"""Dual-Refinement adaptation loop: smoke run, label-leak guard, exact resume, loss variants.

Everything runs on a tiny synthetic target (13 identities, 32x16 images, the `tiny` trunk) on the CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
import torch

from dualref import inference, steps
from dualref.checkpoint import load_checkpoint
from dualref.config import AdaptConfig, LossConfig, load_config
from dualref.data import datasets, synthetic
from dualref.data.records import ReidSplits, Sample
from dualref.memory_bank import InstantMemoryBank, MomentumMemoryBank
from dualref.models.reid_net import ReidNet
from dualref.pipelines import adapt


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    # One intra-op thread: the tiny net is too small to gain from two, and on a busy 2-core machine two
    # threads can be tens of times slower. The runs set it through run.threads; restore it afterwards.
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = synthetic.domain_b_config(scale=0.1)
    return synthetic.write_domain(tmp_path_factory.mktemp("synth"), config, seed=0)


def _config(target_root: Path, run_dir: Path, *overrides: str) -> AdaptConfig:
    return load_config(
        AdaptConfig,
        None,
        [
            "data.target=market1501",
            f"data.target_root={target_root}",
            "data.height=32",
            "data.width=16",
            "data.batch_size=16",
            "data.num_instances=4",
            "data.num_workers=0",
            "data.test_batch_size=64",
            "model.arch=tiny",
            "model.pretrained=null",
            "optim.epochs=2",
            "optim.iters_per_epoch=3",
            "clustering.dbscan_rho=0.05",
            "clustering.k1=10",
            "run.progress=false",
            "run.threads=1",
            f"run.run_dir={run_dir}",
            *overrides,
        ],
    )


def _records(run_dir: Path, kind: str) -> list[dict[str, object]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _assert_same_state(a: Path, b: Path) -> None:
    left, right = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert left["epoch"] == right["epoch"] and left["eps"] == right["eps"]
    assert left["model"].keys() == right["model"].keys()
    for key, value in left["model"].items():
        assert torch.equal(value, right["model"][key]), key
    assert torch.equal(left["memory"]["weight"], right["memory"]["weight"])


@pytest.fixture(scope="module")
def straight_run(target_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    return adapt.adapt_to_target(_config(target_root, run_dir))


def test_smoke_run_writes_every_file_with_finite_losses(straight_run: Path, target_root: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.md", "run.log"):
        assert (straight_run / name).is_file(), name
    assert (straight_run / "label_fscore.png").stat().st_size > 1000
    assert (straight_run / "target_rank.png").stat().st_size > 1000
    epochs = _records(straight_run, "adapt")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        assert record["num_clusters"] >= 1  # type: ignore[operator]
        for name in ("loss_total", "loss_ce_coarse", "loss_triplet_refined", "loss_memory"):
            assert math.isfinite(record[name]), name  # type: ignore[arg-type]
        assert record["loss_memory"] > 0  # type: ignore[operator]
        assert 0.0 <= record["coarse_fscore"] <= 1.0  # type: ignore[operator]
    evals = _records(straight_run, "eval_target")
    assert [r["epoch"] for r in evals] == [1, 2]
    for record in evals:
        assert 0.0 <= record["rank1"] <= record["rank5"] <= record["rank10"] <= 1.0  # type: ignore[operator]
    # The logged result is the saved model's: evaluating checkpoint.pt afresh gives the same scores.
    again = inference.evaluate_checkpoint(
        straight_run / "checkpoint.pt", "market1501", target_root, device=torch.device("cpu"),
        num_workers=0, progress=False,
    )
    assert again.mAP == pytest.approx(evals[-1]["mAP"], abs=1e-6)
    assert again.cmc[0] == pytest.approx(evals[-1]["rank1"], abs=1e-6)
    summary = (straight_run / "summary.md").read_text()
    assert "result: last epoch" in summary and "label_fscore.png" in summary
    # eps is set at epoch 0 and then kept
    assert epochs[0]["eps"] == epochs[1]["eps"]


def test_training_never_reads_target_pids(
    straight_run: Path, target_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = datasets.load_dataset

    def garbage_train_pids(name: str, root: str | Path, **kwargs: object) -> ReidSplits:
        # Same images and cameras, but every training pid replaced by a random identity: any use of
        # the target pids in training (sampling, labels, losses) would change the trained weights.
        splits = real_load(name, root)
        rng = random.Random(1234)
        train = [Sample(s.path, rng.randrange(10_000), s.camid) for s in splits.train]
        return dataclasses.replace(splits, train=train)

    monkeypatch.setattr(datasets, "load_dataset", garbage_train_pids)
    leaked = adapt.adapt_to_target(_config(target_root, tmp_path / "garbage"))
    _assert_same_state(straight_run, leaked)
    # ...while the monitoring, which must read them, does see different pids.
    honest = [r["coarse_fscore"] for r in _records(straight_run, "adapt")]
    garbage = [r["coarse_fscore"] for r in _records(leaked, "adapt")]
    assert honest != garbage
    losses = [r["loss_total"] for r in _records(straight_run, "adapt")]
    assert losses == [r["loss_total"] for r in _records(leaked, "adapt")]


def test_resume_is_bit_identical_to_a_straight_run(
    straight_run: Path, target_root: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "interrupted"
    adapt.adapt_to_target(_config(target_root, run_dir, "optim.epochs=1"))
    adapt.adapt_to_target(_config(target_root, run_dir), resume=run_dir)
    _assert_same_state(straight_run, run_dir)
    resumed = _records(run_dir, "adapt")
    straight = _records(straight_run, "adapt")
    for key in ("loss_total", "loss_memory", "num_clusters", "coarse_fscore"):
        assert [r[key] for r in resumed] == [r[key] for r in straight], key


def test_resume_carries_adam_state_when_not_reset_each_epoch(target_root: Path, tmp_path: Path) -> None:
    # eval_every 0: the straight run evaluates only at the end, the interrupted one also after epoch 1;
    # the result must not depend on it.
    extra = ("optim.reset_each_epoch=false", "optim.iters_per_epoch=2", "run.eval_every=0")
    straight = adapt.adapt_to_target(_config(target_root, tmp_path / "straight", *extra))
    run_dir = tmp_path / "interrupted"
    adapt.adapt_to_target(_config(target_root, run_dir, *extra, "optim.epochs=1"))
    assert load_checkpoint(run_dir / "checkpoint.pt")["optimizer"] is not None
    adapt.adapt_to_target(_config(target_root, run_dir, *extra), resume=run_dir)
    _assert_same_state(straight, run_dir)


def test_fixed_dbscan_eps_replaces_the_rho_rule(target_root: Path, tmp_path: Path) -> None:
    run_dir = adapt.adapt_to_target(
        _config(target_root, tmp_path / "fixed", "clustering.dbscan_eps=0.37", "optim.epochs=1")
    )
    assert [r["eps"] for r in _records(run_dir, "adapt")] == [0.37]
    assert load_checkpoint(run_dir / "checkpoint.pt")["eps"] == 0.37


def test_zero_epochs_is_direct_transfer(target_root: Path, tmp_path: Path) -> None:
    run_dir = adapt.adapt_to_target(_config(target_root, tmp_path / "dt", "optim.epochs=0"))
    assert _records(run_dir, "adapt") == []
    (record,) = _records(run_dir, "eval_target")
    assert record["epoch"] == 0 and 0.0 <= record["mAP"] <= 1.0  # type: ignore[operator]
    assert "result: last epoch" in (run_dir / "summary.md").read_text()


# --- train_target_epoch on hand-made batches: every Table II / III variant ---------------------------


def _batches(num_batches: int, num_samples: int) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        indices = torch.randperm(num_samples, generator=generator)[:8]
        coarse = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        images = torch.rand(8, 3, 32, 16, generator=generator)
        batches.append((images, coarse, torch.zeros(8, dtype=torch.long), indices))
    return batches


@pytest.mark.parametrize(
    ("memory_kind", "memory_loss", "triplet_feature", "alpha", "mu"),
    [
        ("instant", "spread_out", "bn_normalized", 0.5, 0.1),  # full
        ("instant", "spread_out", "pooled", 0.0, 0.0),  # baseline
        ("traditional", "spread_out", "bn_normalized", 0.5, 0.1),  # SP + TM
        ("minibatch", "spread_out", "bn_normalized", 0.5, 0.1),  # SP + MB
        ("traditional", "invariance", "bn_normalized", 0.5, 0.1),  # IN + TM
    ],
)
def test_train_target_epoch_variants(
    memory_kind: str, memory_loss: str, triplet_feature: str, alpha: float, mu: float
) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    num_samples = 20
    model = ReidNet("tiny", num_classes=4)
    memory: InstantMemoryBank | MomentumMemoryBank | None = None
    if mu > 0 and memory_kind == "instant":
        memory = InstantMemoryBank(num_samples, model.feat_dim)
    elif mu > 0 and memory_kind == "traditional":
        memory = MomentumMemoryBank(num_samples, model.feat_dim, momentum=0.5)
    if memory is not None:
        memory.init_from(torch.randn(num_samples, model.feat_dim))
    before = memory.bank().detach().clone() if memory is not None else None
    params = list(model.parameters()) + ([memory.weight] if isinstance(memory, InstantMemoryBank) else [])
    optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-3)
    settings = LossConfig(
        ce_weight=0.5,
        refined_weight=alpha,
        spread_weight=mu,
        triplet_feature=triplet_feature,
        memory_loss=memory_loss,
        spread_num_neighbors=2,
        invariance_num_neighbors=2,
    )
    refined = torch.arange(num_samples) % 4
    stats = steps.train_target_epoch(
        model,
        _batches(3, num_samples),
        optimizer,
        refined,
        memory=memory,
        loss=settings,
        device=torch.device("cpu"),
        progress=False,
    )
    assert stats.iterations == 3
    means = stats.means
    assert (means["memory"] > 0) == (mu > 0)
    assert (means["ce_refined"] > 0) == (alpha > 0)
    # The objective, term by term (lambda = ce_weight 0.5): linear in the terms, so their epoch means
    # obey it too.
    coarse = 0.5 * means["ce_coarse"] + means["triplet_coarse"]
    refined_terms = 0.5 * means["ce_refined"] + means["triplet_refined"]
    expected = (1 - alpha) * coarse + alpha * refined_terms + mu * means["memory"]
    assert means["total"] == pytest.approx(expected, rel=1e-5)
    if memory is not None:
        assert before is not None
        moved = (memory.bank().detach() - before).norm(dim=1) > 0
        if isinstance(memory, InstantMemoryBank):
            assert bool(moved.all())  # every row is a negative of some batch sample: every row trains
        else:  # the momentum update touches exactly the rows of the batches' images
            seen = torch.zeros(num_samples, dtype=torch.bool)
            for batch in _batches(3, num_samples):
                seen[batch[3]] = True
            assert torch.equal(moved, seen) and not bool(seen.all())


def test_scale_bank_gradient() -> None:
    bank = torch.nn.Parameter(torch.zeros(3, 2))
    steps.scale_bank_gradient(bank, 2.0)  # no gradient yet: nothing happens
    assert bank.grad is None
    (bank * torch.tensor([1.0, 3.0])).sum().backward()
    steps.scale_bank_gradient(bank, 2.0)
    assert torch.equal(bank.grad, torch.tensor([[2.0, 6.0]] * 3))  # type: ignore[arg-type]


def test_every_output_file_is_readable_by_others(target_root: Path, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        run_dir = adapt.adapt_to_target(_config(target_root, tmp_path / "perms", "optim.epochs=1"))
    finally:
        os.umask(previous)
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"config.yaml", "checkpoint.pt", "summary.md", "metrics.jsonl", "run.log"} <= {
        p.name for p in files
    }
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


def test_resume_evaluates_an_epoch_whose_evaluation_was_lost(straight_run: Path, tmp_path: Path) -> None:
    # A kill during the last evaluation: the checkpoint of epoch 2 exists, its eval record does not.
    run_dir = tmp_path / "killed_in_eval"
    shutil.copytree(straight_run, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if not ('"eval_target"' in line and '"epoch": 2,' in line)]
    assert len(kept) == len(lines) - 1
    (run_dir / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (run_dir / "summary.md").unlink()
    adapt.adapt_to_target(load_config(AdaptConfig, run_dir / "config.yaml"), resume=run_dir)

    def scores(run: Path) -> list[dict[str, object]]:
        timing = ("time", "seconds_eval")
        return [{k: v for k, v in r.items() if k not in timing} for r in _records(run, "eval_target")]

    assert scores(run_dir) == scores(straight_run)
    assert "result: last epoch" in (run_dir / "summary.md").read_text()
