"""DBSCAN on the sparse k-reciprocal Jaccard graph, its eps rule and the cluster centroids.

The Jaccard distance (``distances.jaccard_distance``) is a ``scipy.sparse`` CSR matrix that stores every pair
with distance < 1, explicit zeros included; absent pairs are exactly 1. Everything here works on the stored
entries only (O(nnz) memory) and reproduces what the reference computes on the dense N x N matrix
(docs/method.md section 3, steps 4, 5 and 7).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from scipy.sparse import csgraph
from torch import Tensor

__all__ = ["cluster_centroids", "cluster_dbscan", "dbscan_eps"]


def _check_square_csr(dist: scipy.sparse.csr_matrix) -> int:
    if not scipy.sparse.issparse(dist) or dist.format != "csr":
        raise ValueError(f"dist must be a scipy.sparse CSR matrix; got {type(dist).__name__}")
    if dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be square; got shape {dist.shape}")
    return int(dist.shape[0])


def _row_indices(dist: scipy.sparse.csr_matrix) -> np.ndarray:
    """[nnz] row index of every stored entry (CSR keeps only column indices)."""
    return np.repeat(np.arange(dist.shape[0], dtype=np.int64), np.diff(dist.indptr))


def dbscan_eps(dist: scipy.sparse.csr_matrix, rho: float = 1.6e-3) -> float:
    """DBSCAN radius: the mean of the smallest ``rho`` fraction of the non-zero pairwise distances.

    The reference (docs/method.md section 3, step 4) takes the strictly upper-triangular part of the
    dense Jaccard matrix, drops the entries that are exactly 0, sorts the rest and averages the smallest
    ``round(rho * count)`` of them. The implicit (absent) entries are 1.0 and are part of ``count``:
    ``count = N (N - 1) / 2 - (stored exact zeros above the diagonal)``. Only the stored entries are read
    (O(nnz) memory); when fewer than ``round(rho * count)`` stored distances are below 1, the rest of the
    selection is made of implicit 1.0 values. Only the upper triangle is read, as in the reference.
    The mean is computed in float64 (the reference averaged float32 values: differences of ~1e-7).

    Args:
        dist: [N, N] CSR Jaccard distances in [0, 1]; absent entries mean 1.
        rho: Fraction of the smallest distances to average (paper: rho), in (0, 1).

    Returns:
        eps, in (0, 1].

    Raises:
        ValueError: Bad ``rho`` or ``dist``, or when the selection is empty (too few pairs for ``rho``).
    """
    num_samples = _check_square_csr(dist)
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must be in (0, 1); got {rho!r}")
    upper = _row_indices(dist) < dist.indices
    values = np.asarray(dist.data[upper], dtype=np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0):
        raise ValueError("dist holds negative or non-finite distances; expected Jaccard values in [0, 1]")
    num_pairs = num_samples * (num_samples - 1) // 2
    nonzero = values[values != 0.0]
    count = num_pairs - (values.size - nonzero.size)
    # np.round (half to even), as the reference, not int(x + 0.5).
    num_selected = int(np.round(rho * count))
    if num_selected < 1:
        raise ValueError(
            f"rho={rho!r} selects round({rho!r} * {count}) = {num_selected} distances; expected at least "
            "one (too few samples or too small rho)"
        )
    # A stored 1.0 and an implicit 1.0 are the same value: clip keeps stored values above 1 from counting.
    nonzero = np.minimum(nonzero, 1.0)
    if nonzero.size <= num_selected:
        total = nonzero.sum() + (num_selected - nonzero.size) * 1.0
    else:
        total = np.partition(nonzero, num_selected - 1)[:num_selected].sum()
    return float(total / num_selected)


def cluster_dbscan(dist: scipy.sparse.csr_matrix, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN on a sparse precomputed distance graph; the labels of scikit-learn's dense DBSCAN.

    Same result as ``sklearn.cluster.DBSCAN(eps, min_samples=min_samples, metric="precomputed")`` on the
    dense matrix (absent entries = 1): the neighbourhood of a point is every point at distance <= eps, the
    point itself included; a core point has at least ``min_samples`` neighbours; clusters are the connected
    components of the core points, numbered in the order of their smallest core index (the order of
    scikit-learn's scan); a non-core point within eps of core points takes the smallest label among them
    (the first cluster scikit-learn's scan reaches it from); the rest are outliers (-1).

    Computed as connected components of the core-core graph in O(nnz): stored entries <= eps are edges,
    explicit zeros included. The diagonal is taken as 0 whatever is stored (a point is its own neighbour,
    as in scikit-learn's sparse path). ``dist`` must be symmetric (Jaccard distances are).

    Args:
        dist: [N, N] symmetric CSR distances; absent entries mean 1.
        eps: Neighbourhood radius, in (0, 1) (absent pairs are at distance 1, so eps >= 1 would need them).
        min_samples: Neighbours (self included) that make a core point.

    Returns:
        [N] int64 labels 0..L-1, -1 for outliers.
    """
    num_samples = _check_square_csr(dist)
    if not 0.0 < eps < 1.0:
        raise ValueError(
            f"eps must be in (0, 1); got {eps!r} (absent pairs are at distance 1, so eps >= 1 would make "
            "them neighbours and is not supported on the sparse graph)"
        )
    if isinstance(min_samples, bool) or not isinstance(min_samples, (int, np.integer)) or min_samples < 1:
        raise ValueError(f"min_samples must be a positive int; got {min_samples!r}")
    rows = _row_indices(dist)
    cols = dist.indices.astype(np.int64)
    edge = (dist.data <= eps) & (rows != cols)
    rows, cols = rows[edge], cols[edge]

    num_neighbours = np.bincount(rows, minlength=num_samples) + 1  # + 1: the point itself
    is_core = num_neighbours >= min_samples
    labels = np.full(num_samples, -1, dtype=np.int64)
    core_ids = np.flatnonzero(is_core)
    if core_ids.size == 0:
        return labels

    core_edge = is_core[rows] & is_core[cols]
    graph = scipy.sparse.csr_matrix(
        (np.ones(int(core_edge.sum()), dtype=np.int8), (rows[core_edge], cols[core_edge])),
        shape=(num_samples, num_samples),
    )
    _, component = csgraph.connected_components(graph, directed=True, connection="weak")
    # Number the components of core points by their smallest core index: core_ids is ascending, so the
    # first occurrence of each component in component[core_ids] is its smallest member.
    core_components = component[core_ids]
    _, first = np.unique(core_components, return_index=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    labels[core_ids] = rank[np.unique(core_components, return_inverse=True)[1]]

    # Border points: within eps of a core point (row of the core point, as scikit-learn reads it).
    border_edge = is_core[rows] & ~is_core[cols]
    if border_edge.any():
        border = np.full(num_samples, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(border, cols[border_edge], labels[rows[border_edge]])
        reached = border != np.iinfo(np.int64).max
        labels[reached] = border[reached]
    return labels


def cluster_centroids(features: Tensor, labels: np.ndarray, num_clusters: int) -> Tensor:
    """L2-normalised mean feature of every cluster, outliers excluded (classifier initialisation).

    docs/method.md section 3, step 7: the mean of the (normalised) member features of each coarse
    cluster, L2-normalised.

    Args:
        features: [N, D] features (L2-normalised).
        labels: [N] int cluster labels 0..num_clusters-1, -1 for outliers.
        num_clusters: L, the number of clusters; every cluster must have a member.

    Returns:
        [L, D] centroids, on the device and in the dtype of ``features``.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D]; got shape {tuple(features.shape)}")
    labels = np.asarray(labels)
    if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be [N] = [{features.shape[0]}] integers; got shape {labels.shape}, {labels.dtype}"
        )
    if num_clusters < 1 or labels.max(initial=-1) >= num_clusters or labels.min(initial=-1) < -1:
        raise ValueError(
            f"labels must lie in -1..num_clusters-1 with num_clusters >= 1; got num_clusters={num_clusters}, "
            f"labels in [{labels.min(initial=-1)}, {labels.max(initial=-1)}]"
        )
    counts = np.bincount(labels[labels >= 0], minlength=num_clusters)
    if (counts == 0).any():
        raise ValueError(f"cluster {int(np.flatnonzero(counts == 0)[0])} has no member")
    members = torch.from_numpy(np.flatnonzero(labels >= 0)).to(features.device)
    member_labels = torch.from_numpy(labels[labels >= 0]).to(features.device)
    sums = torch.zeros(num_clusters, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, member_labels, features[members])
    return torch.nn.functional.normalize(sums, dim=1)
