"""Speed and difficulty of the synthetic domain pair.

Measures, in one process:
1. rendering speed (images/s, wall and CPU time, median of several runs) and JPEG encoding speed;
2. the raw-pixel baseline: nearest neighbour with L2 on normalised 64x32 pixels, query vs gallery of each
   domain, standard Market-1501 protocol (mAP, rank-1);
3. with ``--cnn``: a small CNN trained from scratch with cross-entropy on domain A's training ids (CPU,
   a few hundred iterations), evaluated on A (in-domain) and B (direct transfer). The demo needs
   raw pixels << CNN on A, and CNN on B < CNN on A.

Usage::

    .venv/bin/python benchmarks/bench_synthetic.py [--scale 1.0] [--seed 0] [--cnn --iters 400]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from dualref.data import synthetic
from dualref.evaluation import rank_metrics

QUERY, GALLERY, TRAIN = 1, 2, 0


def _pixels(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 3, H/2, W/2] float32, ImageNet-normalised (what a model would see)."""
    x = images.astype(np.float32) / 255.0
    x = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _evaluate(features: np.ndarray, domain: synthetic.RenderedDomain) -> tuple[float, float]:
    """(mAP, rank-1) of query vs gallery with squared L2 distances between ``features`` rows."""
    q = domain.splits == QUERY
    g = domain.splits == GALLERY
    fq, fg = features[q].astype(np.float64), features[g].astype(np.float64)
    dist = (fq**2).sum(1)[:, None] + (fg**2).sum(1)[None, :] - 2 * fq @ fg.T
    m = rank_metrics(dist, domain.pids[q], domain.pids[g], domain.camids[q], domain.camids[g])
    return float(m.mAP), float(m.cmc[0])


def bench_speed(repeats: int) -> None:
    """Rendering (numpy, no files) and JPEG encoding speed, per domain; medians of ``repeats`` runs."""
    for config in (synthetic.domain_a_config(), synthetic.domain_b_config()):
        plan = synthetic.plan_domain(config, 0)
        rows = np.arange(1024)
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            images = synthetic.render_plan(plan, rows)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        print(
            f"render 1024 images ({config.name}): median {len(rows) / statistics.median(wall):.0f} img/s "
            f"wall, {len(rows) / statistics.median(cpu):.0f} img/s per CPU-second"
        )
        t0, c0 = time.perf_counter(), time.process_time()
        for image in images:
            Image.fromarray(image).save(io.BytesIO(), format="JPEG", quality=config.jpeg_quality)
        print(
            f"JPEG encode q{config.jpeg_quality} ({config.name}): "
            f"{len(images) / (time.perf_counter() - t0):.0f} img/s wall, "
            f"{len(images) / (time.process_time() - c0):.0f} img/s per CPU-second"
        )


def bench_write_pair(scale: float, seed: int) -> None:
    """Wall and CPU time of `dualref data synth` (render + JPEG + files) for the default pair."""
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        roots = synthetic.write_domain_pair(tmp, seed=seed, scale=scale)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        count = sum(1 for root in roots for _ in root.rglob("*.jpg"))
    print(
        f"write_domain_pair(scale={scale}): {count} images in {wall:.1f} s wall, {cpu:.1f} s CPU "
        f"({count / wall:.0f} img/s wall, {count / cpu:.0f} img/s per CPU-second)"
    )


class SmallNet(nn.Module):
    """A 4-stage conv net for 64x32 inputs (one 3x3 conv per stage; about 0.4 M parameters at width 32)."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        for cin, cout in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(True),
                nn.MaxPool2d(2),
            ]
        self.trunk = nn.Sequential(*layers[:-1])  # keep 8x4 resolution at the end
        self.neck = nn.BatchNorm1d(8 * width)
        self.classifier = nn.Linear(8 * width, num_classes, bias=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random 4-pixel-padded crop (the usual re-ID training augmentation)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (4, 4, 4, 4), mode="replicate")
    dy, dx = (int(v) for v in torch.randint(0, 9, (2,), generator=gen))
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def bench_cnn(
    a: synthetic.RenderedDomain, b: synthetic.RenderedDomain, iters: int, seed: int, train_on: str
) -> None:
    """Train on ``train_on`` ("a" or "b": its training split), evaluate on both domains' query/gallery."""
    if train_on == "b":
        a, b = b, a
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train = a.splits == TRAIN
    x = torch.from_numpy(_pixels(a.images[train]))
    _, labels = np.unique(a.pids[train], return_inverse=True)
    y = torch.from_numpy(labels)
    model = SmallNet(int(y.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    t0 = time.perf_counter()
    model.train()
    for it in range(iters):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 100 == 0 or it == iters - 1:
            print(f"  iter {it}: loss {loss.item():.3f}")
    print(f"  trained {iters} iterations in {time.perf_counter() - t0:.0f} s")
    model.eval()
    names = ("A (in-domain)", "B (direct transfer)") if train_on == "a" else ("B (in-domain)", "A (transfer)")
    for domain, name in zip((a, b), names, strict=True):
        with torch.no_grad():
            feats = torch.cat(
                [
                    model.embed(torch.from_numpy(_pixels(domain.images[i : i + 256])))
                    for i in range(0, len(domain.images), 256)
                ]
            )
        feats = F.normalize(feats, dim=1).numpy()
        mean_ap, rank1 = _evaluate(feats, domain)
        print(f"CNN on {name}: mAP {mean_ap:.1%}, rank-1 {rank1:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cnn", action="store_true", help="also train and evaluate a small CNN")
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--train-on", choices=("a", "b"), default="a", help="domain the CNN trains on")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress shows when piped
    torch.set_num_threads(args.threads)
    print(f"load average: {os.getloadavg()}")
    if not args.skip_speed:
        bench_speed(args.repeats)
        bench_write_pair(args.scale, args.seed)
    domains = []
    for config in (synthetic.domain_a_config(args.scale), synthetic.domain_b_config(args.scale)):
        domain = synthetic.render_domain(config, args.seed)
        domains.append(domain)
        counts = [int((domain.splits == s).sum()) for s in (TRAIN, QUERY, GALLERY)]
        flat = _pixels(domain.images).reshape(len(domain.images), -1)
        mean_ap, rank1 = _evaluate(flat, domain)
        print(
            f"{config.name}: train/query/gallery {counts}, cameras {config.num_cameras}; "
            f"raw pixels mAP {mean_ap:.1%}, rank-1 {rank1:.1%}"
        )
    if args.cnn:
        bench_cnn(domains[0], domains[1], args.iters, args.seed, args.train_on)
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
