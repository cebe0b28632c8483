"""Tests of dualref.distances: exact k-NN, the sparse k-reciprocal Jaccard distance and re-ranking.

The reference implementations below are straightforward dense numpy transcriptions of
docs/method.md section 3 (full argsort, Python sets per row, a dense V matrix). They are
slow and obviously O(N^2); the library must give the same numbers without an N x N matrix.
Float64 features make both sides rank with the same similarities, so the comparison is not
disturbed by near-ties; a float32 run is compared too, on data whose ranking margins are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import sparse

from dualref import distances
from dualref.distances import Neighbors, jaccard_distance, knn, reranked_distance

# --------------------------------------------------------------------------------------------------
# ------------- Dense reference implementation of the reference semantics. -------------------------
# --------------------------------------------------------------------------------------


def _normalised_distance(features: np.ndarray) -> np.ndarray:
    """d_ij = 2 - 2 f_i.f_j, each row divided by its own maximum (float64)."""
    f = features.astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    d = 2.0 - 2.0 * (f @ f.T)
    return d / d.max(axis=1, keepdims=True)


def _reference_encoding(d: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Dense V after query expansion, from a row-normalised distance matrix."""
    n = d.shape[0]
    rank = np.argsort(d, axis=1, kind="stable")

    def reciprocal(i: int, k: int) -> np.ndarray:
        forward = rank[i, : k + 1]
        return np.array([j for j in forward if i in rank[j, : k + 1]], dtype=np.int64)

    half = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(int(c), half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion.extend(rc)
        e = np.unique(np.array(expansion, dtype=np.int64))
        w = np.exp(-d[i, e])
        v[i, e] = w / w.sum()
    if k2 > 1:
        v = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(n)])
    return v


def _reference_min_sums(v: np.ndarray, rows: range) -> np.ndarray:
    """S_ij = sum_k min(V_ik, V_jk) for i in rows, all j."""
    out = np.zeros((len(rows), v.shape[0]))
    for out_row, i in enumerate(rows):
        nz = np.nonzero(v[i])[0]
        out[out_row] = np.minimum(v[i, nz][None, :], v[:, nz]).sum(axis=1)
    return out


def reference_jaccard(features: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """Dense [N, N] Jaccard distance of the reference semantics."""
    v = _reference_encoding(_normalised_distance(features), k1, k2)
    s = _reference_min_sums(v, range(v.shape[0]))
    return np.maximum(1.0 - s / (2.0 - s), 0.0)


def reference_rerank(
    query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float
) -> np.ndarray:
    """Dense [Q, G] re-ranked distance: encoding over the union, J mixed with normalised d."""
    num_q = query.shape[0]
    d = _normalised_distance(np.concatenate([query, gallery]))
    v = _reference_encoding(d, k1, k2)
    s = _reference_min_sums(v, range(num_q))
    jac = np.maximum(1.0 - s / (2.0 - s), 0.0)
    return ((1 - lambda_value) * jac + lambda_value * d[:num_q])[:, num_q:]


# --------------------------------------------------------------------------------------------------
# ------------- Fixtures ---------------------------------------------------------------------------
# ------------------------------------


def random_features(
    n: int, dim: int, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(
        torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1
    ).to(dtype)


def clustered_features(
    num_ids: int, per_id: int, dim: int, noise: float, seed: int, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """num_ids centres with per_id noisy unit vectors each, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=gen, dtype=torch.float64)
    centres = torch.nn.functional.normalize(centres, dim=1)
    points = centres.repeat_interleave(per_id, dim=0)
    points = points + noise * torch.randn(
        points.shape, generator=gen, dtype=torch.float64
    ) / math.sqrt(dim)
    points = points[torch.randperm(points.shape[0], generator=gen)]
    return torch.nn.functional.normalize(points, dim=1).to(dtype)


def dense(matrix: sparse.csr_matrix) -> np.ndarray:
    """Dense view with absent entries = 1 (the documented meaning of an absent pair)."""
    out = np.ones(matrix.shape)
    coo = matrix.tocoo()
    out[coo.row, coo.col] = coo.data
    return out


def assert_csr_invariants(matrix: sparse.csr_matrix) -> None:
    n = matrix.shape[0]
    assert isinstance(matrix, sparse.csr_matrix) and matrix.shape == (n, n)
    assert matrix.dtype == np.float32
    assert matrix.has_sorted_indices
    for i in range(n):  # sorted, distinct columns in each row
        cols = matrix.indices[matrix.indptr[i] : matrix.indptr[i + 1]]
        assert np.all(np.diff(cols) > 0)
    assert np.all(matrix.data >= 0) and np.all(matrix.data < 1)
    assert (matrix != matrix.T).nnz == 0  # exactly symmetric, values and structure
    assert np.array_equal(matrix.indptr, matrix.T.tocsr().indptr)
    diagonal = dense(matrix).diagonal()
    assert np.all(diagonal < 1e-6)


# --------------------------------------------------------------------------------------------------
# ------------- knn --------------------------------------------------------------------------------
# -------------------------------


@pytest.mark.parametrize(
    ("chunk_size", "max_candidates"), [(13, 64), (13, 1), (64, 64), (2048, 64)]
)
def test_knn_matches_full_sort(
    chunk_size: int, max_candidates: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # max_candidates=1 forces the full top-k fallback of the block merge nearly everywhere.
    monkeypatch.setattr(distances, "_MAX_CANDIDATES", max_candidates)
    feats = random_features(150, 16, seed=0)
    got = knn(feats, 12, chunk_size=chunk_size)
    sims = (feats @ feats.T).numpy()
    order = np.argsort(-sims, axis=1, kind="stable")[:, :12]
    assert isinstance(got, Neighbors)
    assert got.indices.dtype == torch.int64 and got.indices.shape == (150, 12)
    assert np.array_equal(got.indices.numpy(), order)
    np.testing.assert_allclose(
        got.sims.numpy(), np.take_along_axis(sims, order, axis=1), atol=1e-12
    )
    np.testing.assert_allclose(got.min_sims.numpy(), sims.min(axis=1), atol=1e-12)
    assert np.array_equal(got.indices[:, 0].numpy(), np.arange(150))  # self first


def test_knn_float32_matches_sort_and_keeps_dtype() -> None:
    feats = random_features(300, 32, seed=1, dtype=torch.float32)
    got = knn(feats, 8, chunk_size=50)
    assert got.sims.dtype == torch.float32
    sims = feats.double() @ feats.double().T
    order = torch.argsort(-sims, dim=1, stable=True)[:, :9]
    margins = sims.gather(1, order[:, 7:8]) - sims.gather(1, order[:, 8:9])
    assert float(margins.min()) > 1e-5  # precondition: no near-tie at the k-th place
    assert torch.equal(got.indices, order[:, :8])


def test_knn_ties_lower_index_first() -> None:
    # Basis vectors (each listed twice): similarities are exactly 1 (same vector) or 0, so the top-k
    # is all ties after the duplicates; the documented rule is: highest similarity, then lowest
    # index.
    eye = torch.eye(6, dtype=torch.float32)
    feats = torch.cat([eye, eye])  # row i and row i + 6 are identical
    got = knn(feats, 4, chunk_size=5)
    for i in range(12):
        twins = sorted({i % 6, i % 6 + 6})
        others = [j for j in range(12) if j not in twins][:2]
        assert got.indices[i].tolist() == twins + others
        assert got.sims[i].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_knn_rejects_bad_input() -> None:
    feats = random_features(10, 4, seed=2)
    with pytest.raises(ValueError, match="k=0"):
        knn(feats, 0)
    with pytest.raises(ValueError, match="k=11"):
        knn(feats, 11)
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        knn(feats[0], 1)
    bad = feats.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        knn(bad, 2)
    zero = feats.clone()
    zero[4] = 0
    with pytest.raises(ValueError, match="row 4"):
        knn(zero, 2)
    with pytest.raises(ValueError, match="floating"):
        knn(torch.ones(5, 3, dtype=torch.int64), 2)


# --------------------------------------------------------------------------------------------------
# ------------- jaccard_distance -------------------------------------------------------------------
# --------------------------------------------


def test_jaccard_golden_four_points() -> None:
    # a=(1,0), b=(cos60, sin60), c=-a, d=-b, k1=1, k2=1. By hand: d(a,b)=2-2cos60=1, the row maximum
    # is d(a,c)=4, so d~(a,b)=1/4; top-2 of a is {a, b} and of b is {b, a}, so R(a,1)={a,b}.
    # round(1/2)=0 and R(c,0)={c} adds nothing. V_a = (1, e^-1/4)/(1+e^-1/4) on (a, b), V_b the same
    # on (b, a), hence S_ab = 2q/(1+q) with q = e^-1/4, 2 - S_ab = 2/(1+q), so J_ab = 1 - q =
    # 0.2211992; a and c share no support: J = 1.
    theta = math.pi / 3
    pts = torch.tensor(
        [
            [1.0, 0.0],
            [math.cos(theta), math.sin(theta)],
            [-1.0, 0.0],
            [-math.cos(theta), -math.sin(theta)],
        ],
        dtype=torch.float64,
    )
    jac = jaccard_distance(pts, k1=1, k2=1)
    q = math.exp(-0.25)
    s = 2 * q / (1 + q)
    golden = 1 - s / (2 - s)
    assert golden == pytest.approx(1 - math.exp(-0.25), abs=1e-12)
    assert golden == pytest.approx(0.2211992, abs=1e-7)
    full = dense(jac)
    assert full[0, 1] == pytest.approx(golden, abs=1e-6)
    assert full[2, 3] == pytest.approx(golden, abs=1e-6)
    assert full[0, 2] == 1.0 and full[1, 3] == 1.0 and jac[0, 2] == 0  # absent = 1
    assert jac.nnz == 8  # four diagonal zeros + (a,b), (b,a), (c,d), (d,c)
    # With k2=2 the query-expanded V_a and V_b are both the mean of V_a and V_b: S_ab = 1, J_ab = 0,
    # and that zero must be stored explicitly (absent would mean 1).
    jac2 = jaccard_distance(pts, k1=1, k2=2)
    assert jac2.nnz == 8
    assert jac2[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert 1 in jac2.indices[jac2.indptr[0] : jac2.indptr[1]]


@pytest.mark.parametrize(("k1", "k2"), [(20, 6), (5, 1), (7, 3), (3, 4)])
def test_jaccard_matches_dense_reference_random(k1: int, k2: int) -> None:
    feats = random_features(160, 8, seed=k1 * 10 + k2)
    got = jaccard_distance(feats, k1=k1, k2=k2, chunk_size=37)
    assert_csr_invariants(got)
    want = reference_jaccard(feats.numpy(), k1, k2)
    np.testing.assert_allclose(dense(got), want, atol=1e-5, rtol=0)
    # Stored pairs are exactly those with J < 1.
    assert got.nnz == int((want < 1).sum())


def test_jaccard_matches_dense_reference_clustered() -> None:
    feats = clustered_features(num_ids=25, per_id=12, dim=32, noise=0.6, seed=3)
    got = jaccard_distance(feats, k1=20, k2=6, chunk_size=64)
    assert_csr_invariants(got)
    want = reference_jaccard(feats.numpy(), 20, 6)
    np.testing.assert_allclose(dense(got), want, atol=1e-5, rtol=0)
    assert got.nnz == int((want < 1).sum())


def test_jaccard_small_steps_give_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exercise every multi-step path (row steps, pair steps, accumulator steps) with tiny budgets.
    feats = clustered_features(num_ids=10, per_id=9, dim=16, noise=0.8, seed=4)
    want = jaccard_distance(feats, k1=8, k2=3)
    monkeypatch.setattr(distances, "_ROW_STEP", 7)
    monkeypatch.setattr(distances, "_MAX_TRIPLES", 50)
    monkeypatch.setattr(distances, "_ACCUMULATOR_ENTRIES", 200)
    monkeypatch.setattr(distances, "_PAIRS_PER_DOT", 3)
    got = jaccard_distance(feats, k1=8, k2=3, chunk_size=11)
    assert np.array_equal(got.indptr, want.indptr) and np.array_equal(got.indices, want.indices)
    np.testing.assert_allclose(got.data, want.data, atol=1e-6)


def test_jaccard_float32_matches_reference_when_margins_are_clear() -> None:
    feats = clustered_features(
        num_ids=12, per_id=10, dim=64, noise=0.5, seed=2, dtype=torch.float32
    )
    k1, k2 = 10, 4
    # Precondition: no near-ties at any rank boundary used (k2, round(k1/2)+1, k1+1).
    sims = np.sort(feats.double().numpy() @ feats.double().numpy().T, axis=1)[:, ::-1]
    for place in (k2, round(k1 / 2) + 1, k1 + 1):
        assert (sims[:, place - 1] - sims[:, place]).min() > 1e-5
    got = jaccard_distance(feats, k1=k1, k2=k2)
    assert_csr_invariants(got)
    np.testing.assert_allclose(
        dense(got), reference_jaccard(feats.numpy(), k1, k2), atol=1e-5, rtol=0
    )


@pytest.mark.slow
def test_jaccard_matches_dense_reference_n2000() -> None:
    feats = clustered_features(num_ids=120, per_id=17, dim=64, noise=0.7, seed=6)[:2000]
    got = jaccard_distance(feats, k1=20, k2=6, chunk_size=512)
    want = reference_jaccard(feats.numpy(), 20, 6)
    np.testing.assert_allclose(dense(got), want, atol=1e-5, rtol=0)
    assert got.nnz == int((want < 1).sum())
    assert (got != got.T).nnz == 0


def test_jaccard_on_device_matches_cpu(device: torch.device) -> None:
    feats = clustered_features(num_ids=8, per_id=10, dim=16, noise=0.7, seed=7)
    cpu = jaccard_distance(feats, k1=9, k2=3)
    other = jaccard_distance(feats, k1=9, k2=3, device=device)
    assert np.array_equal(cpu.indices, other.indices) and np.array_equal(cpu.indptr, other.indptr)
    np.testing.assert_allclose(cpu.data, other.data, atol=1e-6)


def test_jaccard_keeps_the_thread_setting() -> None:
    # The sparse phase runs single-threaded on CPU and must restore the caller's setting.
    before = torch.get_num_threads()
    jaccard_distance(random_features(40, 8, seed=11), k1=5, k2=2)
    assert torch.get_num_threads() == before


def test_jaccard_rejects_bad_parameters() -> None:
    feats = random_features(10, 4, seed=8)
    with pytest.raises(ValueError, match="k1=0"):
        jaccard_distance(feats, k1=0)
    with pytest.raises(ValueError, match="k2=0"):
        jaccard_distance(feats, k1=3, k2=0)
    with pytest.raises(ValueError, match="N=10 samples are too few for k1=10"):
        jaccard_distance(feats, k1=10)
    with pytest.raises(ValueError, match="k2=11"):
        jaccard_distance(feats, k1=3, k2=11)
    with pytest.raises(ValueError, match="identical"):
        jaccard_distance(torch.ones(6, 3), k1=2, k2=1)


def test_symmetric_csr_keeps_explicit_zeros() -> None:
    # Upper triangle with a stored zero off the diagonal: the mirror must hold it too.
    rows = np.array([0, 0, 1, 1, 2])
    cols = np.array([0, 2, 1, 2, 2])
    vals = np.array([0.0, 0.0, 0.0, 0.5, 0.0], dtype=np.float32)
    out = distances._symmetric_csr(rows, cols, vals, 3)
    assert out.nnz == 7
    assert out.indptr.tolist() == [0, 2, 4, 7]
    assert out.indices.tolist() == [0, 2, 1, 2, 0, 1, 2]
    assert out.data.tolist() == [0.0, 0.0, 0.0, 0.5, 0.0, 0.5, 0.0]


# --------------------------------------------------------------------------------------------------
# ------------- reranked_distance ------------------------------------------------------------------
# ---------------------------------------------


@pytest.mark.parametrize(("k1", "k2", "lambda_value"), [(20, 6, 0.3), (6, 1, 0.0), (9, 3, 1.0)])
def test_rerank_matches_dense_reference(k1: int, k2: int, lambda_value: float) -> None:
    feats = clustered_features(num_ids=15, per_id=10, dim=24, noise=0.8, seed=9)
    query, gallery = feats[:40], feats[40:]
    got = reranked_distance(query, gallery, k1=k1, k2=k2, lambda_value=lambda_value, chunk_size=33)
    assert got.shape == (40, 110) and got.dtype == np.float32
    want = reference_rerank(query.numpy(), gallery.numpy(), k1, k2, lambda_value)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_rerank_small_steps_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    feats = random_features(90, 12, seed=10)
    want = reranked_distance(feats[:20], feats[20:], k1=7, k2=3)
    monkeypatch.setattr(distances, "_MAX_TRIPLES", 40)
    monkeypatch.setattr(distances, "_ROW_STEP", 5)
    got = reranked_distance(feats[:20], feats[20:], k1=7, k2=3, chunk_size=6)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match=r"lambda_value=1\.5"):
        reranked_distance(feats[:20], feats[20:], lambda_value=1.5)
    with pytest.raises(ValueError, match="D=12 but gallery_features have D=11"):
        reranked_distance(feats[:20], feats[20:, :11])
