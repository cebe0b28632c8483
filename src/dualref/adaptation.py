"""Dual-Refinement adaptation to the unlabelled target domain (`dualref adapt`).

The alternating loop of the paper's Algorithm 1 as the reference code runs it (REFERENCE_BEHAVIOUR.md §3-5).
Every epoch, off-line: extract the target features, k-reciprocal Jaccard distance, DBSCAN (eps fixed at
epoch 0) -> coarse labels, hierarchical refinement -> refined labels, classifier rows <- cluster centroids.
On-line: P x K batches over the coarse labels, the joint objective (`losses.dual_refinement_objective`),
a fresh Adam over the network and the instant memory bank. Every ablation of the paper's Tables II and III is
a config (configs/*/): baseline (alpha = mu = 0), only LR (mu = 0), only IM-SP (alpha = 0), memory variants.

Target ground truth: training sees the target training images through `TargetImages` (paths and cameras
only). The target `pid`s are read in exactly two places, both for measurement: `_monitoring_pids` (pairwise
F-score of the pseudo-labels, paper Fig. 3) and `_evaluate_target` (query/gallery mAP and CMC).

Run folder (see `dualref.runs`): config.yaml, run.log, metrics.jsonl with one "adapt" record per epoch
(eps, clusters, outliers, loss terms, seconds per stage, label quality) and an "eval_target" record per
evaluation (mAP, rank-k, mINP), checkpoint.pt (exact resume), and at the end plots + summary.md
(`dualref.report`). Records use `epoch` = number of adaptation epochs completed (0 = direct transfer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from dualref import (
    checkpoint,
    clustering,
    distances,
    evaluation,
    extraction,
    label_quality,
    losses,
    refinement,
    report,
    runs,
    seeding,
    training,
)
from dualref.config import AdaptConfig, config_to_dict
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits, Sample
from dualref.losses import memory_losses, objective
from dualref.losses.objective import LossTerms, LossWeights
from dualref.memory_bank import InstantMemoryBank, MemoryBank, MomentumMemoryBank, minibatch_bank
from dualref.models.reid_net import ReidNet, load_trunk_and_neck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetImages:
    """All that training may know of the target training split: files and cameras, in dataset order."""

    paths: list[Path]
    camids: list[int]


class PseudoLabels(NamedTuple):
    """The off-line stage's output for one epoch."""

    coarse: np.ndarray  # [N] int64 DBSCAN cluster of every target image, -1 = outlier
    refined: np.ndarray | None  # [N] int64 refined label (outliers too, unused); None if alpha = 0
    num_clusters: int  # L


@dataclass(frozen=True)
class TargetLossSettings:
    """Everything `train_target_epoch` needs to compute the joint objective (from `loss.*`)."""

    weights: LossWeights
    label_smoothing: float = 0.1  # epsilon of the cross-entropy
    triplet_margin: float | None = None  # None = soft margin (reference)
    triplet_feature: str = "bn_normalized"  # bn_normalized (Dual-Refinement) or pooled (baseline script)
    memory_loss: str = "spread_out"  # spread_out or invariance
    spread_num_neighbors: int = 6  # k positives of the spread-out loss
    spread_margin: float = 0.35  # m of the spread-out loss
    spread_variant: str = "reference"  # reference or paper
    invariance_temperature: float = 0.05  # T of the invariance loss
    invariance_num_neighbors: int = 6  # ECN neighbourhood size of the invariance loss
    bank_grad_scale: float = 2.0  # multiplier of the instant bank's gradient (reference: 1/lambda)


def adapt_to_target(cfg: AdaptConfig, *, resume: str | Path | None = None) -> Path:
    """Run (or resume) the Dual-Refinement adaptation described by `cfg`.

    Args:
        cfg: the resolved adaptation config. `optim.epochs = 0` evaluates the starting model only
            (direct transfer).
        resume: a run folder to continue from its checkpoint.pt (None: a fresh run in `run.run_dir`).

    Returns:
        The run folder.
    """
    seeding.seed_everything(cfg.run.seed)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = training.resolve_device(cfg.run.device)
    cluster_device = training.resolve_device(cfg.clustering.device or cfg.run.device, key="clustering.device")
    amp_dtype = training.AMP_DTYPES[cfg.run.amp]
    run_dir = Path(resume) if resume is not None else Path(cfg.run.run_dir)
    with runs.open_run(run_dir, cfg, resume=resume is not None) as run:
        target = _load_target(cfg)
        images = _target_images(target.train)
        monitor_pids = _monitoring_pids(target.train)
        model = _build_model(cfg).to(device)
        test = _TargetEvaluation(target, cfg, device)
        if cfg.optim.epochs == 0:  # direct transfer: evaluate the starting model only
            _evaluate_and_log(run, test, model, epoch=0)
            report.write_report(run.path)
            return run.path
        cluster_loader = _test_loader(images.paths, cfg)
        memory = _build_memory(cfg, num_samples=len(images.paths), feat_dim=model.feat_dim)
        state = _restore(run.checkpoint_path, model, memory, device) if resume is not None else None
        eps = state.eps if state else cfg.clustering.dbscan_eps  # None: from rho at epoch 0
        optimizer = state.optimizer if state else None
        settings = _loss_settings(cfg)
        for epoch in range(state.epoch if state else 0, cfg.optim.epochs):
            seconds: dict[str, float] = {}
            with _timed(seconds, "extract"):
                features = extraction.extract_features(  # [N, D] with the current model
                    model, cluster_loader, device, progress=cfg.run.progress, amp_dtype=amp_dtype
                )
            with _timed(seconds, "jaccard"):
                dist = distances.jaccard_distance(
                    features, cfg.clustering.k1, cfg.clustering.k2, device=cluster_device
                )
            if eps is None:  # fixed from rho at epoch 0, then kept (and checkpointed)
                eps = clustering.dbscan_eps(dist, cfg.clustering.dbscan_rho)
            with _timed(seconds, "dbscan"):
                coarse = clustering.cluster_dbscan(dist, eps, cfg.clustering.min_samples)
            with _timed(seconds, "refine"):
                labels = _pseudo_labels(features, coarse, cfg, epoch=epoch)
            if epoch == 0 and memory is not None:
                memory.init_from(features)  # once, from the source model's features
            centroids = clustering.cluster_centroids(features, labels.coarse, labels.num_clusters)
            model.reset_classifier(labels.num_clusters, centroids.to(device))
            loader = _train_loader(images, labels.coarse, cfg, cluster_loader, device, epoch=epoch)
            lr = _lr_at_epoch(cfg, epoch)
            optimizer = _build_optimizer(model, memory, lr, cfg, previous=optimizer)
            with _timed(seconds, "train"), _naming_checkpoint(run.checkpoint_path):
                stats = train_target_epoch(
                    model,
                    loader,
                    optimizer,
                    torch.as_tensor(_refined_or_coarse(labels), device=device),
                    memory=memory,
                    settings=settings,
                    device=device,
                    amp_dtype=amp_dtype,
                    channels_last=cfg.run.channels_last,
                    progress=cfg.run.progress,
                    epoch=epoch,
                )
            record = {
                **_label_record(eps, labels, lr),
                **{f"loss_{name}": value for name, value in stats.means.items()},
                **{f"seconds_{name}": round(value, 3) for name, value in seconds.items()},
                **_label_quality_record(labels, monitor_pids),
            }
            run.log_metrics(epoch + 1, record, kind="adapt")
            log.info("epoch %d/%d: %s", epoch + 1, cfg.optim.epochs, _epoch_summary(record))
            rng = seeding.rng_state()
            _save(run.checkpoint_path, cfg, model, memory, optimizer, eps=eps, epoch=epoch + 1, rng=rng)
            if _evaluation_due(cfg, epoch + 1):
                _evaluate_and_log(run, test, model, epoch=epoch + 1)
            seeding.set_rng_state(rng)  # evaluation must not change what the next epoch draws
        report.write_report(run.path)
        return run.path


def train_target_epoch(
    model: ReidNet,
    loader: Iterable[Sequence[Tensor]],
    optimizer: torch.optim.Optimizer,
    refined_labels: Tensor,
    *,
    memory: MemoryBank | None,
    settings: TargetLossSettings,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    epoch: int = 0,
) -> training.EpochStats:
    """One on-line epoch of Dual-Refinement (REFERENCE_BEHAVIOUR.md §4 "Where alpha enters", §5).

    Per batch (images, coarse labels, camids, dataset indices): refined labels looked up by index; a
    train-mode forward; CE and triplet under both label sets on the same head and features; the memory
    loss; the joint objective; the bank gradient scaled; an Adam step; a traditional memory's momentum
    update. Terms with weight 0 are not computed (they are logged as 0).

    Args:
        model: the network, its classifier already sized to the L clusters of this epoch.
        loader: yields (images [B, 3, H, W], coarse labels [B], camids [B], indices [B]).
        optimizer: Adam over the network (and the instant bank), learning rate set.
        refined_labels: [N] int64 refined label of every target image, on `device`.
        memory: the memory bank, or None (mini-batch variant, or no memory loss).
        settings: loss weights and options.
        device: where the model lives.
        amp_dtype: autocast dtype on CUDA (None: float32).
        channels_last: channels-last inputs on CUDA.
        progress: show a progress bar.
        epoch: 0-based epoch, for messages.

    Returns:
        EpochStats with the means of ce_coarse, triplet_coarse, ce_refined, triplet_refined, memory,
        total and accuracy (classifier top-1 against the coarse labels).
    """
    weights = settings.weights
    model.train()
    # A fresh fp16 loss scaler per epoch, as in train_source_epoch (resume between epochs stays exact).
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    names = (*LossTerms._fields, "total", "accuracy")
    sums = dict.fromkeys(names, 0.0)
    iterations, num_images, start = 0, 0, time.perf_counter()
    total_iterations = len(loader) if isinstance(loader, Sized) else None
    bar = tqdm(loader, total=total_iterations, desc=f"epoch {epoch}", disable=not progress, leave=False)
    refined_labels = refined_labels.to(device)  # looked up by the batch's indices, on the same device
    for iteration, (images, coarse, _camids, indices) in enumerate(bar):
        images = training.images_to_device(images, device, channels_last)
        coarse = coarse.to(device, non_blocking=True)
        indices = indices.to(device, non_blocking=True)
        refined = refined_labels[indices]  # [B]
        with training.autocast(device, amp_dtype):
            out = model(images)
        features = F.normalize(out.bn.float(), dim=1)  # [B, D] spread-out / BN-triplet feature
        metric = features if settings.triplet_feature == "bn_normalized" else out.pooled.float()
        terms = _loss_terms(out.logits, metric, features, coarse, refined, indices, memory, settings)
        total = objective.dual_refinement_objective(terms, weights)
        training.check_finite(total, epoch=epoch, iteration=iteration)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
        else:
            total.backward()
        if isinstance(memory, InstantMemoryBank):
            scale_bank_gradient(memory.weight, settings.bank_grad_scale)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if isinstance(memory, MomentumMemoryBank):
            memory.update(features.detach(), indices)
        accuracy = (out.logits.detach().argmax(1) == coarse).float().mean()
        for name, value in (*zip(LossTerms._fields, terms, strict=True), ("total", total)):
            sums[name] += float(value.detach())
        sums["accuracy"] += float(accuracy)
        iterations, num_images = iteration + 1, num_images + int(coarse.shape[0])
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{sums['total'] / iterations:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    return training.EpochStats(
        means={name: value / max(iterations, 1) for name, value in sums.items()},
        iterations=iterations,
        seconds=seconds,
        images_per_second=num_images / seconds if seconds > 0 else 0.0,
    )


def scale_bank_gradient(bank: Tensor, scale: float) -> None:
    """Multiply the instant memory bank's gradient by `scale`, in place (after backward, before the step).

    The reference multiplies it by 1/lambda = 2 with the comment that this "removes lambda's effect on
    updating the centers": a leftover from a center-loss-style module, kept for faithfulness
    (`loss.bank_grad_scale`; 1.0 turns it off). Adam being scale-invariant, it mainly changes the ratio
    between the loss gradient and the weight decay (REFERENCE_BEHAVIOUR.md §5 "How the bank is optimised").

    Args:
        bank: the bank parameter [N, D]; nothing happens when it has no gradient.
        scale: the multiplier.
    """
    if bank.grad is not None and scale != 1.0:
        bank.grad.mul_(scale)


def _loss_terms(
    logits: Tensor,
    metric: Tensor,
    features: Tensor,
    coarse: Tensor,
    refined: Tensor,
    indices: Tensor,
    memory: MemoryBank | None,
    settings: TargetLossSettings,
) -> LossTerms:
    """The five terms of the joint objective for one batch; a term with weight 0 is a zero tensor."""
    zero = logits.new_zeros((), dtype=torch.float32)
    weights = settings.weights

    def ce_and_triplet(labels: Tensor) -> tuple[Tensor, Tensor]:
        ce = losses.cross_entropy_with_label_smoothing(logits, labels, epsilon=settings.label_smoothing)
        triplet = losses.batch_hard_triplet_loss(metric, labels, margin=settings.triplet_margin)
        return ce, triplet

    ce_coarse, triplet_coarse = ce_and_triplet(coarse) if weights.refined_weight < 1 else (zero, zero)
    ce_refined, triplet_refined = ce_and_triplet(refined) if weights.refined_weight > 0 else (zero, zero)
    memory_term = zero
    if weights.memory_weight > 0:
        bank, bank_indices = (memory.bank(), indices) if memory is not None else minibatch_bank(features)
        if settings.memory_loss == "invariance":
            memory_term = memory_losses.invariance_loss(
                features,
                bank,
                bank_indices,
                temperature=settings.invariance_temperature,
                num_neighbors=settings.invariance_num_neighbors,
            )
        else:
            memory_term = losses.spread_out_loss(
                features,
                bank,
                bank_indices,
                num_neighbors=settings.spread_num_neighbors,
                margin=settings.spread_margin,
                variant=settings.spread_variant,
            )
    return LossTerms(ce_coarse, triplet_coarse, ce_refined, triplet_refined, memory_term)


# ---------------------------------------------------------------------------------------------------
# Set-up of the stages (config -> plain arguments)
# ---------------------------------------------------------------------------------------------------


def _load_target(cfg: AdaptConfig) -> ReidSplits:
    target = datasets.load_dataset(cfg.data.target, cfg.data.target_root)
    if cfg.data.skip_unreadable:
        target = ReidSplits(
            name=target.name,
            train=loaders.drop_unreadable(target.train, log),
            query=loaders.drop_unreadable(target.query, log),
            gallery=loaders.drop_unreadable(target.gallery, log),
        )
    if not target.train:
        raise ValueError(f"target data set {cfg.data.target_root!r} has no training images")
    log.info(
        "target %s: %d training images (unlabelled use), %d query, %d gallery",
        target.name,
        len(target.train),
        len(target.query),
        len(target.gallery),
    )
    return target


def _target_images(samples: Sequence[Sample]) -> TargetImages:
    """Strip the ground truth: training code receives only paths and cameras."""
    return TargetImages(paths=[s.path for s in samples], camids=[s.camid for s in samples])


def _monitoring_pids(samples: Sequence[Sample]) -> np.ndarray | None:
    """MONITORING ONLY: target ground-truth ids for the pseudo-label quality record (None if unknown)."""
    pids = np.array([s.pid for s in samples], dtype=np.int64)
    return pids if (pids >= 0).all() else None


def _label_quality_record(labels: PseudoLabels, pids: np.ndarray | None) -> dict[str, float]:
    """MONITORING ONLY: pairwise precision / recall / F-score of the coarse and refined labels."""
    if pids is None:
        return {}
    record: dict[str, float] = {}
    label_sets = {"coarse": labels.coarse}
    if labels.refined is not None:
        # Outliers are left out of both (the refined label of an outlier is never used).
        label_sets["refined"] = np.where(labels.coarse >= 0, labels.refined, -1)
    for name, values in label_sets.items():
        quality = label_quality.label_quality(values, pids)
        record[f"{name}_precision"] = quality.pairwise_precision
        record[f"{name}_recall"] = quality.pairwise_recall
        record[f"{name}_fscore"] = quality.pairwise_fscore
        record[f"{name}_nmi"] = quality.nmi
    return record


def _pseudo_labels(features: Tensor, coarse: np.ndarray, cfg: AdaptConfig, *, epoch: int) -> PseudoLabels:
    coarse = np.asarray(coarse, dtype=np.int64)
    num_clusters = int(coarse.max(initial=-1)) + 1
    if num_clusters < 1:
        raise ValueError(
            f"DBSCAN found no cluster at epoch {epoch} (all {coarse.size} images are outliers); "
            f"expected at least one: raise clustering.dbscan_rho or lower clustering.min_samples"
        )
    if cfg.loss.refined_weight > 0:
        refined = refinement.refine_labels(
            features, coarse, cfg.clustering.num_subclusters, seed=cfg.run.seed
        )
        return PseudoLabels(coarse, np.asarray(refined, dtype=np.int64), num_clusters)
    return PseudoLabels(coarse, None, num_clusters)  # never read with alpha = 0: skip the k-means


def _refined_or_coarse(labels: PseudoLabels) -> np.ndarray:
    return labels.refined if labels.refined is not None else labels.coarse


def _label_record(eps: float, labels: PseudoLabels, lr: float) -> dict[str, float | int]:
    clustered = labels.coarse >= 0
    moved = _refined_or_coarse(labels)[clustered] != labels.coarse[clustered]
    changed = float(moved.mean()) if clustered.any() else 0.0
    return {
        "eps": eps,
        "num_clusters": labels.num_clusters,
        "num_outliers": int((~clustered).sum()),
        "refined_changed": round(changed, 5),  # fraction of clustered images the refinement moves
        "lr": lr,
    }


def _epoch_summary(record: dict[str, Any]) -> str:
    parts = [
        f"eps {record['eps']:.4f}",
        f"clusters {record['num_clusters']}",
        f"outliers {record['num_outliers']}",
        f"loss {record['loss_total']:.3f}",
    ]
    if "coarse_fscore" in record:
        parts.append(f"F coarse {record['coarse_fscore']:.3f}")
    if "refined_fscore" in record:
        parts.append(f"F refined {record['refined_fscore']:.3f}")
    stages = ", ".join(f"{k[8:]} {v:.0f}s" for k, v in record.items() if k.startswith("seconds_"))
    return " | ".join([*parts, stages])


def _loss_settings(cfg: AdaptConfig) -> TargetLossSettings:
    loss = cfg.loss
    return TargetLossSettings(
        weights=LossWeights(
            ce_weight=loss.ce_weight,
            refined_weight=loss.refined_weight,
            memory_weight=loss.spread_weight,
        ),
        label_smoothing=loss.label_smoothing,
        triplet_margin=loss.triplet_margin,
        triplet_feature=loss.triplet_feature,
        memory_loss=loss.memory_loss,
        spread_num_neighbors=loss.spread_num_neighbors,
        spread_margin=loss.spread_margin,
        spread_variant=loss.spread_variant,
        invariance_temperature=loss.invariance_temperature,
        invariance_num_neighbors=loss.invariance_num_neighbors,
        bank_grad_scale=loss.bank_grad_scale,
    )


def _build_model(cfg: AdaptConfig) -> ReidNet:
    """The network to adapt: the source checkpoint's trunk and neck (its classifier is dropped)."""
    model_cfg = cfg.model
    if cfg.source_checkpoint is None:
        log.warning("no source_checkpoint: adapting from model.pretrained=%s", model_cfg.pretrained)
        pretrained = model_cfg.pretrained
    else:
        pretrained = None
    model = ReidNet(
        model_cfg.arch,
        num_classes=1,  # resized to the number of clusters every epoch
        pretrained=pretrained,
        last_stride=model_cfg.last_stride,
        stem_relu=model_cfg.stem_relu,
        neck_relu=model_cfg.neck_relu,
    )
    if cfg.source_checkpoint is not None:
        source = checkpoint.load_checkpoint(cfg.source_checkpoint)
        if source.get("arch", model_cfg.arch) != model_cfg.arch:
            raise ValueError(
                f"source checkpoint {cfg.source_checkpoint} holds arch {source['arch']!r} but "
                f"model.arch={model_cfg.arch!r}; set model.arch={source['arch']}"
            )
        load_trunk_and_neck(model, source["model"])
        log.info("started from source checkpoint %s", cfg.source_checkpoint)
    if cfg.run.channels_last and cfg.run.device.startswith("cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def _build_memory(cfg: AdaptConfig, *, num_samples: int, feat_dim: int) -> MemoryBank | None:
    """The memory of the configured Table III variant; None without memory loss or for "minibatch"."""
    if cfg.loss.spread_weight == 0 or cfg.loss.memory == "minibatch":
        return None
    if cfg.loss.memory == "instant":
        return InstantMemoryBank(num_samples, feat_dim).to(cfg.run.device)
    return MomentumMemoryBank(num_samples, feat_dim, momentum=cfg.loss.memory_momentum).to(cfg.run.device)


def _test_loader(paths: Sequence[Path], cfg: AdaptConfig) -> Any:
    return loaders.test_loader(
        paths,
        height=cfg.data.height,
        width=cfg.data.width,
        batch_size=cfg.data.test_batch_size,
        num_workers=cfg.data.num_workers,
        cache=cfg.data.cache_images,
        pin_memory=cfg.run.device.startswith("cuda"),
    )


def _train_loader(
    images: TargetImages,
    coarse: np.ndarray,
    cfg: AdaptConfig,
    cluster_loader: Any,
    device: torch.device,
    *,
    epoch: int,
) -> Any:
    """P x K batches over the coarse labels (outliers, -1, never sampled); order set by (seed, epoch)."""
    loader = loaders.train_loader(
        images.paths,
        coarse.tolist(),
        images.camids,
        height=cfg.data.height,
        width=cfg.data.width,
        batch_size=cfg.data.batch_size,
        num_instances=cfg.data.num_instances,
        num_iterations=cfg.optim.iters_per_epoch,
        seed=cfg.run.seed,
        random_erasing_prob=cfg.data.random_erasing_prob,
        num_workers=cfg.data.num_workers,
        cache=False,
        pin_memory=device.type == "cuda",
    )
    # The extraction loader already decoded every image once (data.cache_images): share its pixels
    # rather than decoding the whole set again for each epoch's new loader.
    cached = getattr(cluster_loader.dataset, "pixels", None)
    if cached is not None and isinstance(loader.dataset, loaders.ImageDataset):
        loader.dataset.pixels = cached
    loaders.set_epoch(loader, epoch)
    return loader


def _lr_at_epoch(cfg: AdaptConfig, epoch: int) -> float:
    optim = cfg.optim
    return training.lr_at_epoch(
        epoch,
        base_lr=optim.lr,
        schedule=optim.schedule,
        warmup_epochs=optim.warmup_epochs,
        warmup_factor=optim.warmup_factor,
        milestones=optim.milestones,
        lr_decay_epochs=optim.lr_decay_epochs,
        gamma=optim.gamma,
        reference_warmup_offset=optim.reference_warmup_offset,
    )


def _build_optimizer(
    model: ReidNet,
    memory: MemoryBank | None,
    lr: float,
    cfg: AdaptConfig,
    *,
    previous: torch.optim.Optimizer | None,
) -> torch.optim.Adam:
    """Adam over the network and the instant bank: new every epoch (reference) or carrying its state.

    With `optim.reset_each_epoch=False` the moments of every parameter that survives the epoch change
    (all but the re-created classifier) are carried over.
    """
    params = list(model.parameters())
    if isinstance(memory, InstantMemoryBank):
        params.append(memory.weight)
    optimizer = training.build_adam(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    if previous is not None and not cfg.optim.reset_each_epoch:
        kept = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for param, param_state in previous.state.items():
            if id(param) in kept:
                optimizer.state[param] = param_state
    return optimizer


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


class _TargetEvaluation:
    """The target query/gallery test (reads their pids: measurement only).

    The loaders are built once, so that with `data.cache_images` the images are decoded once per run.
    """

    def __init__(self, target: ReidSplits, cfg: AdaptConfig, device: torch.device) -> None:
        self.query, self.gallery = target.query, target.gallery
        if not self.query or not self.gallery:
            raise ValueError(
                f"target data set {cfg.data.target_root!r} has {len(self.query)} query and "
                f"{len(self.gallery)} gallery images; expected both non-empty for the evaluation"
            )
        self.query_loader = _test_loader([s.path for s in self.query], cfg)
        self.gallery_loader = _test_loader([s.path for s in self.gallery], cfg)
        self.device, self.progress = device, cfg.run.progress
        self.amp_dtype = training.AMP_DTYPES[cfg.run.amp]

    def rank_metrics(self, model: ReidNet) -> evaluation.RankMetrics:
        """Rank metrics of `model` (eval-mode normalised BN features, squared Euclidean distance)."""
        query_features, gallery_features = (
            extraction.extract_features(
                model, loader, self.device, progress=self.progress, desc=name, amp_dtype=self.amp_dtype
            )
            for name, loader in (("query", self.query_loader), ("gallery", self.gallery_loader))
        )
        return evaluation.rank_metrics_from_features(
            query_features,
            gallery_features,
            [s.pid for s in self.query],
            [s.pid for s in self.gallery],
            [s.camid for s in self.query],
            [s.camid for s in self.gallery],
            device=self.device,
        )


def _evaluate_and_log(run: runs.Run, test: _TargetEvaluation, model: ReidNet, *, epoch: int) -> None:
    start = time.perf_counter()
    metrics = test.rank_metrics(model)
    cmc = metrics.cmc
    record = {
        "mAP": float(metrics.mAP),
        **{f"rank{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)},
        "mINP": float(metrics.mINP),
        "seconds_eval": round(time.perf_counter() - start, 3),
    }
    run.log_metrics(epoch, record, kind="eval_target")
    log.info("epoch %d target: %s", epoch, evaluation.format_metrics(metrics))


def _evaluation_due(cfg: AdaptConfig, epochs_done: int) -> bool:
    """Every `run.eval_every` epochs, and always after the last one (0 = only after the last)."""
    every = cfg.run.eval_every
    return epochs_done == cfg.optim.epochs or (every > 0 and epochs_done % every == 0)


# ---------------------------------------------------------------------------------------------------
# Checkpoint: everything an exact resume needs
# ---------------------------------------------------------------------------------------------------


class _ResumeState(NamedTuple):
    epoch: int  # epochs completed
    eps: float
    optimizer: torch.optim.Optimizer | None  # only kept when optim.reset_each_epoch is False


def _save(
    path: Path,
    cfg: AdaptConfig,
    model: ReidNet,
    memory: MemoryBank | None,
    optimizer: torch.optim.Optimizer | None,
    *,
    eps: float,
    epoch: int,
    rng: dict[str, Any],
) -> None:
    state: dict[str, Any] = {
        "kind": "adapt",
        "model": model.state_dict(),
        "memory": memory.state_dict() if memory is not None else None,
        # A fresh Adam each epoch (the default) needs no state; otherwise its moments must survive.
        "optimizer": None if optimizer is None or cfg.optim.reset_each_epoch else optimizer.state_dict(),
        "eps": eps,
        "epoch": epoch,
        "rng": rng,
        "config": config_to_dict(cfg),
        "arch": model.arch,
        "num_classes": model.num_classes,
        "feat_dim": model.feat_dim,
        "height": cfg.data.height,
        "width": cfg.data.width,
    }
    checkpoint.save_checkpoint(path, state)


def _restore(
    path: Path, model: ReidNet, memory: MemoryBank | None, device: torch.device
) -> _ResumeState | None:
    """Load a resumed run's state into `model` and `memory`; None when it stopped before any epoch ended."""
    if not path.is_file():
        log.warning("no checkpoint in %s yet: starting the adaptation from epoch 0", path.parent)
        return None
    state = checkpoint.load_checkpoint(path)
    if state.get("kind") != "adapt":
        raise ValueError(f"{path} is a {state.get('kind')!r} checkpoint; expected an adaptation checkpoint")
    model.reset_classifier(int(state["num_classes"]))
    model.load_state_dict(state["model"])
    model.to(device)
    if (memory is None) != (state["memory"] is None):
        raise ValueError(
            f"{path}: memory bank presence differs from the config (loss.spread_weight, loss.memory)"
        )
    if memory is not None:
        memory.load_state_dict(state["memory"])
    optimizer = None
    if state["optimizer"] is not None:
        params = list(model.parameters()) + ([memory.weight] if isinstance(memory, InstantMemoryBank) else [])
        optimizer = training.build_adam(params, lr=0.0, weight_decay=0.0)
        optimizer.load_state_dict(state["optimizer"])
    seeding.set_rng_state(state["rng"])
    log.info("resumed after epoch %d (eps %.4f)", state["epoch"], state["eps"])
    return _ResumeState(epoch=int(state["epoch"]), eps=float(state["eps"]), optimizer=optimizer)


@contextlib.contextmanager
def _naming_checkpoint(path: Path) -> Iterator[None]:
    """A non-finite loss error names the last good checkpoint, when there is one."""
    try:
        yield
    except training.NonFiniteLossError as err:
        if path.is_file():
            raise err.with_checkpoint(path) from None
        raise


class _timed:  # noqa: N801 - used as a lower-case context manager, like a function
    """Add the wall time of a `with` block to `seconds[name]`."""

    def __init__(self, seconds: dict[str, float], name: str) -> None:
        self.seconds, self.name = seconds, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.name] = self.seconds.get(self.name, 0.0) + time.perf_counter() - self.start

