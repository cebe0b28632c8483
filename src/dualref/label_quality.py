"""Quality of pseudo-labels against ground-truth identities: for monitoring and research only.

Target ``pids`` must never reach training code; this module only reads them to measure the labels
(the paper's Fig. 3 clustering F-score, plus NMI and ARI).

Outliers (label -1) are singletons everywhere: they form no same-cluster pair, so a same-identity pair that
involves an outlier counts as missed in the recall, and for NMI / ARI every outlier is its own cluster. All
samples count. (The reference's commented-out Fig. 3 code measured the non-outlier samples only; with
singleton outliers, precision is the same as over the non-outliers, and recall is lower by the pairs that
outliers lose.)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["LabelQuality", "format_quality", "label_quality"]


class LabelQuality(NamedTuple):
    """Pairwise and information-theoretic agreement of labels with identities."""

    pairwise_precision: float  # same-cluster pairs sharing an identity / all same-cluster pairs
    pairwise_recall: float  # same-identity pairs placed in one cluster / all same-identity pairs
    pairwise_fscore: float  # harmonic mean of the two (paper Fig. 3 "F-score")
    nmi: float  # normalised mutual information, outliers as singleton clusters
    ari: float  # adjusted Rand index, outliers as singleton clusters
    num_clusters: int  # distinct labels >= 0
    num_outliers: int  # samples labelled -1
    num_samples: int


def _num_pairs(counts: np.ndarray) -> int:
    """sum over the counts of C(n, 2), in exact integers."""
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def _singleton_outliers(labels: np.ndarray) -> np.ndarray:
    """Labels with every -1 replaced by a new label of its own."""
    labels = labels.astype(np.int64, copy=True)
    outliers = np.flatnonzero(labels == -1)
    labels[outliers] = labels.max(initial=-1) + 1 + np.arange(outliers.size)
    return labels


def label_quality(labels: np.ndarray, pids: np.ndarray) -> LabelQuality:
    """Pairwise precision / recall / F-score, NMI and ARI of ``labels`` against ``pids``.

    Pair counts come from the contingency table (sum of C(n, 2) over its cells, rows and columns): O(N) memory
    and time apart from sorting, never O(N^2). Outliers are singletons (see the module docstring). With no
    same-cluster pair the precision is 0 (and so is F); with no same-identity pair the recall is 0.

    Args:
        labels: [N] int pseudo-labels, -1 for outliers.
        pids: [N] int ground-truth identities.

    Returns:
        The measures, as plain Python numbers.
    """
    labels, pids = np.asarray(labels), np.asarray(pids)
    if labels.ndim != 1 or labels.shape != pids.shape:
        raise ValueError(
            f"labels and pids must be [N] arrays of one length; got {labels.shape}, {pids.shape}"
        )
    for name, array in (("labels", labels), ("pids", pids)):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be integers; got dtype {array.dtype}")
    if labels.size and labels.min() < -1:
        raise ValueError(f"labels must be >= -1 (-1 = outlier); got {labels.min()}")

    clustered = labels >= 0
    _, cluster_sizes = np.unique(labels[clustered], return_counts=True)
    _, pid_sizes = np.unique(pids, return_counts=True)
    _, cell_sizes = np.unique(np.stack([labels[clustered], pids[clustered]]), axis=1, return_counts=True)
    predicted_pairs = _num_pairs(cluster_sizes)
    true_pairs = _num_pairs(pid_sizes)
    correct_pairs = _num_pairs(cell_sizes)
    precision = correct_pairs / predicted_pairs if predicted_pairs else 0.0
    recall = correct_pairs / true_pairs if true_pairs else 0.0
    fscore = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

    singletons = _singleton_outliers(labels)
    nmi = float(normalized_mutual_info_score(pids, singletons)) if labels.size else 0.0
    ari = float(adjusted_rand_score(pids, singletons)) if labels.size else 0.0
    return LabelQuality(
        pairwise_precision=precision,
        pairwise_recall=recall,
        pairwise_fscore=fscore,
        nmi=nmi,
        ari=ari,
        num_clusters=int(cluster_sizes.size),
        num_outliers=int((~clustered).sum()),
        num_samples=int(labels.size),
    )


def format_quality(quality: LabelQuality) -> str:
    """One line: clusters, outliers and the measures, e.g. for a log or a table row."""
    return (
        f"clusters {quality.num_clusters}, outliers {quality.num_outliers}/{quality.num_samples}, "
        f"pairwise P {quality.pairwise_precision:.4f} R {quality.pairwise_recall:.4f} "
        f"F {quality.pairwise_fscore:.4f}, NMI {quality.nmi:.4f}, ARI {quality.ari:.4f}"
    )
