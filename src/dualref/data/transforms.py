"""Image transforms for re-ID training and testing (torchvision.transforms.v2).

Inputs may be PIL images or ``[3, H, W]`` uint8 tensors. The geometric steps (resize, flip, pad, crop)
run on uint8 data, which is 4x less memory traffic than float; conversion to float happens once, just
before normalisation. Randomness comes from the torch global RNG, which DataLoader seeds per worker
(see :mod:`dualref.data.loaders`).

Reference pipeline (docs/method.md section 2): bicubic resize to (height, width), horizontal
flip p=0.5, zero-pad 10 px then random crop back to (height, width), to float in [0, 1], ImageNet
normalisation, then (target training only) random erasing written into the *normalised* tensor with the
fill values 0.485 / 0.456 / 0.406.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class ReferenceRandomErasing(torch.nn.Module):
    """Random erasing as the reference applies it (Zhong et al., "Random Erasing Data Augmentation",
    AAAI 2020, Alg. 1).

    With probability ``p``, up to 100 attempts draw a target area uniformly in ``scale`` times the
    image area and an aspect ratio uniformly in ``[ratio, 1 / ratio]``; the first rectangle that fits
    strictly inside the image is filled with ``value`` (one number per channel). This differs from
    ``torchvision``'s RandomErasing, which draws the aspect ratio log-uniformly and tries 10 times.

    Args:
        p: probability of erasing an image.
        scale: (min, max) erased fraction of the image area.
        ratio: smallest aspect ratio h / w; the largest is its inverse (reference: 0.3 -> 3.33).
        value: per-channel fill values, written as they are (the reference writes the ImageNet mean
            into the already-normalised tensor).
    """

    def __init__(
        self,
        p: float = 0.5,
        *,
        scale: tuple[float, float] = (0.02, 0.4),
        ratio: float = 0.3,
        value: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"random erasing probability must be in [0, 1], got {p}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.p = p
        self.scale = scale
        self.ratio = ratio
        self.value = tuple(value)

    def forward(self, image: Tensor) -> Tensor:
        """Erase one rectangle of ``image`` [C, H, W] (float) with probability p; returns a new tensor."""
        if self.p == 0.0 or torch.rand(()).item() >= self.p:
            return image
        if len(self.value) != image.shape[-3]:
            raise ValueError(f"{len(self.value)} fill values for an image with {image.shape[-3]} channels")
        box = erasing_box(image.shape[-2], image.shape[-1], scale=self.scale, ratio=self.ratio)
        if box is None:
            return image
        top, left, h, w = box
        out = image.clone()
        fill = torch.tensor(self.value, dtype=image.dtype, device=image.device)
        out[..., top : top + h, left : left + w] = fill.view(-1, 1, 1)
        return out


def erasing_box(
    height: int, width: int, *, scale: tuple[float, float], ratio: float
) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of a random-erasing rectangle, or None when 100 attempts do not fit.

    Area uniform in ``scale`` x (height * width), aspect ratio h / w uniform in [ratio, 1 / ratio];
    the rectangle must fit strictly inside the image (h < height, w < width), as in the reference.
    Draws from the torch global RNG.
    """
    area = height * width
    for _ in range(100):
        target_area = area * _uniform(*scale)
        aspect = _uniform(ratio, 1.0 / ratio)
        h = round(math.sqrt(target_area * aspect))
        w = round(math.sqrt(target_area / aspect))
        if h < height and w < width:
            top = int(torch.randint(0, height - h + 1, ()).item())
            left = int(torch.randint(0, width - w + 1, ()).item())
            return top, left, h, w
    return None


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def train_transform(
    height: int,
    width: int,
    *,
    flip_prob: float = 0.5,
    pad: int = 10,
    random_erasing_prob: float = 0.0,
) -> Callable[[Any], Tensor]:
    """Training augmentation: resize, flip, pad + crop, normalise, optional random erasing.

    Args:
        height: output height (reference: 256).
        width: output width (reference: 128).
        flip_prob: horizontal flip probability.
        pad: zero padding on every side before the random crop back to (height, width); 0 disables.
        random_erasing_prob: probability of random erasing after normalisation (0 = off, reference
            pre-training; 0.5 in reference target training).

    Returns:
        A callable mapping a PIL image or [3, H, W] uint8 tensor to a [3, height, width] float32 tensor.
    """
    _check_size(height, width)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    steps: list[Callable[..., Any]] = [
        v2.ToImage(),
        v2.Resize((height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if pad > 0:
        steps += [v2.Pad(pad, fill=0), v2.RandomCrop((height, width))]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if random_erasing_prob > 0.0:
        steps.append(ReferenceRandomErasing(random_erasing_prob))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def test_transform(height: int, width: int) -> Callable[[Any], Tensor]:
    """Test transform: bicubic resize, to float, ImageNet normalisation (no flip).

    Returns:
        A callable mapping a PIL image or [3, H, W] uint8 tensor to a [3, height, width] float32 tensor.
    """
    _check_size(height, width)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((height, width), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor(),
        ]
    )


class BatchTrainAugment:
    """The training augmentation of :func:`train_transform`, applied to a whole uint8 batch at once.

    For images already at the network size (the loaders resize while decoding): flip, zero-pad + random
    crop, normalisation and random erasing, with the same distributions as the per-image transform, at
    a fraction of its cost (one vectorised flip and normalisation instead of 64 small-tensor pipelines).
    Works on any device; randomness comes from the torch global RNG.

    Args:
        flip_prob: horizontal flip probability.
        pad: zero padding before the random crop (0 disables).
        random_erasing_prob: probability of reference random erasing after normalisation.
    """

    def __init__(self, *, flip_prob: float = 0.5, pad: int = 10, random_erasing_prob: float = 0.0):
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.flip_prob = flip_prob
        self.pad = pad
        self.erasing = ReferenceRandomErasing(random_erasing_prob)  # validates p; holds the settings

    def __call__(self, images: Tensor, *, batch_size: int | None = None, offset: int = 0) -> Tensor:
        """[b, 3, H, W] uint8 -> [b, 3, H, W] float32, augmented and normalised.

        `images` may be rows ``[offset, offset + b)`` of a batch of `batch_size` (one rank's share,
        `dualref.distributed.batch_rows`): the random draws are those of the whole batch, in the same
        order, and only these rows are augmented, so every image is augmented as in one process.
        """
        rows, _, height, width = images.shape
        batch = rows if batch_size is None else batch_size
        if offset < 0 or offset + rows > batch:
            raise ValueError(f"rows [{offset}, {offset + rows}) are not inside a batch of {batch}")
        mine = slice(offset, offset + rows)
        flip = (torch.rand(batch)[mine] < self.flip_prob).to(images.device).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
        if self.pad > 0:
            padded = torch.nn.functional.pad(images, (self.pad,) * 4)
            tops = torch.randint(0, 2 * self.pad + 1, (batch,))[mine].tolist()
            lefts = torch.randint(0, 2 * self.pad + 1, (batch,))[mine].tolist()
            crops = zip(range(rows), tops, lefts, strict=True)
            images = torch.stack([padded[i, :, t : t + height, x : x + width] for i, t, x in crops])
        out = normalise_batch(images)
        erasing = self.erasing
        if erasing.p > 0.0:
            fill = torch.tensor(erasing.value, device=out.device).view(-1, 1, 1)
            for row in range(batch):  # every row draws, in order; only this share is written
                if torch.rand(()).item() < erasing.p:
                    box = erasing_box(height, width, scale=erasing.scale, ratio=erasing.ratio)
                    if box is not None and offset <= row < offset + rows:
                        top, left, h, w = box
                        out[row - offset, :, top : top + h, left : left + w] = fill  # `out` is fresh
        return out


def normalise_batch(images: Tensor) -> Tensor:
    """[B, 3, H, W] uint8 -> float32 (x / 255 - ImageNet mean) / ImageNet std, in one pass."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 batch, got {images.dtype}")
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean).div_(std)


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
