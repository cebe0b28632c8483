"""Feature extraction: a model in eval mode over a loader, rows placed by dataset index."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sized

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dualref import training


def extract_features(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor, Tensor, Tensor]],
    device: torch.device,
    *,
    flip: bool = False,
    progress: bool = True,
    desc: str = "extract",
    amp_dtype: torch.dtype | None = None,
    out_device: torch.device | None = None,
) -> Tensor:
    """L2-normalised features of every image of a loader, in dataset order.

    The model runs in eval mode under ``torch.no_grad`` (its previous training flag is restored
    afterwards) and must already be on `device`; in eval mode it must return [B, D] features
    (`ReidNet` returns its L2-normalised BN-neck feature). With `flip`, each row is the mean of the
    features of the image and of its horizontal mirror; every row is then L2-normalised.

    Images take the model's memory format (channels-last when its convolutions are) and, with
    `amp_dtype` (torch.bfloat16, or torch.float16 on CUDA; `training.resolve_amp`), run under autocast;
    the returned features are float32 either way.

    Args:
        model: Network whose eval-mode forward maps [B, 3, H, W] to [B, D].
        loader: Yields (images [B, 3, H, W], labels [B], camids [B], indices [B]); `indices` are
            dataset positions, which must cover 0..N-1 exactly once (N = len(loader.dataset)
            when the loader has a sized dataset, else the number of rows seen).
        device: Where to run the model.
        flip: Average with the horizontally flipped image's features.
        progress: Show a tqdm bar with ETA (only when stderr is a terminal).
        desc: Label of the progress bar.
        amp_dtype: Autocast dtype, or None for float32.
        out_device: Where the features are gathered and returned (default: the CPU); the adaptation
            keeps them on its clustering device rather than sending them through the CPU.

    Returns:
        [N, D] float32 tensor on `out_device`, row i = dataset item i, L2-normalised.

    Raises:
        ValueError: The indices do not cover the data set exactly once, or the model's eval output
            is not a [B, D] tensor.
    """
    out_device = out_device if out_device is not None else torch.device("cpu")
    memory_format = torch.channels_last if training.is_channels_last(model) else torch.contiguous_format
    dataset = getattr(loader, "dataset", None)
    expected_rows = len(dataset) if isinstance(dataset, Sized) else None
    was_training = model.training
    model.eval()
    chunks: list[tuple[Tensor, Tensor]] = []
    try:
        with torch.no_grad(), training.autocast(device, amp_dtype):
            bar = tqdm(
                loader,
                desc=desc,
                unit="batch",
                disable=not progress or not sys.stderr.isatty(),
                dynamic_ncols=True,
            )
            for images, _labels, _camids, indices in bar:
                images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                features = _model_features(model, images)
                if flip:
                    features = features + _model_features(model, images.flip(3))
                chunks.append((indices.long().to(out_device), features.float().to(out_device)))
    finally:
        model.train(was_training)
    return _assemble(chunks, expected_rows)


def _model_features(model: nn.Module, images: Tensor) -> Tensor:
    features = model(images)
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(
            f"the model's eval-mode output must be a [B, D] tensor, got {type(features).__name__}"
            f"{'' if not isinstance(features, Tensor) else tuple(features.shape)}"
        )
    return features


def _assemble(chunks: list[tuple[Tensor, Tensor]], expected_rows: int | None) -> Tensor:
    """Place per-batch feature rows by dataset index, checking full coverage; normalise."""
    if not chunks:
        raise ValueError("the loader yielded no batches; nothing to extract")
    indices = torch.cat([idx for idx, _ in chunks])  # [N]
    features = torch.cat([feat for _, feat in chunks])  # [N, D] in loader order
    num_rows = expected_rows if expected_rows is not None else indices.numel()
    counts = torch.bincount(indices.clamp(min=0), minlength=num_rows)
    if (
        indices.numel() != num_rows
        or int(indices.min()) < 0
        or int(indices.max()) >= num_rows
        or bool((counts != 1).any())
    ):
        missing = (counts[:num_rows] == 0).nonzero().flatten()[:8].tolist()
        repeated = (counts > 1).nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"loader indices must cover 0..{num_rows - 1} exactly once; got {indices.numel()} rows, "
            f"range [{int(indices.min())}, {int(indices.max())}], missing e.g. {missing}, "
            f"repeated e.g. {repeated} (use a non-shuffling loader without drop_last)"
        )
    ordered = torch.empty_like(features)
    ordered[indices] = features
    return F.normalize(ordered, dim=1)
