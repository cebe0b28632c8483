"""`dualref extract`: a checkpoint's features of a data set split or of a folder of images, saved as .npy.

Output folder (one per split; `--split all` writes train/, query/ and gallery/ below `out`):

    features.npy   [N, D] float32, L2-normalised BN-neck features (the evaluation path's)
    paths.txt      N lines, the image files in row order
    pids.npy       [N] int64 ground-truth identities, when the data set has them
    camids.npy     [N] int64 0-based cameras, for a data set (an image folder has none)
    meta.json      checkpoint, input size, flip, counts

`features.npy` and `pids.npy` are what `dualref cluster` reads. Every file is written atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualref import extraction, inference, io, training
from dualref.data import datasets, loaders
from dualref.data.records import Sample

log = logging.getLogger(__name__)

SPLITS = ("train", "query", "gallery")


@dataclass(frozen=True)
class ExtractedSplit:
    """What one split's extraction wrote."""

    name: str  # train, query, gallery, or "images" for a folder
    folder: Path
    num_images: int
    feat_dim: int
    files: list[str]


def run_extract(
    checkpoint_path: str | Path,
    *,
    out: str | Path,
    images_dir: str | Path | None = None,
    dataset: str | None = None,
    root: str | Path | None = None,
    split: str = "train",
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    flip: bool = False,
    skip_unreadable: bool = False,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> list[ExtractedSplit]:
    """Extract and save the features of a data set split (or all three) or of every image under a folder.

    Args:
        checkpoint_path: checkpoint of `dualref pretrain` or `dualref adapt`.
        out: output folder.
        images_dir: a folder of images (searched recursively); exclusive with `dataset`/`root`.
        dataset, root: a data set (`datasets.DATASET_NAMES`) and its folder.
        split: train, query, gallery or all.
        device: where the model runs.
        batch_size, num_workers: of the extraction loader.
        flip: average with horizontally flipped images.
        skip_unreadable: drop images that do not decode (each logged) instead of failing on the first.
        progress: progress bar.
        amp_dtype, channels_last: how the network computes (`training.resolve_amp`,
            `training.resolve_channels_last`); the features are float32 either way.

    Returns:
        One record per split written.
    """
    groups = _samples(images_dir, dataset, root, split)
    model, state = inference.load_model(checkpoint_path)
    try:
        height, width = inference.input_size(state)
    except ValueError as err:
        raise ValueError(f"{checkpoint_path}: {err}") from None
    model = training.place_model(model, device, channels_last)
    training.check_autocast(model, amp_dtype, device, (height, width))
    written = []
    for name, samples, labelled in groups:
        if skip_unreadable:
            samples = loaders.drop_unreadable(samples, log)
        if not samples:
            raise ValueError(f"no readable images in the {name} split; nothing to extract")
        loader = loaders.test_loader(
            [s.path for s in samples],
            height=height,
            width=width,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        features = extraction.extract_features(
            model, loader, device, flip=flip, progress=progress, desc=name, amp_dtype=amp_dtype
        )
        folder = Path(out) / name if len(groups) > 1 else Path(out)
        meta = {
            "checkpoint": str(checkpoint_path),
            "checkpoint_kind": state.get("kind"),
            "checkpoint_epoch": state.get("epoch"),
            "source": str(images_dir) if images_dir is not None else f"{dataset} {root}",
            "split": name,
            "height": height,
            "width": width,
            "flip": flip,
            "numerics": training.numerics_name(amp_dtype, channels_last),
            "num_images": len(samples),
            "feat_dim": int(features.shape[1]),
        }
        files = _write(folder, features.numpy().astype(np.float32), samples, labelled, meta)
        written.append(ExtractedSplit(name, folder, len(samples), int(features.shape[1]), files))
    return written


def _samples(
    images_dir: str | Path | None, dataset: str | None, root: str | Path | None, split: str
) -> list[tuple[str, list[Sample], bool]]:
    """(split name, samples, whether pids and camids are known) of each split to extract."""
    if (images_dir is None) == (dataset is None or root is None):
        raise ValueError("give either IMAGES_DIR or both --dataset and --root (not both, not neither)")
    if images_dir is not None:
        # Every image under the folder, recursively; an empty folder is an error naming it.
        return [("images", datasets.load_dataset("unlabelled", images_dir).train, False)]
    assert dataset is not None and root is not None
    if split not in (*SPLITS, "all"):
        raise ValueError(f"--split {split!r}; expected one of {', '.join(SPLITS)}, all")
    splits = datasets.load_dataset(dataset, root)
    names = SPLITS if split == "all" else (split,)
    groups = []
    for name in names:
        samples = getattr(splits, name)
        if not samples:
            raise ValueError(f"data set {dataset!r} at {root} has no {name} images; expected some")
        groups.append((name, samples, dataset != "unlabelled"))
    return groups


def _write(
    folder: Path, features: np.ndarray, samples: Sequence[Sample], labelled: bool, meta: dict[str, Any]
) -> list[str]:
    """Write one split's files atomically; returns their names."""
    arrays: dict[str, np.ndarray] = {"features.npy": features}  # [N, D] float32
    if labelled:
        arrays["pids.npy"] = np.array([s.pid for s in samples], dtype=np.int64)  # [N]
        arrays["camids.npy"] = np.array([s.camid for s in samples], dtype=np.int64)  # [N]
    for name, array in arrays.items():
        save_npy(folder / name, array)
    io.write_text(folder / "paths.txt", "".join(f"{s.path}\n" for s in samples))
    io.write_json(folder / "meta.json", meta)
    return [*arrays, "paths.txt", "meta.json"]


def save_npy(path: Path, array: np.ndarray) -> None:
    """`np.save` through the atomic write."""
    io.write_bytes(path, lambda handle: np.save(handle, array))
