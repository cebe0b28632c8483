"""`dualref cluster FEATURES.npy`: Jaccard distance -> DBSCAN -> hierarchical refinement on saved features.

Writes ``coarse_labels.npy`` (DBSCAN, -1 = outlier) and ``refined_labels.npy`` (every sample, outliers
included) atomically, prints the time of every stage and, given ground-truth ``--pids``, the quality of the
labels (pids are only read for that table).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dualref import clustering, distances, label_quality, refinement, training

__all__ = ["load_features", "run"]

# Rows whose norm is further than this from 1 are taken as "not L2-normalised" (float32 rounding is ~1e-7).
UNIT_NORM_TOLERANCE = 1e-3


def load_features(path: Path) -> tuple[np.ndarray, bool]:
    """[N, D] float32 L2-normalised features from a .npy file, and whether they had to be normalised.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Not a 2-D float array with N >= 2, or non-finite or all-zero rows.
    """
    if not path.is_file():
        raise FileNotFoundError(f"features file {path} does not exist")
    features = np.load(path, allow_pickle=False)
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating) or features.shape[0] < 2:
        raise ValueError(
            f"{path}: expected an [N, D] float array with N >= 2; got shape {features.shape}, "
            f"{features.dtype}"
        )
    if not np.isfinite(features).all():
        bad = int(np.flatnonzero(~np.isfinite(features).all(1))[0])
        raise ValueError(f"{path}: row {bad} holds NaN or infinite values; expected finite features")
    features = features.astype(np.float32)
    norms = np.linalg.norm(features, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{path}: row {int(np.flatnonzero(norms == 0)[0])} is all zeros; cannot normalise")
    # Unit rows are kept bit for bit (re-dividing would move the last bits and, at the eps boundary, labels).
    if np.abs(norms - 1.0).max() <= UNIT_NORM_TOLERANCE:
        return features, False
    return features / norms[:, None], True


def _load_pids(path: Path, num_samples: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"pids file {path} does not exist")
    pids = np.load(path, allow_pickle=False)
    if pids.shape != (num_samples,) or not np.issubdtype(pids.dtype, np.integer):
        raise ValueError(
            f"{path}: expected [N] = [{num_samples}] integer pids; got shape {pids.shape}, {pids.dtype}"
        )
    return pids


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _quality_table(rows: list[tuple[str, np.ndarray]], pids: np.ndarray) -> str:
    header = (
        f"{'labels':<28} {'clusters':>8} {'outliers':>8} {'P':>7} {'R':>7} {'F':>7} {'NMI':>7} {'ARI':>7}"
    )
    lines = [header, "-" * len(header)]
    for name, labels in rows:
        q = label_quality.label_quality(labels, pids)
        lines.append(
            f"{name:<28} {q.num_clusters:>8} {q.num_outliers:>8} {q.pairwise_precision:>7.4f} "
            f"{q.pairwise_recall:>7.4f} {q.pairwise_fscore:>7.4f} {q.nmi:>7.4f} {q.ari:>7.4f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the `dualref cluster` command (arguments: see ``cli.build_parser``); returns the exit status."""
    features_path = Path(args.features)
    out = Path(args.out) if args.out is not None else features_path.parent
    device = training.resolve_device(args.device, key="--device")
    timings: list[tuple[str, float]] = []

    start = time.perf_counter()
    features_np, renormalised = load_features(features_path)
    pids = _load_pids(Path(args.pids), features_np.shape[0]) if args.pids is not None else None
    features = torch.from_numpy(features_np).to(device)
    timings.append(("load", time.perf_counter() - start))
    print(f"features: {features_path} [{features_np.shape[0]}, {features_np.shape[1]}]")
    if renormalised:
        print("note: feature rows were not unit-length; L2-normalised them")

    start = time.perf_counter()
    dist = distances.jaccard_distance(features, k1=args.k1, k2=args.k2, device=device)
    timings.append((f"jaccard (k1={args.k1}, k2={args.k2})", time.perf_counter() - start))
    print(f"jaccard: {dist.nnz} stored pairs ({dist.nnz / features_np.shape[0]:.1f} per row)")

    start = time.perf_counter()
    eps = args.eps if args.eps is not None else clustering.dbscan_eps(dist, rho=args.rho)
    timings.append(("dbscan eps" if args.eps is None else "dbscan eps (given)", time.perf_counter() - start))
    start = time.perf_counter()
    coarse = clustering.cluster_dbscan(dist, eps=eps, min_samples=args.min_samples)
    timings.append((f"dbscan (min_samples={args.min_samples})", time.perf_counter() - start))
    num_clusters = int(coarse.max(initial=-1)) + 1
    print(f"dbscan: eps {eps:.6f}, {num_clusters} clusters, {int((coarse == -1).sum())} outliers")

    start = time.perf_counter()
    if num_clusters > 0:
        refined = refinement.refine_labels(features, coarse, args.num_subclusters, seed=args.seed)
    else:
        print("note: no cluster found; refined labels are the coarse labels (all outliers)")
        refined = coarse.copy()
    timings.append((f"refinement (R={args.num_subclusters})", time.perf_counter() - start))

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "coarse_labels.npy", coarse)
    _save_npy(out / "refined_labels.npy", refined)
    timings.append(("write labels", time.perf_counter() - start))
    print(f"wrote {out / 'coarse_labels.npy'} and {out / 'refined_labels.npy'}")

    print("\ntime per stage:")
    for name, seconds in timings:
        print(f"  {name:<32} {seconds:8.3f} s")
    print(f"  {'total':<32} {sum(s for _, s in timings):8.3f} s")
    if pids is not None:
        # The losses see refined labels only where the coarse label is not an outlier.
        trained = np.where(coarse >= 0, refined, -1)
        rows = [
            ("coarse (DBSCAN)", coarse),
            (f"refined R={args.num_subclusters} (outliers -1)", trained),
            (f"refined R={args.num_subclusters} (all samples)", refined),
        ]
        print("\nlabel quality vs. ground-truth pids (outliers are singletons):")
        print(_quality_table(rows, pids))
    return 0
