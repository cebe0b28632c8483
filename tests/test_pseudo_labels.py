"""The off-line stage: cluster profile, the eps cap, and the stage against its parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualref import clustering, distances, pseudo_labels, refinement
from dualref.config import ClusteringConfig


def test_cluster_profile_golden() -> None:
    coarse = np.array([0, 0, 0, 1, 1, -1, 2, -1, 0, 3])
    profile = pseudo_labels.cluster_profile(coarse, num_instances=3)
    assert profile == {
        "num_clusters": 4,
        "num_outliers": 2,
        "outlier_share": 0.2,
        "largest_cluster_share": 0.4,
        "median_cluster_size": 1.5,
        "clusters_below_k": 3,
    }


def _blobs(seed: int = 0) -> torch.Tensor:
    # 6 tight groups of 8 plus a chain of points between groups 0 and 1 that a large eps merges.
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(6, 16, generator=generator), dim=1)
    points = [centres[i] + 0.05 * torch.randn(8, 16, generator=generator) for i in range(6)]
    bridge = [centres[0] + (centres[1] - centres[0]) * t for t in torch.linspace(0.1, 0.9, 9)]
    return F.normalize(torch.cat([*points, torch.stack(bridge)]), dim=1)


def test_stage_equals_its_parts_and_keeps_a_given_eps() -> None:
    features = _blobs()
    settings = ClusteringConfig(k1=6, k2=2, dbscan_rho=0.05, min_samples=3, num_subclusters=2)
    labels = pseudo_labels.compute_pseudo_labels(
        features, settings, eps=None, refine=True, seed=3, device=torch.device("cpu")
    )
    dist = distances.jaccard_distance(features, 6, 2)
    eps = clustering.dbscan_eps(dist, 0.05)
    coarse = clustering.cluster_dbscan(dist, eps, 3)
    assert labels.eps == eps
    assert np.array_equal(labels.coarse, coarse)
    assert np.array_equal(labels.refined, refinement.refine_labels(features, coarse, 2, seed=3))
    # What the blobs imply, whatever the parts compute: no coarse cluster mixes two groups, the clustered
    # points of a group share one cluster, and every point of a clustered group is refined into it.
    groups = np.arange(48) // 8
    clustered = labels.coarse[:48] >= 0
    for cluster in set(labels.coarse[:48][clustered].tolist()):
        assert len(set(groups[labels.coarse[:48] == cluster].tolist())) == 1
    for group in range(6):
        members = labels.coarse[group * 8 : group * 8 + 8]
        found = set(members[members >= 0].tolist())
        assert len(found) <= 1
        if found:
            assert set(labels.refined[group * 8 : group * 8 + 8].tolist()) == found
    assert clustered.sum() >= 24 and labels.num_clusters >= 4  # most groups found at rho 0.05
    fixed = pseudo_labels.compute_pseudo_labels(
        features, settings, eps=0.3, refine=False, seed=3, device=torch.device("cpu")
    )
    assert fixed.eps == 0.3 and fixed.refined is None
    assert np.array_equal(fixed.coarse, clustering.cluster_dbscan(dist, 0.3, 3))


def test_eps_cap_lowers_eps_until_the_largest_cluster_fits() -> None:
    features = _blobs()
    dist = distances.jaccard_distance(features, 6, 2)
    loose = ClusteringConfig(k1=6, k2=2, dbscan_rho=0.5, min_samples=3)
    eps = pseudo_labels.initial_eps(dist, loose)
    share = pseudo_labels.cluster_profile(clustering.cluster_dbscan(dist, eps, 3), num_instances=1)
    assert share["largest_cluster_share"] > 0.3  # the uncapped rule merges groups
    capped = pseudo_labels.initial_eps(
        dist, ClusteringConfig(k1=6, k2=2, dbscan_rho=0.5, min_samples=3, max_cluster_share=0.3)
    )
    assert capped < eps
    coarse = clustering.cluster_dbscan(dist, capped, 3)
    assert pseudo_labels.cluster_profile(coarse, num_instances=1)["largest_cluster_share"] <= 0.3
    # The largest eps that fits: one more step up (x 1/EPS_SHRINK) would not.
    above = clustering.cluster_dbscan(dist, capped / pseudo_labels.EPS_SHRINK, 3)
    assert pseudo_labels.cluster_profile(above, num_instances=1)["largest_cluster_share"] > 0.3
    # A fixed eps ignores both rules.
    fixed = ClusteringConfig(dbscan_eps=0.42, max_cluster_share=0.01)
    assert pseudo_labels.initial_eps(dist, fixed) == 0.42


def test_label_record_counts_refined_moves() -> None:
    labels = pseudo_labels.PseudoLabels(
        coarse=np.array([0, 0, 1, 1, -1]), refined=np.array([0, 2, 1, 1, 5]), num_clusters=2, eps=0.5
    )
    record = pseudo_labels.label_record(labels, pseudo_labels.cluster_profile(labels.coarse, num_instances=2))
    assert record["refined_changed"] == pytest.approx(0.25)  # 1 of the 4 clustered images moved
    assert record["eps"] == 0.5 and record["num_outliers"] == 1
