"""Pairwise precision / recall / F, NMI, ARI: hand-computed values and a naive all-pairs loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dualref import label_quality


def naive_pairwise(labels: np.ndarray, pids: np.ndarray) -> tuple[float, float, float]:
    """Every pair i < j, outliers (-1) never in a same-cluster pair."""
    same_cluster = same_pid = both = 0
    for i, j in itertools.combinations(range(labels.size), 2):
        clustered = labels[i] == labels[j] and labels[i] != -1
        identity = pids[i] == pids[j]
        same_cluster += clustered
        same_pid += identity
        both += clustered and identity
    precision = both / same_cluster if same_cluster else 0.0
    recall = both / same_pid if same_pid else 0.0
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, fscore


def test_golden_values() -> None:
    # Clusters {0,1,2} (pids 5,5,7), {3,4} (pids 7,7), outliers 5 (pid 5) and 6 (pid 9).
    # Same-cluster pairs: 3 + 1 = 4, sharing a pid: (0,1) and (3,4) = 2 -> precision 1/2.
    # Same-pid pairs: pid 5 {0,1,5}: 3, pid 7 {2,3,4}: 3, pid 9: 0 -> 6; found 2 -> recall 1/3.
    # F = 2 * (1/2)(1/3) / (5/6) = 2/5.
    labels = np.array([0, 0, 0, 1, 1, -1, -1])
    pids = np.array([5, 5, 7, 7, 7, 5, 9])
    quality = label_quality.label_quality(labels, pids)
    assert quality.pairwise_precision == pytest.approx(0.5)
    assert quality.pairwise_recall == pytest.approx(1 / 3)
    assert quality.pairwise_fscore == pytest.approx(0.4)
    assert (quality.num_clusters, quality.num_outliers, quality.num_samples) == (2, 2, 7)
    assert quality.pairwise_fscore == pytest.approx(naive_pairwise(labels, pids)[2])


def test_perfect_and_all_outlier_labels() -> None:
    pids = np.array([3, 3, 1, 1, 1, 8])
    perfect = label_quality.label_quality(np.array([1, 1, 0, 0, 0, 2]), pids)
    assert perfect.pairwise_fscore == 1.0 and perfect.nmi == pytest.approx(1.0)
    assert perfect.ari == pytest.approx(1.0)
    none = label_quality.label_quality(np.full(6, -1), pids)
    assert (none.pairwise_precision, none.pairwise_recall, none.pairwise_fscore) == (0.0, 0.0, 0.0)
    assert none.num_clusters == 0 and none.num_outliers == 6
    assert none.ari == pytest.approx(0.0)  # all singletons vs identities with pairs: chance level


def test_outliers_are_singletons_for_nmi_and_ari() -> None:
    # Two outliers of the same identity as singletons: not the same as one shared cluster.
    pids = np.array([0, 0, 1, 1])
    with_outliers = label_quality.label_quality(np.array([0, 0, -1, -1]), pids)
    merged = label_quality.label_quality(np.array([0, 0, 1, 1]), pids)
    assert with_outliers.ari < merged.ari == pytest.approx(1.0)
    assert with_outliers.nmi < merged.nmi


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_pair_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pids = rng.integers(0, 12, size=90)
    labels = np.where(rng.random(90) < 0.7, pids % 9, rng.integers(-1, 9, size=90))  # partly right
    quality = label_quality.label_quality(labels, pids)
    precision, recall, fscore = naive_pairwise(labels, pids)
    assert quality.pairwise_precision == pytest.approx(precision)
    assert quality.pairwise_recall == pytest.approx(recall)
    assert quality.pairwise_fscore == pytest.approx(fscore)
    # Invariant to renaming the clusters.
    renamed = np.where(labels >= 0, (labels * 7 + 3) % 9 + 100, -1)
    renamed_quality = label_quality.label_quality(renamed, pids)
    assert renamed_quality._replace(nmi=quality.nmi) == quality  # NMI: equal up to rounding
    assert renamed_quality.nmi == pytest.approx(quality.nmi, abs=1e-12)


def test_format_and_bad_input() -> None:
    quality = label_quality.label_quality(np.array([0, 0, -1]), np.array([1, 1, 2]))
    text = label_quality.format_quality(quality)
    assert "clusters 1" in text and "outliers 1/3" in text and "F 1.0000" in text
    with pytest.raises(ValueError, match="one length"):
        label_quality.label_quality(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="integers"):
        label_quality.label_quality(np.array([0.0, 1.0]), np.array([0, 1]))
    with pytest.raises(ValueError, match=">= -1"):
        label_quality.label_quality(np.array([0, -2]), np.array([0, 1]))
