"""The off-line stage of each epoch: features -> Jaccard -> eps -> DBSCAN -> refinement (docs/method.md §3-4).

Used by `dualref adapt` (each epoch) and by `dualref cluster` (saved features). Label-free: nothing here
reads a ground-truth identity; `label_quality_record` is the monitoring side and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from dualref import clustering, distances, label_quality, refinement
from dualref.config import ClusteringConfig
from dualref.timing import timed

# The eps cap (`clustering.max_cluster_share`) lowers eps by this factor until the largest cluster fits.
EPS_SHRINK = 0.95
MAX_EPS_STEPS = 80

# Label-free signs of a degenerate clustering (`degenerate_clustering`). No identity of a re-ID training
# set holds even 1 % of its images (Market-1501's largest: ~0.6 %), so a cluster of a fifth of them has
# swallowed many identities; with most images outliers, little of the target trains.
LARGEST_SHARE_WARNING = 0.2
OUTLIER_SHARE_WARNING = 0.8
GIANT_CLUSTER_HINT = (
    "Lower clustering.dbscan_eps (with a fixed eps) or cap the rho rule with clustering.max_cluster_share "
    "(e.g. 0.01), lower clustering.dbscan_rho, or raise clustering.min_samples"
)
OUTLIER_HINT = (
    "Raise clustering.dbscan_eps (with a fixed eps) or clustering.dbscan_rho (the rho rule), or lower "
    "clustering.min_samples"
)


@dataclass(frozen=True)
class PseudoLabels:
    """The off-line stage's output for one epoch.

    Attributes:
        coarse: [N] int64 DBSCAN cluster of every target image, -1 = outlier.
        refined: [N] int64 refined label (outliers get one too, never used), or None when not asked
            for (alpha = 0) or when DBSCAN found no cluster.
        num_clusters: L, the number of coarse clusters.
        eps: the DBSCAN eps used.
        seconds: wall time of each stage ("jaccard", "dbscan", "refine").
    """

    coarse: np.ndarray
    refined: np.ndarray | None
    num_clusters: int
    eps: float
    seconds: dict[str, float] = field(default_factory=dict)

    def refined_or_coarse(self) -> np.ndarray:
        """The labels of the refined loss terms: the refined ones, or the coarse ones without refinement."""
        return self.refined if self.refined is not None else self.coarse


def compute_pseudo_labels(
    features: Tensor,
    settings: ClusteringConfig,
    *,
    eps: float | None,
    refine: bool,
    seed: int,
    device: torch.device,
) -> PseudoLabels:
    """Coarse and refined pseudo-labels of `features`.

    Args:
        features: [N, D] L2-normalised features in dataset order.
        settings: `clustering.*` (k1, k2, rho / fixed eps / eps cap, min_samples, R).
        eps: the eps fixed at epoch 0 (None: derive it now, from `settings`).
        refine: compute the refined labels (skipped when no loss term reads them).
        seed: seed of the k-means restarts.
        device: device of the neighbour search and the k-means (the features are moved there, so that
            `dualref adapt` and `dualref cluster` compute on the same device the same way).

    Returns:
        The labels, the eps used and the time of each stage.
    """
    features = features.to(device)
    seconds: dict[str, float] = {}
    with timed(seconds, "jaccard"):
        dist = distances.jaccard_distance(features, settings.k1, settings.k2, device=device)
    if eps is None:
        eps = initial_eps(dist, settings)
    with timed(seconds, "dbscan"):
        coarse = np.asarray(clustering.cluster_dbscan(dist, eps, settings.min_samples), dtype=np.int64)
    num_clusters = int(coarse.max(initial=-1)) + 1
    refined = None
    if refine and num_clusters > 0:
        with timed(seconds, "refine"):
            refined = np.asarray(
                refinement.refine_labels(features, coarse, settings.num_subclusters, seed=seed),
                dtype=np.int64,
            )
    return PseudoLabels(coarse, refined, num_clusters, float(eps), seconds)


def initial_eps(dist: scipy.sparse.csr_matrix, settings: ClusteringConfig) -> float:
    """The eps of epoch 0: fixed (`dbscan_eps`), or the rho rule capped by `max_cluster_share`.

    The rho rule (mean of the smallest rho fraction of pairwise distances) follows the paper; with a
    weak source model those distances are large and DBSCAN can chain a large part of the target into
    one cluster. The cap is label-free: eps is lowered by `EPS_SHRINK` until the largest cluster holds at
    most `max_cluster_share` of the images (or `MAX_EPS_STEPS` were taken).
    """
    if settings.dbscan_eps is not None:
        return float(settings.dbscan_eps)
    eps = clustering.dbscan_eps(dist, settings.dbscan_rho)
    if settings.max_cluster_share >= 1.0:
        return eps
    for _ in range(MAX_EPS_STEPS):
        coarse = clustering.cluster_dbscan(dist, eps, settings.min_samples)
        if cluster_profile(coarse, num_instances=1)["largest_cluster_share"] <= settings.max_cluster_share:
            break
        eps *= EPS_SHRINK
    return float(eps)


def cluster_profile(coarse: np.ndarray, *, num_instances: int) -> dict[str, float | int]:
    """Label-free shape of a clustering: what to look at when the pseudo-labels degenerate.

    Args:
        coarse: [N] cluster labels, -1 = outlier.
        num_instances: K of the P x K sampler (clusters smaller than K repeat images in a batch).

    Returns:
        num_clusters, num_outliers, outlier_share, largest_cluster_share (of all N images),
        median_cluster_size, clusters_below_k.
    """
    coarse = np.asarray(coarse)
    sizes = np.bincount(coarse[coarse >= 0]) if (coarse >= 0).any() else np.zeros(0, dtype=np.int64)
    sizes = sizes[sizes > 0]
    num = max(coarse.size, 1)
    return {
        "num_clusters": int(sizes.size),
        "num_outliers": int((coarse < 0).sum()),
        "outlier_share": round(float((coarse < 0).sum()) / num, 5),
        "largest_cluster_share": round(float(sizes.max(initial=0)) / num, 5),
        "median_cluster_size": float(np.median(sizes)) if sizes.size else 0.0,
        "clusters_below_k": int((sizes < num_instances).sum()),
    }


def degenerate_clustering(
    profile: dict[str, float | int], *, identities_per_batch: int, fixed_eps: bool
) -> list[str]:
    """Warnings, with the numbers and the config key to change, when a clustering looks degenerate.

    Label-free: reads only `cluster_profile`'s figures. Empty for a healthy clustering.

    Args:
        profile: `cluster_profile` of the epoch's coarse labels.
        identities_per_batch: P of the P x K sampler (data.batch_size / data.num_instances).
        fixed_eps: eps is `clustering.dbscan_eps` (else the rho rule), to name the key that sets it.
    """
    smaller = (
        "lower clustering.dbscan_eps"
        if fixed_eps
        else "cap the rho rule with clustering.max_cluster_share (e.g. 0.01), or lower clustering.dbscan_rho"
    )
    numbers = (
        f"{profile['num_clusters']} clusters, largest {profile['largest_cluster_share']:.1%} of the images, "
        f"outliers {profile['outlier_share']:.1%}"
    )
    warnings = []
    if profile["largest_cluster_share"] > LARGEST_SHARE_WARNING:
        warnings.append(
            f"degenerate clustering ({numbers}): one cluster holds more than "
            f"{LARGEST_SHARE_WARNING:.0%} of the images, many identities chained together: {smaller}"
        )
    if profile["outlier_share"] > OUTLIER_SHARE_WARNING:
        warnings.append(
            f"degenerate clustering ({numbers}): more than {OUTLIER_SHARE_WARNING:.0%} of the images are "
            f"outliers and never train. {OUTLIER_HINT}"
        )
    if profile["num_clusters"] < identities_per_batch:
        warnings.append(
            f"degenerate clustering ({numbers}): fewer clusters than the {identities_per_batch} identities "
            "of a P x K batch (data.batch_size / data.num_instances), so every batch repeats clusters; "
            "see the cluster and outlier shares (clustering.dbscan_eps / clustering.dbscan_rho, "
            "clustering.min_samples), or lower data.batch_size"
        )
    return warnings


def label_record(labels: PseudoLabels, profile: dict[str, float | int]) -> dict[str, float | int]:
    """Label-free figures of one epoch's pseudo-labels for metrics.jsonl (`profile`: `cluster_profile`
    of the coarse labels)."""
    clustered = labels.coarse >= 0
    moved = labels.refined_or_coarse()[clustered] != labels.coarse[clustered]
    return {
        "eps": labels.eps,
        **profile,
        "refined_changed": round(float(moved.mean()) if clustered.any() else 0.0, 5),
    }


def label_quality_record(labels: PseudoLabels, pids: np.ndarray | None) -> dict[str, float]:
    """MONITORING ONLY: pairwise precision / recall / F-score and NMI of the coarse and refined labels."""
    if pids is None:
        return {}
    record: dict[str, float] = {}
    label_sets = {"coarse": labels.coarse}
    if labels.refined is not None:
        # Outliers are left out of both (the refined label of an outlier is never used).
        label_sets["refined"] = np.where(labels.coarse >= 0, labels.refined, -1)
    for name, values in label_sets.items():
        quality = label_quality.label_quality(values, pids)
        record[f"{name}_precision"] = quality.pairwise_precision
        record[f"{name}_recall"] = quality.pairwise_recall
        record[f"{name}_fscore"] = quality.pairwise_fscore
        record[f"{name}_nmi"] = quality.nmi
    return record
