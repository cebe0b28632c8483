"""Extract a trained model's features of a data set's training split, for `dualref cluster`.

Writes ``features.npy`` [N, D] float32 (L2-normalised BN-neck features, as the adaptation loop clusters
them) and ``pids.npy`` [N] int64 (ground truth, for the quality table of `dualref cluster` only) in the
data set's training order. Used to study the off-line stage (eps, R) on a fixed model without training.

Usage::

    .venv/bin/python benchmarks/extract_checkpoint_features.py runs/cpu_pretrain_duke/checkpoint.pt \\
        --dataset market1501 --root ../shared/data/Market-1501 --out benchmarks/_work/duke_model_on_market
    .venv/bin/dualref cluster benchmarks/_work/duke_model_on_market/features.npy \\
        --pids benchmarks/_work/duke_model_on_market/pids.npy --num-subclusters 5
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dualref import extraction, inference, training
from dualref.data import datasets, loaders


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device, key="--device")
    model, state = inference.load_model(args.checkpoint)
    model = model.to(device)
    train = datasets.load_dataset(args.dataset, args.root).train
    loader = loaders.test_loader(
        [s.path for s in train], height=int(state["height"]), width=int(state["width"]), num_workers=1
    )
    start = time.perf_counter()
    features = extraction.extract_features(model, loader, device, progress=False)
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "features.npy", features.numpy().astype(np.float32))
    np.save(args.out / "pids.npy", np.array([s.pid for s in train], dtype=np.int64))
    print(f"{len(train)} x {features.shape[1]} features in {time.perf_counter() - start:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
