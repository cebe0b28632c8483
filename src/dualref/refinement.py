"""Hierarchical (coarse-to-fine) label refinement: k-means prototypes inside every coarse cluster.

docs/method.md section 4. Every coarse cluster with more than R members is split by k-means into
R prototypes (scikit-learn's algorithm as the reference ran it: k-means++ seeding, 10 restarts keeping the
lowest inertia, Lloyd iterations up to 300, tolerance 1e-4 of the mean per-dimension variance); a cluster
with R or fewer members gets R copies of its mean. Prototypes are L2-normalised, and every sample (outliers
included) is re-assigned to the cluster whose prototypes have the largest summed dot product with it.

All clusters and all restarts run at once as batched tensor operations, not as a loop of library calls.
Clusters are padded to a common size inside buckets of similar sizes (masks mark the padding). Centres are
kept as weights over the member points, so that Lloyd iterations of clusters smaller than the feature
dimension work on the members' Gram matrix (M x M) instead of the D-dimensional features.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["refine_labels", "subcluster_prototypes"]

NUM_RESTARTS = 10  # scikit-learn 0.22 KMeans n_init, as the reference ran it
MAX_ITER = 300  # scikit-learn KMeans max_iter
RELATIVE_TOL = 1e-4  # scikit-learn KMeans tol, relative to the mean per-dimension variance
# Elements (float64) of the largest per-bucket tensor: bounds the memory of one batched k-means call.
BUCKET_ELEMENTS = 1 << 23
# Rows of features scored against all clusters at once in the final re-assignment.
SCORE_ELEMENTS = 1 << 24


class _Points(NamedTuple):
    """Padded members of a bucket of clusters, in the representation that the k-means iterations use."""

    data: Tensor  # [B, M, M] float64 Gram matrices (use_gram) or [B, M, D] features, zero on padding
    use_gram: bool
    sq_norms: Tensor  # [B, M] squared norms of the points, zero on padding
    valid: Tensor  # [B, M] bool, False on padding
    sizes: Tensor  # [B] int64 members per cluster
    num_dims: int  # D, the feature dimension (for scikit-learn's tolerance)


def _point_dots(points: _Points, index: Tensor) -> Tensor:
    """[B, K, M] dot products between the points ``index`` [B, K] and all points of each cluster."""
    batch, count = index.shape
    if points.use_gram:
        return points.data.gather(1, index[:, :, None].expand(batch, count, points.data.shape[2]))
    rows = points.data.gather(1, index[:, :, None].expand(batch, count, points.data.shape[2]))
    return torch.bmm(rows, points.data.transpose(1, 2)).to(torch.float64)


def _sq_dist_to_points(points: _Points, index: Tensor) -> Tensor:
    """[B, K, M] squared distances from the points ``index`` [B, K] to all points; zero on padding."""
    dots = _point_dots(points, index)
    sq = points.sq_norms.gather(1, index)[:, :, None] + points.sq_norms[:, None, :] - 2.0 * dots
    return sq.clamp_min(0.0) * points.valid[:, None, :]


class _Centres(NamedTuple):
    """Centres given as weights over the points, through the products the iterations need."""

    dots: Tensor  # [B, M, K] x_i . c_k, float64
    sq_norms: Tensor  # [B, K] |c_k|^2, float64
    coords: Tensor | None  # [B, K, D] the centres themselves (feature-space path only)


def _centre_products(points: _Points, weights: Tensor) -> _Centres:
    """Products of the points with the centres ``weights`` [B, K, M] @ points."""
    if points.use_gram:
        dots = torch.bmm(points.data, weights.transpose(1, 2))  # x_i . c_k = (G W^T)_ik
        return _Centres(dots, (weights * dots.transpose(1, 2)).sum(-1), None)  # |c_k|^2 = w_k^T G w_k
    # Feature-space path (clusters larger than D): products in the features' dtype, as scikit-learn.
    centres = torch.bmm(weights.to(points.data.dtype), points.data)
    dots = torch.bmm(points.data, centres.transpose(1, 2)).to(torch.float64)
    return _Centres(dots, (centres.to(torch.float64) ** 2).sum(-1), centres)


def _sq_dist_to_centres(points: _Points, centres: _Centres) -> Tensor:
    """[B, M, K] squared distances from every point to every centre."""
    return (points.sq_norms[:, :, None] - 2.0 * centres.dots + centres.sq_norms[:, None, :]).clamp_min(0.0)


def _kmeans_plus_plus(
    points: _Points, num_subclusters: int, num_restarts: int, generator: torch.Generator
) -> Tensor:
    """[B, S, R] member indices of the k-means++ seeds of every cluster and restart.

    scikit-learn's greedy k-means++: the first seed uniformly at random; each next seed is the best (lowest
    potential) of 2 + floor(log R) candidates drawn with probability proportional to the squared distance
    to the closest seed so far.
    """
    batch, num_points = points.valid.shape
    device = points.data.device
    num_trials = 2 + int(math.log(num_subclusters))
    sizes = points.sizes[:, None]
    uniform = torch.rand(batch, num_restarts, generator=generator, dtype=torch.float64).to(device)
    first = torch.minimum((uniform * sizes).long(), sizes - 1)
    seeds = [first]
    closest = _sq_dist_to_points(points, first)  # [B, S, M]
    potential = closest.sum(-1)
    for _ in range(1, num_subclusters):
        draws = torch.rand(batch, num_restarts, num_trials, generator=generator, dtype=torch.float64).to(
            device
        )
        targets = draws * potential[:, :, None]
        candidates = torch.searchsorted(closest.cumsum(-1).contiguous(), targets.contiguous())
        candidates = torch.minimum(candidates, sizes[:, :, None] - 1)  # [B, S, T]
        dist = _sq_dist_to_points(points, candidates.reshape(batch, -1))
        dist = torch.minimum(dist.reshape(batch, num_restarts, num_trials, num_points), closest[:, :, None])
        trial_potential = dist.sum(-1)  # [B, S, T]
        best = trial_potential.argmin(-1, keepdim=True)  # first minimum, as numpy
        closest = dist.gather(2, best[..., None].expand(-1, -1, 1, num_points)).squeeze(2)
        potential = trial_potential.gather(2, best).squeeze(2)
        seeds.append(candidates.gather(2, best).squeeze(2))
    return torch.stack(seeds, dim=-1)


def _subset(points: _Points, keep: Tensor) -> _Points:
    """The clusters ``keep`` ([B] bool) of a bucket."""
    return points._replace(
        data=points.data[keep],
        sq_norms=points.sq_norms[keep],
        valid=points.valid[keep],
        sizes=points.sizes[keep],
    )


def _relocated(labels: Tensor, own_dist: Tensor, empty: Tensor, valid: Tensor) -> Tensor:
    """[B, S, M] labels for the centre update with every empty centre given a far point, as scikit-learn.

    scikit-learn moves each empty centre onto one of the points farthest from their own centre (the j-th
    empty centre gets the j-th farthest point here) and removes that point from its old cluster's mean.

    Args:
        labels: [B, S, M] assignments; own_dist: [B, S, M] squared distance to the assigned centre;
        empty: [B, S, R] centres without a point; valid: [B, M] padding mask.
    """
    far = own_dist.masked_fill(~valid[:, None, :], -1.0).argsort(dim=-1, descending=True, stable=True)
    rank = empty.cumsum(-1) - 1
    labels = labels.clone()
    for j in range(empty.shape[2] - 1):  # at most R - 1 centres can be empty
        target = (rank == j) & empty
        point = far[..., j : j + 1]
        current = labels.gather(2, point)
        labels.scatter_(
            2,
            point,
            torch.where(target.any(-1, keepdim=True), target.long().argmax(-1, keepdim=True), current),
        )
    return labels


def _batched_kmeans(
    points: _Points, num_subclusters: int, num_restarts: int, generator: torch.Generator
) -> Tensor:
    """[B, R, M] centre weights (centres = weights @ member features) of the best restart per cluster.

    Lloyd's algorithm as in scikit-learn, run for all clusters and restarts at once; each (cluster, restart)
    stops on its own when its labels no longer change or its total squared centre shift is <= tol. Empty
    centres move to far points as in scikit-learn (a centre left empty even then keeps its position).
    Clusters whose restarts have all stopped leave the batch once they are half of it.
    """
    batch, num_points = points.valid.shape
    device, R, S = points.data.device, num_subclusters, num_restarts
    sizes = points.sizes.to(torch.float64)
    # scikit-learn's tolerance: tol * mean over the D dimensions of the per-dimension variance, from
    # sum_d var_d = mean |x|^2 - |mean x|^2, with |sum x|^2 = sum_ij G_ij.
    mean_sq = points.sq_norms.sum(1) / sizes
    if points.use_gram:
        sum_sq = points.data.sum((1, 2))
    else:
        sum_sq = (points.data.sum(1, dtype=torch.float64) ** 2).sum(-1)
    tol = RELATIVE_TOL * (mean_sq - sum_sq / sizes**2).clamp_min(0.0) / points.num_dims  # [B]

    seeds = _kmeans_plus_plus(points, R, S, generator)  # [B, S, R]
    weights = torch.zeros(batch, S, R, num_points, dtype=torch.float64, device=device)
    weights.scatter_(3, seeds[..., None], 1.0)
    subcluster_ids = torch.arange(R, device=device)[None, None, :, None]
    # The working set: clusters with a restart still iterating.
    work = torch.arange(batch, device=device)
    work_points, work_weights, work_tol = points, weights, tol
    centres = _centre_products(points, weights.reshape(batch, S * R, num_points))
    labels_old = torch.full((batch, S, num_points), -1, dtype=torch.long, device=device)
    active = torch.ones(batch, S, dtype=torch.bool, device=device)
    for _ in range(MAX_ITER):
        size = work.numel()
        valid = work_points.valid
        dist = _sq_dist_to_centres(work_points, centres)
        own_dist, labels = dist.reshape(size, num_points, S, R).min(-1)
        labels, own_dist = labels.transpose(1, 2), own_dist.transpose(1, 2)  # [W, S, M]
        onehot = (labels[:, :, None, :] == subcluster_ids) & valid[:, None, None, :]  # [W, S, R, M]
        counts = onehot.sum(-1)
        if bool((counts == 0).any()):
            moved = _relocated(labels, own_dist, counts == 0, valid)
            onehot = (moved[:, :, None, :] == subcluster_ids) & valid[:, None, None, :]
            counts = onehot.sum(-1)
        counts = counts[..., None]
        new_weights = torch.where(counts > 0, onehot / counts.clamp_min(1), work_weights)
        # Products only for the restarts still running somewhere in the working set.
        restarts = torch.nonzero(active.any(0))[:, :1]
        columns = (restarts * R + torch.arange(R, device=device)).reshape(-1)  # of the S * R centres
        flat_new = new_weights.reshape(size, S * R, num_points)[:, columns]
        new_centres = _centre_products(work_points, flat_new)
        old_dots, old_sq_norms = centres.dots[:, :, columns], centres.sq_norms[:, columns]
        # Centre shift |c_new - c_old|^2 = |c_new|^2 - 2 c_new . c_old + |c_old|^2 from the products
        # already at hand: c_new . c_old = sum_i w_new,i (x_i . c_old).
        if centres.coords is not None and new_centres.coords is not None:
            move = new_centres.coords - centres.coords[:, columns]
            column_shift = (move.to(torch.float64) ** 2).sum(-1)
        else:
            cross = (flat_new * old_dots.transpose(1, 2)).sum(-1)
            column_shift = (new_centres.sq_norms - 2.0 * cross + old_sq_norms).clamp_min(0.0)
        shift = torch.zeros(size, S * R, dtype=torch.float64, device=device)
        shift = shift.index_copy(1, columns, column_shift).reshape(size, S, R).sum(-1)
        unchanged = ((labels == labels_old) | ~valid[:, None, :]).all(-1)
        step = active.repeat_interleave(R, dim=1)[:, columns]  # [W, columns]
        centres = _Centres(
            centres.dots.index_copy(2, columns, torch.where(step[:, None, :], new_centres.dots, old_dots)),
            centres.sq_norms.index_copy(1, columns, torch.where(step, new_centres.sq_norms, old_sq_norms)),
            None
            if centres.coords is None or new_centres.coords is None
            else centres.coords.index_copy(
                1, columns, torch.where(step[:, :, None], new_centres.coords, centres.coords[:, columns])
            ),
        )
        work_weights = torch.where(active[:, :, None, None], new_weights, work_weights)
        labels_old = torch.where(active[:, :, None], labels, labels_old)
        # Both stopping rules of scikit-learn: strict label convergence, or centre shift <= tol.
        active = active & ~(unchanged | (shift <= work_tol[:, None]))
        keep = active.any(1)
        if not bool(keep.any()):
            break
        if 2 * int(keep.sum()) <= size:
            weights[work] = work_weights
            work, work_points, work_weights = work[keep], _subset(work_points, keep), work_weights[keep]
            work_tol, labels_old, active = work_tol[keep], labels_old[keep], active[keep]
            coords = None if centres.coords is None else centres.coords[keep]
            centres = _Centres(centres.dots[keep], centres.sq_norms[keep], coords)
    weights[work] = work_weights

    # Final E-step with the last centres (scikit-learn does the same after a tol stop), then the inertia.
    dist = _sq_dist_to_centres(points, _centre_products(points, weights.reshape(batch, S * R, num_points)))
    closest = dist.reshape(batch, num_points, S, R).amin(-1)  # [B, M, S]
    inertia = (closest * points.valid[:, :, None]).sum(1)  # [B, S]
    best = inertia.argmin(-1)  # first minimum: the earliest restart wins ties, as in scikit-learn
    return weights[torch.arange(batch, device=device), best]


def _check_inputs(features: Tensor, coarse_labels: np.ndarray, num_subclusters: int) -> np.ndarray:
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(
            f"features must be an [N, D] float tensor; got shape {tuple(features.shape)}, {features.dtype}"
        )
    labels = np.asarray(coarse_labels)
    if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"coarse_labels must be [N] = [{features.shape[0]}] integers; got shape {labels.shape}, "
            f"{labels.dtype}"
        )
    if isinstance(num_subclusters, bool) or not isinstance(num_subclusters, (int, np.integer)):
        raise ValueError(f"num_subclusters must be an int >= 1; got {num_subclusters!r}")
    if num_subclusters < 1:
        raise ValueError(f"num_subclusters must be >= 1; got {num_subclusters}")
    if labels.min(initial=-1) < -1:
        raise ValueError(f"coarse_labels must be >= -1 (-1 = outlier); got {labels.min()}")
    if labels.max(initial=-1) < 0:
        raise ValueError("coarse_labels holds no cluster (all outliers); nothing to refine")
    counts = np.bincount(labels[labels >= 0])
    if (counts == 0).any():
        raise ValueError(
            f"coarse_labels must number the clusters 0..L-1 without gaps; cluster "
            f"{int(np.flatnonzero(counts == 0)[0])} is empty"
        )
    return labels.astype(np.int64, copy=False)


def _buckets(cluster_ids: np.ndarray, sizes: np.ndarray, width: int, num_dims: int) -> list[np.ndarray]:
    """Groups of clusters of similar size (at most 2x apart), each small enough for one batched call."""
    order = cluster_ids[np.argsort(sizes[cluster_ids], kind="stable")]
    groups: list[np.ndarray] = []
    start = 0
    for end in range(1, order.size + 1):
        if end < order.size:
            size = int(sizes[order[end]])
            per_cluster = size * (max(size, width) if size <= num_dims else num_dims + width)
            if size <= 2 * sizes[order[start]] and (end - start + 1) * per_cluster <= BUCKET_ELEMENTS:
                continue
        groups.append(order[start:end])
        start = end
    return groups


def _padded_points(
    features: Tensor, members: np.ndarray, starts: np.ndarray, sizes: np.ndarray, clusters: np.ndarray
) -> tuple[_Points, Tensor]:
    """The bucket ``clusters`` as padded points, and its [B, M, D] member features (padding: a repeat).

    Products of features are computed in their dtype (scikit-learn runs float32 k-means in float32); the
    Gram matrices and the distances are then float64. Clusters larger than D stay in feature space.
    Padding rows repeat a member: they are masked everywhere and get zero centre weight.
    """
    device = features.device
    width = int(sizes[clusters].max())
    offsets = np.arange(width)[None, :]
    valid_np = offsets < sizes[clusters][:, None]
    position = starts[clusters][:, None] + np.minimum(offsets, sizes[clusters][:, None] - 1)
    valid = torch.from_numpy(valid_np).to(device)
    member_features = features[torch.from_numpy(members[position]).to(device)]  # [B, M, D]
    num_dims = features.shape[1]
    mask = valid.to(torch.float64)
    if width <= num_dims:
        gram = torch.bmm(member_features, member_features.transpose(1, 2)).to(torch.float64)
        data = gram * mask[:, :, None] * mask[:, None, :]
        sq_norms, use_gram = torch.diagonal(data, dim1=1, dim2=2), True
    else:
        data = member_features * valid[:, :, None]
        sq_norms, use_gram = (data.to(torch.float64) ** 2).sum(-1), False
    sizes_t = torch.from_numpy(sizes[clusters].astype(np.int64)).to(device)
    return _Points(data, use_gram, sq_norms, valid, sizes_t, num_dims), member_features


def subcluster_prototypes(
    features: Tensor, coarse_labels: np.ndarray, num_subclusters: int, seed: int = 0
) -> Tensor:
    """R L2-normalised k-means prototypes inside every coarse cluster (docs/method.md section 4).

    Clusters with more than R members: scikit-learn-style k-means (k-means++ seeding, 10 restarts, the lowest
    inertia kept, at most 300 Lloyd iterations, tol 1e-4) on the member features, all clusters and restarts
    batched. Clusters with R or fewer members: R copies of the member mean. Outliers (-1) are ignored.
    The seeding draws from a torch generator seeded with ``seed``, so results are deterministic per seed
    (but not the same random stream as scikit-learn: equal up to k-means' own seed dependence).

    Args:
        features: [N, D] float features (L2-normalised).
        coarse_labels: [N] int labels 0..L-1 (every cluster non-empty), -1 for outliers.
        num_subclusters: R, prototypes per cluster (paper: R), >= 1.
        seed: Seed of the k-means++ draws.

    Returns:
        [L, R, D] unit prototypes, on the device and in the dtype of ``features``.
    """
    labels = _check_inputs(features, coarse_labels, num_subclusters)
    sizes = np.bincount(labels[labels >= 0])
    members = np.flatnonzero(labels >= 0)
    members = members[np.argsort(labels[members], kind="stable")]  # grouped by cluster, index order inside
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    num_clusters, num_dims = sizes.size, features.shape[1]
    prototypes = torch.empty(
        num_clusters, num_subclusters, num_dims, dtype=torch.float64, device=features.device
    )

    small = np.flatnonzero(sizes <= num_subclusters)
    if small.size:
        cluster_of = torch.from_numpy(labels).to(features.device)
        is_small = torch.from_numpy(np.isin(labels, small)).to(features.device)
        sums = torch.zeros(num_clusters, num_dims, dtype=torch.float64, device=features.device)
        sums.index_add_(0, cluster_of[is_small], features[is_small].to(torch.float64))
        small_t = torch.from_numpy(small).to(features.device)
        prototypes[small_t] = sums[small_t, None, :]  # the mean up to scale: normalised below

    generator = torch.Generator().manual_seed(seed)
    large = np.flatnonzero(sizes > num_subclusters)
    for clusters in _buckets(large, sizes, NUM_RESTARTS * num_subclusters, num_dims):
        points, member_features = _padded_points(features, members, starts, sizes, clusters)
        weights = _batched_kmeans(points, num_subclusters, NUM_RESTARTS, generator)  # [B, R, M]
        centres = torch.bmm(weights.to(features.dtype), member_features)  # zero weight on padding
        prototypes[torch.from_numpy(clusters).to(features.device)] = centres.to(torch.float64)
    return torch.nn.functional.normalize(prototypes, dim=2).to(features.dtype)


def refine_labels(
    features: Tensor, coarse_labels: np.ndarray, num_subclusters: int, seed: int = 0
) -> np.ndarray:
    """Refined labels: every sample re-assigned to the cluster of highest summed prototype similarity.

    docs/method.md section 4: y_i = argmax_l sum_r <c_lr, f_i> over all L coarse clusters, for every
    sample, outliers included (the paper averages over r instead of summing: same argmax). R = 1 is
    nearest-normalised-centroid re-assignment.

    Args:
        features: [N, D] float features (L2-normalised).
        coarse_labels: [N] int DBSCAN labels 0..L-1, -1 for outliers.
        num_subclusters: R, prototypes per cluster (paper: R).
        seed: Seed of the k-means++ draws.

    Returns:
        [N] int64 refined labels in 0..L-1.
    """
    prototypes = subcluster_prototypes(features, coarse_labels, num_subclusters, seed=seed)
    summed = prototypes.sum(1)  # [L, D]: sum_r <c_lr, f> = <sum_r c_lr, f>
    rows = max(1, SCORE_ELEMENTS // summed.shape[0])
    refined = [
        (chunk @ summed.T).argmax(1) for chunk in torch.split(features, rows)
    ]  # argmax: first maximum on ties
    return torch.cat(refined).cpu().numpy().astype(np.int64)
