"""`dualref evaluate`: a checkpoint on a data set's query/gallery, with its options and saved outputs.

Options: flip averaging, k-reciprocal re-ranking (k1, k2, lambda), the cross-camera breakdown
(`evaluation.cross_camera_map`). Outputs: `--out results.json` (metrics, options, breakdown) and
`--save-features DIR`:

    query_features.npy / gallery_features.npy   [Q, D] / [G, D] float32, L2-normalised
    dist.npy                                    [Q, G] float32, the distances ranked by
    query_pids.npy, query_camids.npy, ...       [Q] / [G] int64
    query_paths.txt / gallery_paths.txt         the image files in row order

(`dualref visualize --saved DIR` draws ranked lists from such a folder without a model.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualref import evaluation, inference, io, training
from dualref.config import EvalConfig
from dualref.pipelines.extract import save_npy


@dataclass(frozen=True)
class EvaluateOptions:
    """The command's options (CLI flags, one to one)."""

    ranking: EvalConfig = field(default_factory=EvalConfig)  # flip averaging; re-ranking, its k1, k2, lambda
    cross_camera: bool = False
    height: int | None = None
    width: int | None = None


def run_evaluate(
    checkpoint_path: str | Path,
    dataset: str,
    root: str | Path,
    *,
    options: EvaluateOptions,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    out: str | Path | None = None,
    save_features: str | Path | None = None,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[inference.EvaluationResult, dict[str, Any]]:
    """Evaluate a checkpoint; write results.json and the features when asked.

    `amp_dtype` and `channels_last`: how the network computes (`training.resolve_amp`,
    `training.resolve_channels_last`); the metrics are computed in float32 either way.

    Returns:
        The evaluation and its JSON record (what `out` receives).
    """
    model, evaluator, state = inference.checkpoint_evaluator(
        checkpoint_path,
        dataset,
        root,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        options=options.ranking,
        height=options.height,
        width=options.width,
        progress=progress,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
    )
    result = evaluator.evaluate(model, keep_dist=save_features is not None, cross_camera=options.cross_camera)
    ranking = options.ranking
    record = {
        "checkpoint": str(checkpoint_path),
        "checkpoint_kind": state.get("kind"),
        "checkpoint_epoch": state.get("epoch"),
        "dataset": dataset,
        "root": str(root),
        "num_query": len(evaluator.query),
        "num_gallery": len(evaluator.gallery),
        "options": {
            "flip": ranking.flip,
            "rerank": ranking.rerank,
            **({"rerank_k1": ranking.rerank_k1, "rerank_k2": ranking.rerank_k2} if ranking.rerank else {}),
            **({"rerank_lambda": ranking.rerank_lambda} if ranking.rerank else {}),
            "height": evaluator.height,
            "width": evaluator.width,
            "numerics": training.numerics_name(amp_dtype, channels_last),
        },
        **inference.metrics_record(result.metrics),
        "cmc": [round(float(v), 6) for v in result.metrics.cmc[:20]],  # rank 1..20
    }
    if result.cross_camera is not None:
        record["cross_camera"] = cross_camera_record(result.cross_camera)
    if out is not None:
        io.write_json(out, record)
    if save_features is not None:
        _save_features(Path(save_features), result, evaluator)
    return result, record


def cross_camera_record(breakdown: evaluation.CrossCameraMAP) -> dict[str, Any]:
    """The breakdown as JSON: mAP per query camera and per (query, gallery) camera pair; null = no query."""

    def value(x: float) -> float | None:
        return None if math.isnan(x) else round(float(x), 6)

    return {
        "per_query_camera": {
            str(int(cam)): {"mAP": value(m), "num_queries": int(n)}
            for cam, m, n in zip(
                breakdown.query_cameras, breakdown.per_query_camera, breakdown.num_queries, strict=True
            )
        },
        "per_pair": {
            f"{int(q_cam)}->{int(g_cam)}": {
                "mAP": value(breakdown.per_pair[i, j]),
                "num_queries": int(breakdown.num_pair_queries[i, j]),
            }
            for i, q_cam in enumerate(breakdown.query_cameras)
            for j, g_cam in enumerate(breakdown.gallery_cameras)
        },
    }


def _save_features(folder: Path, result: inference.EvaluationResult, evaluator: inference.Evaluator) -> None:
    assert result.dist is not None
    save_npy(folder / "query_features.npy", result.query_features.numpy().astype(np.float32))
    save_npy(folder / "gallery_features.npy", result.gallery_features.numpy().astype(np.float32))
    save_npy(folder / "dist.npy", np.asarray(result.dist, dtype=np.float32))
    for name, samples in (("query", evaluator.query), ("gallery", evaluator.gallery)):
        save_npy(folder / f"{name}_pids.npy", np.array([s.pid for s in samples], dtype=np.int64))
        save_npy(folder / f"{name}_camids.npy", np.array([s.camid for s in samples], dtype=np.int64))
        io.write_text(folder / f"{name}_paths.txt", "".join(f"{s.path}\n" for s in samples))
