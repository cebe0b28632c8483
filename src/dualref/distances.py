"""Exact k-nearest neighbours, the sparse k-reciprocal Jaccard distance and test-time re-ranking.

Everything here works in O(N * k) memory: no function allocates an N x N matrix. The only O(N^2)
work is the unavoidable similarity scan of `knn`, done block by block (each block of F F^T is
computed once and serves both its rows and, transposed, its columns).

Semantics (docs/method.md section 3, "Jaccard distance as implemented", the k-reciprocal
encoding of Zhong et al., CVPR 2017, as used by MMT and Dual-Refinement):

1. ``d_ij = 2 - 2 f_i.f_j`` (squared Euclidean distance of unit vectors), each row divided by its
   own maximum over all N columns: ``d~_ij = d_ij / max_j d_ij``. Only the row's minimum
   similarity is needed for that.
2. ``R(i, k)``: those of i's top-(k+1) neighbours (self included) whose own top-(k+1) contains i.
3. Expansion: ``E(i) = R(i, k1)`` plus ``R(c, h)``, h = round(k1/2), for every c in ``R(i, k1)``
   with ``|R(c, h) & R(i, k1)| > 2/3 |R(c, h)|``. (``round`` halves to even, like numpy's.)
4. ``V_ij = exp(-d~_ij) / sum_{j' in E(i)} exp(-d~_ij')`` for j in E(i), else 0.
5. Query expansion (k2 > 1): ``V_i <- mean of V_n over n in the top-k2 of i`` (self included).
6. ``S_ij = sum_k min(V_ik, V_jk)``, ``J_ij = max(0, 1 - S_ij / (2 - S_ij))``.

Ties: neighbour lists are ordered by similarity, descending, then by index, ascending. A row whose
k-th and (k+1)-th similarities are exactly equal (so that membership of the top-k depends on the
tie) is recomputed on its own and ordered by a stable sort, so the lower index wins. Similarities
are those of the float32 matrix product; the reference's dense argsort breaks ties arbitrarily.

Size: over 400 lines because k-NN, the k-reciprocal sets, the sparse Jaccard and re-ranking share the
blocked-similarity and tie-handling helpers; splitting it would spread one algorithm over files.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

# Block edge of the F F^T scan: a 2048 x 2048 float32 block is 16 MiB.
_DEFAULT_CHUNK = 2048
# Rows per step of the reciprocal-set and expansion code ([rows, 21, 21] int64 = 28 MiB at 8192
# rows).
_ROW_STEP = 8192
# Pair contributions generated per step of the sparse min-sum / query-expansion accumulation.
_MAX_TRIPLES = 1 << 22
# Size of the per-step accumulator (rows of the step x N columns), in entries (float32 + int32
# each).
_ACCUMULATOR_ENTRIES = 1 << 23
# Most candidates per row for which a block is merged by comparison rather than a full top-k.
_MAX_CANDIDATES = 64
# Gathered feature pairs per step when a similarity is not already known from the neighbour lists.
_PAIRS_PER_DOT = 4096


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the enclosed (small, memory-bound) tensor ops with one intra-op thread on CPU.

    Each parallel torch op forks and joins its OpenMP team; on a shared 2-core machine a join waits
    for a descheduled thread. Measured under load ~15: 20 sorts of 80k keys took 4.7 s with 2
    threads and 0.18 s with 1. The big matrix products stay multi-threaded (they are outside).
    Restores the previous thread count; CUDA work is unaffected.
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Neighbors(NamedTuple):
    """Exact top-k neighbours of every row of a feature matrix within the same matrix.

    Attributes:
        indices: [N, k] int64, sorted by similarity descending (ties: lower index first); a
            row's own index is normally its first entry.
        sims: [N, k] cosine similarities matching `indices` (float32; float64 for float64 features).
        min_sims: [N] minimum similarity of each row over all N columns (self included); gives the
            row maximum of the distance 2 - 2 s used for the reference's row normalisation.
    """

    indices: Tensor
    sims: Tensor
    min_sims: Tensor


def _prepared_features(
    features: Tensor, device: str | torch.device | None, name: str = "features"
) -> Tensor:
    """Validate a [N, D] feature matrix; return it L2-normalised on `device`.

    float64 stays float64 (exact comparisons in tests); other floating dtypes become float32.
    """
    if not isinstance(features, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of shape [N, D], got {type(features).__name__}"
        )
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape [N, D] with N, D >= 1, got {tuple(features.shape)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    target = torch.device(device) if device is not None else features.device
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    feats = features.detach().to(device=target, dtype=dtype)
    if not bool(torch.isfinite(feats).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    norms = feats.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        bad = int(torch.nonzero(norms[:, 0] == 0)[0, 0])
        raise ValueError(f"{name} row {bad} is all zeros; cannot L2-normalise it")
    # Callers promise unit vectors; normalising again is cheap and keeps d = 2 - 2 s meaningful.
    return feats / norms


def _merge_top(
    best_sims: Tensor,
    best_idx: Tensor,
    rows: slice,
    block: Tensor,
    col_offset: int,
    transposed: bool,
) -> None:
    """Merge the row-wise top-k of a similarity block into best[rows], in place.

    `block` is [rows, cols] with first column col_offset, or [cols, rows] when `transposed` (the
    block serves its columns). Once every row holds k candidates, only entries >= the row's current
    k-th similarity can enter; they are few, so a comparison finds them, much cheaper than a full
    top-k. Entries equal to the k-th are kept, so tie detection afterwards stays exact.
    """
    k = best_sims.shape[1]
    num_rows = block.shape[1] if transposed else block.shape[0]
    kth = best_sims[rows, k - 1]
    if bool(torch.isfinite(kth).all()):
        # Compare in the block's own (contiguous) layout: nonzero on a transposed view is slow.
        if transposed:
            c, r = torch.nonzero(block >= kth[None, :], as_tuple=True)
            order = torch.sort(r, stable=True).indices
            r, c = r[order], c[order]
            cand = block[c, r]
        else:
            r, c = torch.nonzero(block >= kth[:, None], as_tuple=True)  # r ascending
            cand = block[r, c]
        counts = torch.bincount(r, minlength=num_rows)
        width = int(counts.max()) if r.numel() > 0 else 0
        if width == 0:
            return
        if width <= _MAX_CANDIDATES:
            slot = torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]
            vals = torch.full((num_rows, width), -torch.inf, dtype=block.dtype, device=block.device)
            pos = torch.full((num_rows, width), -1, dtype=torch.int64, device=block.device)
            vals[r, slot] = cand
            pos[r, slot] = c + col_offset
            _keep_top(best_sims, best_idx, rows, vals, pos)
            return
    view = block.T.contiguous() if transposed else block
    vals, pos = view.topk(min(k, view.shape[1]), dim=1)
    _keep_top(best_sims, best_idx, rows, vals, pos + col_offset)


def _keep_top(best_sims: Tensor, best_idx: Tensor, rows: slice, vals: Tensor, idx: Tensor) -> None:
    """best[rows] <- top-k of best[rows] and the candidates (vals, idx), both [rows, *]."""
    cand_sims = torch.cat([best_sims[rows], vals], dim=1)
    cand_idx = torch.cat([best_idx[rows], idx], dim=1)
    top_vals, top_pos = cand_sims.topk(best_sims.shape[1], dim=1)
    best_sims[rows] = top_vals
    best_idx[rows] = cand_idx.gather(1, top_pos)


def _sorted_by_sim_then_index(sims: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row by similarity descending, ties by index ascending (two stable sorts)."""
    by_index = idx.argsort(dim=1, stable=True)
    sims, idx = sims.gather(1, by_index), idx.gather(1, by_index)
    by_sim = sims.argsort(dim=1, descending=True, stable=True)
    return sims.gather(1, by_sim), idx.gather(1, by_sim)


def _knn_normalised(feats: Tensor, k: int, chunk_size: int) -> Neighbors:
    """`knn` on already validated, L2-normalised features."""
    n = feats.shape[0]
    # One spare neighbour tells whether the k-th place is tied with the next one.
    kk = min(k + 1, n)
    best_sims = torch.full((n, kk), -torch.inf, dtype=feats.dtype, device=feats.device)
    best_idx = torch.full((n, kk), -1, dtype=torch.int64, device=feats.device)
    min_sims = torch.full((n,), torch.inf, dtype=feats.dtype, device=feats.device)
    starts = range(0, n, chunk_size)
    for a in starts:
        rows_a = slice(a, min(a + chunk_size, n))
        for b in starts:
            if b < a:
                continue  # F F^T is symmetric: block (b, a) is the transpose of block (a, b)
            rows_b = slice(b, min(b + chunk_size, n))
            block = feats[rows_a] @ feats[rows_b].T
            with _one_thread_on_cpu(feats.device):
                _merge_top(best_sims, best_idx, rows_a, block, b, transposed=False)
                min_sims[rows_a] = torch.minimum(min_sims[rows_a], block.amin(dim=1))
                if b != a:
                    _merge_top(best_sims, best_idx, rows_b, block, a, transposed=True)
                    min_sims[rows_b] = torch.minimum(min_sims[rows_b], block.amin(dim=0))
    best_sims, best_idx = _sorted_by_sim_then_index(best_sims, best_idx)
    if kk > k:
        tied = torch.nonzero(best_sims[:, k - 1] == best_sims[:, k])[:, 0]
        for start in range(0, tied.numel(), chunk_size):
            rows = tied[start : start + chunk_size]
            full = feats[rows] @ feats.T
            order = full.argsort(dim=1, descending=True, stable=True)[:, :kk]
            best_idx[rows] = order
            best_sims[rows] = full.gather(1, order)
    return Neighbors(best_idx[:, :k].contiguous(), best_sims[:, :k].contiguous(), min_sims)


def knn(
    features: Tensor,
    k: int,
    *,
    chunk_size: int = _DEFAULT_CHUNK,
    device: str | torch.device | None = None,
) -> Neighbors:
    """Exact top-k cosine neighbours of every row within `features` (self included), blocked F F^T.

    The same code runs on CPU and CUDA. Memory: O(N * k) plus one chunk_size x chunk_size block.

    Args:
        features: [N, D] float features; L2-normalised here (rows must be non-zero and finite).
        k: neighbours per row, 1 <= k <= N.
        chunk_size: edge of the similarity blocks.
        device: where to compute; default: the device of `features`.

    Returns:
        Neighbors(indices [N, k] int64, sims [N, k], min_sims [N]) on the compute device; sims are
        float32 (float64 for float64 features).
        Ties are broken by the lower index (see the module docstring).
    """
    feats = _prepared_features(features, device)
    n = feats.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k!r} is not valid; expected 1 <= k <= N={n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected a positive integer")
    return _knn_normalised(feats, k, chunk_size)


def _reciprocal_mask(top: Tensor, k: int) -> Tensor:
    """[N, k+1] bool: whether top[i, p] (p <= k) has i among its own top-(k+1)."""
    lists = top[:, : k + 1]
    n = lists.shape[0]
    mask = torch.empty(lists.shape, dtype=torch.bool, device=top.device)
    for r0 in range(0, n, _ROW_STEP):
        block = lists[r0 : r0 + _ROW_STEP]
        rows = torch.arange(r0, r0 + block.shape[0], device=top.device)
        mask[r0 : r0 + block.shape[0]] = (lists[block] == rows[:, None, None]).any(dim=2)
    return mask


class _SparseRows(NamedTuple):
    """CSR-like sparse matrix in torch: entry e = (rows[e], cols[e], vals[e]), row-major order."""

    indptr: Tensor  # [N + 1] int64
    rows: Tensor  # [nnz] int64
    cols: Tensor  # [nnz] int64
    vals: Tensor  # [nnz] float32


def _pair_sims(feats: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """[P] dot products feats[rows[p]] . feats[cols[p]], in bounded-size steps."""
    out = torch.empty(rows.shape, dtype=feats.dtype, device=feats.device)
    for s in range(0, rows.numel(), _PAIRS_PER_DOT):
        a = feats[rows[s : s + _PAIRS_PER_DOT]]
        b = feats[cols[s : s + _PAIRS_PER_DOT]]
        out[s : s + _PAIRS_PER_DOT] = torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return out


def _encoding(feats: Tensor, nbrs: Neighbors, k1: int) -> _SparseRows:
    """The k-reciprocal encoding V (steps 2-4 of the module docstring) before query expansion."""
    n = feats.shape[0]
    half = round(k1 / 2)  # Python's round halves to even, like numpy.around in the reference
    top = nbrs.indices
    a, b = k1 + 1, half + 1
    lists1, mask1 = top[:, :a], _reciprocal_mask(top, k1)
    lists_h, mask_h = top[:, :b], _reciprocal_mask(top, half)
    # Similarities already known from the neighbour lists, sorted by index for lookups.
    known_idx, order = top.sort(dim=1)
    known_sims = nbrs.sims.gather(1, order)
    # Row maximum of d = 2 - 2 s, over all N columns.
    row_max = 2.0 - 2.0 * nbrs.min_sims
    # All rows (nearly) identical to row i: the reference would divide by ~0; refuse instead.
    degenerate = row_max <= 16 * torch.finfo(row_max.dtype).eps
    if bool(degenerate.any()):
        bad = int(torch.nonzero(degenerate)[0, 0])
        raise ValueError(
            f"features row {bad} is identical to every other row (row-max distance"
            f" {float(row_max[bad]):.3g}); expected distinct features"
        )

    counts, all_cols, all_vals = [], [], []
    for r0 in range(0, n, _ROW_STEP):
        l1, m1 = lists1[r0 : r0 + _ROW_STEP], mask1[r0 : r0 + _ROW_STEP]
        m = l1.shape[0]
        sentinel = torch.full_like(l1, n)
        recip = torch.where(m1, l1, sentinel)  # R(i, k1), padded with the sentinel N
        members = recip.sort(dim=1).values
        cand_half, cand_mask = (
            lists_h[l1],
            mask_h[l1],
        )  # [m, a, b]: R(c, half) for each c in i's top-(k1+1)
        flat = cand_half.reshape(m, a * b)
        pos = torch.searchsorted(members, flat).clamp_(max=a - 1)
        inside = (members.gather(1, pos) == flat).view(m, a, b) & cand_mask
        size = cand_mask.sum(dim=2)
        # |R(c,half) & R(i,k1)| > 2/3 |R(c,half)|, in integers (same outcome as the float test for
        # sizes < 2^50)
        accept = m1 & (3 * inside.sum(dim=2) > 2 * size)
        added = torch.where(accept[:, :, None] & cand_mask, cand_half, n).reshape(m, a * b)
        cand = torch.cat([recip, added], dim=1).sort(dim=1).values
        keep = cand < n
        keep[:, 1:] &= cand[:, 1:] != cand[:, :-1]  # unique
        # Similarity of each candidate: from i's own neighbour list when there, else a direct dot
        # product.
        known_k, known_s = known_idx[r0 : r0 + m], known_sims[r0 : r0 + m]
        kpos = torch.searchsorted(known_k, cand).clamp_(max=known_k.shape[1] - 1)
        hit = known_k.gather(1, kpos) == cand
        sims = torch.where(hit, known_s.gather(1, kpos), 0.0)
        miss_r, miss_c = torch.nonzero(keep & ~hit, as_tuple=True)
        if miss_r.numel() > 0:
            sims[miss_r, miss_c] = _pair_sims(feats, miss_r + r0, cand[miss_r, miss_c])
        dist = (2.0 - 2.0 * sims) / row_max[r0 : r0 + m, None]
        weights = torch.where(keep, torch.exp(-dist), 0.0)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(
            torch.finfo(weights.dtype).tiny
        )
        counts.append(keep.sum(dim=1))
        all_cols.append(cand[keep])
        all_vals.append(weights[keep])
    row_counts = torch.cat(counts)
    indptr = torch.zeros(n + 1, dtype=torch.int64, device=feats.device)
    indptr[1:] = row_counts.cumsum(0)
    rows = torch.repeat_interleave(torch.arange(n, device=feats.device), row_counts)
    return _SparseRows(indptr, rows, torch.cat(all_cols), torch.cat(all_vals))


def _expand_segments(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Enumerate segments [starts[s], starts[s] + counts[s]): (segment id, position) per element."""
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    shift = starts - (counts.cumsum(0) - counts)  # position minus running element number
    pos = torch.arange(seg.numel(), device=counts.device) + shift[seg]
    return seg, pos


def _row_steps(costs: Tensor, max_rows: int) -> list[tuple[int, int]]:
    """Split rows into consecutive ranges of <= max_rows rows and about _MAX_TRIPLES total cost."""
    cum = costs.cumsum(0).cpu().numpy()
    n = cum.shape[0]
    steps, r0 = [], 0
    while r0 < n:
        base = cum[r0 - 1] if r0 > 0 else 0
        r1 = int(np.searchsorted(cum, base + _MAX_TRIPLES, side="right"))
        r1 = min(max(r1, r0 + 1), r0 + max_rows, n)
        steps.append((r0, r1))
        r0 = r1
    return steps


class _KeySums:
    """Sums values by integer key over a bounded key range, in O(number of values) per call.

    The dense buffer is touched only where keys fall; a second buffer records one owner per key,
    so the distinct keys are found without sorting all values or scanning the buffer.
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.acc = torch.zeros(capacity, dtype=dtype, device=device)
        self.owner = torch.empty(capacity, dtype=torch.int32, device=device)

    def __call__(self, keys: Tensor, vals: Tensor) -> tuple[Tensor, Tensor]:
        """Return (distinct keys ascending, their sums) and leave the buffer zeroed again."""
        self.acc.index_add_(0, keys, vals)
        ticket = torch.arange(keys.numel(), dtype=torch.int32, device=keys.device)
        self.owner[keys] = ticket  # one arbitrary writer per key wins; that is all we need
        distinct = keys[self.owner[keys] == ticket].sort().values
        sums = self.acc[distinct]
        self.acc[distinct] = 0.0
        return distinct, sums


def _query_expanded(v: _SparseRows, top: Tensor, k2: int) -> _SparseRows:
    """V_i <- mean of V_n over n in top[i, :k2] (reference step 6), sparse."""
    n = v.indptr.numel() - 1
    device = v.vals.device
    row_nnz = v.indptr[1:] - v.indptr[:-1]
    nbrs = top[:, :k2]
    costs = row_nnz[nbrs].sum(dim=1)
    max_rows = max(1, _ACCUMULATOR_ENTRIES // n)
    sums = _KeySums(max_rows * n, v.vals.dtype, device)
    counts, cols, vals = [], [], []
    for r0, r1 in _row_steps(costs, max_rows):
        seg_rows = nbrs[r0:r1].reshape(-1)
        seg, pos = _expand_segments(v.indptr[seg_rows], row_nnz[seg_rows])
        local_row = seg // k2
        keys, total = sums(local_row * n + v.cols[pos], v.vals[pos])
        counts.append(torch.bincount(keys // n, minlength=r1 - r0))
        cols.append(keys % n)
        vals.append(total / k2)
    row_counts = torch.cat(counts)
    indptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
    indptr[1:] = row_counts.cumsum(0)
    rows = torch.repeat_interleave(torch.arange(n, device=device), row_counts)
    return _SparseRows(indptr, rows, torch.cat(cols), torch.cat(vals))


class _Columns(NamedTuple):
    """Column-major view of a _SparseRows: CSC arrays plus, per CSR entry, its CSC position."""

    colptr: Tensor  # [N + 1]
    rows: Tensor  # [nnz] rows ascending within each column
    vals: Tensor  # [nnz]
    csc_pos: Tensor  # [nnz] position of CSR entry e in the CSC arrays


def _columns(v: _SparseRows, n: int) -> _Columns:
    order = torch.sort(v.cols, stable=True).indices  # stable: rows stay ascending within a column
    colptr = torch.zeros(n + 1, dtype=torch.int64, device=v.cols.device)
    colptr[1:] = torch.bincount(v.cols, minlength=n).cumsum(0)
    csc_pos = torch.empty_like(order)
    csc_pos[order] = torch.arange(order.numel(), device=order.device)
    return _Columns(colptr, v.rows[order], v.vals[order], csc_pos)


def _min_sums(
    v: _SparseRows,
    cols: _Columns,
    row_range: tuple[int, int],
    partner_start: Tensor,
    num_keys_per_row: int,
    key_offset: int,
    consume: _KeySums | None,
    dense_out: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """S_ij = sum_k min(V_ik, V_jk) for rows i in row_range and the partners j of each column k.

    The partners of CSR entry e = (i, k) are the CSC entries of column k at positions
    [partner_start[e], colptr[k + 1]). Either returns (i, j, S) for the distinct pairs (via
    `consume`) or adds S into `dense_out`, a flat [rows * num_keys_per_row] buffer with key
    (i - r0) * num_keys_per_row + (j - key_offset).
    """
    r0, r1 = row_range
    lo, hi = int(v.indptr[r0]), int(v.indptr[r1])
    entry_cols = v.cols[lo:hi]
    seg, pos = _expand_segments(
        partner_start[lo:hi], cols.colptr[entry_cols + 1] - partner_start[lo:hi]
    )
    contrib = torch.minimum(v.vals[lo:hi][seg], cols.vals[pos])
    row_keys = (v.rows[lo:hi] - r0) * num_keys_per_row - key_offset  # per entry: few, cheap
    keys = row_keys[seg] + cols.rows[pos]
    if dense_out is not None:
        dense_out.index_add_(0, keys, contrib)
        return None
    assert consume is not None
    distinct, sums = consume(keys, contrib)
    return distinct // num_keys_per_row + r0, distinct % num_keys_per_row + key_offset, sums


def _validated_params(n: int, k1: int, k2: int, chunk_size: int) -> None:
    if k1 < 1:
        raise ValueError(f"k1={k1!r} is not valid; expected k1 >= 1")
    if k2 < 1:
        raise ValueError(f"k2={k2!r} is not valid; expected k2 >= 1")
    if n <= k1:
        raise ValueError(f"N={n} samples are too few for k1={k1}; expected N > k1")
    if k2 > n:
        raise ValueError(f"k2={k2!r} is not valid; expected k2 <= N={n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; expected a positive integer")


def _expanded_encoding(
    feats: Tensor, k1: int, k2: int, chunk_size: int
) -> tuple[_SparseRows, Neighbors]:
    """Neighbours, the k-reciprocal encoding V and its query expansion (reference steps 1-5)."""
    nbrs = _knn_normalised(feats, max(k1 + 1, k2), chunk_size)
    with _one_thread_on_cpu(feats.device):
        v = _encoding(feats, nbrs, k1)
        if k2 > 1:
            v = _query_expanded(v, nbrs.indices, k2)
    return v, nbrs


def jaccard_distance(
    features: Tensor,
    k1: int = 20,
    k2: int = 6,
    *,
    device: str | torch.device | None = None,
    chunk_size: int = _DEFAULT_CHUNK,
) -> sparse.csr_matrix:
    """k-reciprocal Jaccard distance between all rows of `features`, as the reference computes it.

    Semantics: see the module docstring (docs/method.md section 3). Runs in O(N * k)
    memory; everything (plain tensor code) runs on `device`.

    The result's invariants, which the clustering relies on:
    - a scipy CSR matrix [N, N], float32, with sorted column indices in every row;
    - it stores exactly the pairs with J < 1, i.e. the pairs whose encodings share support;
      **an absent entry means exactly 1.0**, and a stored 0.0 is a real distance of 0, not an
      absent pair (explicit zeros are kept: do not call `eliminate_zeros()` or scipy arithmetic
      that drops them);
    - exactly symmetric (each pair is computed once and mirrored);
    - stored values lie in [0, 1); the diagonal is stored and is ~0 (float rounding, clamped at 0).

    Args:
        features: [N, D] float features (L2-normalised here; rows must be finite and non-zero).
        k1: reciprocal-neighbour size, >= 1 (reference: 20); N must exceed k1.
        k2: query-expansion size, 1 <= k2 <= N (reference: 6); 1 disables the expansion.
        device: compute device; default: the device of `features`.
        chunk_size: block edge of the neighbour search.

    Returns:
        scipy.sparse.csr_matrix [N, N] of float32 Jaccard distances, absent = 1.
    """
    feats = _prepared_features(features, device)
    n = feats.shape[0]
    _validated_params(n, k1, k2, chunk_size)
    v, _ = _expanded_encoding(feats, k1, k2, chunk_size)
    with _one_thread_on_cpu(feats.device):
        rows_u, cols_u, s = _upper_min_sums(v, n)
    dist = np.maximum(1.0 - s / (2.0 - s), 0.0).astype(np.float32)
    return _symmetric_csr(rows_u, cols_u, dist, n)


def _upper_min_sums(v: _SparseRows, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, S_ij) for every pair i <= j with S_ij > 0, row-major sorted, as numpy arrays."""
    device = v.vals.device
    cols = _columns(v, n)
    # Pair (i, j) only for j >= i: partners in column k start at i's own CSC position (rows
    # ascending).
    partner_start = cols.csc_pos
    costs = torch.zeros(n, dtype=torch.int64, device=device)
    costs.index_add_(0, v.rows, cols.colptr[v.cols + 1] - partner_start)
    max_rows = max(1, _ACCUMULATOR_ENTRIES // n)
    consume = _KeySums(max_rows * n, v.vals.dtype, device)
    up_i, up_j, up_s = [], [], []
    for step in _row_steps(costs, max_rows):
        found = _min_sums(v, cols, step, partner_start, n, 0, consume, None)
        assert found is not None
        up_i.append(found[0].cpu())
        up_j.append(found[1].cpu())
        up_s.append(found[2].cpu())
    return torch.cat(up_i).numpy(), torch.cat(up_j).numpy(), torch.cat(up_s).double().numpy()


def _symmetric_csr(
    rows_u: np.ndarray, cols_u: np.ndarray, vals_u: np.ndarray, n: int
) -> sparse.csr_matrix:
    """Full CSR from the upper triangle (rows_u <= cols_u, row-major sorted), mirrored.

    Explicit zeros are kept: the arrays are placed directly, nothing is summed or eliminated.
    """
    strict = cols_u > rows_u
    cnt_u = np.bincount(rows_u, minlength=n)
    # Lower triangle = transposed strict upper. scipy's CSR -> CSC conversion is a counting sort
    # that copies every entry (zeros included) and leaves the row indices of each column ascending.
    cnt_s = np.bincount(rows_u[strict], minlength=n)
    strict_upper = sparse.csr_matrix(
        (vals_u[strict], cols_u[strict], np.concatenate([[0], np.cumsum(cnt_s)])), shape=(n, n)
    )
    lower = strict_upper.tocsc()  # CSC of the upper = CSR of the lower
    cnt_l = np.diff(lower.indptr)
    rows_l = np.repeat(np.arange(n), cnt_l)
    cols_l, vals_l = lower.indices, lower.data
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt_l + cnt_u, out=indptr[1:])
    nnz = int(indptr[-1])
    index_dtype = np.int32 if max(nnz, n) < np.iinfo(np.int32).max else np.int64
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=np.float32)
    # Each row: its lower entries (columns < row), then its upper entries (columns >= row).
    pos_l = indptr[rows_l] + (np.arange(rows_l.size) - lower.indptr[rows_l])
    rank_u = np.arange(rows_u.size) - (np.cumsum(cnt_u) - cnt_u)[rows_u]
    pos_u = indptr[rows_u] + cnt_l[rows_u] + rank_u
    indices[pos_l], data[pos_l] = cols_l, vals_l
    indices[pos_u], data[pos_u] = cols_u, vals_u
    out = sparse.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, n))
    out.has_sorted_indices = True
    return out


def reranked_distance(
    query_features: Tensor,
    gallery_features: Tensor,
    *,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device: str | torch.device | None = None,
    chunk_size: int = _DEFAULT_CHUNK,
) -> np.ndarray:
    """Test-time k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query-gallery distances.

    The encoding is computed over the union of query and gallery (M = Q + G samples), with the
    same steps as `jaccard_distance`; then ``final = (1 - lambda) * J + lambda * d~`` on the
    query x gallery block, where ``d~_ij = (2 - 2 f_i.f_j) / max_j' (2 - 2 f_i.f_j')`` is the
    squared Euclidean distance divided by its row maximum over all M columns (the reference
    normalisation, as in `jaccard_distance`).

    Choice: the distance entering the re-ranking is the squared Euclidean distance, as in Zhong et
    al.'s formulation (their code squares the Euclidean distances it is given). The open-reid
    family (MMT, Dual-Refinement) passes already-squared distances to that code, which squares
    them once more, i.e. uses (2 - 2 s)^2; that changes the weights and the lambda term, not the
    neighbour ranking. J is clamped at 0 as in `jaccard_distance` (the reference's test-time code
    does not clamp; the difference is float rounding only). Only the [Q, G] output and O(M * k)
    working memory are allocated.

    Args:
        query_features: [Q, D] float features.
        gallery_features: [G, D] float features.
        k1: reciprocal-neighbour size (>= 1, < Q + G).
        k2: query-expansion size (1 <= k2 <= Q + G).
        lambda_value: weight of the original distance, in [0, 1].
        device: compute device; default: the device of `query_features`.
        chunk_size: block edge of the neighbour search.

    Returns:
        [Q, G] float32 numpy array of re-ranked distances (smaller = closer).
    """
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value!r} is not valid; expected a number in [0, 1]")
    target = device if device is not None else getattr(query_features, "device", None)
    query = _prepared_features(query_features, target, "query_features")
    gallery = _prepared_features(gallery_features, target, "gallery_features")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"query_features have D={query.shape[1]} but gallery_features have"
            f" D={gallery.shape[1]}; expected equal"
        )
    num_q, num_g = query.shape[0], gallery.shape[0]
    feats = torch.cat([query, gallery])
    query, gallery = feats[:num_q], feats[num_q:]  # views: one copy of the features, not two
    m = feats.shape[0]
    _validated_params(m, k1, k2, chunk_size)
    v, nbrs = _expanded_encoding(feats, k1, k2, chunk_size)
    with _one_thread_on_cpu(feats.device):
        out = _query_gallery_min_sums(v, m, num_q)
    # S -> Jaccard, then mix in the row-normalised original distance, block by block.
    row_max = 2.0 - 2.0 * nbrs.min_sims[:num_q]
    step = max(1, _ACCUMULATOR_ENTRIES // (2 * num_g))  # keeps the temporaries ~ 32 MiB each
    for r0 in range(0, num_q, step):
        block = out[r0 : r0 + step]
        jac = (1.0 - block / (2.0 - block)).clamp_min_(0.0)
        original = 2.0 - 2.0 * (query[r0 : r0 + step] @ gallery.T)
        original /= row_max[r0 : r0 + step, None]
        block.copy_((1.0 - lambda_value) * jac + lambda_value * original)
    return out.to(torch.float32).cpu().numpy()


def _query_gallery_min_sums(v: _SparseRows, m: int, num_q: int) -> Tensor:
    """Dense [Q, G] S_ij for query rows i < num_q and gallery rows j >= num_q of V ([M, M])."""
    device = v.vals.device
    cols = _columns(v, m)
    # Partners of a query row are the gallery rows of each column: those after the column's query
    # rows.
    queries_per_col = torch.zeros(m, dtype=torch.int64, device=device)
    queries_per_col.index_add_(0, v.cols, (v.rows < num_q).long())
    partner_start = cols.colptr[v.cols] + queries_per_col[v.cols]
    costs = torch.zeros(num_q, dtype=torch.int64, device=device)
    q_entries = int(v.indptr[num_q])
    costs.index_add_(
        0, v.rows[:q_entries], cols.colptr[v.cols[:q_entries] + 1] - partner_start[:q_entries]
    )
    num_g = m - num_q
    out = torch.zeros(num_q, num_g, dtype=v.vals.dtype, device=device)
    for r0, r1 in _row_steps(costs, num_q):
        _min_sums(v, cols, (r0, r1), partner_start, num_g, num_q, None, out[r0:r1].view(-1))
    return out
