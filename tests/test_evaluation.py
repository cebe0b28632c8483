"""Tests of dualref.evaluation: golden values, a naive per-query reference, scikit-learn, real data."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from conftest import shared_dataset
from dualref.evaluation import (
    RankMetrics,
    cross_camera_map,
    format_metrics,
    rank_metrics,
    rank_metrics_from_features,
    sqeuclidean_distance,
)

# ---------------------------------------------------------------------------------------------
# Naive reference: one query at a time, the protocol written out literally.
# ---------------------------------------------------------------------------------------------


class Reference:
    """Per-query results of the literal protocol (stable sort on (distance, gallery index))."""

    def __init__(
        self,
        dist: np.ndarray,
        q_pids: np.ndarray,
        g_pids: np.ndarray,
        q_cams: np.ndarray,
        g_cams: np.ndarray,
        max_rank: int,
    ) -> None:
        self.aps: list[float] = []
        self.sklearn_aps: list[float] = []
        self.inps: list[float] = []
        self.cmc = np.zeros(max_rank)
        self.num_skipped = 0
        for i in range(len(q_pids)):
            order = np.argsort(dist[i], kind="stable")
            junk = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
            kept = order[~junk]
            matches = g_pids[kept] == q_pids[i]
            if not matches.any():
                self.num_skipped += 1
                continue
            hit_ranks = np.flatnonzero(matches) + 1  # 1-based ranks of the true matches
            self.aps.append(float(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks)))
            self.sklearn_aps.append(average_precision_score(matches, -dist[i][kept]))
            self.inps.append(len(hit_ranks) / hit_ranks[-1])
            if hit_ranks[0] <= max_rank:
                self.cmc[hit_ranks[0] - 1 :] += 1
        self.cmc /= max(1, len(self.aps))


def random_case(
    seed: int, num_query: int, num_gallery: int, num_pids: int, ties: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_pids, num_query)
    g_pids = rng.integers(0, num_pids, num_gallery)
    q_cams = rng.integers(0, 3, num_query)
    g_cams = rng.integers(0, 3, num_gallery)
    if ties:  # few distinct values: many ties, including between matches and non-matches
        dist = rng.integers(0, 6, (num_query, num_gallery)).astype(np.float64)
    else:
        dist = rng.random((num_query, num_gallery))
    return dist, q_pids, g_pids, q_cams, g_cams


# ---------------------------------------------------------------------------------------------
# Golden case, computed by hand.
# ---------------------------------------------------------------------------------------------

# gallery index:      g0  g1  g2  g3  g4  g5
GOLDEN_G_PIDS = [1, 1, 2, 0, 1, 3]  # g3 is a distractor (pid 0)
GOLDEN_G_CAMS = [0, 1, 0, 1, 2, 0]
GOLDEN_Q_PIDS = [1, 2, 3]
GOLDEN_Q_CAMS = [0, 1, 0]
GOLDEN_DIST = [
    # q0 (pid 1, cam 0). Sorted: g0 .10 (pid 1 cam 0: junk, ignored although closest), g2 .20 (neg),
    # g3 .30 (distractor), g1 .40 (match), g5 .45 (neg), g4 .50 (match).
    # Ranked list without junk: g2, g3, g1, g5, g4 -> matches at ranks 3 and 5.
    # AP = (1/3 + 2/5) / 2 = 11/30; first match at rank 3; INP = 2 matches / rank 5 = 2/5.
    [0.10, 0.40, 0.20, 0.30, 0.50, 0.45],
    # q1 (pid 2, cam 1). Sorted: g5 .05 (neg), g2 .10 (pid 2 cam 0: match), g3, g1, g4, g0.
    # AP = 1/2; first match at rank 2; INP = 1/2.
    [0.50, 0.30, 0.10, 0.20, 0.40, 0.05],
    # q2 (pid 3, cam 0): its only same-pid entry g5 is on camera 0 too (junk) -> no valid match,
    # skipped and counted.
    [0.30, 0.20, 0.10, 0.40, 0.50, 0.01],
]


def test_golden_case() -> None:
    m = rank_metrics(
        np.array(GOLDEN_DIST), GOLDEN_Q_PIDS, GOLDEN_G_PIDS, GOLDEN_Q_CAMS, GOLDEN_G_CAMS, max_rank=6
    )
    assert m.num_valid_queries == 2
    assert m.num_skipped_queries == 1
    assert m.mAP == pytest.approx((11 / 30 + 1 / 2) / 2, abs=1e-12)  # = 13/30
    assert m.mINP == pytest.approx((2 / 5 + 1 / 2) / 2, abs=1e-12)  # = 0.45
    # first matches at ranks 3 (q0) and 2 (q1)
    np.testing.assert_allclose(m.cmc, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    assert m.cmc.dtype == np.float64 and m.cmc.shape == (6,)


def test_golden_case_agrees_with_sklearn() -> None:
    # q0 after junk removal: ranked g2, g3, g1, g5, g4 with matches g1, g4
    assert average_precision_score([0, 0, 1, 0, 1], -np.array([0.2, 0.3, 0.4, 0.45, 0.5])) == (
        pytest.approx(11 / 30)
    )
    ref = Reference(
        np.array(GOLDEN_DIST),
        np.array(GOLDEN_Q_PIDS),
        np.array(GOLDEN_G_PIDS),
        np.array(GOLDEN_Q_CAMS),
        np.array(GOLDEN_G_CAMS),
        max_rank=6,
    )
    assert ref.sklearn_aps == pytest.approx([11 / 30, 1 / 2])


def test_ties_are_broken_by_gallery_index() -> None:
    # One query (pid 1, cam 0); gallery g0 negative and g1 match at the same distance.
    pids, cams = [1], [0]
    # stable order g0, g1 -> the match is at rank 2: AP 1/2, R1 0
    m = rank_metrics(np.array([[1.0, 1.0]]), pids, [5, 1], cams, [1, 1], max_rank=2)
    assert m.mAP == pytest.approx(0.5) and m.cmc[0] == 0.0
    # swap the gallery order: the match is now g0 and wins the tie: AP 1, R1 1
    m = rank_metrics(np.array([[1.0, 1.0]]), pids, [1, 5], cams, [1, 1], max_rank=2)
    assert m.mAP == pytest.approx(1.0) and m.cmc[0] == 1.0


def test_junk_tied_with_a_match_is_not_counted() -> None:
    # query pid 1 cam 0; g0 junk (pid 1 cam 0), g1 negative, g2 match, all at distance 0.
    # Ranked without junk: g1, g2 -> AP 1/2 (a counted junk entry would give 1/3).
    m = rank_metrics(np.zeros((1, 3)), [1], [1, 7, 1], [0], [0, 1, 1], max_rank=3)
    assert m.mAP == pytest.approx(0.5)
    assert m.mINP == pytest.approx(0.5)
    np.testing.assert_allclose(m.cmc, [0.0, 1.0, 1.0])


def test_format_metrics() -> None:
    m = RankMetrics(
        mAP=0.1234, cmc=np.linspace(0.1, 1.0, 10), mINP=0.05, num_valid_queries=3,
        num_skipped_queries=0,
    )
    assert format_metrics(m) == "mAP 12.3 | R1 10.0 | R5 50.0 | R10 100.0 | mINP 5.0"
    assert format_metrics(m, ranks=(2,)) == "mAP 12.3 | R2 20.0 | mINP 5.0"
    with pytest.raises(ValueError, match="ranks"):
        format_metrics(m, ranks=(11,))


# ---------------------------------------------------------------------------------------------
# Random cases against the naive reference.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_reference(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(100 + seed)
    num_query, num_gallery = int(rng.integers(5, 60)), int(rng.integers(1, 120))
    case = random_case(seed, num_query, num_gallery, num_pids=int(rng.integers(2, 12)), ties=ties)
    ref = Reference(*case, max_rank=20)
    if not ref.aps:
        with pytest.raises(ValueError, match="valid match"):
            rank_metrics(*case, max_rank=20)
        return
    m = rank_metrics(*case, max_rank=20, chunk_size=int(rng.integers(1, 16)))
    assert m.num_valid_queries == len(ref.aps)
    assert m.num_skipped_queries == ref.num_skipped
    assert m.mAP == pytest.approx(np.mean(ref.aps), abs=1e-12)
    assert m.mINP == pytest.approx(np.mean(ref.inps), abs=1e-12)
    np.testing.assert_allclose(m.cmc, ref.cmc, atol=1e-12)  # every rank 1..20
    if not ties:  # sklearn groups tied scores, so it is the reference only without ties
        assert m.mAP == pytest.approx(np.mean(ref.sklearn_aps), abs=1e-12)


def test_realistic_sizes_match_reference() -> None:
    # Clustered features (many matches per query, some deep), squared Euclidean in float32.
    rng = np.random.default_rng(7)
    num_pids, dim = 40, 16
    centers = rng.normal(size=(num_pids, dim))
    g_pids, q_pids = rng.integers(0, num_pids, 600), rng.integers(0, num_pids, 90)
    g_cams, q_cams = rng.integers(0, 4, 600), rng.integers(0, 4, 90)
    gallery = centers[g_pids] + rng.normal(size=(600, dim))
    query = centers[q_pids] + rng.normal(size=(90, dim))
    dist = ((query[:, None] - gallery[None]) ** 2).sum(-1).astype(np.float32)
    ref = Reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    m = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50, chunk_size=32)
    assert 0.05 < m.mAP < 0.95  # a non-trivial ranking
    assert m.mAP == pytest.approx(np.mean(ref.aps), abs=1e-12)
    assert m.mINP == pytest.approx(np.mean(ref.inps), abs=1e-12)
    np.testing.assert_allclose(m.cmc, ref.cmc, atol=1e-12)


def test_chunk_size_does_not_change_the_result() -> None:
    case = random_case(3, num_query=37, num_gallery=90, num_pids=6, ties=True)
    results = [rank_metrics(*case, max_rank=10, chunk_size=c) for c in (1, 2, 7, 36, 37, 500)]
    for m in results[1:]:
        assert m.mAP == pytest.approx(results[0].mAP, abs=1e-12)
        assert m.mINP == pytest.approx(results[0].mINP, abs=1e-12)
        np.testing.assert_array_equal(m.cmc, results[0].cmc)
        assert m.num_valid_queries == results[0].num_valid_queries


def test_tensor_input_and_device(device: torch.device) -> None:
    case = random_case(4, num_query=20, num_gallery=50, num_pids=5, ties=False)
    expected = rank_metrics(*case, max_rank=10)
    dist, *ids = case
    tensors = [torch.as_tensor(x, device=device) for x in (dist.astype(np.float32), *ids)]
    m = rank_metrics(*tensors, max_rank=10, chunk_size=8)
    assert m.mAP == pytest.approx(expected.mAP, abs=1e-9)
    np.testing.assert_allclose(m.cmc, expected.cmc)


def test_max_rank_larger_than_gallery() -> None:
    case = random_case(5, num_query=10, num_gallery=4, num_pids=2, ties=False)
    ref = Reference(*case, max_rank=4)
    m = rank_metrics(*case, max_rank=9)
    assert m.cmc.shape == (9,)
    np.testing.assert_allclose(m.cmc[:4], ref.cmc)
    np.testing.assert_allclose(m.cmc[4:], 1.0)  # every valid query has its first match within G


# ---------------------------------------------------------------------------------------------
# From features.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_from_features_equals_explicit_distance(metric: str, device: torch.device) -> None:
    rng = np.random.default_rng(11)
    q_pids, g_pids = rng.integers(0, 8, 45), rng.integers(0, 8, 130)
    q_cams, g_cams = rng.integers(0, 3, 45), rng.integers(0, 3, 130)
    query = rng.normal(size=(45, 6)) + q_pids[:, None] * 0.3
    gallery = rng.normal(size=(130, 6)) + g_pids[:, None] * 0.3
    if metric == "sqeuclidean":
        dist = ((query[:, None] - gallery[None]) ** 2).sum(-1)
    else:
        qn = query / np.linalg.norm(query, axis=1, keepdims=True)
        gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        dist = 1 - qn @ gn.T
    expected = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=15)
    m = rank_metrics_from_features(
        torch.from_numpy(query),
        torch.from_numpy(gallery),
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        metric=metric,  # type: ignore[arg-type]
        max_rank=15,
        chunk_size=16,
        device=device,
    )
    assert m.mAP == pytest.approx(expected.mAP, abs=1e-12)
    assert m.mINP == pytest.approx(expected.mINP, abs=1e-12)
    np.testing.assert_array_equal(m.cmc, expected.cmc)
    assert m.num_skipped_queries == expected.num_skipped_queries


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    dist, q_pids, g_pids, q_cams, g_cams = random_case(6, 4, 5, 2, ties=False)
    with pytest.raises(ValueError, match="dist"):
        rank_metrics(dist[0], q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="query_pids"):
        rank_metrics(dist, q_pids[:3], g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="gallery_pids"):
        rank_metrics(dist, q_pids, g_pids[:4], q_cams, g_cams)
    with pytest.raises(ValueError, match="query_camids"):
        rank_metrics(dist, q_pids, g_pids, q_cams[:1], g_cams)
    with pytest.raises(ValueError, match="gallery_camids"):
        rank_metrics(dist, q_pids, g_pids, q_cams, np.append(g_cams, 0))
    with pytest.raises(ValueError, match="gallery_pids"):
        rank_metrics(dist, q_pids, g_pids.astype(float), q_cams, g_cams)
    bad = dist.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"dist.*NaN.*row 2"):
        rank_metrics(bad, q_pids, g_pids, q_cams, g_cams)
    with pytest.raises(ValueError, match="max_rank"):
        rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=0)
    with pytest.raises(ValueError, match="chunk_size"):
        rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=0)
    with pytest.raises(ValueError, match="query_features"):
        rank_metrics_from_features(np.ones((4, 3)), np.ones((5, 2)), q_pids, g_pids, q_cams, g_cams)
    features = np.ones((4, 3))
    features[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics_from_features(features, np.ones((5, 3)), q_pids, g_pids, q_cams, g_cams)


def test_no_valid_query_raises() -> None:
    # every same-pid gallery entry is on the query's own camera
    with pytest.raises(ValueError, match="valid match"):
        rank_metrics(np.ones((2, 2)), [1, 2], [1, 2], [0, 0], [0, 0])


# ---------------------------------------------------------------------------------------------
# Real data: the shared Market-1501 split, fixed features, against the per-query reference.
# ---------------------------------------------------------------------------------------------

# Prefix match: the distributed split has a few names like "1488_c1s6_023021_00.jpg.jpg".
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d)s\d+_\d+_\d+\.jpg")


def parse_market_folder(folder: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Image paths, pids and 0-based camids of one Market-1501 folder, junk (pid -1) dropped."""
    paths, pids, cams = [], [], []
    for path in sorted(folder.glob("*.jpg")):
        found = MARKET_NAME.match(path.name)
        assert found, f"unexpected Market-1501 file name {path}"
        pid, cam = int(found.group(1)), int(found.group(2))
        if pid == -1:
            continue
        paths.append(path)
        pids.append(pid)
        cams.append(cam - 1)
    return paths, np.array(pids), np.array(cams)


def thumbnail_features(paths: list[Path], projection: np.ndarray) -> np.ndarray:
    """Seeded random projection of 16x8 grayscale thumbnails: fixed, cheap, non-trivial features."""
    from PIL import Image

    pixels = np.empty((len(paths), 16 * 8), dtype=np.float64)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            image.draft("L", (8, 16))  # JPEG decodes straight to ~1/8 scale: fast
            pixels[i] = np.asarray(image.convert("L").resize((8, 16)), dtype=np.float64).ravel()
    pixels -= pixels.mean(axis=1, keepdims=True)
    return pixels @ projection


@pytest.mark.realdata
@pytest.mark.slow  # ~8 s idle, over 20 s when the shared 2-core machine is busy (image decoding)
def test_market1501_matches_reference() -> None:
    root = shared_dataset("Market-1501")
    started = time.perf_counter()
    q_paths, q_pids, q_cams = parse_market_folder(root / "query")
    g_paths, g_pids, g_cams = parse_market_folder(root / "bounding_box_test")
    assert (len(q_paths), len(g_paths)) == (3368, 15913)
    assert (g_pids == 0).sum() > 0  # distractors kept
    keep = np.arange(0, len(q_paths), 8)  # every 8th query keeps the reference loop short
    projection = np.random.default_rng(0).normal(size=(128, 32))
    query = thumbnail_features([q_paths[i] for i in keep], projection)
    gallery = thumbnail_features(g_paths, projection)
    q_pids, q_cams = q_pids[keep], q_cams[keep]
    dist = ((query**2).sum(1)[:, None] + (gallery**2).sum(1)[None] - 2 * query @ gallery.T)

    m = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    ref = Reference(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    assert m.num_valid_queries == len(ref.aps) == len(keep)  # every Market query has a match
    assert m.mAP == pytest.approx(np.mean(ref.aps), abs=1e-6)
    assert m.mAP == pytest.approx(np.mean(ref.sklearn_aps), abs=1e-6)
    assert m.mINP == pytest.approx(np.mean(ref.inps), abs=1e-6)
    np.testing.assert_allclose(m.cmc, ref.cmc, atol=1e-6)
    assert m.cmc[0] > 0.003  # raw thumbnails are weak (~1%) but above chance (~14 / 15913)

    from_features = rank_metrics_from_features(
        query, gallery, q_pids, g_pids, q_cams, g_cams, max_rank=50, chunk_size=128
    )
    assert from_features.mAP == pytest.approx(m.mAP, abs=1e-6)
    print(f"market1501 realdata check: {format_metrics(m)} in {time.perf_counter() - started:.1f}s")


# ---------------------------------------------------------------------------------------------
# Cross-camera breakdown against a literal per-query, per-camera loop.
# ---------------------------------------------------------------------------------------------


def cross_camera_reference(
    dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray, g_cams: np.ndarray
) -> tuple[dict[int, list[float]], dict[tuple[int, int], list[float]]]:
    """Per query camera and per (query camera, gallery camera): the APs, one query at a time."""
    per_camera: dict[int, list[float]] = {}
    per_pair: dict[tuple[int, int], list[float]] = {}
    for i in range(len(q_pids)):
        order = np.argsort(dist[i], kind="stable")
        not_junk = [g for g in order if not (g_pids[g] == q_pids[i] and g_cams[g] == q_cams[i])]
        per_gallery_camera = [(c, [g for g in not_junk if g_cams[g] == c]) for c in set(g_cams)]
        for camera, kept in [(None, not_junk), *per_gallery_camera]:
            hits = [rank for rank, g in enumerate(kept, start=1) if g_pids[g] == q_pids[i]]
            if not hits:
                continue
            ap = float(np.mean([n / rank for n, rank in enumerate(hits, start=1)]))
            if camera is None:
                per_camera.setdefault(int(q_cams[i]), []).append(ap)
            else:
                per_pair.setdefault((int(q_cams[i]), int(camera)), []).append(ap)
    return per_camera, per_pair


@pytest.mark.parametrize(("seed", "ties"), [(0, False), (1, True), (2, False)])
def test_cross_camera_map_matches_the_per_query_reference(seed: int, ties: bool) -> None:
    dist, q_pids, g_pids, q_cams, g_cams = random_case(seed, 40, 70, 6, ties)
    result = cross_camera_map(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=7)
    per_camera, per_pair = cross_camera_reference(dist, q_pids, g_pids, q_cams, g_cams)
    assert result.query_cameras.tolist() == sorted(set(q_cams.tolist()))
    assert result.gallery_cameras.tolist() == sorted(set(g_cams.tolist()))
    for i, camera in enumerate(result.query_cameras.tolist()):
        aps = per_camera.get(camera, [])
        assert result.num_queries[i] == len(aps)
        if aps:
            assert result.per_query_camera[i] == pytest.approx(np.mean(aps), abs=1e-12)
        else:
            assert np.isnan(result.per_query_camera[i])
        for j, g_camera in enumerate(result.gallery_cameras.tolist()):
            aps = per_pair.get((camera, g_camera), [])
            assert result.num_pair_queries[i, j] == len(aps)
            if aps:
                assert result.per_pair[i, j] == pytest.approx(np.mean(aps), abs=1e-12)
            else:
                assert np.isnan(result.per_pair[i, j])
        same_camera = result.gallery_cameras.tolist().index(camera)
        assert np.isnan(result.per_pair[i, same_camera])  # same camera: every match is junk
    # The per-camera means, weighted by their queries, are the overall mAP.
    overall = rank_metrics(dist, q_pids, g_pids, q_cams, g_cams)
    weighted = np.nansum(result.per_query_camera * result.num_queries) / result.num_queries.sum()
    assert weighted == pytest.approx(overall.mAP, abs=1e-12)


def test_cross_camera_map_golden_and_checks() -> None:
    golden = (GOLDEN_Q_PIDS, GOLDEN_G_PIDS, GOLDEN_Q_CAMS, GOLDEN_G_CAMS)
    result = cross_camera_map(np.array(GOLDEN_DIST), *golden)
    # q0 (cam 0): AP 11/30 overall; gallery cam 1 holds g1 (match) and g3 -> ranked g3, g1: AP 1/2;
    # cam 2 holds only g4 (match): AP 1. q1 (cam 1): AP 1/2; cam 0: g5, g2 (match), g0 -> AP 1/2.
    # q2: no valid match.
    assert result.per_query_camera.tolist() == pytest.approx([11 / 30, 1 / 2])
    assert result.num_queries.tolist() == [1, 1]
    assert result.per_pair[0, 1:].tolist() == pytest.approx([1 / 2, 1.0])
    assert result.per_pair[1, 0] == pytest.approx(1 / 2)
    assert np.isnan(result.per_pair[[0, 1, 1], [0, 1, 2]]).all()
    with pytest.raises(ValueError, match="dist: expected a"):
        cross_camera_map(np.zeros(3), [1], [1, 2, 3], [0], [0, 1, 2])
    with pytest.raises(ValueError, match="gallery_camids: expected shape"):
        cross_camera_map(np.zeros((1, 3)), [1], [1, 2, 3], [0], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        cross_camera_map(np.full((1, 3), np.nan), [1], [1, 2, 3], [0], [0, 1, 2])


def test_sqeuclidean_distance_ranks_as_rank_metrics_from_features() -> None:
    rng = np.random.default_rng(0)
    query, gallery = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)
    dist = sqeuclidean_distance(query, gallery)
    assert dist.shape == (20, 30) and dist.dtype == np.float32
    np.testing.assert_allclose(dist, ((query[:, None] - gallery[None]) ** 2).sum(-1), rtol=1e-5, atol=1e-5)
    ids = (rng.integers(0, 5, 20), rng.integers(0, 5, 30), rng.integers(0, 3, 20), rng.integers(0, 3, 30))
    assert rank_metrics(dist, *ids).mAP == pytest.approx(rank_metrics_from_features(query, gallery, *ids).mAP)
