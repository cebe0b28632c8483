"""What several processes cost and need: a rank's loader alone, and one step's communication.

Issue 12, "throughput accounting". Two measurements, each the median of ``--runs`` timed repetitions:

* ``loader``: `dualref.data.loaders.train_loader` alone (decoded images cached in RAM, P x K sampler,
  flip / pad + crop / normalise / random erasing 0.5, the main process, one torch thread), for the whole
  global batch (one process) and for one rank's rows of it (K = 2 and 4: the rank augments only its rows
  but takes the whole batch's random draws). Images per second of the rows delivered, to set against
  the GPU's step rate (benchmarks/results/gpu.md).
* ``comm``: two gloo processes on this CPU; per training step, DDP all-reduces the gradient (every
  trainable parameter, float32) and `distributed.gather_rows` all-gathers the outputs (pooled, BN
  feature, logits: B/K x (2 D + L) floats per rank) plus labels and indices. Times the two collectives
  of that size alone; the instant memory bank adds nothing per step (its gradient is computed from
  the gathered batch on every rank) and one [N, D] broadcast per epoch.

Usage (from the repository root)::

    .venv/bin/python benchmarks/bench_distributed.py --height 256 --width 128 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dualref import distributed
from dualref.data import datasets, loaders
from dualref.data.records import relabel_pids
from dualref.models.reid_net import ReidNet

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "Market-1501"


def loader_rate(paths: list[Path], labels: list[int], camids: list[int], args: argparse.Namespace) -> None:
    pixels = None
    for world in (1, 2, 4):
        rows = None if world == 1 else (0, args.batch_size // world)
        loader = loaders.train_loader(
            paths,
            labels,
            camids,
            height=args.height,
            width=args.width,
            batch_size=args.batch_size,
            num_instances=4,
            num_iterations=args.iters,
            seed=0,
            random_erasing_prob=0.5,
            num_workers=0,
            cache=pixels is None,
            rows=rows,
        )
        if pixels is None:
            pixels = loader.dataset.pixels
        loader.dataset.pixels = pixels
        rates = []
        for run in range(args.runs):
            loaders.set_epoch(loader, run)
            start = time.perf_counter()
            count = sum(int(batch[0].shape[0]) for batch in loader)
            rates.append(count / (time.perf_counter() - start))
        per_batch = args.batch_size / world / statistics.median(rates) * 1000
        print(
            f"| {args.height}x{args.width} | {world} | {args.batch_size // world} | "
            f"{statistics.median(rates):,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | {per_batch:.1f} ms |"
        )


def _comm_rank(rank: int, init: str, sizes: dict[str, int], runs: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    ranks = distributed.Ranks(rank, 2, rank)
    results = {}
    for name, numel in sizes.items():
        tensor = torch.randn(numel)
        times = []
        for _ in range(runs + 2):
            dist.barrier()
            start = time.perf_counter()
            if name.startswith("gather"):
                distributed.gather_rows(tensor.view(-1, 1), ranks)
            else:
                dist.all_reduce(tensor)
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times[2:])
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def comm_cost(args: argparse.Namespace) -> None:
    for arch, feat_dim in (("mobilenet_v2", 1280), ("resnet50", 2048)):
        model = ReidNet(arch, args.classes, pretrained=None)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_rank_rows = args.batch_size // 2
        sizes = {
            "all-reduce gradient": params,
            "gather outputs": per_rank_rows * (2 * feat_dim + args.classes) + 2 * per_rank_rows,
        }
        with tempfile.TemporaryDirectory() as folder:
            out = os.path.join(folder, "comm.pt")
            mp.spawn(_comm_rank, args=(os.path.join(folder, "init"), sizes, args.runs, out), nprocs=2)
            times = torch.load(out)
        for name, numel in sizes.items():
            size = f"{numel * 4 / 2**20:.2f} MiB"
            print(f"| {arch} | {name} | {numel:,} | {size} | {times[name] * 1000:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--parts", default="loader,comm")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20, help="batches per timed run of the loader")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=700, help="L, pseudo-classes (Market: ~650-750)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    if "loader" in parts:
        if not args.data_root.is_dir():
            raise SystemExit(f"--data-root {args.data_root} is not a folder (Market-1501 layout expected)")
        train = datasets.load_dataset("market1501", str(args.data_root)).train
        paths, camids = [s.path for s in train], [s.camid for s in train]
        labels = relabel_pids(train)
        print("| input | ranks K | rows per rank | loader img/s | range | per rank's batch |")
        print("|---|---:|---:|---:|---|---:|")
        loader_rate(paths, labels, camids, args)
    if "comm" in parts:
        print("| network | collective per step | floats | size | median time (gloo, 2 CPU ranks) |")
        print("|---|---|---:|---:|---:|")
        comm_cost(args)


if __name__ == "__main__":
    main()
