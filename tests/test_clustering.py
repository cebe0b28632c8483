"""dbscan_eps / cluster_dbscan / cluster_centroids against dense, obviously-correct references."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn.cluster import DBSCAN

from dualref import clustering


def sparse_from_dense(dense: np.ndarray) -> scipy.sparse.csr_matrix:
    """CSR holding every entry < 1 of ``dense`` (explicit zeros kept); absent entries mean 1."""
    rows, cols = np.nonzero(dense < 1.0)
    dist = scipy.sparse.csr_matrix((dense[rows, cols], (rows, cols)), shape=dense.shape)
    dist.has_canonical_format = True
    return dist


def dense_from_sparse(dist: scipy.sparse.csr_matrix) -> np.ndarray:
    dense = np.ones(dist.shape, dtype=dist.dtype)
    coo = dist.tocoo()
    dense[coo.row, coo.col] = coo.data
    return dense


def clustered_distances(
    num_ids: int, per_id: int, seed: int, cutoff: float = 0.9, num_duplicates: int = 5
) -> np.ndarray:
    """[N, N] symmetric distances in [0, 1] with clusters, a zero diagonal, exact-zero duplicate pairs,
    and every distance >= cutoff set to exactly 1 (what the Jaccard graph leaves out)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, 8))
    points = np.repeat(centres, per_id, axis=0) + 0.45 * rng.normal(size=(num_ids * per_id, 8))
    points = np.concatenate([points, rng.normal(scale=3.0, size=(6, 8))])  # a few likely outliers
    dup = rng.choice(len(points), size=num_duplicates, replace=False)
    points = np.concatenate([points, points[dup]])  # exact duplicates -> explicit zero distances
    sq = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    dense = (1.0 - np.exp(-sq / 8.0)).astype(np.float32)
    dense[dense >= cutoff] = 1.0
    np.fill_diagonal(dense, 0.0)
    return dense


def naive_eps(dense: np.ndarray, rho: float) -> float:
    """The reference rule verbatim: upper triangle, drop exact zeros, sort, mean of the round(rho*n) first."""
    upper = dense[np.triu_indices(dense.shape[0], k=1)]
    upper = np.sort(upper[upper != 0.0].astype(np.float64))
    return float(upper[: int(np.round(rho * upper.size))].mean())


def test_dbscan_eps_golden() -> None:
    # 4 points; upper-triangular pairs (0,1)=0, (0,2)=.2, (0,3)=.6, (1,3)=.4, (1,2) and (2,3) absent (=1).
    # count = 6 pairs - 1 exact zero = 5; rho = 0.5 -> round(2.5) = 2 (half to even) -> mean(.2, .4) = .3.
    dense = np.array([[0, 0, 0.2, 0.6], [0, 0, 1, 0.4], [0.2, 1, 0, 1], [0.6, 0.4, 1, 0]], dtype=np.float64)
    dist = sparse_from_dense(dense)
    assert dist.nnz == 12  # 4 diagonal zeros + (0, 1) zero pair + 3 non-zero pairs, both triangles
    assert clustering.dbscan_eps(dist, rho=0.5) == pytest.approx(0.3)
    # rho = 0.7 -> round(3.5) = 4: .2 + .4 + .6 + one implicit 1.0 -> 2.2 / 4 = .55
    assert clustering.dbscan_eps(dist, rho=0.7) == pytest.approx(0.55)
    # rho = 0.99 -> round(4.95) = 5: .2 + .4 + .6 + 1 + 1 = 3.2 / 5 = .64 (padding with implicit 1.0s)
    assert clustering.dbscan_eps(dist, rho=0.99) == pytest.approx(0.64)
    assert clustering.dbscan_eps(dist, rho=0.7) == pytest.approx(naive_eps(dense, 0.7))


@pytest.mark.parametrize("rho", [1.6e-3, 0.01, 0.3, 0.95])
def test_dbscan_eps_matches_dense_rule(rho: float) -> None:
    dense = clustered_distances(num_ids=20, per_id=8, seed=1)
    dist = sparse_from_dense(dense)
    assert (dist.data == 0).sum() > dense.shape[0]  # explicit off-diagonal zeros are present
    assert clustering.dbscan_eps(dist, rho=rho) == pytest.approx(naive_eps(dense, rho), rel=1e-6)


def test_dbscan_eps_rejects_bad_input() -> None:
    dist = sparse_from_dense(clustered_distances(num_ids=3, per_id=4, seed=0))
    for rho in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="rho"):
            clustering.dbscan_eps(dist, rho=rho)
    with pytest.raises(ValueError, match="square"):
        clustering.dbscan_eps(scipy.sparse.csr_matrix(np.zeros((3, 4))), rho=0.1)
    with pytest.raises(ValueError, match="CSR"):
        clustering.dbscan_eps(np.zeros((3, 3)), rho=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least"):
        clustering.dbscan_eps(sparse_from_dense(np.eye(3)), rho=0.01)  # round(0.03) = 0


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [0.05, 0.15, 0.3, 0.6])
@pytest.mark.parametrize("min_samples", [1, 4, 7])
def test_cluster_dbscan_matches_dense_sklearn(seed: int, eps: float, min_samples: int) -> None:
    dense = clustered_distances(num_ids=15, per_id=9, seed=seed)
    perm = np.random.default_rng(seed + 10).permutation(dense.shape[0])  # mix cluster members
    dense = dense[perm][:, perm]
    expected = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(dense)
    labels = clustering.cluster_dbscan(sparse_from_dense(dense), eps=eps, min_samples=min_samples)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)


def test_cluster_dbscan_border_point_takes_first_cluster() -> None:
    # Groups {0,1,2} and {4,5,6} (pairs at .1 inside a group); point 3 is at .1 from 2 and 4 only.
    # min_samples=4: 2 and 4 have 4 neighbours (group + point 3) -> the only cores; 0, 1, 5, 6 and 3 have 3.
    # Scan order: cluster 0 grows from core 2 (reaching 0, 1, 3), cluster 1 from core 4 (5, 6; 3 is taken).
    dense = np.ones((7, 7))
    for group in ((0, 1, 2), (4, 5, 6)):
        for i in group:
            for j in group:
                dense[i, j] = 0.1
    dense[2, 3] = dense[3, 2] = dense[3, 4] = dense[4, 3] = 0.1
    np.fill_diagonal(dense, 0.0)
    labels = clustering.cluster_dbscan(sparse_from_dense(dense), eps=0.2, min_samples=4)
    # Point 3 is non-core (neighbours 2, 3, 4) and reached from both clusters: sklearn gives it cluster 0.
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, 1, 1, 1])
    expected = DBSCAN(eps=0.2, min_samples=4, metric="precomputed").fit_predict(dense)
    np.testing.assert_array_equal(labels, expected)


def test_cluster_dbscan_explicit_zeros_are_neighbours() -> None:
    # Three identical points (pairwise distance stored as explicit 0) and one isolated point.
    dense = np.ones((4, 4))
    dense[:3, :3] = 0.0
    np.fill_diagonal(dense, 0.0)
    dist = sparse_from_dense(dense)
    assert dist.nnz == 10 and (dist.data == 0).all()
    np.testing.assert_array_equal(clustering.cluster_dbscan(dist, eps=0.1, min_samples=3), [0, 0, 0, -1])
    # Without a stored diagonal, a point is still its own neighbour.
    no_diag = sparse_from_dense(dense)
    no_diag.setdiag(1.0)  # stored 1 == absent
    np.testing.assert_array_equal(clustering.cluster_dbscan(no_diag, eps=0.1, min_samples=3), [0, 0, 0, -1])


def test_cluster_dbscan_rejects_bad_eps_and_min_samples() -> None:
    dist = sparse_from_dense(clustered_distances(num_ids=3, per_id=4, seed=0))
    for eps in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            clustering.cluster_dbscan(dist, eps=eps)
    with pytest.raises(ValueError, match="min_samples"):
        clustering.cluster_dbscan(dist, eps=0.5, min_samples=0)


def test_cluster_dbscan_all_outliers() -> None:
    dist = sparse_from_dense(np.eye(5) * 0 + (1 - np.eye(5)))
    np.testing.assert_array_equal(clustering.cluster_dbscan(dist, eps=0.5, min_samples=2), [-1] * 5)


def test_cluster_centroids_golden() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = np.array([0, 0, -1, 1])
    centroids = clustering.cluster_centroids(features, labels, num_clusters=2)
    # cluster 0: mean (0.5, 0.5) -> (1, 1)/sqrt(2); cluster 1: (0.6, 0.8); the outlier (-1, 0) is ignored.
    expected = torch.tensor([[2**-0.5, 2**-0.5], [0.6, 0.8]])
    torch.testing.assert_close(centroids, expected)


def test_cluster_centroids_rejects_empty_cluster() -> None:
    with pytest.raises(ValueError, match="no member"):
        clustering.cluster_centroids(torch.eye(3), np.array([0, 0, 2]), num_clusters=3)
    with pytest.raises(ValueError, match="num_clusters"):
        clustering.cluster_centroids(torch.eye(3), np.array([0, 1, 2]), num_clusters=2)
