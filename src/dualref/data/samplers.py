"""Batch samplers with an exact number of iterations per epoch and a per-(seed, epoch) order.

Both samplers are *batch* samplers: pass them as ``DataLoader(dataset, batch_sampler=sampler)``. Each
epoch's order is a pure function of ``(seed, epoch)`` drawn from a private numpy Generator, never from a
global RNG, so a resumed run sees exactly the batches it would have seen. As with PyTorch's
``DistributedSampler``, iterating twice without calling :meth:`set_epoch` repeats the same order: call
``sampler.set_epoch(epoch)`` before each epoch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    # SeedSequence mixes (seed, epoch) into well-separated streams; nearby seeds/epochs do not correlate.
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


class _EpochBatchSampler:
    """What both samplers share: exactly ``num_iterations`` batches an epoch, cut from an endless run of
    passes (``_passes``) drawn from the epoch's (seed, epoch) generator."""

    def __init__(self, *, batch_size: int, num_iterations: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_iterations < 0:
            raise ValueError(f"num_iterations must be >= 0, got {num_iterations}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.batch_size = batch_size
        self.num_iterations = num_iterations
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``iter()`` produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_iterations

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(self._passes(_epoch_rng(self.seed, self.epoch)), self.num_iterations)

    def _passes(self, rng: np.random.Generator) -> Iterator[list[int]]:
        """Batches of dataset indices, pass after pass, without end."""
        raise NotImplementedError


class RandomIdentitySampler(_EpochBatchSampler):
    """Camera-aware P x K sampler: P identities per batch, K images each (the reference's sampler).

    One *pass* visits every identity (label >= 0) once, in random order. For each identity it picks a
    random anchor image and K-1 companions, preferring cameras other than the anchor's:

    * the identity has images from other cameras: draw the K-1 among them, without replacement when
      there are at least K such images, with replacement otherwise (the reference's threshold is K,
      not K-1, and is kept);
    * all its images share the anchor's camera: draw among its other images by the same rule;
    * it has a single image: the anchor is repeated K times. (The reference contributes the anchor
      alone, which shifts the batch boundaries; we keep every batch exactly P x K.)

    A pass gives ``num_identities // P`` batches of P consecutive identities; the remaining identities
    are dropped, as with the reference's ``drop_last``, and a new pass starts. Passes follow each other
    until exactly ``num_iterations`` batches have been produced. When there are fewer than P identities,
    each batch lists every identity once and fills its other slots with identities drawn again from a
    fresh permutation, so an identity can then fill 2 or more K-slots of one batch.

    Within a batch, the K images of an identity are consecutive and the anchor comes first.

    Args:
        labels: [N] training label of each dataset index; labels < 0 (outliers) are never sampled.
        camids: [N] camera of each dataset index.
        batch_size: images per batch, P * K.
        num_instances: K, images per identity in a batch.
        num_iterations: batches per epoch (``len(sampler)``).
        seed: base seed (>= 0); an epoch's order depends only on (seed, epoch).
    """

    def __init__(
        self,
        labels: Sequence[int],
        camids: Sequence[int],
        *,
        batch_size: int,
        num_instances: int,
        num_iterations: int,
        seed: int,
    ) -> None:
        super().__init__(batch_size=batch_size, num_iterations=num_iterations, seed=seed)
        if num_instances < 1 or batch_size % num_instances != 0:
            raise ValueError(
                f"batch_size {batch_size} must be a positive multiple of num_instances {num_instances}"
            )
        labels_arr = np.asarray(labels, dtype=np.int64)
        camids_arr = np.asarray(camids, dtype=np.int64)
        if labels_arr.ndim != 1 or labels_arr.shape != camids_arr.shape:
            raise ValueError(
                f"labels and camids must be 1-D of equal length, got {labels_arr.shape} "
                f"and {camids_arr.shape}"
            )
        valid = np.flatnonzero(labels_arr >= 0)
        if valid.size == 0:
            raise ValueError("no label >= 0 to sample from (all images are outliers)")
        self.num_instances = num_instances
        self.num_identities_per_batch = batch_size // num_instances
        # Group dataset indices by label, in index order, once; camids grouped alike.
        order = valid[np.argsort(labels_arr[valid], kind="stable")]
        _, starts = np.unique(labels_arr[order], return_index=True)
        self._indices = np.split(order, starts[1:])
        self._camids = [camids_arr[group] for group in self._indices]

    @property
    def num_identities(self) -> int:
        """Identities with at least one sampleable image."""
        return len(self._indices)

    def _identity_chunk(self, identity: int, rng: np.random.Generator) -> list[int]:
        """Anchor first, then K-1 companions preferring other cameras (see the class docstring)."""
        indices, cams = self._indices[identity], self._camids[identity]
        k = self.num_instances
        position = int(rng.integers(len(indices)))
        if len(indices) == 1:
            return [int(indices[0])] * k
        pool = indices[cams != cams[position]]
        if pool.size == 0:
            pool = np.delete(indices, position)
        companions = rng.choice(pool, size=k - 1, replace=pool.size < k)
        return [int(indices[position]), *(int(i) for i in companions)]

    def _passes(self, rng: np.random.Generator) -> Iterator[list[int]]:
        while True:
            for identities in _shuffled_groups(rng, self.num_identities, self.num_identities_per_batch):
                yield [i for identity in identities for i in self._identity_chunk(identity, rng)]


class RandomBatchSampler(_EpochBatchSampler):
    """Plain shuffled batches (no P x K), exactly ``num_iterations`` per epoch.

    Used to forward target images during source training so BatchNorm statistics see the target
    domain. A pass is a random permutation of all indices cut into full batches (the last partial batch
    is dropped, like ``drop_last``); passes follow each other until ``num_iterations`` batches are out.
    With fewer than ``batch_size`` images a batch concatenates several permutations.

    Args:
        num_samples: dataset size N; indices 0..N-1 are sampled.
        batch_size: images per batch.
        num_iterations: batches per epoch.
        seed: base seed (>= 0); an epoch's order depends only on (seed, epoch).
    """

    def __init__(self, num_samples: int, *, batch_size: int, num_iterations: int, seed: int) -> None:
        super().__init__(batch_size=batch_size, num_iterations=num_iterations, seed=seed)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples

    def _passes(self, rng: np.random.Generator) -> Iterator[list[int]]:
        while True:
            for batch in _shuffled_groups(rng, self.num_samples, self.batch_size):
                yield batch.tolist()


def _shuffled_groups(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """One pass of random disjoint groups of `size` drawn from range(n) (the remainder is dropped).

    With fewer than `size` items, a single group cycles through fresh permutations, so batches keep
    their full size.
    """
    if n >= size:
        order = rng.permutation(n)
        return [order[i * size : (i + 1) * size] for i in range(n // size)]
    repeats = -(-size // n)  # ceil(size / n)
    return [np.concatenate([rng.permutation(n) for _ in range(repeats)])[:size]]
