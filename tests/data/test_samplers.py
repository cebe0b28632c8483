"""Batch structure, iteration count, determinism and camera preference of the samplers."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dualref.data.samplers import RandomBatchSampler, RandomIdentitySampler


def make_data(seed: int = 0) -> tuple[list[int], list[int]]:
    """30 identities with 1..9 images over up to 4 cameras, plus 15 outliers (label -1), shuffled."""
    rng = np.random.default_rng(seed)
    labels: list[int] = []
    camids: list[int] = []
    for identity in range(30):
        count = 1 + identity % 9
        labels += [identity] * count
        camids += rng.integers(0, 1 + identity % 4, size=count).tolist()
    labels += [-1] * 15
    camids += [0] * 15
    order = rng.permutation(len(labels))
    return [labels[i] for i in order], [camids[i] for i in order]


def sampler(labels: list[int], camids: list[int], **kwargs: int) -> RandomIdentitySampler:
    options = {"batch_size": 16, "num_instances": 4, "num_iterations": 23, "seed": 3} | kwargs
    return RandomIdentitySampler(labels, camids, **options)


def test_every_batch_is_p_identities_times_k_images_and_never_an_outlier() -> None:
    labels, camids = make_data()
    batches = list(sampler(labels, camids))
    assert len(batches) == 23  # exact, although one pass gives only 30 // 4 = 7 batches
    for batch in batches:
        assert len(batch) == 16
        batch_labels = [labels[i] for i in batch]
        assert min(batch_labels) >= 0
        # 4 distinct identities, each exactly 4 times and in one consecutive chunk of K.
        assert sorted(Counter(batch_labels).values()) == [4, 4, 4, 4]
        chunks = [batch_labels[c : c + 4] for c in range(0, 16, 4)]
        assert all(len(set(chunk)) == 1 for chunk in chunks)


def test_passes_visit_every_identity_once_before_repeating() -> None:
    labels, camids = make_data()
    s = sampler(labels, camids, num_iterations=14)  # two full passes of 7 batches
    first_ids = [labels[b[c]] for b in s for c in range(0, 16, 4)]
    per_pass = [first_ids[:28], first_ids[28:]]
    for ids in per_pass:
        assert len(set(ids)) == 28  # 2 of the 30 identities are dropped per pass (drop_last)


def test_exact_iterations_and_len() -> None:
    labels, camids = make_data()
    for n in (0, 1, 7, 8, 50):
        s = sampler(labels, camids, num_iterations=n)
        assert len(s) == n
        assert len(list(s)) == n


def test_order_depends_only_on_seed_and_epoch() -> None:
    labels, camids = make_data()
    a, b = sampler(labels, camids), sampler(labels, camids)
    np.random.seed(123)  # global RNGs must not matter
    a.set_epoch(5)
    first = list(a)
    np.random.seed(999)
    b.set_epoch(5)
    assert list(b) == first
    assert list(a) == first  # same epoch again: same order
    a.set_epoch(6)
    assert list(a) != first
    assert list(sampler(labels, camids, seed=4)) != list(sampler(labels, camids))


def test_companions_come_from_other_cameras_when_enough_exist() -> None:
    # identity 0: 1 image in camera 0, 5 in camera 1 -> anchor 0 => companions all camera 1 without
    # replacement; anchor in camera 1 => companions drawn from the single other-camera image.
    labels = [0] * 6 + [1] * 8
    camids = [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2]  # identity 0, then identity 1
    s = RandomIdentitySampler(labels, camids, batch_size=8, num_instances=4, num_iterations=200, seed=0)
    anchors_seen = set()
    for batch in s:
        for c in range(0, 8, 4):
            chunk = batch[c : c + 4]
            anchor, companions = chunk[0], chunk[1:]
            anchors_seen.add(anchor)
            anchor_cam = camids[anchor]
            other_cam = [i for i in range(len(labels)) if labels[i] == labels[anchor]
                         and camids[i] != anchor_cam]
            # Every companion is from another camera (there is always at least one here).
            assert all(camids[i] != anchor_cam for i in companions)
            if len(other_cam) >= 4:
                assert len(set(companions)) == 3  # without replacement
            else:
                assert set(companions) <= set(other_cam)  # with replacement from the few others
    assert anchors_seen == set(range(14))  # every image serves as an anchor at some point


def test_same_camera_identity_draws_other_images_and_single_image_is_repeated() -> None:
    labels = [0, 0, 0, 0, 0, 1, 1, 2]
    camids = [3, 3, 3, 3, 3, 1, 1, 0]
    s = RandomIdentitySampler(labels, camids, batch_size=12, num_instances=4, num_iterations=100, seed=1)
    for batch in s:
        chunks = {labels[batch[c]]: batch[c : c + 4] for c in range(0, 12, 4)}
        five, two, one = chunks[0], chunks[1], chunks[2]
        assert five[0] not in five[1:] and len(set(five[1:])) == 3  # 4 others >= K: no replacement
        assert set(two[1:]) == {({5, 6} - {two[0]}).pop()}  # the only other image, repeated
        assert one == [7, 7, 7, 7]  # single image: anchor repeated K times


def test_fewer_identities_than_p_still_gives_full_batches() -> None:
    labels, camids = [0, 0, 1, 1, 1], [0, 1, 0, 1, 1]
    s = RandomIdentitySampler(labels, camids, batch_size=12, num_instances=2, num_iterations=5, seed=0)
    batches = list(s)
    assert len(batches) == 5
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 12 and set(counts) == {0, 1} and sorted(counts.values()) == [6, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 10, "num_instances": 4}, "multiple of num_instances"),
        ({"num_iterations": -1}, "num_iterations"),
        ({"seed": -2}, "seed"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, int], message: str) -> None:
    labels, camids = make_data()
    with pytest.raises(ValueError, match=message):
        sampler(labels, camids, **kwargs)


def test_all_outliers_or_mismatched_lengths_rejected() -> None:
    with pytest.raises(ValueError, match="no label >= 0"):
        RandomIdentitySampler([-1, -1], [0, 1], batch_size=4, num_instances=2, num_iterations=1, seed=0)
    with pytest.raises(ValueError, match="equal length"):
        RandomIdentitySampler([0, 1], [0], batch_size=4, num_instances=2, num_iterations=1, seed=0)


def test_random_batch_sampler_shuffles_all_indices_per_pass() -> None:
    s = RandomBatchSampler(10, batch_size=3, num_iterations=7, seed=0)
    batches = list(s)
    assert len(batches) == 7 and all(len(b) == 3 for b in batches)
    for p in range(2):  # a pass = 3 batches of distinct indices (1 index dropped)
        flat = [i for b in batches[3 * p : 3 * p + 3] for i in b]
        assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    s.set_epoch(1)
    assert list(s) != batches
    s.set_epoch(0)
    assert list(s) == batches
    small = RandomBatchSampler(2, batch_size=5, num_iterations=2, seed=0)
    assert all(len(b) == 5 and set(b) == {0, 1} for b in small)
