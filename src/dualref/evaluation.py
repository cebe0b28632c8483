"""Standard person re-ID evaluation: mAP, CMC ("market1501" setting) and mINP.

Protocol (docs/method.md section 6):

* for each query the gallery is ranked by distance (smaller = closer);
* gallery entries with the **same pid and the same camera** as the query are ignored ("junk");
  nothing else is removed (Market distractors, pid 0, stay in the gallery as negatives);
* queries with no remaining true match are skipped and counted;
* AP is the mean of the precision at the rank of every true match, which is what
  ``sklearn.metrics.average_precision_score(matches, -dist)`` computes when distances are distinct;
* CMC is the "market1501" configuration (all gallery shots, first match break): ``cmc[k-1]`` is the
  fraction of valid queries whose first true match is within the top k;
* mINP (Ye et al., TPAMI 2021) is the mean over valid queries of
  ``number of true matches / rank of the hardest (last) true match``.

Ties are broken by a stable sort on (distance, gallery index): of two gallery entries at the same
distance, the one with the smaller gallery index ranks first. Only the ranking enters the metrics,
so any monotone transform of ``dist`` gives the same result.

How it is computed: a query's metrics need only the ranks of its few true matches, not the whole
ranked list. Per chunk of queries the distance rows are sorted (values only, which is several times
cheaper than an argsort), and the rank of every true match is found by a batched binary search of its
distance in its sorted row; ties with other entries are settled exactly by counting, and junk entries
ranked before a match are subtracted. Everything is vectorised over the chunk; there is no Python loop
over queries. The same code runs on CPU tensors, NumPy arrays and CUDA tensors.

Size: over 400 lines, one protocol: the chunked metrics, the cross-camera breakdown, their input checks
and record types belong together.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[int]
Metric = Literal["sqeuclidean", "cosine"]

DEFAULT_CHUNK_SIZE = 256  # query rows per step: [256, G] distances; 84 MB per buffer at MSMT17 size


class RankMetrics(NamedTuple):
    """Retrieval metrics of one query/gallery evaluation.

    Attributes:
        mAP: mean average precision over valid queries, in [0, 1].
        cmc: ``[max_rank]`` float64 array; ``cmc[k-1]`` is the rank-k accuracy (``cmc[0]`` = rank-1).
            When ``max_rank`` exceeds the gallery size the tail holds the last value (1.0).
        mINP: mean inverse negative penalty over valid queries, in [0, 1].
        num_valid_queries: queries with at least one true match left after junk removal.
        num_skipped_queries: queries without one (not part of any mean).
    """

    mAP: float  # noqa: N815 (the name every re-ID paper uses)
    cmc: np.ndarray
    mINP: float  # noqa: N815
    num_valid_queries: int
    num_skipped_queries: int


def format_metrics(metrics: RankMetrics, ranks: Sequence[int] = (1, 5, 10)) -> str:
    """One-line summary in percent, e.g. ``"mAP 12.3 | R1 45.6 | R5 60.1 | R10 66.0 | mINP 3.2"``.

    Args:
        metrics: result of :func:`rank_metrics`.
        ranks: 1-based CMC ranks to show; each must be within ``len(metrics.cmc)``.

    Returns:
        The summary line.
    """
    for rank in ranks:
        if not 1 <= rank <= len(metrics.cmc):
            raise ValueError(f"ranks: rank {rank} is outside the CMC curve (1..{len(metrics.cmc)})")
    parts = [f"mAP {100 * metrics.mAP:.1f}"]
    parts += [f"R{rank} {100 * metrics.cmc[rank - 1]:.1f}" for rank in ranks]
    parts.append(f"mINP {100 * metrics.mINP:.1f}")
    return " | ".join(parts)


def rank_metrics(
    dist: np.ndarray | torch.Tensor,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> RankMetrics:
    """mAP, CMC and mINP of a query-gallery distance matrix under the standard re-ID protocol.

    Args:
        dist: ``[Q, G]`` distances (NumPy array or tensor on any device; smaller = closer). Any
            distance works (Euclidean, cosine, re-ranked). Not copied; only one chunk of rows is
            converted and sorted at a time.
        query_pids: ``[Q]`` ground-truth identities of the queries.
        gallery_pids: ``[G]`` ground-truth identities of the gallery.
        query_camids: ``[Q]`` camera index of every query.
        gallery_camids: ``[G]`` camera index of every gallery image.
        max_rank: length of the returned CMC curve.
        chunk_size: number of query rows processed at once (memory ~ 3 x chunk_size x G values).

    Returns:
        The metrics; see :class:`RankMetrics`.

    Raises:
        ValueError: on shape mismatches, NaN in ``dist``, bad ``max_rank``/``chunk_size``, or when no
            query has a valid match.
    """
    dist_t = _as_tensor(dist, "dist")
    if dist_t.dim() != 2:
        raise ValueError(f"dist: expected a [Q, G] matrix, got shape {tuple(dist_t.shape)}")
    num_query, num_gallery = dist_t.shape
    device = dist_t.device
    labels = _QueryGalleryLabels.build(
        query_pids, gallery_pids, query_camids, gallery_camids, num_query, num_gallery, device
    )
    _check_options(max_rank, chunk_size)

    totals = _Totals(max_rank)
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        chunk = _as_float(dist_t[start:stop])
        _check_no_nan(chunk, start, "dist")
        totals.add(_chunk_metrics(chunk, labels, start, stop))
    return totals.result()


def rank_metrics_from_features(
    query_features: np.ndarray | torch.Tensor,
    gallery_features: np.ndarray | torch.Tensor,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    metric: Metric = "sqeuclidean",
    max_rank: int = 50,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    device: torch.device | str | None = None,
) -> RankMetrics:
    """:func:`rank_metrics` on distances computed chunk by chunk, never holding the ``[Q, G]`` matrix.

    Memory beyond the inputs is a few ``[chunk_size, G]`` buffers, so MSMT17 size
    (11,659 x 82,161, D = 2048) fits in well under 4 GB.

    Args:
        query_features: ``[Q, D]`` query descriptors.
        gallery_features: ``[G, D]`` gallery descriptors.
        query_pids: ``[Q]`` query identities.
        gallery_pids: ``[G]`` gallery identities.
        query_camids: ``[Q]`` query cameras.
        gallery_camids: ``[G]`` gallery cameras.
        metric: ``"sqeuclidean"`` (``|q - g|^2``, the reference behaviour; monotone in cosine for
            L2-normalised features) or ``"cosine"`` (``1 - cos(q, g)``, features need not be
            normalised).
        max_rank: length of the CMC curve.
        chunk_size: query rows per step.
        device: where to compute (default: the device of ``query_features``). The gallery features are
            moved there once; float16/bfloat16 inputs are computed in float32.

    Returns:
        The metrics, identical to ``rank_metrics(explicit_dist, ...)``.
    """
    query = _as_tensor(query_features, "query_features")
    gallery = _as_tensor(gallery_features, "gallery_features")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            "query_features/gallery_features: expected [Q, D] and [G, D] with the same D, got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    if metric not in ("sqeuclidean", "cosine"):
        raise ValueError(f"metric: expected 'sqeuclidean' or 'cosine', got {metric!r}")
    target = torch.device(device) if device is not None else query.device
    dtype = torch.float64 if torch.float64 in (query.dtype, gallery.dtype) else torch.float32
    gallery = gallery.to(device=target, dtype=dtype)
    num_query, num_gallery = query.shape[0], gallery.shape[0]
    labels = _QueryGalleryLabels.build(
        query_pids, gallery_pids, query_camids, gallery_camids, num_query, num_gallery, target
    )
    _check_options(max_rank, chunk_size)

    # Per-gallery norms once, so that no normalised or squared copy of the gallery is ever made.
    gallery_norms = torch.linalg.vector_norm(gallery, dim=1)  # [G]

    totals = _Totals(max_rank)
    for start in range(0, num_query, chunk_size):
        stop = min(start + chunk_size, num_query)
        q = query[start:stop].to(device=target, dtype=dtype)  # [C, D]
        sim = q @ gallery.T  # [C, G]
        q_norms = torch.linalg.vector_norm(q, dim=1)  # [C]
        if metric == "sqeuclidean":
            # |q|^2 + |g|^2 - 2 q.g, clamped: rounding can make it slightly negative.
            chunk = sim.mul_(-2).add_(q_norms[:, None] ** 2).add_(gallery_norms[None, :] ** 2)
            chunk = chunk.clamp_min_(0)
        else:
            eps = torch.finfo(sim.dtype).tiny
            sim.div_(q_norms[:, None].clamp_min(eps)).div_(gallery_norms[None, :].clamp_min(eps))
            chunk = sim.neg_().add_(1)
        # NaN/inf features give NaN distances; report them as a feature problem.
        _check_no_nan(chunk, start, "query_features/gallery_features")
        totals.add(_chunk_metrics(chunk, labels, start, stop))
    return totals.result()


class CrossCameraMAP(NamedTuple):
    """mAP broken down by camera, under the standard protocol (same pid + same camera = junk).

    Attributes:
        query_cameras: ``[Cq]`` query camera ids, ascending.
        gallery_cameras: ``[Cg]`` gallery camera ids, ascending.
        per_query_camera: ``[Cq]`` mAP of each camera's queries against the whole gallery (their mean,
            weighted by ``num_queries``, is the overall mAP); NaN for a camera without a valid query.
        num_queries: ``[Cq]`` valid queries (a true match on another camera) per query camera.
        per_pair: ``[Cq, Cg]`` mAP of query camera ``qc``'s queries against gallery camera ``gc``'s
            images alone, over the queries with a true match there. NaN where there is none, which
            includes every ``qc == gc`` cell: a same-camera match is junk.
        num_pair_queries: ``[Cq, Cg]`` queries averaged in each ``per_pair`` cell.
    """

    query_cameras: np.ndarray
    gallery_cameras: np.ndarray
    per_query_camera: np.ndarray
    num_queries: np.ndarray
    per_pair: np.ndarray
    num_pair_queries: np.ndarray


def cross_camera_map(
    dist: np.ndarray | torch.Tensor,
    query_pids: ArrayLike,
    gallery_pids: ArrayLike,
    query_camids: ArrayLike,
    gallery_camids: ArrayLike,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> CrossCameraMAP:
    """mAP per query camera and per (query camera, gallery camera) pair, from a distance matrix.

    Which camera pairs a model links and which it does not is what a cross-camera re-ID score hides;
    a UDA model typically gains on the hard pairs. Per pair, the gallery is restricted to one camera and
    the query's AP computed over that camera's images, ranked by (distance, gallery index) as in
    :func:`rank_metrics`.

    Args:
        dist: ``[Q, G]`` query-gallery distances (smaller = closer), NaN-free.
        query_pids, gallery_pids: ``[Q]`` / ``[G]`` identities.
        query_camids, gallery_camids: ``[Q]`` / ``[G]`` cameras.
        chunk_size: query rows per step (memory: a few ``[chunk_size, G]`` arrays).

    Returns:
        The breakdown (see :class:`CrossCameraMAP`).
    """
    values = _as_tensor(dist, "dist").cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"dist: expected a [Q, G] matrix, got shape {values.shape}")
    num_query, num_gallery = values.shape
    q_pids, g_pids, q_cams, g_cams = (
        _as_ids(ids, name, n, torch.device("cpu")).numpy()
        for ids, name, n in (
            (query_pids, "query_pids", num_query),
            (gallery_pids, "gallery_pids", num_gallery),
            (query_camids, "query_camids", num_query),
            (gallery_camids, "gallery_camids", num_gallery),
        )
    )
    _check_options(1, chunk_size)
    query_cameras, q_cam_index = np.unique(q_cams, return_inverse=True)
    gallery_cameras = np.unique(g_cams)
    ap_sum = np.zeros(len(query_cameras))
    num_queries = np.zeros(len(query_cameras), dtype=np.int64)
    pair_sum = np.zeros((len(query_cameras), len(gallery_cameras)))
    num_pair = np.zeros((len(query_cameras), len(gallery_cameras)), dtype=np.int64)
    for start in range(0, num_query, chunk_size):
        rows = slice(start, min(start + chunk_size, num_query))
        chunk = values[rows]
        if np.isnan(chunk).any():
            raise ValueError(f"dist: distances contain NaN (in query rows {rows.start}..{rows.stop - 1})")
        order = np.argsort(chunk, axis=1, kind="stable")  # [C, G] ranked gallery indices
        match = g_pids[order] == q_pids[rows, None]  # [C, G]
        ranked_cams = g_cams[order]  # [C, G]
        same_camera = ranked_cams == q_cams[rows, None]
        cam_index = q_cam_index[rows]
        ap, ok = _average_precision(match & ~same_camera, ~(match & same_camera))
        np.add.at(ap_sum, cam_index[ok], ap[ok])
        np.add.at(num_queries, cam_index[ok], 1)
        for column, camera in enumerate(gallery_cameras):
            kept = ranked_cams == camera  # only this camera's images
            ap, ok = _average_precision(match & kept & ~same_camera, kept)
            np.add.at(pair_sum[:, column], cam_index[ok], ap[ok])
            np.add.at(num_pair[:, column], cam_index[ok], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return CrossCameraMAP(
            query_cameras=query_cameras,
            gallery_cameras=gallery_cameras,
            per_query_camera=np.where(num_queries > 0, ap_sum / num_queries, np.nan),
            num_queries=num_queries,
            per_pair=np.where(num_pair > 0, pair_sum / num_pair, np.nan),
            num_pair_queries=num_pair,
        )


def _average_precision(hits: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of ranked rows over their kept entries.

    Args:
        hits: ``[C, G]`` bool, true matches in ranked order (a subset of ``kept``).
        kept: ``[C, G]`` bool, the entries that are ranked (others are skipped, like junk).

    Returns:
        ``ap`` ``[C]`` float64 (0 where there is no hit) and ``ok`` ``[C]`` bool (at least one hit).
    """
    rank = np.cumsum(kept, axis=1)  # 1-based rank among the kept entries
    found = np.cumsum(hits, axis=1)  # hits up to and including this entry
    num_hits = found[:, -1] if hits.shape[1] else np.zeros(len(hits), dtype=np.int64)
    precision = np.where(hits, found / np.maximum(rank, 1), 0.0)
    return precision.sum(axis=1) / np.maximum(num_hits, 1), num_hits > 0


def sqeuclidean_distance(
    query_features: np.ndarray | torch.Tensor, gallery_features: np.ndarray | torch.Tensor
) -> np.ndarray:
    """``[Q, G]`` float32 squared Euclidean distances ``|q|^2 + |g|^2 - 2 q.g`` (clamped at 0).

    The distance :func:`rank_metrics_from_features` ranks by, as one matrix (to save or break down).

    Args:
        query_features: ``[Q, D]`` descriptors.
        gallery_features: ``[G, D]`` descriptors.
    """
    query = _as_tensor(query_features, "query_features").float().cpu()
    gallery = _as_tensor(gallery_features, "gallery_features").float().cpu()
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            "query_features/gallery_features: expected [Q, D] and [G, D] with the same D, got "
            f"{tuple(query.shape)} and {tuple(gallery.shape)}"
        )
    dist = (query @ gallery.T).mul_(-2)
    dist.add_(query.pow(2).sum(1, keepdim=True)).add_(gallery.pow(2).sum(1)[None, :])
    return dist.clamp_min_(0).numpy()


class _QueryGalleryLabels(NamedTuple):
    """Identities and cameras on the compute device, with the gallery grouped by pid."""

    query_pids: torch.Tensor  # [Q] int64
    query_camids: torch.Tensor  # [Q] int64
    gallery_camids: torch.Tensor  # [G] int64
    gallery_by_pid: torch.Tensor  # [G] gallery indices sorted by (pid, index)
    match_start: torch.Tensor  # [Q] offset of the query's pid group in gallery_by_pid
    match_count: torch.Tensor  # [Q] gallery images with the query's pid (0 when absent)

    @staticmethod
    def build(
        query_pids: ArrayLike,
        gallery_pids: ArrayLike,
        query_camids: ArrayLike,
        gallery_camids: ArrayLike,
        num_query: int,
        num_gallery: int,
        device: torch.device,
    ) -> _QueryGalleryLabels:
        q_pids = _as_ids(query_pids, "query_pids", num_query, device)
        g_pids = _as_ids(gallery_pids, "gallery_pids", num_gallery, device)
        q_cams = _as_ids(query_camids, "query_camids", num_query, device)
        g_cams = _as_ids(gallery_camids, "gallery_camids", num_gallery, device)
        if num_gallery == 0:
            raise ValueError("gallery_pids: the gallery is empty; expected at least one image")
        # Stable, so the matches of a query come in ascending gallery index (the tie order).
        by_pid = torch.sort(g_pids, stable=True).indices
        pids, counts = torch.unique_consecutive(g_pids[by_pid], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        where = torch.searchsorted(pids, q_pids).clamp_max(len(pids) - 1)
        found = pids[where] == q_pids
        match_count = torch.where(found, counts[where], 0)
        return _QueryGalleryLabels(q_pids, q_cams, g_cams, by_pid, starts[where], match_count)


class _ChunkMetrics(NamedTuple):
    """Per-query results of one chunk (valid queries only)."""

    average_precision: torch.Tensor  # [V] float64
    inverse_negative_penalty: torch.Tensor  # [V] float64
    first_rank: torch.Tensor  # [V] int64, 0-based rank of the first true match
    num_skipped: int


class _Totals:
    """Running sums over chunks."""

    def __init__(self, max_rank: int) -> None:
        self.max_rank = max_rank
        self.ap_sum = 0.0
        self.inp_sum = 0.0
        self.num_valid = 0
        self.num_skipped = 0
        self.first_rank_hist = np.zeros(max_rank, dtype=np.int64)

    def add(self, chunk: _ChunkMetrics) -> None:
        self.ap_sum += float(chunk.average_precision.sum())
        self.inp_sum += float(chunk.inverse_negative_penalty.sum())
        self.num_valid += len(chunk.first_rank)
        self.num_skipped += chunk.num_skipped
        within = chunk.first_rank[chunk.first_rank < self.max_rank]
        self.first_rank_hist += torch.bincount(within, minlength=self.max_rank).cpu().numpy()

    def result(self) -> RankMetrics:
        if self.num_valid == 0:
            raise ValueError(
                f"query_pids: none of the {self.num_skipped} queries has a valid match in the gallery "
                "(same pid, other camera); expected at least one"
            )
        cmc = np.cumsum(self.first_rank_hist) / self.num_valid
        return RankMetrics(
            mAP=self.ap_sum / self.num_valid,
            cmc=cmc,
            mINP=self.inp_sum / self.num_valid,
            num_valid_queries=self.num_valid,
            num_skipped_queries=self.num_skipped,
        )


def _chunk_metrics(
    dist: torch.Tensor, labels: _QueryGalleryLabels, start: int, stop: int
) -> _ChunkMetrics:
    """AP, INP and first-match rank of queries ``start:stop`` from their distance rows.

    Args:
        dist: ``[C, G]`` float32/float64 distances of the chunk, NaN-free.
        labels: identities and cameras (see :class:`_QueryGalleryLabels`).
        start: index of the chunk's first query.
        stop: one past its last query.
    """
    num_rows, num_gallery = dist.shape
    device = dist.device
    counts = labels.match_count[start:stop]  # [C]
    width = int(counts.max()) if num_rows else 0
    if width == 0:
        empty = torch.zeros(0, dtype=torch.float64, device=device)
        return _ChunkMetrics(empty, empty, empty.long(), num_rows)

    # Gallery indices of every same-pid entry of each query, padded with the sentinel G.
    slot = torch.arange(width, device=device)
    real = slot[None, :] < counts[:, None]  # [C, M]
    offsets = (labels.match_start[start:stop, None] + slot[None, :]).clamp_max(num_gallery - 1)
    match_index = torch.where(real, labels.gallery_by_pid[offsets], num_gallery)  # [C, M]
    safe_index = match_index.clamp_max(num_gallery - 1)
    same_camera = labels.gallery_camids[safe_index] == labels.query_camids[start:stop, None]
    valid = real & ~same_camera  # true matches; real & same_camera are the junk entries
    match_dist = torch.gather(dist, 1, safe_index)  # [C, M]

    # Position of each same-pid entry in the stable (distance, index) order of its whole row:
    # entries strictly closer, plus entries at exactly the same distance with a smaller index.
    sorted_rows = _sorted_rows(dist)  # [C, G]
    closer = torch.searchsorted(sorted_rows, match_dist)
    closer_or_equal = torch.searchsorted(sorted_rows, match_dist, right=True)
    tied = real & (closer_or_equal - closer > 1)  # shares its distance with another entry
    position = closer + _equal_and_earlier(dist, match_dist, match_index, tied)
    position = torch.where(real, position, 2 * num_gallery)  # padding sorts last

    # Walk the same-pid entries in ranked order; junk entries ahead of a match do not count.
    position, order = torch.sort(position, dim=1)
    valid = torch.gather(valid, 1, order)
    junk = torch.gather(real, 1, order) & ~valid
    junk_before = torch.cumsum(junk.long(), 1) - junk.long()
    rank = position - junk_before  # [C, M] 0-based rank among the non-junk gallery entries
    num_matches = valid.sum(1)  # [C]
    has_match = num_matches > 0

    hits = torch.cumsum(valid.long(), 1)  # true matches up to and including this one
    precision = hits.double() / (rank + 1).double()
    average_precision = torch.where(valid, precision, 0.0).sum(1) / num_matches.clamp_min(1)
    first_rank = torch.where(valid, rank, 2 * num_gallery).min(1).values
    last_rank = torch.where(valid, rank, -1).max(1).values
    inverse_negative_penalty = num_matches.double() / (last_rank + 1).double()
    return _ChunkMetrics(
        average_precision=average_precision[has_match],
        inverse_negative_penalty=inverse_negative_penalty[has_match],
        first_rank=first_rank[has_match],
        num_skipped=int((~has_match).sum()),
    )


def _equal_and_earlier(
    dist: torch.Tensor, match_dist: torch.Tensor, match_index: torch.Tensor, tied: torch.Tensor
) -> torch.Tensor:
    """For each tied entry, the number of gallery entries at the same distance with a smaller index.

    Args:
        dist: ``[C, G]`` distances.
        match_dist: ``[C, M]`` distance of each same-pid entry.
        match_index: ``[C, M]`` its gallery index.
        tied: ``[C, M]`` entries that share their distance with at least one other gallery entry.

    Returns:
        ``[C, M]`` int64 counts (0 where not tied). Ties are rare with real features, so the
        comparison runs only on the tied entries, in steps of bounded memory.
    """
    extra = torch.zeros_like(match_index)
    if not bool(tied.any()):
        return extra
    rows, cols = tied.nonzero(as_tuple=True)
    gallery_index = torch.arange(dist.shape[1], device=dist.device)
    # Rows per step: about as many values as the chunk itself, at least 2**20 (few Python steps).
    step = max(dist.shape[0], 2**20 // max(1, dist.shape[1]))
    for begin in range(0, len(rows), step):
        r, c = rows[begin : begin + step], cols[begin : begin + step]
        same = dist[r] == match_dist[r, c, None]
        earlier = gallery_index[None, :] < match_index[r, c, None]
        extra[r, c] = (same & earlier).sum(1)
    return extra


def _sorted_rows(dist: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending, ``[C, G]``. NumPy's SIMD sort is several times faster on CPU."""
    if dist.device.type == "cpu":
        return torch.from_numpy(np.sort(dist.numpy(), axis=1))
    return torch.sort(dist, dim=1).values


def _as_tensor(values: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """A tensor view of ``values`` (no copy for NumPy arrays or tensors)."""
    if isinstance(values, torch.Tensor):
        return values.detach()
    array = np.asarray(values)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise ValueError(f"{name}: expected a numeric array, got dtype {array.dtype}")
    with warnings.catch_warnings():
        # Read-only arrays (e.g. memory-mapped) are fine: nothing here writes to the input.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _as_float(values: torch.Tensor) -> torch.Tensor:
    """float32/float64 unchanged; other dtypes to float64 (half precision: float32)."""
    if values.dtype in (torch.float32, torch.float64):
        return values
    if values.dtype in (torch.float16, torch.bfloat16):
        return values.float()
    return values.double()


def _as_ids(values: ArrayLike, name: str, length: int, device: torch.device) -> torch.Tensor:
    """``[length]`` int64 tensor of integer ids on ``device``."""
    tensor = _as_tensor(values if not isinstance(values, Sequence) else np.asarray(values), name)
    if tensor.dim() != 1 or tensor.shape[0] != length:
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex():
        raise ValueError(f"{name}: expected integer ids, got dtype {tensor.dtype}")
    return tensor.to(device=device, dtype=torch.int64)


def _check_no_nan(chunk: torch.Tensor, start: int, name: str) -> None:
    """Raise when a ``[C, G]`` distance chunk starting at query ``start`` holds a NaN."""
    nan_rows = torch.isnan(chunk).any(dim=1)
    if bool(nan_rows.any()):
        row = start + int(nan_rows.nonzero()[0, 0])
        raise ValueError(f"{name}: distances contain NaN (first in query row {row}); expected none")


def _check_options(max_rank: int, chunk_size: int) -> None:
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank: expected a positive int, got {max_rank!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int, got {chunk_size!r}")


__all__ = [
    "CrossCameraMAP",
    "RankMetrics",
    "cross_camera_map",
    "format_metrics",
    "rank_metrics",
    "rank_metrics_from_features",
    "sqeuclidean_distance",
]
