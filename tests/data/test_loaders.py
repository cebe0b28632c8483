"""ImageDataset, the loaders, and the behaviour on missing or corrupt images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualref.data import loaders, transforms
from dualref.data.loaders import ImageDataset, ImageReadError
from dualref.data.records import Sample

H, W = 32, 16


def write_images(folder: Path, count: int, size: tuple[int, int] = (W, H)) -> list[Path]:
    """``count`` random-noise JPEGs of ``size`` = (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}_c{1 + i % 2}_x.jpg"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return write_images(tmp_path / "imgs", 12)


def test_items_are_image_label_camid_index(images: list[Path]) -> None:
    labels, camids = list(range(12)), [i % 2 for i in range(12)]
    dataset = ImageDataset(images, labels, camids, transforms.test_transform(H, W))
    image, label, camid, index = dataset[5]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    assert (label, camid, index) == (5, 1, 5)
    unlabelled = ImageDataset(images, None, None, transforms.test_transform(H, W))
    assert unlabelled[3][1:] == (-1, -1, 3)
    with pytest.raises(ValueError, match="3 labels for 12 paths"):
        ImageDataset(images, [0, 1, 2], None, transforms.test_transform(H, W))


def test_decoding_resizes_with_pil_bicubic_and_cache_gives_identical_items(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "big", 4, size=(23, 50))
    transform = transforms.test_transform(H, W)
    plain = ImageDataset(paths, None, None, transform, resize_to=(H, W))
    cached = ImageDataset(paths, None, None, transform, resize_to=(H, W), cache=True)
    assert cached.pixels is not None and cached.pixels.shape == (4, 3, H, W)
    for i in range(4):
        torch.testing.assert_close(plain[i][0], cached[i][0], rtol=0, atol=0)
        with Image.open(paths[i]) as im:
            expected = np.asarray(im.convert("RGB").resize((W, H), Image.Resampling.BICUBIC))
        assert torch.equal(cached.pixels[i], torch.from_numpy(expected.copy()).permute(2, 0, 1))
    with pytest.raises(ValueError, match="resize_to"):
        ImageDataset(paths, None, None, transform, cache=True)


def test_corrupt_or_missing_image_is_an_error_naming_the_file(images: list[Path]) -> None:
    truncate(images[2])
    images[4].unlink()
    dataset = ImageDataset(images, None, None, transforms.test_transform(H, W))
    with pytest.raises(ImageReadError, match=r"0002_c1_x\.jpg.*(?i:truncated)"):
        dataset[2]
    with pytest.raises(OSError, match=r"0004_c1_x\.jpg"):  # ImageReadError is an OSError
        dataset[4]
    loader = loaders.test_loader(images, height=H, width=W, batch_size=4, num_workers=0)
    with pytest.raises(ImageReadError, match=r"0002_c1_x\.jpg"):
        list(loader)
    in_worker = loaders.test_loader(images, height=H, width=W, batch_size=4, num_workers=1)
    with pytest.raises(ImageReadError, match=r"0002_c1_x\.jpg"):  # re-raised in the main process
        list(in_worker)
    with pytest.raises(ImageReadError, match=r"0002_c1_x\.jpg"):
        loaders.test_loader(images, height=H, width=W, num_workers=0, cache=True)


def test_skip_option_logs_each_file_and_the_count(
    images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    truncate(images[2])
    images[7].write_bytes(b"not an image")
    ok, bad = loaders.verify_images(images)
    assert ok == [i for i in range(12) if i not in (2, 7)]
    assert [p.name for p, _ in bad] == ["0002_c1_x.jpg", "0007_c2_x.jpg"]
    samples = [Sample(p, i, 0) for i, p in enumerate(images)]
    with caplog.at_level(logging.WARNING):
        kept = loaders.drop_unreadable(samples, logging.getLogger("test"))
    assert [s.pid for s in kept] == ok
    messages = [r.getMessage() for r in caplog.records]
    assert any("0002_c1_x.jpg" in m for m in messages) and any("0007_c2_x.jpg" in m for m in messages)
    assert any("skipped 2 unreadable image(s) of 12" in m for m in messages)


def test_train_loader_batches_and_exact_iterations(images: list[Path]) -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1]
    camids = [i % 2 for i in range(12)]
    loader = loaders.train_loader(
        images, labels, camids, height=H, width=W, batch_size=4, num_instances=2,
        num_iterations=5, seed=0, random_erasing_prob=0.5, num_workers=0,
    )
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    for image, label, camid, index in batches:
        assert image.shape == (4, 3, H, W) and image.dtype == torch.float32
        assert label.tolist() == [labels[i] for i in index.tolist()]
        assert camid.tolist() == [camids[i] for i in index.tolist()]
        assert (label >= 0).all() and label[0] == label[1] and label[2] == label[3] != label[0]


def test_epoch_order_and_worker_augmentation_are_reproducible(images: list[Path]) -> None:
    def run(epoch: int) -> tuple[list[list[int]], torch.Tensor]:
        loader = loaders.train_loader(
            images, [i // 3 for i in range(12)], [i % 2 for i in range(12)], height=H, width=W,
            batch_size=4, num_instances=2, num_iterations=3, seed=7, random_erasing_prob=0.5,
            num_workers=1,
        )
        loaders.set_epoch(loader, epoch)
        torch.manual_seed(epoch + 100)  # the main process RNG must not matter with workers
        out = list(loader)
        return [b[3].tolist() for b in out], torch.cat([b[0] for b in out])

    order, pixels = run(1)
    order_again, pixels_again = run(1)
    assert order == order_again and torch.equal(pixels, pixels_again)
    other_order, _ = run(2)
    assert other_order != order


def test_test_loader_keeps_order_and_random_loader_is_exact(images: list[Path]) -> None:
    loader = loaders.test_loader(images, height=H, width=W, batch_size=5, num_workers=0, cache=True)
    batches = list(loader)
    assert [len(b[3]) for b in batches] == [5, 5, 2]
    assert torch.cat([b[3] for b in batches]).tolist() == list(range(12))
    assert (torch.cat([b[1] for b in batches]) == -1).all()
    random = loaders.random_loader(
        images, height=H, width=W, batch_size=5, num_iterations=4, seed=0, num_workers=0
    )
    assert [len(b[3]) for b in random] == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="set_epoch needs"):
        loaders.set_epoch(loader, 1)


def test_batched_fetch_equals_per_item_transform(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "odd", 6, size=(20, 45))
    loader = loaders.test_loader(paths, height=H, width=W, batch_size=4, num_workers=0)
    per_item = ImageDataset(paths, None, None, transforms.test_transform(H, W), resize_to=(H, W))
    images = torch.cat([b[0] for b in loader])
    torch.testing.assert_close(images, torch.stack([per_item[i][0] for i in range(6)]), atol=1e-5, rtol=0)
