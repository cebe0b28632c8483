"""Hierarchical refinement: golden 2-D case, small-cluster path, agreement with a scikit-learn KMeans loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from dualref import clustering, refinement


def unit(*xy: float) -> list[float]:
    norm = math.hypot(*xy)
    return [v / norm for v in xy]


def golden_case() -> tuple[torch.Tensor, np.ndarray]:
    # Cluster 0: a=(1,0) x2, b=(0,1) x2, g=(0,-1). 2-means optimum (inertias worked out by hand):
    #   {a,a,g}|{b,b}: centre (2/3,-1/3): 2*(2/9) + 8/9 = 4/3   <- best
    #   {a,a}|{b,b,g}: centre (0,1/3): 2*(4/9) + 16/9 = 8/3;   {a,a,b,b}|{g}: 4 * 1/2 = 2
    #   prototypes (2,-1)/sqrt(5) and (0,1); summed P0 = (0.8944, 0.5528).
    # Cluster 1: c=(-1,0) x3, d=(-.6,-.8) x2 -> prototypes c and d (duplicates), P1 = (-1.6, -0.8).
    # Scores <f, P0> vs <f, P1>: a .894 vs -1.6 -> 0; b .553 vs -.8 -> 0; g -.553 vs .8 -> 1 (re-assigned);
    #   c -.894 vs 1.6 -> 1; d -.979 vs 1.6 -> 1; outlier o=(.6,-.8) .094 vs -.32 -> 0;
    #   outlier q=(-.8,.6) -.384 vs .8 -> 1.
    points = [
        [1, 0], [1, 0], [0, 1], [0, 1], [0, -1],
        [-1, 0], [-1, 0], [-1, 0], [-0.6, -0.8], [-0.6, -0.8],
        [0.6, -0.8], [-0.8, 0.6],
    ]  # fmt: skip
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, -1, -1])
    return torch.tensor(points, dtype=torch.float32), labels


def test_refine_labels_golden_two_clusters() -> None:
    features, labels = golden_case()
    refined = refinement.refine_labels(features, labels, num_subclusters=2, seed=0)
    assert refined.dtype == np.int64
    np.testing.assert_array_equal(refined, [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1])
    prototypes = refinement.subcluster_prototypes(features, labels, num_subclusters=2, seed=0)
    assert prototypes.shape == (2, 2, 2)
    expected = [[unit(2, -1), [0.0, 1.0]], [[-1.0, 0.0], [-0.6, -0.8]]]
    for cluster in range(2):
        found = sorted(prototypes[cluster].tolist())
        torch.testing.assert_close(torch.tensor(found), torch.tensor(sorted(expected[cluster])))


def test_small_clusters_use_copies_of_their_mean() -> None:
    # R = 2: cluster 0 has exactly 2 (distinct) members -> 2 copies of normalise((1,0)+(0,1)) = (1,1)/sqrt2,
    # not the two points; cluster 1 (3 members) goes through k-means; cluster 2 has one member.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [-1.0, 0.0], [0.0, -1.0], [0.6, -0.8]])
    labels = np.array([0, 0, 1, 1, 1, 2])
    prototypes = refinement.subcluster_prototypes(features, labels, num_subclusters=2)
    torch.testing.assert_close(prototypes[0], torch.tensor([unit(1, 1), unit(1, 1)]))
    torch.testing.assert_close(prototypes[2], torch.tensor([[0.6, -0.8], [0.6, -0.8]]))
    torch.testing.assert_close(
        torch.tensor(sorted(prototypes[1].tolist())), torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    )


def clustered_features(
    num_clusters: int, num_dims: int, seed: int, num_subclusters: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Unit features of clusters made of well-separated sub-clusters; cluster sizes vary from 2 to 40."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for cluster in range(num_clusters):
        size = int(rng.integers(2, 41))
        centre = rng.normal(size=num_dims)
        subs = centre + 1.2 * rng.normal(size=(num_subclusters, num_dims))
        member_sub = np.arange(size) % num_subclusters
        rows.append(subs[member_sub] + 0.05 * rng.normal(size=(size, num_dims)))
        labels += [cluster] * size
    features = np.concatenate(rows)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    labels_np = np.array(labels)
    labels_np[rng.random(labels_np.size) < 0.05] = -1  # outliers
    order = rng.permutation(labels_np.size)
    # Clusters stay numbered 0..L-1 (no cluster loses every member with these sizes; checked below).
    return torch.tensor(features[order], dtype=torch.float32), labels_np[order]


def sklearn_prototypes(features: np.ndarray, labels: np.ndarray, num_subclusters: int) -> np.ndarray:
    """The reference loop: scikit-learn KMeans(n_init=10) per cluster, mean copies for small clusters."""
    num_clusters = labels.max() + 1
    prototypes = np.zeros((num_clusters, num_subclusters, features.shape[1]))
    for cluster in range(num_clusters):
        members = features[labels == cluster]
        if len(members) > num_subclusters:
            with threadpool_limits(1):  # tiny problems: threads only add overhead on a shared machine
                kmeans = KMeans(n_clusters=num_subclusters, n_init=10, random_state=0).fit(members)
            prototypes[cluster] = kmeans.cluster_centers_
        else:
            prototypes[cluster] = members.mean(0)
    return prototypes / np.linalg.norm(prototypes, axis=2, keepdims=True)


# num_dims 6 < most cluster sizes: exercises the feature-space path; 64: the Gram path.
@pytest.mark.parametrize(("num_dims", "num_subclusters", "seed"), [(64, 2, 0), (64, 5, 1), (6, 3, 2)])
def test_agrees_with_sklearn_kmeans_loop(num_dims: int, num_subclusters: int, seed: int) -> None:
    features, labels = clustered_features(12, num_dims, seed, num_subclusters)
    assert np.array_equal(np.unique(labels[labels >= 0]), np.arange(12))
    ours = refinement.subcluster_prototypes(features, labels, num_subclusters, seed=seed).double().numpy()
    expected = sklearn_prototypes(features.numpy(), labels, num_subclusters)
    for cluster in range(12):
        # Same set of prototypes up to order: every one of ours has an equal one in scikit-learn's.
        gaps = np.linalg.norm(ours[cluster][:, None] - expected[cluster][None], axis=2)
        assert gaps.min(1).max() < 1e-5, f"cluster {cluster}: {gaps.min(1)}"
        assert gaps.min(0).max() < 1e-5, f"cluster {cluster}: {gaps.min(0)}"
    naive = np.argmax(np.einsum("nd,lrd->nl", features.double().numpy(), expected), axis=1)
    refined = refinement.refine_labels(features, labels, num_subclusters, seed=seed)
    np.testing.assert_array_equal(refined, naive)
    # Outliers get a refined label too, in range.
    assert refined[labels == -1].size > 0 and (refined[labels == -1] >= 0).all()


def test_one_subcluster_is_nearest_centroid() -> None:
    features, labels = clustered_features(12, 16, seed=3, num_subclusters=2)
    centroids = clustering.cluster_centroids(features, labels, num_clusters=12)
    expected = (features @ centroids.T).argmax(1).numpy()
    np.testing.assert_array_equal(refinement.refine_labels(features, labels, 1), expected)


def test_deterministic_per_seed_and_invariant_to_sample_order() -> None:
    features, labels = clustered_features(10, 16, seed=4, num_subclusters=3)
    first = refinement.subcluster_prototypes(features, labels, 3, seed=7)
    torch.testing.assert_close(refinement.subcluster_prototypes(features, labels, 3, seed=7), first)
    perm = np.random.default_rng(0).permutation(labels.size)
    permuted = refinement.refine_labels(features[torch.from_numpy(perm)], labels[perm], 3, seed=7)
    np.testing.assert_array_equal(permuted, refinement.refine_labels(features, labels, 3, seed=7)[perm])


def test_rejects_bad_input() -> None:
    features = torch.eye(4)
    with pytest.raises(ValueError, match="num_subclusters"):
        refinement.refine_labels(features, np.array([0, 0, 1, 1]), 0)
    with pytest.raises(ValueError, match="empty"):
        refinement.refine_labels(features, np.array([0, 0, 2, 2]), 2)
    with pytest.raises(ValueError, match="no cluster"):
        refinement.refine_labels(features, np.array([-1, -1, -1, -1]), 2)
    with pytest.raises(ValueError, match="coarse_labels"):
        refinement.refine_labels(features, np.array([0, 0, 1]), 2)
    with pytest.raises(ValueError, match="features"):
        refinement.refine_labels(torch.ones(4, 2, dtype=torch.long), np.array([0, 0, 1, 1]), 2)


def test_fewer_distinct_points_than_subclusters() -> None:
    # 4 members but only 2 distinct points, R = 3: k-means++ must repeat a seed, one centre starts empty
    # and is moved onto a point (scikit-learn's relocation). Prototypes: both points, one of them twice.
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    prototypes = refinement.subcluster_prototypes(features, np.array([0, 0, 0, 0, 1]), 3)
    found = {tuple(row) for row in prototypes[0].tolist()}
    assert found == {(1.0, 0.0), (0.0, 1.0)}
    assert torch.isfinite(prototypes).all()
