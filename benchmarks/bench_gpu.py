"""GPU figures: Jaccard / k-NN on the GPU, and the training step in float32, bf16 and fp16.

Run on a machine with CUDA (the CPU machine has none); every figure is a median of several timed runs
after a warm-up, with ``torch.cuda.synchronize`` around each, and peak memory from
``torch.cuda.max_memory_allocated`` reset before each case. Inputs are random (no data, no weights):

* ``jaccard``: ``knn`` (bare exact top-k) and ``jaccard_distance`` at Market-1501 size
  (12,936 x 2,048), MSMT17 size (32,621 x 2,048) and 100,000 x 256, plus the same Jaccard on the CPU at
  Market size (this process, all CPU threads) for the ratio.
* ``step``: the training step of both pipelines on one batch already on the GPU: the supervised source
  step (CE + soft triplet) and the full Dual-Refinement step (coarse + refined CE / triplet and the
  IM-spread-out loss against an instant memory bank of 12,936 rows, Adam on the bank too), against the
  baseline step (coarse labels only, no memory): the paper's Table IV compares exactly these two.
  Two network scales: MobileNetV2 at 128x64 (our CPU scale) and ResNet-50 at 256x128 (the paper's).

Usage::

    PYTHONPATH=src python3 benchmarks/bench_gpu.py [--jaccard market,msmt17,100k]
        [--archs mobilenet_v2,resnet50] [--runs 5] [--iters 20] [--out FILE.json]

An empty --jaccard or --archs skips that part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from dualref import steps, training
from dualref.config import LossConfig
from dualref.distances import jaccard_distance, knn
from dualref.memory_bank import InstantMemoryBank
from dualref.models import ReidNet


def timed(fn: Callable[[], Any], runs: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak MiB allocated on `device`) of `runs` calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


JACCARD_CASES = {
    "market": (12_936, 2_048),
    "msmt17": (32_621, 2_048),
    "100k": (100_000, 256),
    "small": (2_000, 64),
}
STEP_CASES = {"mobilenet_v2": (128, 64), "resnet50": (256, 128), "tiny": (64, 32)}


def bench_jaccard(names: list[str], runs: int, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        n, d = JACCARD_CASES[name]
        generator = torch.Generator().manual_seed(0)
        centres = torch.randn(max(n // 16, 1), d, generator=generator)
        feats = centres[torch.randint(len(centres), (n,), generator=generator)]
        feats = F.normalize(feats + 0.8 * torch.randn(n, d, generator=generator), dim=1)
        on_device = feats.to(device)
        knn_s, knn_mib = timed(partial(knn, on_device, 20), runs, device)
        jac_s, jac_mib = timed(partial(jaccard_distance, on_device, k1=20, k2=6), runs, device)
        row = {
            "case": name,
            "n": n,
            "d": d,
            "knn_s": knn_s,
            "jaccard_s": jac_s,
            "ratio": jac_s / knn_s,
            "knn_peak_mib": knn_mib,
            "jaccard_peak_mib": jac_mib,
        }
        if name in ("market", "small"):
            on_cpu = partial(jaccard_distance, feats, k1=20, k2=6, device="cpu")
            cpu_s, _ = timed(on_cpu, 1, torch.device("cpu"))
            row["jaccard_cpu_s"] = cpu_s
            row["cpu_threads"] = torch.get_num_threads()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _batch(num_samples: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(64, 3, height, width, generator=generator)
    labels = torch.arange(16).repeat_interleave(4)
    indices = torch.randperm(num_samples, generator=generator)[:64]
    return images, labels, torch.zeros(64, dtype=torch.long), indices


def _make_step(
    arch: str, method: str, amp: str, channels_last: bool, device: torch.device, iters: int
) -> Callable[[], Any]:
    """`iters` training steps of `method` (source / baseline / full) on one fixed batch."""
    num_samples = 12_936
    height, width = STEP_CASES[arch]
    batches = [_batch(num_samples, height, width)] * iters
    torch.manual_seed(0)
    model = ReidNet(arch, num_classes=500).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "source":
        optimizer = torch.optim.Adam(params, lr=3.5e-4)
        return lambda: steps.train_source_epoch(
            model,
            batches,
            optimizer,
            device=device,
            label_smoothing=0.1,
            triplet_margin=None,
            amp_dtype=training.AMP_DTYPES[amp],
            channels_last=channels_last,
            progress=False,
        )
    full = method == "full"
    memory = None
    if full:
        memory = InstantMemoryBank(num_samples, model.feat_dim).to(device)
        memory.init_from(torch.randn(num_samples, model.feat_dim, device=device))
        params.append(memory.weight)
    optimizer = torch.optim.Adam(params, lr=3.5e-4)
    settings = LossConfig(
        ce_weight=0.5,
        refined_weight=0.5 if full else 0.0,
        spread_weight=0.1 if full else 0.0,
        triplet_feature="bn_normalized" if full else "pooled",
    )
    refined = torch.randint(0, 500, (num_samples,))
    return lambda: steps.train_target_epoch(
        model,
        batches,
        optimizer,
        refined,
        memory=memory,
        loss=settings,
        device=device,
        amp_dtype=training.AMP_DTYPES[amp],
        channels_last=channels_last,
        progress=False,
    )


def bench_step(archs: list[str], runs: int, device: torch.device, iters: int) -> list[dict[str, Any]]:
    rows = []
    for arch in archs:
        height, width = STEP_CASES[arch]
        for amp in ("none", "bf16", "fp16"):
            for channels_last in (False, True):
                for method in ("source", "baseline", "full"):
                    step = _make_step(arch, method, amp, channels_last, device, iters)
                    seconds, peak = timed(step, runs, device)
                    row = {
                        "arch": arch,
                        "size": f"{height}x{width}",
                        "amp": amp,
                        "channels_last": channels_last,
                        "method": method,
                        "images_per_s": 64 * iters / seconds,
                        "peak_mib": peak,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    del step
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jaccard", default="market,msmt17,100k", help=f"of {sorted(JACCARD_CASES)}")
    parser.add_argument("--archs", default="mobilenet_v2,resnet50", help=f"of {sorted(STEP_CASES)}")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="training steps per timed run")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="write every row to this JSON file")
    args = parser.parse_args()
    device = training.resolve_device(args.device, key="--device")
    torch.backends.cudnn.benchmark = True
    info = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(json.dumps(info), flush=True)
    results: dict[str, Any] = {"info": info}
    if args.jaccard:
        results["jaccard"] = bench_jaccard(args.jaccard.split(","), args.runs, device)
    if args.archs:
        results["step"] = bench_step(args.archs.split(","), args.runs, device, args.iters)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
