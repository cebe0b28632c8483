"""`dualref evaluate` options and outputs, and the same options in adaptation's evaluation (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dualref import cli, distances, evaluation, inference, training
from dualref.data import datasets
from dualref.pipelines import adapt
from tiny_adapt import tiny_config
from tiny_model import write_checkpoint, write_target


@pytest.fixture(scope="module")
def target_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_target(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint.pt")


@pytest.fixture
def rerank_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Records the options every re-ranking is called with."""
    calls: list[dict[str, Any]] = []
    real = distances.reranked_distance

    def recording(query: Any, gallery: Any, **options: Any) -> np.ndarray:
        calls.append(options)
        return real(query, gallery, **options)

    monkeypatch.setattr(distances, "reranked_distance", recording)
    return calls


def test_evaluate_with_every_option_writes_results_and_features(
    model_path: Path,
    target_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rerank_calls: list[dict[str, Any]],
) -> None:
    results, saved = tmp_path / "results.json", tmp_path / "saved"
    argv = ["evaluate", str(model_path), "--dataset", "market1501", "--root", str(target_root)]
    argv += ["--workers", "0", "--device", "cpu", "--flip", "--rerank", "--rerank-k1", "7"]
    argv += ["--rerank-k2", "3", "--rerank-lambda", "0.2", "--cross-camera"]
    assert cli.main([*argv, "--out", str(results), "--save-features", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "with flip, re-ranking (k1=7, k2=3, lambda=0.2)" in printed
    assert "mAP % by camera" in printed and "valid queries" in printed
    assert rerank_calls == [{"k1": 7, "k2": 3, "lambda_value": 0.2}]

    record = json.loads(results.read_text())
    options = {"flip": True, "rerank": True, "rerank_k1": 7, "rerank_k2": 3, "rerank_lambda": 0.2}
    assert record["options"] == {**options, "height": 32, "width": 16, "numerics": "float32, channels-last"}
    assert 0 <= record["mAP"] <= 1 and len(record["cmc"]) == 20
    splits = datasets.load_dataset("market1501", target_root)
    dist = np.load(saved / "dist.npy")
    assert dist.shape == (len(splits.query), len(splits.gallery)) and dist.dtype == np.float32
    q_ids = np.load(saved / "query_pids.npy"), np.load(saved / "query_camids.npy")
    g_ids = np.load(saved / "gallery_pids.npy"), np.load(saved / "gallery_camids.npy")
    # The saved distances and ids give back the reported numbers.
    recomputed = evaluation.rank_metrics(dist, q_ids[0], g_ids[0], q_ids[1], g_ids[1])
    assert recomputed.mAP == pytest.approx(record["mAP"], abs=1e-6)
    breakdown = evaluation.cross_camera_map(dist, q_ids[0], g_ids[0], q_ids[1], g_ids[1])
    first = record["cross_camera"]["per_query_camera"][str(int(breakdown.query_cameras[0]))]
    assert first["mAP"] == pytest.approx(breakdown.per_query_camera[0], abs=1e-6)
    assert np.load(saved / "query_features.npy").shape == (len(splits.query), 256)
    assert (saved / "gallery_paths.txt").read_text().splitlines() == [str(s.path) for s in splits.gallery]


def test_plain_evaluation_is_unchanged_by_keeping_the_distances(model_path: Path, target_root: Path) -> None:
    model, evaluator, _ = inference.checkpoint_evaluator(
        model_path, "market1501", target_root, device=torch.device("cpu"), num_workers=0, progress=False
    )
    plain = evaluator.evaluate(model)
    kept = evaluator.evaluate(model, keep_dist=True, cross_camera=True)
    assert plain.dist is None and plain.cross_camera is None and kept.dist is not None
    assert kept.metrics.mAP == pytest.approx(plain.metrics.mAP, abs=1e-6)


def test_adaptation_evaluates_with_the_configured_options(
    target_root: Path, tmp_path: Path, rerank_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    flips: list[bool] = []
    real_evaluate = inference.Evaluator.evaluate

    def recording(self: inference.Evaluator, model: Any, **kwargs: Any) -> Any:
        flips.append(self.options.flip)
        return real_evaluate(self, model, **kwargs)

    monkeypatch.setattr(inference.Evaluator, "evaluate", recording)
    overrides = ("optim.epochs=0", "evaluation.flip=true", "evaluation.rerank=true", "evaluation.rerank_k1=5")
    adapt.adapt_to_target(tiny_config(target_root, tmp_path / "run", *overrides))
    assert flips == [True] and rerank_calls == [{"k1": 5, "k2": 6, "lambda_value": 0.3}]
    adapt.adapt_to_target(tiny_config(target_root, tmp_path / "plain", "optim.epochs=0"))
    assert flips == [True, False] and len(rerank_calls) == 1  # off by default


def test_device_auto_resolves_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="dualref.training"):
        device = training.resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert f"run.device=auto: running on {device.type}" in caplog.text
    with pytest.raises(ValueError, match="expected cpu, cuda, cuda:N or auto"):
        training.resolve_device("tpu")
