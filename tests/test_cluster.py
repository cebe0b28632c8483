"""`dualref cluster` end to end on a small generated .npy (real Jaccard, DBSCAN and refinement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dualref import cli, clustering, distances, refinement


def write_features(folder: Path, scale: float = 1.0) -> tuple[Path, Path, np.ndarray]:
    """30 identities x 8 noisy unit vectors in 32-d (times ``scale``), saved as features.npy / pids.npy."""
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(30), 8)
    centres = rng.normal(size=(30, 32))
    features = centres[pids] + 0.35 * rng.normal(size=(pids.size, 32))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    features = (features * scale).astype(np.float32)
    np.save(folder / "features.npy", features)
    np.save(folder / "pids.npy", pids)
    return folder / "features.npy", folder / "pids.npy", features


def test_cluster_command_writes_labels_and_quality(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features_path, pids_path, features = write_features(tmp_path)
    out = tmp_path / "labels"
    argv = ["cluster", str(features_path), "--pids", str(pids_path), "--out", str(out)]
    assert cli.main([*argv, "--rho", "0.01", "--num-subclusters", "2", "--seed", "3"]) == 0
    coarse = np.load(out / "coarse_labels.npy")
    refined = np.load(out / "refined_labels.npy")

    # The same stages called directly give the same labels.
    feats = torch.from_numpy(features)
    dist = distances.jaccard_distance(feats, k1=20, k2=6)
    eps = clustering.dbscan_eps(dist, rho=0.01)
    np.testing.assert_array_equal(coarse, clustering.cluster_dbscan(dist, eps=eps, min_samples=4))
    np.testing.assert_array_equal(refined, refinement.refine_labels(feats, coarse, 2, seed=3))
    assert coarse.max() >= 5  # the identities are well separated: many clusters
    assert refined.min() >= 0 and refined.max() == coarse.max()

    printed = capsys.readouterr().out
    for text in ("time per stage", "jaccard", "dbscan: eps", "refinement (R=2)", "coarse (DBSCAN)", "ARI"):
        assert text in printed
    assert "not unit-length" not in printed


def test_cluster_command_defaults_out_to_features_folder_and_normalises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    features_path, _, _ = write_features(tmp_path, scale=3.0)
    assert cli.main(["cluster", str(features_path), "--eps", "0.5", "--num-subclusters", "1"]) == 0
    assert "not unit-length" in capsys.readouterr().out
    coarse = np.load(tmp_path / "coarse_labels.npy")
    assert coarse.shape == (240,) and coarse.max() >= 5
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file


def test_cluster_command_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = np.ones((10, 4), dtype=np.float32)
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert cli.main(["cluster", str(tmp_path / "nan.npy")]) == 2
    assert "row 3" in capsys.readouterr().err
    np.save(tmp_path / "ints.npy", np.ones((10, 4), dtype=np.int64))
    assert cli.main(["cluster", str(tmp_path / "ints.npy")]) == 2
    assert "float" in capsys.readouterr().err
    assert cli.main(["cluster", str(tmp_path / "missing.npy")]) == 2
    assert "does not exist" in capsys.readouterr().err
    features_path, _, _ = write_features(tmp_path)
    np.save(tmp_path / "short_pids.npy", np.arange(5))
    assert cli.main(["cluster", str(features_path), "--pids", str(tmp_path / "short_pids.npy")]) == 2
    assert "pids" in capsys.readouterr().err
    assert not (tmp_path / "coarse_labels.npy").exists()
