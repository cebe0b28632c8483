"""Using a trained model: rebuild it from any dualref checkpoint, extract, evaluate (docs/method.md §6).

One evaluation path for every caller: pre-training's source and direct-transfer evaluations, adaptation's
per-epoch target evaluation and `dualref evaluate` all go through `Evaluator` (eval mode, L2-normalised
BN-neck features, squared Euclidean distance or k-reciprocal re-ranking, mAP / CMC / mINP). Query and
gallery pids are read here, for measurement only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dualref import checkpoint, evaluation, extraction
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits, Sample
from dualref.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dualref.evaluation import RankMetrics
from dualref.models.reid_net import ReidNet

log = logging.getLogger(__name__)

MODEL_KINDS = ("pretrain", "adapt")


def model_metadata(model: ReidNet, *, height: int, width: int) -> dict[str, Any]:
    """What inference needs to rebuild `model` without its config (stored in every checkpoint)."""
    return {
        "arch": model.arch,
        "num_classes": model.num_classes,
        "feat_dim": model.feat_dim,
        "height": height,
        "width": width,
        "model_options": dict(model.options),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    }


def model_from_checkpoint(state: dict[str, Any]) -> ReidNet:
    """Rebuild the network stored in a checkpoint (pretrain or adapt), weights loaded, on the CPU."""
    missing = [key for key in ("model", "arch", "num_classes") if key not in state]
    if missing or state.get("kind", "pretrain") not in MODEL_KINDS:
        raise ValueError(
            f"checkpoint lacks {missing or 'a model'} (kind {state.get('kind')!r}); expected a "
            "checkpoint of dualref pretrain/adapt"
        )
    options = state.get("model_options")
    if options is None:  # checkpoints written before model_options existed: read the config
        model_cfg = state.get("config", {}).get("model", {})
        options = {
            "last_stride": int(model_cfg.get("last_stride", 1)),
            "stem_relu": bool(model_cfg.get("stem_relu", False)),
            "neck_relu": bool(model_cfg.get("neck_relu", False)),
        }
    model = ReidNet(state["arch"], int(state["num_classes"]), pretrained=None, **options)
    model.load_state_dict(state["model"])
    return model


def load_model(path: str | Path) -> tuple[ReidNet, dict[str, Any]]:
    """The model of checkpoint `path` (CPU, eval mode) and the checkpoint's state."""
    state = checkpoint.load_checkpoint(path)
    try:
        model = model_from_checkpoint(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return model.eval(), state


class Evaluator:
    """The query/gallery test of one data set; loaders built once (images decoded once with `cache`).

    Args:
        splits: the data set (its query and gallery pids are read: measurement only).
        height, width: network input size.
        batch_size, num_workers, cache: of the extraction loaders.
        device: where the model runs.
        amp_dtype: autocast dtype on CUDA.
        flip: average with horizontally flipped images.
        rerank: k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) instead of the plain distance.
        progress: progress bars.
    """

    def __init__(
        self,
        splits: ReidSplits,
        *,
        height: int,
        width: int,
        device: torch.device,
        batch_size: int = 128,
        num_workers: int = 2,
        cache: bool = False,
        amp_dtype: torch.dtype | None = None,
        flip: bool = False,
        rerank: bool = False,
        progress: bool = True,
    ) -> None:
        if not splits.query or not splits.gallery:
            raise ValueError(
                f"data set {splits.name!r} has {len(splits.query)} query and {len(splits.gallery)} "
                "gallery images; expected both non-empty for the evaluation"
            )
        self.name = splits.name
        self.query, self.gallery = splits.query, splits.gallery
        self.loaders = {
            name: loaders.test_loader(
                [s.path for s in samples],
                height=height,
                width=width,
                batch_size=batch_size,
                num_workers=num_workers,
                cache=cache,
                pin_memory=device.type == "cuda",
            )
            for name, samples in (("query", self.query), ("gallery", self.gallery))
        }
        self.device, self.amp_dtype = device, amp_dtype
        self.flip, self.rerank, self.progress = flip, rerank, progress

    def rank_metrics(self, model: nn.Module) -> RankMetrics:
        """Rank metrics of `model` (moved to the evaluator's device beforehand)."""
        query, gallery = (
            extraction.extract_features(
                model,
                loader,
                self.device,
                flip=self.flip,
                progress=self.progress,
                desc=name,
                amp_dtype=self.amp_dtype,
            )
            for name, loader in self.loaders.items()
        )
        labels = (_ids(self.query, "pid"), _ids(self.gallery, "pid"))
        cams = (_ids(self.query, "camid"), _ids(self.gallery, "camid"))
        if self.rerank:
            from dualref import distances

            dist = distances.reranked_distance(query, gallery, k1=20, k2=6, lambda_value=0.3)
            return evaluation.rank_metrics(dist, labels[0], labels[1], cams[0], cams[1])
        return evaluation.rank_metrics_from_features(
            query, gallery, labels[0], labels[1], cams[0], cams[1], device=self.device
        )

    def record(self, model: nn.Module) -> dict[str, Any]:
        """`metrics_record` of `model`, with the data set's name and the evaluation's wall time."""
        start = time.perf_counter()
        metrics = self.rank_metrics(model)
        return {
            "dataset": self.name,
            **metrics_record(metrics),
            "seconds_eval": round(time.perf_counter() - start, 3),
        }


def _ids(samples: Sequence[Sample], name: str) -> np.ndarray:
    return np.array([getattr(s, name) for s in samples], dtype=np.int64)


def metrics_record(metrics: RankMetrics) -> dict[str, float | int]:
    """The record of an evaluation in metrics.jsonl and results.json (scores in [0, 1])."""
    cmc = metrics.cmc
    return {
        "mAP": float(metrics.mAP),
        "rank1": float(cmc[0]),
        "rank5": float(cmc[min(4, len(cmc) - 1)]),
        "rank10": float(cmc[min(9, len(cmc) - 1)]),
        "mINP": float(metrics.mINP),
        "num_valid_queries": int(metrics.num_valid_queries),
    }


def format_table(metrics: RankMetrics) -> str:
    """The standard table: mAP, R1, R5, R10, mINP in percent, and the number of valid queries."""
    row = metrics_record(metrics)
    header = f"{'mAP':>6} {'R1':>6} {'R5':>6} {'R10':>6} {'mINP':>6} {'valid queries':>14}"
    values = " ".join(f"{100 * row[k]:6.1f}" for k in ("mAP", "rank1", "rank5", "rank10", "mINP"))
    return f"{header}\n{values} {row['num_valid_queries']:>14d}"


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    dataset: str,
    root: str | Path,
    *,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    flip: bool = False,
    rerank: bool = False,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> RankMetrics:
    """Evaluate a saved model on a data set's query/gallery split.

    Args:
        checkpoint_path: checkpoint.pt / model_best.pt of `dualref pretrain` or `dualref adapt`.
        dataset: market1501, dukemtmc, msmt17 or folder.
        root: the data set folder (or its parent).
        device: where to run the model.
        batch_size, num_workers: of the extraction loaders.
        flip: average features with horizontally flipped images.
        rerank: k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3).
        height, width: input size; default the checkpoint's training size.
        progress: progress bar.

    Returns:
        The metrics.
    """
    model, state = load_model(checkpoint_path)
    evaluator = Evaluator(
        datasets.load_dataset(dataset, root),
        height=height or int(state["height"]),
        width=width or int(state["width"]),
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        flip=flip,
        rerank=rerank,
        progress=progress,
    )
    return evaluator.rank_metrics(model.to(device))
