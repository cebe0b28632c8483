"""Training throughput: the full step (JPEG loading + augmentation + step) against the bare step.

Issue 4, "Figures to reach": on CPU at 128x64 with MobileNetV2 and batch 64 (16 ids x 4), the pipeline
must keep the network at least 85% busy, i.e. full-step images/s >= 0.85 x bare-step images/s.

One process runs these phases in order (``--phases``), each a few warm-up iterations then
``--windows`` timed windows of ``--window-iters`` iterations; a phase's figure is the median over its
windows of images/s:

* ``bare``: forward + backward + Adam step of the source-training loss (label-smoothed CE on the
  logits + soft-margin batch-hard triplet on the pooled feature) on one batch already in memory.
* ``full``: the same step, the batch coming from ``dualref.data.loaders.train_loader`` (P x K sampler,
  JPEG decoding, flip / pad / crop / normalise) with ``--num-workers`` workers.
* ``full-cache``: as ``full`` with ``cache=True`` (images decoded once into RAM before timing).
* ``bare-s2``: ``bare`` with ``last_stride=2`` (the cost of the default last stride 1, for reference).
* ``data`` / ``data-cache``: the loader alone, in the main process (``num_workers=0``), no step.

Every window also records this process's CPU time per image (all its threads). On a shared machine the
wall-clock figures move with the load; the CPU-time figures much less. With loading and the step
sharing the same cores (2 here), the busy fraction is bounded by
``bare CPU / (bare CPU + data CPU)``, printed at the end when ``data`` phases ran.

The bare phase runs first and last, so drift of the machine's load shows up as a difference between
the two. Data: the Market-1501 train split under ``--data-root`` if present, else generated JPEGs
under benchmarks/_work/throughput_jpegs.

Usage::

    .venv/bin/python benchmarks/bench_throughput.py [--phases bare,full,full-cache,bare] [--windows 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dualref import losses
from dualref.data import loaders
from dualref.data.datasets import load_dataset
from dualref.data.records import relabel_pids
from dualref.models import ReidNet, ReidOutput

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "Market-1501"
GENERATED = REPO / "benchmarks" / "_work" / "throughput_jpegs"

Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def _generated_jpegs(num_ids: int = 100, per_id: int = 8) -> tuple[list[Path], list[int], list[int]]:
    """Market-sized (64 wide x 128 high) noisy JPEGs, written once; labels and cameras alternate."""
    GENERATED.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths, labels, camids = [], [], []
    for pid in range(num_ids):
        base = rng.integers(0, 256, size=(1, 1, 3))
        for i in range(per_id):
            path = GENERATED / f"{pid:04d}_c{i % 2 + 1}_{i:02d}.jpg"
            if not path.exists():
                noise = rng.integers(-40, 40, size=(128, 64, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(path, quality=90)
            paths.append(path)
            labels.append(pid)
            camids.append(i % 2)
    return paths, labels, camids


def _training_data(root: Path) -> tuple[str, list[Path], list[int], list[int]]:
    if root.is_dir():
        train = load_dataset("market1501", root).train
        return (
            f"Market-1501 train ({len(train)} JPEGs) at {root}",
            [s.path for s in train],
            relabel_pids(train),
            [s.camid for s in train],
        )
    paths, labels, camids = _generated_jpegs()
    return f"generated JPEGs ({len(paths)}) at {GENERATED}", paths, labels, camids


def _make_step(model: ReidNet) -> Callable[[Tensor, Tensor], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3.5e-4, weight_decay=5e-4)

    def step(images: Tensor, labels: Tensor) -> float:
        out = model(images)
        assert isinstance(out, ReidOutput)
        loss = losses.cross_entropy_with_label_smoothing(
            out.logits, labels
        ) + losses.batch_hard_triplet_loss(out.pooled, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


class Windows(NamedTuple):
    """Per-window measurements of one phase."""

    rates: list[float]  # images/s (wall clock)
    cpu_ms: list[float]  # CPU milliseconds per image of this process (all its threads)


def _timed_windows(
    batches: Iterator[Batch],
    step: Callable[[Tensor, Tensor], float] | None,
    *,
    warmup: int,
    windows: int,
    window_iters: int,
) -> Windows:
    """Time windows of `window_iters` batches; fetching each batch is inside the window.

    With `step` None only the batches are fetched (data-loading cost alone).
    """
    for _ in range(warmup):
        images, labels, _, _ = next(batches)
        if step is not None:
            step(images, labels)
    rates, cpu_ms = [], []
    for _ in range(windows):
        num_images = 0
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(window_iters):
            images, labels, _, _ = next(batches)
            if step is not None:
                step(images, labels)
            num_images += images.shape[0]
        rates.append(num_images / (time.perf_counter() - start))
        cpu_ms.append(1000 * (time.process_time() - start_cpu) / num_images)
    return Windows(rates, cpu_ms)


def _repeat(batch: Batch) -> Iterator[Batch]:
    while True:
        yield batch


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--phases", default="bare,full,full-cache,bare")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-instances", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--window-iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    phases = args.phases.split(",")
    description, paths, labels, camids = _training_data(args.data_root)
    num_classes = max(labels) + 1
    print(f"# throughput: {args.arch} {args.height}x{args.width}, batch {args.batch_size}")
    print(f"data: {description}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"{platform.processor() or platform.machine()}; workers {args.num_workers}"
    )
    print(f"load before: {_uptime()}")

    models = {
        stride: ReidNet(args.arch, num_classes, last_stride=stride).train() for stride in (1, 2)
    }
    steps = {stride: _make_step(model) for stride, model in models.items()}
    total_iters = args.warmup + args.windows * args.window_iters
    batch_labels = torch.arange(args.batch_size) // args.num_instances
    memory_batch: Batch = (
        torch.randn(args.batch_size, 3, args.height, args.width),
        batch_labels,
        torch.zeros(args.batch_size, dtype=torch.long),
        torch.arange(args.batch_size),
    )
    results: dict[str, Windows] = {}
    for phase in phases:
        started = time.perf_counter()
        step: Callable[[Tensor, Tensor], float] | None = steps[1]
        if phase in ("bare", "bare-s2"):
            batches: Iterator[Batch] = _repeat(memory_batch)
            step = steps[2 if phase == "bare-s2" else 1]
        elif phase in ("full", "full-cache", "data", "data-cache"):
            in_main = phase.startswith("data")
            loader = loaders.train_loader(
                paths,
                labels,
                camids,
                height=args.height,
                width=args.width,
                batch_size=args.batch_size,
                num_instances=args.num_instances,
                num_iterations=total_iters,
                seed=args.seed,
                num_workers=0 if in_main else args.num_workers,
                cache=phase.endswith("cache"),
            )
            print(f"{phase}: loader ready in {time.perf_counter() - started:.1f} s")
            batches = iter(loader)
            step = None if in_main else steps[1]
        else:
            raise ValueError(
                f"unknown phase {phase!r}; expected bare, bare-s2, full, full-cache, data or data-cache"
            )
        # DataLoader workers run with one torch thread; so does the main-process data phase (idle
        # OpenMP threads spinning would otherwise be counted as loading CPU time).
        threads = torch.get_num_threads()
        if step is None:
            torch.set_num_threads(1)
        measured = _timed_windows(
            batches, step, warmup=args.warmup, windows=args.windows, window_iters=args.window_iters
        )
        torch.set_num_threads(threads)
        del batches
        previous = results.get(phase, Windows([], []))
        results[phase] = Windows(previous.rates + measured.rates, previous.cpu_ms + measured.cpu_ms)
        print(
            f"{phase}: median {statistics.median(measured.rates):.1f} img/s, "
            f"{statistics.median(measured.cpu_ms):.1f} CPU ms/img; windows "
            f"{[round(r, 1) for r in measured.rates]} ({time.perf_counter() - started:.0f} s)"
        )
    print(f"load after: {_uptime()}")
    print()
    _print_table(results)


def _print_table(results: dict[str, Windows]) -> None:
    bare = statistics.median(results["bare"].rates) if "bare" in results else None
    print("| phase | median img/s | min | max | windows | wall vs bare | CPU ms/img (main process) |")
    print("|---|---|---|---|---|---|---|")
    for phase, windows in results.items():
        rate = statistics.median(windows.rates)
        ratio = f"{100 * rate / bare:.0f}%" if bare and not phase.startswith("data") else "-"
        print(
            f"| {phase} | {rate:.1f} | {min(windows.rates):.1f} | {max(windows.rates):.1f} "
            f"| {len(windows.rates)} | {ratio} | {statistics.median(windows.cpu_ms):.2f} |"
        )
    if "bare" in results:
        bare_cpu = statistics.median(results["bare"].cpu_ms)
        for data_phase in ("data", "data-cache"):
            if data_phase in results:
                data_cpu = statistics.median(results[data_phase].cpu_ms)
                print(
                    f"\nCPU-time bound with `{data_phase}` loading on the same cores as the step: "
                    f"{bare_cpu:.2f} / ({bare_cpu:.2f} + {data_cpu:.2f}) = "
                    f"{100 * bare_cpu / (bare_cpu + data_cpu):.1f}% busy"
                )


if __name__ == "__main__":
    main()
