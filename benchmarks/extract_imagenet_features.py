"""Extract ImageNet MobileNetV2 features of Market-1501 train, for the real-data clustering report.

Features: torchvision ``mobilenet_v2().features`` with the local ImageNet weights, 128x64 bicubic input,
ImageNet normalisation, global average pooling (1280-d), L2-normalised. Writes ``features.npy`` [N, 1280]
float32 and ``pids.npy`` [N] int64 (ground truth, for the quality table only) in file-name order.

Usage:
    .venv/bin/python benchmarks/extract_imagenet_features.py \
        [--root ../shared/data/Market-1501] [--weights ../shared/weights/mobilenet_v2_imagenet.pth] \
        [--out benchmarks/_work/market_mobilenet]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as transforms

REPO = Path(__file__).resolve().parents[1]
# Market file names: PPPP_cCsS_FFFFFF_BB.jpg (pid -1 = junk, never in the train split).
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d)s\d+_\d+_\d+\.jpg$")


def market_train_files(root: Path) -> tuple[list[Path], np.ndarray]:
    """Train images of a Market-1501 folder in sorted file-name order, and their pids [N] int64."""
    folder = root / "bounding_box_train"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected the Market-1501 folder as --root")
    paths: list[Path] = []
    pids: list[int] = []
    for path in sorted(folder.iterdir()):
        match = MARKET_NAME.match(path.name)
        if match is None or int(match.group(1)) < 0:
            continue
        paths.append(path)
        pids.append(int(match.group(1)))
    if not paths:
        raise ValueError(f"no Market-1501 images named PPPP_cCsS_FFFFFF_BB.jpg in {folder}")
    return paths, np.asarray(pids, dtype=np.int64)


def load_trunk(weights: Path) -> torch.nn.Module:
    """torchvision MobileNetV2 feature layers with the local ImageNet weights (strict key check)."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    prefix = "features."
    if not all(key.startswith(prefix) for key in state):
        raise ValueError(f"{weights}: expected only '{prefix}*' keys of torchvision mobilenet_v2")
    trunk = torchvision.models.mobilenet_v2().features
    trunk.load_state_dict({key[len(prefix) :]: value for key, value in state.items()}, strict=True)
    return trunk.eval()


@torch.no_grad()
def extract(trunk: torch.nn.Module, paths: list[Path], batch_size: int) -> Tensor:
    """[N, 1280] L2-normalised global-average-pooled features of the images in ``paths``."""
    transform = transforms.Compose(
        [
            transforms.ToImage(),
            transforms.Resize((128, 64), interpolation=InterpolationMode.BICUBIC, antialias=True),
            transforms.ToDtype(torch.float32, scale=True),
            transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]
    )
    chunks: list[Tensor] = []
    for start in range(0, len(paths), batch_size):
        images = [transform(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]]
        pooled = trunk(torch.stack(images)).mean(dim=(2, 3))
        chunks.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(chunks)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO.parent / "shared/data/Market-1501")
    parser.add_argument(
        "--weights", type=Path, default=REPO.parent / "shared/weights/mobilenet_v2_imagenet.pth"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/_work/market_mobilenet")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(2)
    paths, pids = market_train_files(args.root)
    trunk = load_trunk(args.weights)
    start = time.perf_counter()
    features = extract(trunk, paths, args.batch_size)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    save_npy(args.out / "features.npy", features.numpy().astype(np.float32))
    save_npy(args.out / "pids.npy", pids)
    print(
        f"{len(paths)} images, {len(np.unique(pids))} identities, features {tuple(features.shape)} "
        f"in {seconds:.1f} s -> {args.out}"
    )


if __name__ == "__main__":
    main()
