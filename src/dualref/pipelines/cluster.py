"""`dualref cluster FEATURES.npy`: the off-line stage (`dualref.pseudo_labels`) on saved features.

Writes ``coarse_labels.npy`` (DBSCAN, -1 = outlier) and ``refined_labels.npy`` (every sample, outliers
included) atomically, prints the time of every stage and, given ground-truth ``--pids``, the quality of the
labels (pids are only read for that table).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from dualref import io, label_quality, pseudo_labels
from dualref.config import ClusteringConfig

__all__ = ["load_features", "run_cluster"]

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


def _save_array(handle: BinaryIO, *, array: np.ndarray) -> None:
    np.save(handle, array)


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


def run_cluster(
    features_path: Path,
    *,
    settings: ClusteringConfig,
    pids_path: Path | None = None,
    out: Path | None = None,
    seed: int = 0,
    device: torch.device | None = None,
) -> int:
    """`dualref cluster`: the off-line stage on saved features, with timings; returns the exit status.

    Args:
        features_path: [N, D] float .npy file.
        settings: `clustering.*` (k1, k2, rho or a fixed eps, the eps cap, min_samples, R).
        pids_path: [N] int .npy of ground-truth ids, for the quality table only.
        out: folder of the label files (default: beside the features).
        seed: seed of the k-means restarts.
        device: device of the neighbour search and the k-means (default: CPU).
    """
    device = device if device is not None else torch.device("cpu")
    out = out if out is not None else features_path.parent
    timings: list[tuple[str, float]] = []
    start = time.perf_counter()
    features_np, renormalised = load_features(features_path)
    pids = _load_pids(pids_path, features_np.shape[0]) if pids_path is not None else None
    features = torch.from_numpy(features_np).to(device)
    timings.append(("load", time.perf_counter() - start))
    print(f"features: {features_path} [{features_np.shape[0]}, {features_np.shape[1]}]")
    if renormalised:
        print("note: feature rows were not unit-length; L2-normalised them")

    labels = pseudo_labels.compute_pseudo_labels(
        features, settings, eps=None, refine=True, seed=seed, device=device
    )
    timings.append((f"jaccard (k1={settings.k1}, k2={settings.k2})", labels.seconds["jaccard"]))
    timings.append((f"dbscan (min_samples={settings.min_samples})", labels.seconds["dbscan"]))
    coarse = labels.coarse
    print(
        f"dbscan: eps {labels.eps:.6f}, {labels.num_clusters} clusters, {int((coarse == -1).sum())} outliers"
    )
    refined = labels.refined
    if refined is None:
        print("note: no cluster found; refined labels are the coarse labels (all outliers)")
        refined = coarse.copy()
    timings.append((f"refinement (R={settings.num_subclusters})", labels.seconds.get("refine", 0.0)))

    start = time.perf_counter()
    for name, array in (("coarse_labels.npy", coarse), ("refined_labels.npy", refined)):
        io.write_bytes(out / name, functools.partial(_save_array, array=array))
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
            (f"refined R={settings.num_subclusters} (outliers -1)", trained),
            (f"refined R={settings.num_subclusters} (all samples)", refined),
        ]
        print("\nlabel quality vs. ground-truth pids (outliers are singletons):")
        print(_quality_table(rows, pids))
    return 0
