"""Datasets and DataLoaders of re-ID images.

Every loader yields ``(images [B, 3, H, W] float32, labels [B] int64, camids [B] int64, indices [B]
int64)``; ``indices`` are positions in the ``paths`` given, so features, memory-bank rows and labels
stay aligned. A missing or corrupt image is an error that names the file (:class:`ImageReadError`);
to skip such files instead, call :func:`drop_unreadable` (or :func:`verify_images`) once before
building the loader.

Speed (what makes loading cheap on a 2-core machine, where every loader cycle is taken from the
network): decoding is most of the cost of a small re-ID image, and per-image transform pipelines
are the rest. So (1) images are resized (bicubic, PIL, as the reference) to the network size as they
are decoded, making the transform's own resize a no-op; (2) with ``cache=True`` all images are decoded
once, by a thread pool, into one ``[N, 3, H, W]`` uint8 tensor (Market train at 128x64: 12,936 x 24 KiB
= 318 MB; at 256x128, 1.3 GB) that forked workers share copy-on-write; (3) the loaders fetch whole
batches (``ImageDataset.__getitems__``) and augment them as one uint8 tensor
(:class:`~dualref.data.transforms.BatchTrainAugment`): flip, pad and crop on uint8, a single float
conversion and normalisation, erasing in place. Measured side by side on Market train, 128x64,
batch 64, one process, one thread (medians of 30 batches): 27 ms per batch cached and 84 ms uncached,
against 93 ms and 203 ms with per-image torchvision v2 pipelines (2-core machine at load average ~15,
so absolute numbers are inflated; the ratios are the point).
``pin_memory`` only helps when batches go to CUDA. On 2 cores, ``num_workers=0`` with ``cache=True``
avoids a worker process competing with the network for the cores; whether that beats a worker depends
on the step time (benchmarks/bench_throughput.py measures both).

Determinism: the batch order is a function of (seed, epoch) (see :mod:`dualref.data.samplers`).
Augmentations draw from torch's RNG; with ``num_workers > 0`` DataLoader seeds each worker from the
loader's own generator, which :func:`set_epoch` re-seeds from (seed, epoch), so they are reproducible
too. With ``num_workers=0`` they come from the global torch RNG (the caller's seed_everything).

Size: over 400 lines; decoding, caching, the dataset and the three loader builders share their helpers.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dualref.data import transforms as transforms_lib
from dualref.data.records import Sample
from dualref.data.samplers import RandomBatchSampler, RandomIdentitySampler

log = logging.getLogger(__name__)

Item = tuple[Tensor, int, int, int]


class ImageReadError(OSError):
    """An image file is missing, truncated or not an image. The message names the file.

    A subclass of OSError so that ``except OSError`` around file access catches it, and constructible
    from one message string so DataLoader workers can re-raise it in the main process.
    """


def read_image(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image, optionally resized (bicubic) to ``size`` = (h, w).

    Raises:
        ImageReadError: naming ``path`` and the reason (missing, truncated, not an image...).
    """
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")  # convert() decodes the whole file: truncation raises here
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path}: {err}") from err
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return image


def _to_uint8_tensor(image: Image.Image) -> Tensor:
    """[3, H, W] uint8 tensor of an RGB PIL image."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _num_threads() -> int:
    return min(8, os.cpu_count() or 1)


def image_sizes(
    paths: Sequence[Path], *, decode: bool = True, num_threads: int | None = None
) -> tuple[list[tuple[int, int] | None], list[tuple[Path, str]]]:
    """(width, height) of every image, decoding each when ``decode`` (else reading the header only).

    PIL releases the GIL while decoding, so a thread pool scales across cores.

    Returns:
        ``sizes`` (None for an unreadable file, same order as ``paths``) and ``bad``, a list of
        (path, reason) in path order.
    """

    def probe(path: Path) -> tuple[int, int] | str:
        try:
            with Image.open(path) as opened:
                size = opened.size
                if decode:
                    # JPEG draft mode decodes at 1/8 scale: every byte is still entropy-decoded (so
                    # truncation and corruption are caught) but the inverse DCT is ~2x cheaper.
                    opened.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                    opened.load()
                return size
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return str(err)

    with ThreadPoolExecutor(num_threads or _num_threads()) as pool:
        results = list(pool.map(probe, paths))
    sizes = [r if isinstance(r, tuple) else None for r in results]
    bad = [(Path(p), r) for p, r in zip(paths, results, strict=True) if isinstance(r, str)]
    return sizes, bad


def verify_images(paths: Sequence[Path]) -> tuple[list[int], list[tuple[Path, str]]]:
    """Decode every image once.

    Returns:
        ``ok_indices`` (positions in ``paths`` that decode) and ``bad`` = [(path, reason), ...].
    """
    sizes, bad = image_sizes(paths, decode=True)
    return [i for i, s in enumerate(sizes) if s is not None], bad


def drop_unreadable(samples: Sequence[Sample], log: logging.Logger) -> list[Sample]:
    """The explicit skip option: drop samples whose image does not decode, logging each and the count."""
    ok, bad = verify_images([s.path for s in samples])
    for path, reason in bad:
        log.warning("skipping unreadable image %s: %s", path, reason)
    if bad:
        log.warning("skipped %d unreadable image(s) of %d", len(bad), len(samples))
    return [samples[i] for i in ok]


class ImageDataset(Dataset[Item]):
    """Images with optional labels and cameras; item i is ``(image, label, camid, i)``.

    Args:
        paths: [N] image files.
        labels: [N] training labels, or None (label -1 for every item).
        camids: [N] camera ids, or None (camid -1 for every item).
        transform: maps a [3, H, W] uint8 tensor to the model input.
        resize_to: (height, width) to resize to (bicubic, PIL) while decoding; None keeps the size.
        cache: decode every image once now (thread pool) and keep the uint8 pixels in RAM. Needs
            ``resize_to`` so that all images share one tensor. Raises ImageReadError on a bad file.
        pixels: [N, 3, H, W] uint8 pixels of `paths` already decoded (another dataset's cache, shared
            instead of decoding again); takes the place of `cache`.
        batch_transform: maps a [B, 3, H, W] uint8 batch to the model input; when given (with
            ``resize_to``), DataLoader's batched fetch (``__getitems__``) uses it instead of calling
            ``transform`` per image: the same augmentation, vectorised. Single items still use
            ``transform``.
        rows: ``(start, stop)``: keep only these rows of every batch the sampler gives (one rank's share
            of the global batch, `dualref.distributed.batch_rows`); `batch_transform` then takes the
            whole batch's random draws (`BatchTrainAugment`'s ``batch_size`` and ``offset``).
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        camids: Sequence[int] | None,
        transform: Callable[[Tensor], Tensor],
        *,
        resize_to: tuple[int, int] | None = None,
        cache: bool = False,
        batch_transform: Callable[..., Tensor] | None = None,
        rows: tuple[int, int] | None = None,
        pixels: Tensor | None = None,
    ) -> None:
        for name, values in (("labels", labels), ("camids", camids)):
            if values is not None and len(values) != len(paths):
                raise ValueError(f"{len(values)} {name} for {len(paths)} paths; expected equal lengths")
        if (cache or batch_transform is not None) and resize_to is None:
            raise ValueError("cache=True and batch_transform need resize_to=(height, width)")
        self.paths = [Path(p) for p in paths]
        self.labels = [-1] * len(paths) if labels is None else [int(x) for x in labels]
        self.camids = [-1] * len(paths) if camids is None else [int(x) for x in camids]
        self.transform = transform
        self.batch_transform = batch_transform
        self.resize_to = resize_to
        if rows is not None and (batch_transform is None or not 0 <= rows[0] < rows[1]):
            raise ValueError(f"rows={rows!r}: expected 0 <= start < stop, with a batch_transform")
        self.rows = rows
        if pixels is not None and (resize_to is None or pixels.shape != (len(paths), 3, *resize_to)):
            raise ValueError(
                f"pixels of shape {tuple(pixels.shape)}: expected [{len(paths)}, 3, *resize_to={resize_to}]"
            )
        self.pixels: Tensor | None = pixels if pixels is not None else self._decode_all() if cache else None

    def _decode_all(self) -> Tensor:
        """[N, 3, H, W] uint8 pixels of every image, decoded by a thread pool."""
        assert self.resize_to is not None
        pixels = torch.empty((len(self.paths), 3, *self.resize_to), dtype=torch.uint8)

        def fill(i: int) -> None:
            pixels[i] = _to_uint8_tensor(read_image(self.paths[i], self.resize_to))

        with ThreadPoolExecutor(_num_threads()) as pool:
            list(pool.map(fill, range(len(self.paths))))
        return pixels

    def __len__(self) -> int:
        return len(self.paths)

    def _pixels(self, index: int) -> Tensor:
        if self.pixels is not None:
            return self.pixels[index]
        return _to_uint8_tensor(read_image(self.paths[index], self.resize_to))

    def __getitem__(self, index: int) -> Item:
        image = self.transform(self._pixels(index))
        return image, self.labels[index], self.camids[index], index

    def __getitems__(self, indices: Sequence[int]) -> list[Item]:
        """The items of one batch; DataLoader calls this instead of ``__getitem__`` when it exists."""
        if self.batch_transform is None:
            return [self[i] for i in indices]
        options: dict[str, int] = {}
        if self.rows is not None:  # this rank's share of the global batch
            options = {"batch_size": len(indices), "offset": self.rows[0]}
            if self.rows[1] > len(indices):
                raise ValueError(f"rows {self.rows} are not inside a batch of {len(indices)}")
            indices = list(indices)[self.rows[0] : self.rows[1]]
        if self.pixels is not None:
            pixels = self.pixels[torch.as_tensor(indices, dtype=torch.long)]
        else:
            pixels = torch.stack([self._pixels(i) for i in indices])
        images = self.batch_transform(pixels, **options)
        return [
            (image, self.labels[i], self.camids[i], i)
            for image, i in zip(images.unbind(0), indices, strict=True)
        ]


def _seed_worker(worker_id: int) -> None:
    # DataLoader already seeds torch per worker (base_seed + worker_id); derive python's and numpy's
    # seeds from it so any augmentation using them is reproducible as well.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def _make_loader(
    dataset: ImageDataset,
    *,
    seed: int,
    num_workers: int,
    pin_memory: bool,
    batch_sampler: Any = None,
    batch_size: int | None = None,
) -> DataLoader[Item]:
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator().manual_seed(_mixed_seed(seed, 0))
    loader: DataLoader[Item] = DataLoader(
        dataset,
        batch_size=batch_size if batch_sampler is None else 1,
        batch_sampler=batch_sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        generator=generator,
        # Two batches in flight per worker is enough: the per-batch work is small and RAM is not free.
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return loader


def _mixed_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 7919]).generate_state(1, dtype=np.uint64)[0] >> 1)


def set_epoch(loader: DataLoader[Item], epoch: int) -> None:
    """Make the next pass over ``loader`` a function of (seed, epoch): batch order and worker RNGs.

    Calls ``loader.batch_sampler.set_epoch(epoch)`` (the order) and re-seeds the loader's generator
    from (sampler seed, epoch); DataLoader derives each worker's torch seed from that generator, so the
    augmentations of workers are reproducible too.

    Raises:
        ValueError: ``loader`` was not made by :func:`train_loader` or :func:`random_loader`.
    """
    sampler = loader.batch_sampler
    if not isinstance(sampler, RandomIdentitySampler | RandomBatchSampler):
        raise ValueError(
            f"set_epoch needs a loader from train_loader() or random_loader(), got batch sampler "
            f"{type(sampler).__name__}"
        )
    sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(_mixed_seed(sampler.seed, epoch))


def train_loader(
    paths: Sequence[Path],
    labels: Sequence[int],
    camids: Sequence[int],
    *,
    height: int,
    width: int,
    batch_size: int,
    num_instances: int,
    num_iterations: int,
    seed: int,
    random_erasing_prob: float = 0.0,
    num_workers: int = 2,
    cache: bool = False,
    pin_memory: bool = False,
    flip_prob: float = 0.5,
    pad: int = 10,
    rows: tuple[int, int] | None = None,
    pixels: Tensor | None = None,
) -> DataLoader[Item]:
    """P x K training batches, exactly ``num_iterations`` per epoch; labels < 0 are never sampled.

    The sampler is ``loader.batch_sampler`` (a :class:`RandomIdentitySampler`): call
    ``set_epoch(loader, epoch)`` (or ``loader.batch_sampler.set_epoch(epoch)``) before each epoch.

    Args:
        paths: [N] image files; labels: [N] training labels (-1 = outlier); camids: [N] cameras.
        height, width: network input size.
        batch_size: P * K; num_instances: K.
        num_iterations: batches per epoch.
        seed: base seed of the batch order and of the workers' augmentation RNGs.
        random_erasing_prob: 0 in reference pre-training, 0.5 in target training.
        num_workers: loader processes (0 = main process).
        cache: decode all images once into RAM (see the module docstring).
        pin_memory: set True only when batches go to a CUDA device.
        flip_prob, pad: see :func:`dualref.data.transforms.train_transform`.
        rows: this rank's rows of every batch (see `ImageDataset`); None: the whole batch.
        pixels: the images already decoded at (height, width), shared instead of `cache` (`ImageDataset`).
    """
    sampler = RandomIdentitySampler(
        labels,
        camids,
        batch_size=batch_size,
        num_instances=num_instances,
        num_iterations=num_iterations,
        seed=seed,
    )
    transform = transforms_lib.train_transform(
        height, width, flip_prob=flip_prob, pad=pad, random_erasing_prob=random_erasing_prob
    )
    augment = transforms_lib.BatchTrainAugment(
        flip_prob=flip_prob, pad=pad, random_erasing_prob=random_erasing_prob
    )
    dataset = ImageDataset(
        paths,
        labels,
        camids,
        transform,
        resize_to=(height, width),
        cache=cache,
        batch_transform=augment,
        rows=rows,
        pixels=pixels,
    )
    return _make_loader(
        dataset, seed=seed, num_workers=num_workers, pin_memory=pin_memory, batch_sampler=sampler
    )


def test_loader(
    paths: Sequence[Path],
    *,
    height: int,
    width: int,
    batch_size: int = 128,
    num_workers: int = 2,
    cache: bool = False,
    pin_memory: bool = False,
    camids: Sequence[int] | None = None,
    pixels: Tensor | None = None,
) -> DataLoader[Item]:
    """Every image once, in the order given, with the test transform (label -1; camid -1 unless given).

    `pixels`: the images already decoded at (height, width), shared instead of `cache` (`ImageDataset`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = ImageDataset(
        paths,
        None,
        camids,
        transforms_lib.test_transform(height, width),
        resize_to=(height, width),
        cache=cache,
        batch_transform=transforms_lib.normalise_batch,
        pixels=pixels,
    )
    return _make_loader(
        dataset, seed=0, num_workers=num_workers, pin_memory=pin_memory, batch_size=batch_size
    )


def random_loader(
    paths: Sequence[Path],
    *,
    height: int,
    width: int,
    batch_size: int,
    num_iterations: int,
    seed: int,
    num_workers: int = 2,
    cache: bool = False,
    pin_memory: bool = False,
    random_erasing_prob: float = 0.0,
    rows: tuple[int, int] | None = None,
) -> DataLoader[Item]:
    """Shuffled batches (no P x K) with the training transform, exactly ``num_iterations`` per epoch.

    For the reference's forwarding of target batches during source training (BatchNorm statistics).
    ``loader.batch_sampler`` is a :class:`RandomBatchSampler`; use :func:`set_epoch` as for training.
    `rows`: this rank's rows of every batch (see `ImageDataset`).
    """
    sampler = RandomBatchSampler(len(paths), batch_size=batch_size, num_iterations=num_iterations, seed=seed)
    transform = transforms_lib.train_transform(height, width, random_erasing_prob=random_erasing_prob)
    augment = transforms_lib.BatchTrainAugment(random_erasing_prob=random_erasing_prob)
    dataset = ImageDataset(
        paths,
        None,
        None,
        transform,
        resize_to=(height, width),
        cache=cache,
        batch_transform=augment,
        rows=rows,
    )
    return _make_loader(
        dataset, seed=seed, num_workers=num_workers, pin_memory=pin_memory, batch_sampler=sampler
    )
