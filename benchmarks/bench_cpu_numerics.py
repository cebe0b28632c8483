"""CPU training and extraction throughput under four numerics (issue 23): float32, channels-last, bf16
autocast, bf16 + channels-last; the project's code next to the bare torchvision network, one process.

Rows, for each network and input size (`--configs`, default MobileNetV2 128x64, ResNet-50 128x64 and
256x128), batch 64 = 16 identities x 4, one batch already in memory (data loading is measured by
bench_throughput.py):

* ``bare train``: the torchvision network with the same last stride (1) and a linear classifier:
  forward, label-smoothed CE, backward, torch.optim.Adam. What the hardware allows.
* ``dualref train``: `steps.train_source_epoch` on a `ReidNet` (BN neck, CE + soft-margin triplet,
  the project's Adam and step loop, loss checks and all), without the target batch.
* ``dualref pretrain step``: the same with one target batch forwarded per step, as `dualref pretrain`
  runs it (images per second count the source images only).
* ``bare extract`` / ``dualref extract``: eval-mode forward without gradient; the project's is
  `extraction.extract_features` (its L2-normalised BN-neck feature, rows placed by index).

Every timed unit is one step (one batch of extraction); the settings of a network are interleaved round
by round (`--rounds`), so a drift of the machine's load hits every setting alike; figures are medians.

With ``--real CHECKPOINT``, instead: bf16 extraction against float32 (both channels-last) with one
checkpoint on real Market-1501 (`--market`): the largest difference between the features of its 12,936
training images, the agreement of the Jaccard + DBSCAN (rho rule) labels computed from each (pairwise
F-score and ARI of one against the other), and mAP / R1 on the full query/gallery with each.

Usage::

    .venv/bin/python benchmarks/bench_cpu_numerics.py --threads 2 [--rounds 5] [--configs mobilenet_v2:128x64]
    .venv/bin/python benchmarks/bench_cpu_numerics.py --threads 2 --real runs/.../checkpoint.pt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import Tensor, nn

from dualref import extraction, steps, training
from dualref.models import ReidNet

CPU = torch.device("cpu")
SETTINGS = {  # name -> (amp dtype, channels-last)
    "fp32": (None, False),
    "fp32 channels-last": (None, True),
    "bf16": (torch.bfloat16, False),
    "bf16 + channels-last": (torch.bfloat16, True),
}
MARKET = Path(__file__).resolve().parents[2] / "shared" / "data" / "Market-1501"
NUM_CLASSES = 751
BATCH = 64


def _bare_network(arch: str) -> nn.Module:
    """torchvision's network with the project's last stride 1 and `NUM_CLASSES` outputs."""
    if arch == "resnet50":
        net = tvm.resnet50(num_classes=NUM_CLASSES)
        net.layer4[0].conv2.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
        return net
    net = tvm.mobilenet_v2(num_classes=NUM_CLASSES)
    net.features[14].conv[1][0].stride = (1, 1)  # the last stride-2 block's depthwise conv
    return net


Step = Callable[[], None]
Key = tuple[str, str]  # (code row, numerics setting)


def _bare_train(arch: str, images: Tensor, labels: Tensor, amp: torch.dtype | None, cl: bool) -> Step:
    net = training.place_model(_bare_network(arch).train(), CPU, cl)
    optimizer = torch.optim.Adam(net.parameters(), lr=3.5e-4, weight_decay=5e-4)
    batch = images.contiguous(memory_format=torch.channels_last) if cl else images

    def step() -> None:
        with training.autocast(CPU, amp):
            logits = net(batch)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _dualref_train(
    arch: str, images: Tensor, labels: Tensor, amp: torch.dtype | None, cl: bool, *, target: bool
) -> Step:
    model = training.place_model(ReidNet(arch, NUM_CLASSES), CPU, cl)
    optimizer = training.build_adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    batch = (images, labels, torch.zeros_like(labels), torch.arange(BATCH))
    target_batch = (torch.randn_like(images), labels, labels, torch.arange(BATCH))

    def endless() -> Any:
        while True:
            yield target_batch

    target_iter = endless() if target else None

    def step() -> None:
        steps.train_source_epoch(
            model,
            [batch],
            optimizer,
            device=CPU,
            label_smoothing=0.1,
            triplet_margin=None,
            target_loader_iter=target_iter,
            amp_dtype=amp,
            channels_last=cl,
            progress=False,
        )

    return step


def _bare_extract(arch: str, images: Tensor, amp: torch.dtype | None, cl: bool) -> Step:
    net = training.place_model(_bare_network(arch).eval(), CPU, cl)
    batch = images.contiguous(memory_format=torch.channels_last) if cl else images

    def step() -> None:
        with torch.no_grad(), training.autocast(CPU, amp):
            net(batch)

    return step


def _dualref_extract(arch: str, images: Tensor, amp: torch.dtype | None, cl: bool) -> Step:
    model = training.place_model(ReidNet(arch, NUM_CLASSES), CPU, cl)
    batch = [(images, torch.zeros(BATCH), torch.zeros(BATCH), torch.arange(BATCH))]

    def step() -> None:
        extraction.extract_features(model, batch, CPU, progress=False, amp_dtype=amp)

    return step


def _measure(units: dict[Key, Step], rounds: int, warmup: int) -> dict[Key, list[float]]:
    """Images per second of each unit, one step per unit per round, units interleaved."""
    for step in units.values():
        for _ in range(warmup):
            step()
    rates: dict[Key, list[float]] = {name: [] for name in units}
    for _ in range(rounds):
        for name, step in units.items():
            start = time.perf_counter()
            step()
            rates[name].append(BATCH / (time.perf_counter() - start))
    return rates


def _real_data(checkpoint_path: str, market: str) -> None:
    """bf16 against float32 extraction with one checkpoint on Market-1501 (see the module docstring)."""
    from dualref import inference, label_quality, pseudo_labels
    from dualref.config import ClusteringConfig
    from dualref.data import datasets, loaders

    train = datasets.load_dataset("market1501", market).train
    outcome: dict[str, dict[str, Any]] = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        started = time.perf_counter()
        model, evaluator, state = inference.checkpoint_evaluator(
            checkpoint_path, "market1501", market, device=CPU, progress=False, amp_dtype=amp,
            channels_last=True,
        )
        result = evaluator.evaluate(model)
        evaluated = time.perf_counter() - started
        height, width = inference.input_size(state)
        loader = loaders.test_loader(
            [s.path for s in train], height=height, width=width, batch_size=128, num_workers=1
        )
        started = time.perf_counter()
        features = extraction.extract_features(model, loader, CPU, progress=False, amp_dtype=amp)
        extracted = time.perf_counter() - started
        labels = pseudo_labels.compute_pseudo_labels(
            features, ClusteringConfig(), eps=None, refine=False, seed=0, device=CPU
        )
        outcome[name] = {
            "metrics": result.metrics,
            "features": features,
            "coarse": labels.coarse,
            "eps": labels.eps,
            "seconds": (evaluated, extracted),
        }
    fp32, bf16 = outcome["fp32"], outcome["bf16"]
    agreement = label_quality.label_quality(bf16["coarse"], fp32["coarse"])
    print(f"checkpoint {checkpoint_path} (epoch {state.get('epoch')}), Market-1501 at {market}")
    for name, row in outcome.items():
        m = row["metrics"]
        print(
            f"{name}: mAP {100 * m.mAP:.2f} R1 {100 * m.cmc[0]:.2f}; eps {row['eps']:.4f}, "
            f"{int(row['coarse'].max()) + 1} clusters, {int((row['coarse'] < 0).sum())} outliers; "
            f"query+gallery {row['seconds'][0]:.0f} s, train extraction {row['seconds'][1]:.0f} s"
        )
    difference = (bf16["features"] - fp32["features"]).abs()
    cosine = (bf16["features"] * fp32["features"]).sum(1)
    print(f"train features: max |bf16 - fp32| {difference.max():.4f}, min cosine {cosine.min():.5f}")
    print(
        f"DBSCAN labels bf16 vs fp32: pairwise F {agreement.pairwise_fscore:.4f}, ARI {agreement.ari:.4f}, "
        f"identical labels: {bool((bf16['coarse'] == fp32['coarse']).all())}"
    )


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--configs", default="mobilenet_v2:128x64,resnet50:128x64,resnet50:256x128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--real", default=None, metavar="CHECKPOINT", help="bf16 vs fp32 on real Market")
    parser.add_argument("--market", default=str(MARKET))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.real is not None:
        _real_data(args.real, args.market)
        return
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"{platform.processor() or platform.machine()}, native bf16: {training.cpu_supports_bf16()}"
    )
    print(f"load before: {_uptime()}")
    for config in args.configs.split(","):
        arch, size = config.split(":")
        height, width = (int(v) for v in size.split("x"))
        torch.manual_seed(0)
        images = torch.randn(BATCH, 3, height, width)
        labels = torch.arange(BATCH) // 4
        started = time.perf_counter()
        for kind in ("train", "extract"):
            units: dict[Key, Step] = {}
            for setting, (amp, cl) in SETTINGS.items():
                if kind == "train":
                    units[("bare train", setting)] = _bare_train(arch, images, labels, amp, cl)
                    units[("dualref train", setting)] = _dualref_train(
                        arch, images, labels, amp, cl, target=False
                    )
                    units[("dualref pretrain step", setting)] = _dualref_train(
                        arch, images, labels, amp, cl, target=True
                    )
                else:
                    units[("bare extract", setting)] = _bare_extract(arch, images, amp, cl)
                    units[("dualref extract", setting)] = _dualref_extract(arch, images, amp, cl)
            rates = _measure(units, args.rounds, args.warmup)
            _print_table(f"{arch} {height}x{width} {kind}", rates)
        print(f"({time.perf_counter() - started:.0f} s; load now: {_uptime()})\n")


def _print_table(title: str, rates: dict[Key, list[float]]) -> None:
    rows = list(dict.fromkeys(row for row, _ in rates))
    print(f"### {title}: median img/s (min-max over rounds); x = against the row's fp32\n")
    print("| code | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for row in rows:
        base = statistics.median(rates[(row, "fp32")])
        cells = []
        for setting in SETTINGS:
            values = rates[(row, setting)]
            median = statistics.median(values)
            cells.append(f"{median:.1f} ({min(values):.0f}-{max(values):.0f}) {median / base:.2f}x")
        print(f"| {row} | " + " | ".join(cells) + " |")
    bare = "bare train" if "bare train" in rows else "bare extract"
    for row in rows:
        if row == bare:
            continue
        shares = [
            f"{100 * statistics.median(rates[(row, s)]) / statistics.median(rates[(bare, s)]):.0f}%"
            for s in SETTINGS
        ]
        print(f"\n{row} / {bare}: " + ", ".join(f"{s} {v}" for s, v in zip(SETTINGS, shares, strict=True)))
    print()


if __name__ == "__main__":
    main()
