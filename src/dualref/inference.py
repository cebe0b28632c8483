"""Using a trained model: rebuild it from any dualref checkpoint, extract, evaluate (docs/method.md §6).

One evaluation path for every caller: pre-training's source and direct-transfer evaluations, adaptation's
per-epoch target evaluation and `dualref evaluate` all go through `Evaluator` (eval mode, L2-normalised
BN-neck features, squared Euclidean distance or k-reciprocal re-ranking, mAP / CMC / mINP). Query and
gallery pids are read here, for measurement only.

`FeatureExtractor` embeds images given as files, PIL images, arrays or tensors with any checkpoint, with
exactly the evaluation path's preprocessing (`dualref.data.loaders.read_image`: bicubic PIL resize to the
checkpoint's input size, then `/255`, mean and std) and forward (`extraction.extract_features`).

Size: over 400 lines: the model from any checkpoint, the one evaluation path, and FeatureExtractor's
input handling (paths, PIL images, arrays, tensors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from dualref import checkpoint, evaluation, extraction, training
from dualref.config import EvalConfig
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


def input_size(state: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the network input the checkpoint was trained at.

    Checkpoints written before the size was stored: read from their config (`data.height/width`).
    """
    data_cfg = state.get("config", {}).get("data", {})
    height, width = state.get("height", data_cfg.get("height")), state.get("width", data_cfg.get("width"))
    if height is None or width is None:
        raise ValueError(
            "checkpoint stores no input size (keys height/width, or config data.height/data.width); "
            "give the size explicitly (height=, width= / --height, --width)"
        )
    return int(height), int(width)


def normalization(state: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel the checkpoint's inputs were normalised with (ImageNet if not stored)."""
    stored = state.get("normalization") or {}
    mean = tuple(float(v) for v in stored.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in stored.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"checkpoint normalization {stored!r}: expected 3 means and 3 stds (RGB)")
    return mean, std


@dataclass(frozen=True)
class EvaluationResult:
    """One evaluation: the metrics and what they were computed from."""

    metrics: RankMetrics
    query_features: Tensor  # [Q, D] float32, L2-normalised
    gallery_features: Tensor  # [G, D] float32, L2-normalised
    dist: np.ndarray | None  # [Q, G] float32: the re-ranked or squared Euclidean distances; when asked
    cross_camera: evaluation.CrossCameraMAP | None  # per-camera breakdown, if asked


class Evaluator:
    """The query/gallery test of one data set; loaders built once (images decoded once with `cache`).

    Args:
        splits: the data set (its query and gallery pids are read: measurement only).
        height, width: network input size.
        batch_size, num_workers, cache: of the extraction loaders.
        device: where the model runs.
        amp_dtype: autocast dtype (None: float32).
        options: flip averaging and k-reciprocal re-ranking (default: neither, the standard protocol).
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
        options: EvalConfig = EvalConfig(),
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
        self.height, self.width = height, width
        self.options, self.progress = options, progress

    def rank_metrics(self, model: nn.Module) -> RankMetrics:
        """Rank metrics of `model` (moved to the evaluator's device beforehand)."""
        return self.evaluate(model).metrics

    def evaluate(
        self, model: nn.Module, *, keep_dist: bool = False, cross_camera: bool = False
    ) -> EvaluationResult:
        """Features, metrics and, when asked, the [Q, G] distances and the per-camera breakdown.

        Asking for the distances or the breakdown never changes the metrics.
        """
        query, gallery = (
            extraction.extract_features(
                model,
                loader,
                self.device,
                flip=self.options.flip,
                progress=self.progress,
                desc=name,
                amp_dtype=self.amp_dtype,
            )
            for name, loader in self.loaders.items()
        )
        labels = (_ids(self.query, "pid"), _ids(self.gallery, "pid"))
        cams = (_ids(self.query, "camid"), _ids(self.gallery, "camid"))
        dist: np.ndarray | None = None
        if self.options.rerank:
            from dualref import distances

            o = self.options
            dist = distances.reranked_distance(
                query, gallery, k1=o.rerank_k1, k2=o.rerank_k2, lambda_value=o.rerank_lambda
            )
            metrics = evaluation.rank_metrics(dist, labels[0], labels[1], cams[0], cams[1])
        else:
            # Chunk by chunk on the device, with no [Q, G] matrix; one is made only to be kept.
            metrics = evaluation.rank_metrics_from_features(
                query, gallery, labels[0], labels[1], cams[0], cams[1], device=self.device
            )
            if keep_dist or cross_camera:
                dist = evaluation.sqeuclidean_distance(query, gallery)
        breakdown = None
        if cross_camera:
            assert dist is not None
            breakdown = evaluation.cross_camera_map(dist, labels[0], labels[1], cams[0], cams[1])
        return EvaluationResult(metrics, query, gallery, dist if keep_dist else None, breakdown)

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


def checkpoint_evaluator(
    checkpoint_path: str | Path,
    dataset: str,
    root: str | Path,
    *,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    options: EvalConfig = EvalConfig(),
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[ReidNet, Evaluator, dict[str, Any]]:
    """A saved model (on `device`, eval mode), the evaluation of a data set at its input size, its state.

    Arguments as :func:`evaluate_checkpoint`, and how the network computes: `amp_dtype` (autocast dtype,
    None for float32; checked by `training.check_autocast` before anything runs) and `channels_last`.
    """
    model, state = load_model(checkpoint_path)
    if height is None or width is None:
        try:
            stored = input_size(state)
        except ValueError as err:
            raise ValueError(f"{checkpoint_path}: {err}") from None
        height, width = height or stored[0], width or stored[1]
    evaluator = Evaluator(
        datasets.load_dataset(dataset, root),
        height=height,
        width=width,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        options=options,
        progress=progress,
        amp_dtype=amp_dtype,
    )
    model = training.place_model(model, device, channels_last)
    training.check_autocast(model, amp_dtype, device, (height, width))
    return model, evaluator, state


def format_cross_camera(breakdown: evaluation.CrossCameraMAP) -> str:
    """mAP in percent per query camera (rows; "all" = the whole gallery) and gallery camera (columns)."""
    cells = [f"{c:>6d}" for c in breakdown.gallery_cameras]
    lines = [
        "mAP % by camera (rows: query camid, columns: gallery camid; - = no query with a match there)",
        f"{'camid':>5} {'queries':>7} {'all':>6} " + " ".join(cells),
    ]
    for i, camera in enumerate(breakdown.query_cameras):
        values = [breakdown.per_query_camera[i], *breakdown.per_pair[i]]
        text = " ".join("     -" if np.isnan(v) else f"{100 * v:6.1f}" for v in values)
        lines.append(f"{camera:>5d} {breakdown.num_queries[i]:>7d} {text}")
    return "\n".join(lines)


def evaluate_checkpoint(
    checkpoint_path: str | Path,
    dataset: str,
    root: str | Path,
    *,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    options: EvalConfig = EvalConfig(),
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
        options: flip averaging, k-reciprocal re-ranking and its k1, k2, lambda (default: neither).
        height, width: input size; default the checkpoint's training size.
        progress: progress bar.

    Returns:
        The metrics.
    """
    model, evaluator, _ = checkpoint_evaluator(
        checkpoint_path,
        dataset,
        root,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        options=options,
        height=height,
        width=width,
        progress=progress,
    )
    return evaluator.rank_metrics(model)


# What FeatureExtractor accepts as one image.
ImageInput = str | Path | Image.Image | np.ndarray | Tensor


class FeatureExtractor:
    """L2-normalised features of images, from any dualref checkpoint (like torchreid's FeatureExtractor).

    The checkpoint holds the architecture, input size and normalisation, so nothing is repeated here.
    Preprocessing and forward are the evaluation path's: a file gives the same row as
    `extraction.extract_features` over `loaders.test_loader` of that file.

    Accepted inputs, one or a list (mixed kinds allowed):
        - a path (str or Path) of an image file;
        - a PIL image (converted to RGB);
        - a numpy ``[H, W, 3]`` uint8 RGB array, or ``[B, H, W, 3]`` for several;
        - a uint8 tensor ``[3, H, W]`` / ``[B, 3, H, W]``: RGB pixels, preprocessed like a file;
        - a float tensor ``[3, H, W]`` / ``[B, 3, H, W]``: already preprocessed (normalised, at the
          checkpoint's input size), used as is.

    Args:
        checkpoint: checkpoint.pt of `dualref pretrain` or `dualref adapt`.
        device: "cpu", "cuda", "cuda:N" or "auto".
        flip: average each feature with its horizontally flipped image's (then re-normalise).
        batch_size: images per forward pass.
        height, width: input size; default the checkpoint's.
        amp_dtype: autocast dtype (torch.bfloat16; torch.float16 on CUDA only), None for float32.
        channels_last: the network in channels-last layout: True, False or "auto" (on the CPU, where it is
            faster; `training.resolve_channels_last`).

    Example::

        extractor = FeatureExtractor("runs/demo/dual_refinement/checkpoint.pt")
        features = extractor(["a.jpg", "b.jpg"])  # [2, D], rows of unit length
        similarity = features @ features.T
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: str | torch.device = "cpu",
        flip: bool = False,
        batch_size: int = 64,
        height: int | None = None,
        width: int | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool | str = "auto",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected >= 1")
        model, state = load_model(checkpoint)
        try:
            stored = input_size(state) if height is None or width is None else (height, width)
            self.mean, self.std = normalization(state)
        except ValueError as err:
            raise ValueError(f"{checkpoint}: {err}") from None
        self.height, self.width = height or stored[0], width or stored[1]
        self.device = training.resolve_device(str(device), key="device")
        channels_last = training.resolve_channels_last(channels_last, self.device)
        self.model = training.place_model(model, self.device, channels_last)
        training.check_autocast(self.model, amp_dtype, self.device, (self.height, self.width))
        self.feat_dim: int = model.feat_dim
        self.flip, self.batch_size, self.amp_dtype = flip, batch_size, amp_dtype
        self.checkpoint_kind = str(state.get("kind"))

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        """``[N, D]`` float32 CPU features, one L2-normalised row per image, in input order."""
        items = self._items(images)
        if not items:
            raise ValueError("no images given; expected a path, PIL image, array, tensor or a list of them")
        features = extraction.extract_features(
            self.model,
            self._batches(items),
            self.device,
            flip=self.flip,
            progress=False,
            amp_dtype=self.amp_dtype,
        )
        if features.shape[0] != len(items):  # extract_features cannot count an iterator's rows
            raise ValueError(f"{features.shape[0]} features for {len(items)} images")
        return features

    def preprocess(self, image: ImageInput) -> Tensor:
        """One image as the network's input: ``[3, height, width]`` float32, normalised."""
        if isinstance(image, Tensor) and image.is_floating_point():
            if tuple(image.shape) != (3, self.height, self.width):
                raise ValueError(
                    f"float tensor of shape {tuple(image.shape)}: expected an already preprocessed "
                    f"[3, {self.height}, {self.width}] image (or pass uint8 pixels to be resized)"
                )
            return image.float()
        pixels = np.asarray(self._pil(image), dtype=np.uint8)  # [H, W, 3] at the input size
        tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return tensor.sub_(mean).div_(std)  # the operations of transforms.normalise_batch, in order

    def _pil(self, image: ImageInput) -> Image.Image:
        """The RGB PIL image at the input size (bicubic, as `loaders.read_image` resizes)."""
        size = (self.height, self.width)
        if isinstance(image, str | Path):
            return loaders.read_image(Path(image), size)
        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(
                    f"numpy image of shape {image.shape} and dtype {image.dtype}: expected [H, W, 3] uint8"
                )
            pil = Image.fromarray(image, "RGB")
        elif isinstance(image, Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"tensor image of shape {tuple(image.shape)} and dtype {image.dtype}: expected "
                    "[3, H, W] uint8 RGB pixels or an already preprocessed float tensor"
                )
            pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy(), "RGB")
        else:
            raise ValueError(
                f"cannot read an image from a {type(image).__name__}; expected a path, PIL image, "
                "numpy [H, W, 3] uint8 array or tensor"
            )
        if pil.size != (self.width, self.height):
            pil = pil.resize((self.width, self.height), Image.Resampling.BICUBIC)
        return pil

    @staticmethod
    def _items(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
        """The input as a list of single images (batched arrays and tensors split)."""
        if isinstance(images, Tensor | np.ndarray) and images.ndim == 4:
            return list(images)
        if isinstance(images, str | Path | Image.Image | Tensor | np.ndarray):
            return [images]
        items: list[ImageInput] = []
        for item in images:
            items.extend(FeatureExtractor._items(item) if isinstance(item, Tensor | np.ndarray) else [item])
        return items

    def _batches(self, items: list[ImageInput]) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Loader-shaped batches (images, labels, camids, indices) for `extraction.extract_features`."""
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            images = torch.stack([self.preprocess(item) for item in chunk])
            indices = torch.arange(start, start + len(chunk))
            yield images, torch.full_like(indices, -1), torch.full_like(indices, -1), indices
