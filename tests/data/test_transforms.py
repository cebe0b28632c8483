"""Shapes, dtypes and exact values of the re-ID transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dualref.data import transforms
from dualref.data.transforms import IMAGENET_MEAN, IMAGENET_STD, ReferenceRandomErasing

H, W = 32, 16


def random_uint8(seed: int = 0, height: int = H, width: int = W) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)


def normalised(image: torch.Tensor) -> torch.Tensor:
    """The naive reference: x / 255, minus the ImageNet mean, divided by the std, per channel."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def test_test_transform_golden_value_on_a_constant_image() -> None:
    image = torch.full((3, H, W), 51, dtype=torch.uint8)  # 51 / 255 = 0.2 exactly
    out = transforms.test_transform(H, W)(image)
    assert out.shape == (3, H, W) and out.dtype == torch.float32 and type(out) is torch.Tensor
    # channel 0: (0.2 - 0.485) / 0.229 = -1.24454...
    expected = [(0.2 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))
    assert abs(expected[0] - (-1.244541)) < 1e-5
    torch.testing.assert_close(out, torch.tensor(expected).view(3, 1, 1).expand(3, H, W))


def test_test_transform_accepts_pil_and_uint8_and_resizes() -> None:
    image = random_uint8()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    transform = transforms.test_transform(H, W)
    torch.testing.assert_close(transform(pil), transform(image))
    torch.testing.assert_close(transform(image), normalised(image))  # same size: no resampling
    big = transforms.test_transform(2 * H, 3 * W)(image)
    assert big.shape == (3, 2 * H, 3 * W)


def test_train_transform_without_randomness_equals_test_transform() -> None:
    image = random_uint8(1)
    plain = transforms.train_transform(H, W, flip_prob=0.0, pad=0)
    torch.testing.assert_close(plain(image), transforms.test_transform(H, W)(image))
    flipped = transforms.train_transform(H, W, flip_prob=1.0, pad=0)
    torch.testing.assert_close(flipped(image), normalised(image).flip(-1))


def test_pad_and_crop_give_a_window_of_the_zero_padded_image() -> None:
    torch.manual_seed(0)
    pad = 3
    transform = transforms.train_transform(H, W, flip_prob=0.0, pad=pad)
    image = random_uint8(2)
    padded = normalised(torch.nn.functional.pad(image, (pad, pad, pad, pad)))
    offsets = set()
    for _ in range(40):
        out = transform(image)
        assert out.shape == (3, H, W)
        matches = [
            (top, left)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            if torch.allclose(out, padded[:, top : top + H, left : left + W], atol=1e-5)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # the crop position is random


def test_random_erasing_writes_the_mean_into_the_normalised_tensor() -> None:
    torch.manual_seed(0)
    image = random_uint8(3, 64, 32)
    base = normalised(image)
    transform = transforms.train_transform(64, 32, flip_prob=0.0, pad=0, random_erasing_prob=1.0)
    fractions = []
    for _ in range(100):
        out = transform(image)
        changed = ((out - base).abs() > 1e-5).any(dim=0)
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert rows.numel() > 0  # p = 1 always erases here
        top, bottom = int(rows.min()), int(rows.max()) + 1
        left, right = int(cols.min()), int(cols.max()) + 1
        # The erased region is exactly one rectangle filled with 0.485 / 0.456 / 0.406 (not normalised).
        box = out[:, top:bottom, left:right]
        torch.testing.assert_close(box, torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand_as(box))
        assert int(changed.sum()) == (bottom - top) * (right - left)
        fractions.append((bottom - top) * (right - left) / (64 * 32))
        assert 1 / 3.34 - 0.2 < (bottom - top) / (right - left) < 3.34 + 0.5  # rounding slack
    # area fraction drawn in [0.02, 0.4] (rounding of h and w shifts it a little)
    assert min(fractions) > 0.01 and max(fractions) < 0.45
    assert np.mean(fractions) > 0.1  # ~0.21 for uniform areas restricted to rectangles that fit


def test_random_erasing_probability_and_arguments() -> None:
    torch.manual_seed(1)
    image = torch.zeros(3, 20, 10)
    erased = sum(bool((ReferenceRandomErasing(0.5)(image) != 0).any()) for _ in range(400))
    assert 150 < erased < 250  # binomial(400, 0.5): mean 200, sd 10
    assert ReferenceRandomErasing(0.0)(image) is image
    with pytest.raises(ValueError, match="probability"):
        ReferenceRandomErasing(1.5)
    with pytest.raises(ValueError, match="image size"):
        transforms.train_transform(0, 10)


def test_batch_augment_matches_the_per_image_semantics() -> None:
    torch.manual_seed(2)
    batch = torch.stack([random_uint8(s) for s in range(6)])
    expected = torch.stack([normalised(image) for image in batch])
    torch.testing.assert_close(transforms.normalise_batch(batch), expected)
    plain = transforms.BatchTrainAugment(flip_prob=0.0, pad=0)
    torch.testing.assert_close(plain(batch), expected)
    flipped = transforms.BatchTrainAugment(flip_prob=1.0, pad=0)
    torch.testing.assert_close(flipped(batch), expected.flip(-1))
    # pad + crop: each image is one window of its own zero-padded image, at a random offset
    pad = 2
    padded = torch.stack([normalised(torch.nn.functional.pad(im, (pad,) * 4)) for im in batch])
    offsets = set()
    for _ in range(10):
        out = transforms.BatchTrainAugment(flip_prob=0.0, pad=pad)(batch)
        for i in range(len(batch)):
            matches = [
                (t, x)
                for t in range(2 * pad + 1)
                for x in range(2 * pad + 1)
                if torch.allclose(out[i], padded[i, :, t : t + H, x : x + W], atol=1e-5)
            ]
            assert len(matches) == 1
            offsets.add(matches[0])
    assert len(offsets) > 15  # of 25 possible
    with pytest.raises(ValueError, match="uint8"):
        transforms.normalise_batch(batch.float())


def test_batch_augment_random_erasing_fills_one_rectangle_per_erased_image() -> None:
    torch.manual_seed(3)
    batch = torch.stack([random_uint8(s, 64, 32) for s in range(200)])
    base = transforms.normalise_batch(batch)
    out = transforms.BatchTrainAugment(flip_prob=0.0, pad=0, random_erasing_prob=0.5)(batch)
    erased = 0
    for i in range(len(batch)):
        changed = ((out[i] - base[i]).abs() > 1e-5).any(dim=0)
        if not changed.any():
            continue
        erased += 1
        rows, cols = torch.nonzero(changed, as_tuple=True)
        box = out[i, :, int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1]
        torch.testing.assert_close(box, torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand_as(box))
    assert 70 < erased < 130  # binomial(200, 0.5): mean 100, sd 7
