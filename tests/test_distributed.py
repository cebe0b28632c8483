"""Several processes (torchrun, DDP, gloo on CPU): the rank layout reproduces one process exactly.

- Single-process properties: shards cover the data set in order; a rank's rows of a batch are augmented
  with the whole batch's random draws (bit-identical to slicing the one-process batch).
- Two gloo ranks (torch.multiprocessing): a few target and source iterations under DDP give the losses,
  weights and memory bank of one process whose BatchNorm is ghost BN over 2 groups; every rank ends with
  the same weights and the same bank.
- An error of rank 0 stops every rank with its message.
- torchrun end to end on the tiny synthetic target: a 2-rank adaptation runs, only rank 0 writes, resume
  at the same world size is exact, and resuming with another one is refused in one line; 2-rank
  pretraining equals one process with ghost BN over 2 groups.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dualref import distributed, steps, training
from dualref.config import LossConfig
from dualref.data import loaders, synthetic
from dualref.data.transforms import BatchTrainAugment
from dualref.memory_bank import InstantMemoryBank
from dualref.models.reid_net import ReidNet
from tiny_adapt import TINY_OVERRIDES, write_target

WORLD = 2
BATCH, K_INSTANCES, NUM_SAMPLES, ITERATIONS = 16, 4, 40, 3

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def test_shards_cover_the_items_once_in_order() -> None:
    for num_items in (0, 1, 5, 156, 12936):
        for world in (1, 2, 3, 4, 7):
            views = [distributed.Ranks(rank, world, rank) for rank in range(world)]
            ranges = [distributed.shard_range(num_items, view) for view in views]
            assert ranges[0][0] == 0 and ranges[-1][1] == num_items
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_batch_rows_split_the_global_batch_and_refuse_a_remainder() -> None:
    assert distributed.batch_rows(64, distributed.SINGLE) is None
    rows = [distributed.batch_rows(64, distributed.Ranks(r, 4, r)) for r in range(4)]
    assert rows == [(0, 16), (16, 32), (32, 48), (48, 64)]
    with pytest.raises(ValueError, match=r"data.batch_size=66 .* 4 ranks"):
        distributed.batch_rows(66, distributed.Ranks(0, 4, 0))


@pytest.mark.parametrize("world", [2, 4])
def test_a_ranks_rows_are_augmented_exactly_as_in_the_whole_batch(world: int) -> None:
    images = torch.randint(0, 256, (BATCH, 3, 32, 16), dtype=torch.uint8)
    augment = BatchTrainAugment(random_erasing_prob=0.5)
    torch.manual_seed(3)
    whole = augment(images)
    per_rank = BATCH // world
    for rank in range(world):
        torch.manual_seed(3)  # every rank's RNG is where the one process's was
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        mine = augment(images[rows], batch_size=BATCH, offset=rows.start)
        assert torch.equal(mine, whole[rows])
        assert torch.rand(()) == _rand_after(augment, images)  # the same draws were consumed


def _rand_after(augment: BatchTrainAugment, images: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(3)
    augment(images)
    return torch.rand(())


def test_a_datasets_rows_load_the_ranks_share_of_each_batch(tmp_path: Path) -> None:
    root = write_target(tmp_path / "target")
    paths = sorted((root / "bounding_box_train").glob("*.jpg"))[:BATCH]
    augment = BatchTrainAugment(random_erasing_prob=0.5)
    batch = list(range(BATCH))

    def items(rows: tuple[int, int] | None) -> list[loaders.Item]:
        dataset = loaders.ImageDataset(
            paths, None, None, lambda x: x, resize_to=(32, 16), cache=True, batch_transform=augment, rows=rows
        )
        torch.manual_seed(5)
        return dataset.__getitems__(batch)

    whole = items(None)
    share = items((4, 12))
    assert [item[3] for item in share] == batch[4:12]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(share, whole[4:12], strict=True))


# --- two gloo ranks against one process --------------------------------------------------------------


def _batches(seed: int) -> list[list[torch.Tensor]]:
    """ITERATIONS global P x K batches (images, labels, camids, dataset indices) of fixed content."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(ITERATIONS):
        labels = torch.randperm(6, generator=generator)[: BATCH // K_INSTANCES].repeat_interleave(K_INSTANCES)
        indices = torch.randperm(NUM_SAMPLES, generator=generator)[:BATCH]
        images = torch.randn(BATCH, 3, 32, 16, generator=generator)
        batches.append([images, labels, torch.zeros(BATCH, dtype=torch.long), indices])
    return batches


def _train(ranks: distributed.Ranks, bn_groups: int, out: Path) -> None:
    """Target and source iterations on the fixed batches; rank 0 (or the one process) saves the results."""
    torch.manual_seed(0)
    model = ReidNet("tiny", 6, bn_groups=bn_groups)
    memory = InstantMemoryBank(NUM_SAMPLES, model.feat_dim)
    memory.init_from(torch.randn(NUM_SAMPLES, model.feat_dim, generator=torch.Generator().manual_seed(1)))
    rows = distributed.batch_rows(BATCH, ranks) or (0, BATCH)

    def mine(batches: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        return [[t[rows[0] : rows[1]] for t in batch] for batch in batches]

    loss = LossConfig()  # the faithful full method: both label sets, spread-out against the instant bank
    refined = torch.arange(NUM_SAMPLES) % 5
    optimizer = training.build_adam([*model.parameters(), memory.weight], lr=1e-3, weight_decay=5e-4)
    cpu = torch.device("cpu")
    target = steps.train_target_epoch(
        distributed.wrap(model, ranks, cpu),
        mine(_batches(1)),
        optimizer,
        refined,
        memory=memory,
        loss=loss,
        device=cpu,
        progress=False,
        diagnostics_every=1,
        ranks=ranks,
    )
    source_optimizer = training.build_adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    source = steps.train_source_epoch(
        distributed.wrap(model, ranks, cpu),
        mine(_batches(2)),
        source_optimizer,
        device=cpu,
        label_smoothing=0.1,
        triplet_margin=None,
        target_loader_iter=iter(mine(_batches(3))),
        progress=False,
        ranks=ranks,
    )
    # DDP keeps the parameters equal and the bank gets the same gradient everywhere (never broadcast);
    # the BatchNorm statistics are each rank's own until rank 0's are broadcast.
    same = distributed.same_on_every_rank([*model.parameters(), memory.weight], ranks)
    distributed.broadcast_modules([model], ranks)
    if ranks.is_main:
        torch.save(
            {
                "target": target.means,
                "source": source.means,
                "model": model.state_dict(),
                "bank": memory.weight.detach().clone(),
                "same_on_every_rank": same,
            },
            out,
        )


def _rank_main(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        _train(distributed.Ranks(rank, WORLD, rank), bn_groups=1, out=Path(out))
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_two_ranks_train_as_one_process_with_ghost_bn_over_two_groups(tmp_path: Path) -> None:
    # Tolerances: the same arithmetic but for the order of sums (convolutions over 8 rows instead of 16,
    # the all-reduce of the ranks' gradients), i.e. float32 rounding: 1e-5 relative on the losses. Adam
    # turns a near-zero gradient into a step of about lr whatever its size, so rounding can move a single
    # weight by up to lr (measured: 1 element in 589,824 by more than 1e-4): weights are compared by the
    # norm of their difference, against the difference plain BatchNorm makes (the control), 1e-2 of it
    # at most (measured: 6e-4).
    try:
        mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=WORLD, join=True)
    except (OSError, RuntimeError) as err:  # no fork/spawn or no local sockets in this sandbox
        pytest.skip(f"could not start {WORLD} processes with gloo: {err}")
    _train(distributed.SINGLE, bn_groups=WORLD, out=tmp_path / "one.pt")
    _train(distributed.SINGLE, bn_groups=1, out=tmp_path / "plain.pt")
    ddp, one, plain = (torch.load(tmp_path / f"{name}.pt") for name in ("ddp", "one", "plain"))
    assert ddp["same_on_every_rank"], "the ranks' weights or memory banks differ"
    for stage in ("target", "source"):
        assert ddp[stage].keys() == one[stage].keys()
        for name, value in one[stage].items():
            assert ddp[stage][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (stage, name)
        assert abs(plain[stage]["total"] - one[stage]["total"]) > 1e-4  # the control differs
    for name, value in one["model"].items():
        if not value.is_floating_point() or name == "neck.bias":  # the frozen neck bias stays 0
            continue
        control = float((plain["model"][name] - value).norm())
        assert control > 0, name
        assert float((ddp["model"][name] - value).norm()) <= 1e-2 * control, name
    torch.testing.assert_close(ddp["bank"], one["bank"], rtol=0, atol=1e-5)
    assert float((plain["bank"] - one["bank"]).abs().max()) > 1e-4  # the bank moved differently


def _failing_rank(rank: int, init_file: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    ranks = distributed.Ranks(rank, WORLD, rank)

    def compute() -> int:
        raise ValueError("DBSCAN found no cluster")

    try:
        distributed.on_main(compute, ranks)
    except ValueError as err:  # RankZeroError is one
        Path(folder, f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    distributed.on_main(lambda: 7, ranks)  # the group still works afterwards
    dist.destroy_process_group()


@needs_gloo
def test_an_error_of_rank_0_stops_every_rank_with_its_message(tmp_path: Path) -> None:
    try:
        mp.spawn(_failing_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    except (OSError, RuntimeError) as err:
        pytest.skip(f"could not start {WORLD} processes with gloo: {err}")
    assert (tmp_path / "rank0.txt").read_text() == "ValueError: DBSCAN found no cluster"
    assert (tmp_path / "rank1.txt").read_text() == "RankZeroError: rank 0 stopped: DBSCAN found no cluster"


# --- torchrun end to end -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dualref(args: list[str], *, world: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "dualref"]
    if world > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            f"--master_port={_free_port()}",
            "-m",
            "dualref",
        ]
    return subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _adapt_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    sets = [*TINY_OVERRIDES, f"data.target_root={root}", "source_checkpoint=null", *extra]
    return ["adapt", *[part for item in sets for part in ("--set", item)], "--set", f"run.run_dir={run_dir}"]


@needs_gloo
def test_torchrun_adaptation_writes_once_resumes_exactly_and_refuses_another_size(tmp_path: Path) -> None:
    root = write_target(tmp_path / "target")
    whole = _dualref(_adapt_args(root, tmp_path / "whole"), world=WORLD, cwd=tmp_path)
    if whole.returncode != 0 and "errno" in whole.stderr.lower() and "socket" in whole.stderr.lower():
        pytest.skip(f"torchrun could not open its local rendezvous: {whole.stderr[-300:]}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["kind"]) for r in records] == [(1, "adapt"), (2, "adapt"), (2, "eval_target")]
    assert "2 process(es)" in (tmp_path / "whole" / "run.log").read_text()

    first = _dualref(_adapt_args(root, tmp_path / "split", "optim.epochs=1"), world=WORLD, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resume = ["adapt", "--resume", str(tmp_path / "split"), "--set", "optim.epochs=2"]
    refused = _dualref(resume, world=1, cwd=tmp_path)
    assert refused.returncode == 2
    assert "written by 2 process(es)" in refused.stderr and "--nproc_per_node=2" in refused.stderr
    assert refused.stderr.count("\n") == 1, refused.stderr  # one line, no traceback
    resumed = _dualref(resume, world=WORLD, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["world_size"] == b["world_size"] == WORLD
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert torch.equal(a["memory"]["weight"], b["memory"]["weight"])


@needs_gloo
def test_torchrun_pretraining_equals_one_process_with_ghost_bn(tmp_path: Path) -> None:
    # Tolerance: float32 rounding of the sums' order (measured: 1e-7 relative on the losses).
    small = {"num_train_ids": 6, "num_test_ids": 4, "images_per_id": 6, "num_distractors": 2}
    domains = [
        synthetic.write_domain(tmp_path, dataclasses.replace(config(), height=64, width=32, **small))
        for config in (synthetic.domain_a_config, synthetic.domain_b_config)
    ]
    sets = [
        "data.source=market1501",
        f"data.source_root={domains[0]}",
        "data.target=market1501",
        f"data.target_root={domains[1]}",
        "data.height=32",
        "data.width=16",
        "model.arch=tiny",
        "data.batch_size=8",
        "data.num_instances=4",
        "data.num_workers=0",
        "model.pretrained=null",
        "optim.epochs=2",
        "optim.iters_per_epoch=2",
        "run.progress=false",
        "run.threads=1",
    ]
    args = ["pretrain", *[part for item in sets for part in ("--set", item)]]
    two = _dualref([*args, "--set", f"run.run_dir={tmp_path / 'two'}"], world=WORLD, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one_args = [*args, "--set", "model.bn_groups=2", "--set", f"run.run_dir={tmp_path / 'one'}"]
    one = _dualref(one_args, world=1, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("two", "one")]
    train = [
        [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("two", "one")
    ]
    assert [r["kind"] for r in train[0]] == [r["kind"] for r in train[1]]
    for a, b in zip(*train, strict=True):
        for key in ("ce", "triplet", "total", "mAP"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5), (b["epoch"], b["kind"], key)
    transfer = [result["direct_transfer"]["mAP"] for result in results]
    assert transfer[0] == pytest.approx(transfer[1], rel=1e-5)
