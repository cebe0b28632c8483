"""Dual-Refinement adaptation to the unlabelled target domain (`dualref adapt`).

The alternating loop of the paper's Algorithm 1 as the reference code runs it (docs/method.md §3-5).
Every epoch, off-line (`prepare_epoch`, a pure function of the run state and the features): extract the
target features, k-reciprocal Jaccard distance, DBSCAN (eps fixed at epoch 0) -> coarse labels,
hierarchical refinement -> refined labels, cluster centroids; then `AdaptState.take_labels` (classifier
rows <- centroids, the bank initialised at epoch 0). On-line (`steps.train_target_epoch`): P x K batches
over the coarse labels, the joint objective, a fresh Adam over the network and the instant memory bank.
Every ablation of the paper's Tables II and III is a config (configs/*/): baseline (alpha = mu = 0), only
LR (mu = 0), only IM-SP (alpha = 0).

Target ground truth: training sees the target training images through `TargetImages` (paths and cameras
only). The target `pid`s are read in exactly two places, both for measurement: `_monitoring_pids` (label
and bank-neighbour precision, paper Fig. 3) and the `Evaluator` (query/gallery mAP and CMC).

Run folder (`dualref.runs`): config.yaml, run.log, metrics.jsonl with one "adapt" record per epoch (eps,
cluster profile, loss terms, gradient shares, bank drift, seconds per stage, label quality) and an
"eval_target" record per evaluation, checkpoint.pt (exact resume), and at the end plots + summary.md
(`dualref.report`). Records use `epoch` = number of adaptation epochs completed (0 = direct transfer).

Size: over 500 lines: the loop (one screen), the run state (`AdaptState`: what one epoch hands the next,
saved and restored by itself), `prepare_epoch`, and the set-up, checks and monitoring helpers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualref import (
    checkpoint,
    clustering,
    diagnostics,
    distributed,
    extraction,
    inference,
    pseudo_labels,
    report,
    runs,
    seeding,
    steps,
    training,
)
from dualref.config import AdaptConfig
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits, Sample
from dualref.memory_bank import InstantMemoryBank, MemoryBank, build_memory_bank
from dualref.models.reid_net import ReidNet, load_trunk_and_neck
from dualref.pipelines import common
from dualref.timing import timed

log = logging.getLogger(__name__)

EVAL_KIND = "eval_target"  # metrics.jsonl records of the target evaluations


@dataclass(frozen=True)
class TargetImages:
    """All that training may know of the target training split: files and cameras, in dataset order."""

    paths: list[Path]
    camids: list[int]


def adapt_to_target(cfg: AdaptConfig, *, resume: str | Path | None = None) -> Path:
    """Run (or resume) the Dual-Refinement adaptation described by `cfg`.

    Args:
        cfg: the resolved adaptation config. `optim.epochs = 0` evaluates the starting model only
            (direct transfer).
        resume: a run folder to continue from its checkpoint.pt (None: a fresh run in `run.run_dir`).

    Returns:
        The run folder.
    """
    device, amp_dtype, channels_last = common.start_process(cfg.run)
    ranks, device = distributed.init_from_env(device)  # torchrun: this rank's device (docs/distributed.md)
    cluster_device = _cluster_device(cfg, device, ranks)
    run_dir = common.run_folder(cfg.run, resume)
    # Everything that can be checked is checked before the run folder is written, so that a retry into
    # the same folder starts afresh and a resumed run's config.yaml never takes a bad value.
    saved = common.check_resume(run_dir, "adapt", cfg.model.arch, ranks) if resume is not None else None
    source = None if saved is not None else _source_state(cfg)  # a run's own checkpoint holds the weights
    target = _parse_target(cfg)
    common.check_numerics(cfg.model, (cfg.data.height, cfg.data.width), device, amp_dtype, channels_last)
    distributed.batch_rows(cfg.data.batch_size, ranks)  # refuses a batch the ranks cannot share
    with common.open_run(run_dir, cfg, resume, ranks) as run:
        target = _load_target(cfg, target)
        common.log_compute(device, amp_dtype, channels_last, ranks.world_size)
        images = TargetImages(paths=[s.path for s in target.train], camids=[s.camid for s in target.train])
        monitor_pids = _monitoring_pids(target.train)
        test = _target_evaluator(cfg, target, device, ranks)
        model = _build_model(cfg, device, channels_last, source, resumed=saved is not None)
        state = AdaptState(model, _build_memory(cfg, len(images.paths), model.feat_dim, device))
        if saved is not None:
            state.restore(saved, run.checkpoint_path, cfg.loss.bank_weight_decay)
        if resume is not None:
            run.discard_records_after(state.epoch)
        if saved is not None and state.epoch >= cfg.optim.epochs:
            summary = run.path / report.SUMMARY_FILE
            log.info("the run had finished all %d epochs: its result is in %s", state.epoch, summary)
        _evaluate_missing(run, test, model, cfg, epoch=state.epoch)
        # Decodes the target images (data.cache_images): not for a direct transfer or a finished run.
        pending = state.epoch < cfg.optim.epochs
        cluster_loader = common.test_loader(images.paths, cfg.data, device) if pending else None
        for epoch in range(state.epoch, cfg.optim.epochs):
            seconds: dict[str, float] = {}
            with timed(seconds, "extract"):
                features = _extract(model, cluster_loader, device, cluster_device, amp_dtype, cfg, ranks)
            prepare = functools.partial(prepare_epoch, state, features, cfg, cluster_device)
            prepared = distributed.on_main(prepare, ranks)  # rank 0's, the same on every rank
            state.take_labels(prepared, features, refresh_bank=epoch == 0 or cfg.loss.bank_refresh)
            monitoring = _monitoring_record(prepared, features, state.memory, monitor_pids, cfg, ranks)
            loader = _train_loader(images, prepared.labels.coarse, cfg, cluster_loader, device, epoch, ranks)
            lr, mu = common.epoch_lr(cfg.optim, epoch), cfg.loss.spread_weight_at(epoch)
            state.optimizer = _build_optimizer(model, state.memory, lr, cfg, previous=state.optimizer)
            with timed(seconds, "train"), common.naming_checkpoint(run.checkpoint_path):
                stats = steps.train_target_epoch(
                    distributed.wrap(model, ranks, device),  # DDP over the new classifier too
                    loader,
                    state.optimizer,
                    torch.from_numpy(prepared.labels.refined_or_coarse()),
                    memory=state.memory,
                    loss=cfg.loss,
                    device=device,
                    spread_weight=mu,
                    amp_dtype=amp_dtype,
                    channels_last=channels_last,
                    progress=cfg.run.progress,
                    epoch=epoch,
                    diagnostics_every=cfg.run.diagnostics_every,
                    ranks=ranks,
                )
            # Rank 0's BN statistics for the extraction; the banks are equal already, but GPU atomics round.
            distributed.broadcast_modules([model, state.memory], ranks)
            state.epoch = epoch + 1
            extra = {**state.bank_drift(), **monitoring}
            record = _epoch_record(prepared, stats, lr, mu, seconds | prepared.labels.seconds, extra)
            run.log_metrics(state.epoch, record, kind="adapt")
            log.info("epoch %d/%d: %s", state.epoch, cfg.optim.epochs, _epoch_summary(record))
            if ranks.is_main:
                state.save(run.checkpoint_path, cfg)
            if test is not None and common.evaluation_due(cfg.run, state.epoch, cfg.optim.epochs):
                common.logged_evaluation(run, test, model, epoch=state.epoch, kind=EVAL_KIND)
        if ranks.is_main:
            report.write_report(run.path)
        distributed.barrier(ranks)  # the others leave once rank 0 has written everything
        return run.path


@dataclass(frozen=True)
class EpochLabels:
    """The off-line stage's result for one epoch: what the on-line stage trains on (`prepare_epoch`)."""

    labels: pseudo_labels.PseudoLabels  # coarse [N] (-1 outliers), refined [N] or None, L, eps, seconds
    centroids: Tensor  # [L, D] L2-normalised coarse-cluster centroids on the CPU: the classifier's rows
    profile: dict[str, float | int]  # `pseudo_labels.cluster_profile` of the coarse labels


def prepare_epoch(state: AdaptState, features: Tensor, cfg: AdaptConfig, device: torch.device) -> EpochLabels:
    """The off-line stage of the epoch after `state.epoch` (docs/method.md §3-4): k-reciprocal Jaccard
    distance, DBSCAN at `state.eps` (derived now at epoch 0) -> coarse labels, hierarchical refinement ->
    refined labels (when a loss term reads them), and the coarse clusters' centroids. Reads `state`,
    changes nothing.

    Args:
        state: the run so far (its eps and epoch).
        features: [N, D] L2-normalised target features in dataset order, on `device`.
        cfg: the run's config (clustering.*, the refined loss's weight, the sampler's P and K, the seed).
        device: device of the neighbour search and the k-means.

    Raises:
        ValueError: no training batch can be formed (fewer than 2 clusters); degenerate clusterings
            are logged as warnings.
    """
    labels = pseudo_labels.compute_pseudo_labels(
        features,
        cfg.clustering,
        eps=state.eps,
        refine=cfg.loss.refined_weight > 0,
        seed=cfg.run.seed,
        device=device,
    )
    profile = pseudo_labels.cluster_profile(labels.coarse, num_instances=cfg.data.num_instances)
    _check_clusters(labels, profile, state.epoch, cfg)
    centroids = clustering.cluster_centroids(features, labels.coarse, labels.num_clusters).cpu()
    return EpochLabels(labels, centroids, profile)


@dataclass
class AdaptState:
    """What one adaptation epoch hands the next; checkpoint.pt holds it, so a resumed run continues
    exactly (with the RNG states, taken when saving).

    `drift_initial`: rows `diagnostics.drift_rows` of the instant bank at its last (re)initialisation, for
    the drift diagnostic only.
    """

    model: ReidNet
    memory: MemoryBank | None
    optimizer: torch.optim.Optimizer | None = None  # carried over only with optim.reset_each_epoch=False
    eps: float | None = None  # DBSCAN's eps: derived at epoch 0, then fixed
    epoch: int = 0  # epochs completed
    drift_initial: Tensor | None = None

    def take_labels(self, prepared: EpochLabels, features: Tensor, *, refresh_bank: bool) -> None:
        """Start an epoch on its labels: eps fixed, the memory (re)initialised from the features when
        `refresh_bank` (the reference: at epoch 0 only), the classifier's rows set to the centroids."""
        self.eps = prepared.labels.eps
        if self.memory is not None and refresh_bank:
            self.memory.init_from(features)
            if isinstance(self.memory, InstantMemoryBank):
                bank = self.memory.bank().detach()
                self.drift_initial = bank[diagnostics.drift_rows(len(bank)).to(bank.device)].clone()
        self.model.reset_classifier(prepared.labels.num_clusters, prepared.centroids)

    def bank_drift(self) -> dict[str, float]:
        """The instant bank's drift since its (re)initialisation (`diagnostics.bank_drift`); {} without."""
        if self.memory is None or self.drift_initial is None:
            return {}
        bank = self.memory.bank()
        return diagnostics.bank_drift(bank, self.drift_initial, diagnostics.drift_rows(len(bank)))

    def save(self, path: Path, cfg: AdaptConfig) -> None:
        # A fresh Adam each epoch (the default) needs no state; otherwise its moments must survive.
        keep_optimizer = self.optimizer is not None and not cfg.optim.reset_each_epoch
        common.save_run_checkpoint(
            path,
            "adapt",
            cfg,
            self.model,
            epoch=self.epoch,
            eps=self.eps,
            memory=self.memory.state_dict() if self.memory is not None else None,
            optimizer=self.optimizer.state_dict() if keep_optimizer and self.optimizer is not None else None,
            drift_initial=self.drift_initial,
        )

    def restore(self, saved: dict[str, Any], path: Path, bank_weight_decay: float | None) -> None:
        """Continue from the checkpoint `path` that `common.check_resume` read (`saved`) and checked."""
        self.model.reset_classifier(int(saved["num_classes"]))
        self.model.load_state_dict(saved["model"])
        if (self.memory is None) != (saved["memory"] is None):
            raise ValueError(
                f"{path}: memory bank presence differs from the config (loss.spread_weight, loss.memory)"
            )
        if self.memory is not None:
            self.memory.load_state_dict(saved["memory"])
        if saved["optimizer"] is not None:
            params = _trainable(self.model, self.memory, bank_weight_decay)
            self.optimizer = training.build_adam(params, lr=0.0, weight_decay=0.0)
            self.optimizer.load_state_dict(saved["optimizer"])
        seeding.set_rng_state(saved["rng"])
        self.epoch, self.eps = int(saved["epoch"]), float(saved["eps"])
        self.drift_initial = saved.get("drift_initial")
        if self.drift_initial is None and saved.get("bank_start") is not None:  # written before drift_initial
            self.drift_initial = saved["bank_start"][diagnostics.drift_rows(len(saved["bank_start"]))]
        log.info("resumed after epoch %d (eps %.4f)", self.epoch, self.eps)


def _extract(
    model: ReidNet,
    loader: Any,
    device: torch.device,
    cluster_device: torch.device,
    amp_dtype: torch.dtype | None,
    cfg: AdaptConfig,
    ranks: distributed.Ranks,
) -> Tensor:
    """[N, D] target features in dataset order, on `cluster_device`; under torchrun each rank extracts its
    shard."""
    if not ranks.distributed:
        return extraction.extract_features(
            model, loader, device, progress=cfg.run.progress, amp_dtype=amp_dtype, out_device=cluster_device
        )
    num_images = len(loader.dataset)
    start, stop = distributed.shard_range(num_images, ranks)
    pixels = loader.dataset.pixels
    shard = common.test_loader(
        loader.dataset.paths[start:stop],
        cfg.data,
        device,
        cache=False,
        pixels=None if pixels is None else pixels[start:stop],  # a view of the decoded images
    )
    features = extraction.extract_features(
        model, shard, device, progress=cfg.run.progress, amp_dtype=amp_dtype, out_device=device
    )
    return distributed.gather_rows_in_order(features, num_images, ranks).to(cluster_device)


def _parse_target(cfg: AdaptConfig) -> ReidSplits:
    """The target's splits, parsed (no image opened) and checked before the run folder is written."""
    target = datasets.load_dataset(cfg.data.target, cfg.data.target_root)
    _require_target(target)
    if cfg.optim.epochs > 0 and len(target.train) <= cfg.clustering.k1:
        raise ValueError(
            f"the target's {len(target.train)} training images ({cfg.data.target_root}) are too few for "
            f"clustering.k1={cfg.clustering.k1}; expected more images than k1 (or a smaller clustering.k1)"
        )
    return target


def _require_target(target: ReidSplits) -> None:
    common.require_splits(target, "target", "data.target_root", {"train": "adaptation"})
    if bool(target.query) != bool(target.gallery):  # both: scored; neither: an unlabelled target
        scoring = "the target evaluation (a query split needs a gallery and vice versa)"
        common.require_splits(target, "target", "data.target_root", {"query": scoring, "gallery": scoring})


def _source_state(cfg: AdaptConfig) -> dict[str, Any] | None:
    """The checked `source_checkpoint` (kind, trunk), or None without one."""
    if cfg.source_checkpoint is None:
        return None
    path = Path(cfg.source_checkpoint)
    if not path.is_file() and not path.is_dir():  # a folder: load_checkpoint names it as one
        raise FileNotFoundError(
            f"source_checkpoint={cfg.source_checkpoint!r} does not exist; expected the checkpoint.pt of a "
            "`dualref pretrain` run (or null to start from model.pretrained)"
        )
    source = checkpoint.load_checkpoint(path)
    try:
        common.check_model_checkpoint(source, path, inference.MODEL_KINDS, cfg.model.arch)
    except ValueError as err:
        raise ValueError(f"source_checkpoint: {err}") from None
    return source


def _load_target(cfg: AdaptConfig, target: ReidSplits) -> ReidSplits:
    target = common.without_unreadable(target, skip_unreadable=cfg.data.skip_unreadable)
    _require_target(target)  # again: dropping unreadable images may empty a split
    log.info(
        "target %s: %d training images (unlabelled use), %d query, %d gallery",
        target.name,
        len(target.train),
        len(target.query),
        len(target.gallery),
    )
    return target


def _build_memory(
    cfg: AdaptConfig, num_samples: int, feat_dim: int, device: torch.device
) -> MemoryBank | None:
    """The memory of the configured Table III variant; None without memory loss or for "minibatch"."""
    if cfg.loss.spread_weight == 0:
        return None
    memory = build_memory_bank(cfg.loss.memory, num_samples, feat_dim, cfg.loss.memory_momentum)
    return memory.to(device) if memory is not None else None


def _epoch_record(
    prepared: EpochLabels,
    stats: steps.EpochStats,
    lr: float,
    mu: float,
    seconds: dict[str, float],
    extra: dict[str, float],
) -> dict[str, Any]:
    """One "adapt" line of metrics.jsonl: labels, losses (loss_<term>), gradient shares, timings, extra."""
    return {
        **pseudo_labels.label_record(prepared.labels, prepared.profile),
        "lr": lr,
        "spread_weight": mu,
        **{name if name.startswith("grad_") else f"loss_{name}": v for name, v in stats.means.items()},
        **{f"seconds_{name}": round(value, 3) for name, value in seconds.items()},
        **extra,
    }


def _evaluate_missing(
    run: runs.AnyRun, test: inference.Evaluator | None, model: ReidNet, cfg: AdaptConfig, *, epoch: int
) -> None:
    """Evaluate the checkpoint's epoch if its evaluation was due but the run stopped before logging it.

    Epoch 0 of a direct-transfer run (`optim.epochs = 0`) is evaluated here too; a no-op without an
    evaluation (an unlabelled target, or not rank 0).
    """
    due = epoch == cfg.optim.epochs or (epoch > 0 and common.evaluation_due(cfg.run, epoch, cfg.optim.epochs))
    if test is not None and due:
        common.logged_evaluation(run, test, model, epoch=epoch, kind=EVAL_KIND)


def _target_evaluator(
    cfg: AdaptConfig, target: ReidSplits, device: torch.device, ranks: distributed.Ranks
) -> inference.Evaluator | None:
    """Rank 0's query/gallery evaluation of the target; None for an unlabelled target (no query, no
    gallery: it trains all the same; one split without the other was refused by `_require_target`)."""
    if not (target.query or target.gallery):
        log.info("target %s has no query/gallery: no target evaluation", target.name)
        return None
    return common.evaluator(target, cfg.data, cfg.run, device, cfg.evaluation) if ranks.is_main else None


def _cluster_device(cfg: AdaptConfig, device: torch.device, ranks: distributed.Ranks) -> torch.device:
    """Where the off-line stage computes: `clustering.device` (default: the run's); under torchrun on
    CUDA, each rank's own GPU (rank 0 computes, the others wait)."""
    cluster_device = training.resolve_device(cfg.clustering.device or cfg.run.device, key="clustering.device")
    return device if ranks.distributed and cluster_device.type == "cuda" else cluster_device


def _monitoring_pids(samples: Sequence[Sample]) -> np.ndarray | None:
    """MONITORING ONLY: target ground-truth ids for the quality records (None if unknown)."""
    pids = np.array([s.pid for s in samples], dtype=np.int64)
    return pids if (pids >= 0).all() else None


def _monitoring_record(
    prepared: EpochLabels,
    features: Tensor,
    memory: MemoryBank | None,
    pids: np.ndarray | None,
    cfg: AdaptConfig,
    ranks: distributed.Ranks,
) -> dict[str, float]:
    """MONITORING ONLY: label quality, and the precision of the spread-out loss's k positives (rank 0)."""
    if not ranks.is_main:
        return {}
    record = pseudo_labels.label_quality_record(prepared.labels, pids)
    k = cfg.loss.spread_num_neighbors
    if pids is not None and memory is not None and 1 <= k < len(pids):
        neighbours = diagnostics.nearest_bank_entries(features, memory.bank().detach(), k)
        record["bank_neighbour_precision"] = diagnostics.neighbour_precision(neighbours, pids)
    return record


def _check_clusters(
    labels: pseudo_labels.PseudoLabels, profile: dict[str, float | int], epoch: int, cfg: AdaptConfig
) -> None:
    """Stop when no training batch can be formed; warn when the clustering degenerates (label-free)."""
    settings = cfg.clustering
    fixed_eps = settings.dbscan_eps is not None
    if labels.num_clusters < 1:
        key = "raise clustering.dbscan_eps" if fixed_eps else "raise clustering.dbscan_rho"
        if not fixed_eps and settings.max_cluster_share < 1.0:
            key += " or clustering.max_cluster_share"
        raise ValueError(
            f"DBSCAN found no cluster at epoch {epoch} (all {labels.coarse.size} images are outliers at eps "
            f"{labels.eps:.4f}); expected at least one: {key}, or lower clustering.min_samples"
        )
    if labels.num_clusters < 2:  # every batch would hold one label: the triplet loss needs two
        raise ValueError(
            f"DBSCAN put the target into a single cluster at epoch {epoch} (it holds "
            f"{profile['largest_cluster_share']:.1%} of the {labels.coarse.size} images, eps "
            f"{labels.eps:.4f}); no training batch can be formed: a P x K batch needs at least 2 "
            f"clusters for the triplet loss. {pseudo_labels.GIANT_CLUSTER_HINT}"
        )
    per_batch = cfg.data.batch_size // cfg.data.num_instances
    for warning in pseudo_labels.degenerate_clustering(
        profile, identities_per_batch=per_batch, fixed_eps=fixed_eps
    ):
        log.warning("epoch %d/%d: %s", epoch + 1, cfg.optim.epochs, warning)


def _epoch_summary(record: dict[str, Any]) -> str:
    parts = [
        f"eps {record['eps']:.4f}",
        f"clusters {record['num_clusters']}",
        f"outliers {record['num_outliers']}",
        f"largest {record['largest_cluster_share']:.3f}",
        f"loss {record['loss_total']:.3f}",
    ]
    parts += [
        f"F {name} {record[f'{name}_fscore']:.3f}"
        for name in ("coarse", "refined")
        if f"{name}_fscore" in record
    ]
    stages = ", ".join(f"{k[8:]} {v:.0f}s" for k, v in record.items() if k.startswith("seconds_"))
    return " | ".join([*parts, stages])


def _build_model(
    cfg: AdaptConfig,
    device: torch.device,
    channels_last: bool,
    source: dict[str, Any] | None,
    *,
    resumed: bool,
) -> ReidNet:
    """The network to adapt: the source checkpoint's trunk and neck (its classifier is dropped).

    `source` is `_source_state`'s. `resumed`: the run's own checkpoint replaces these weights, so
    neither the source checkpoint nor model.pretrained is read (the source may be gone by now).
    """
    if cfg.source_checkpoint is None and not resumed:
        log.warning("no source_checkpoint: adapting from model.pretrained=%s", cfg.model.pretrained)
    pretrained = cfg.model.pretrained if cfg.source_checkpoint is None and not resumed else None
    # One class for now: resized to the number of clusters every epoch.
    model = common.build_model(
        cfg.model, 1, pretrained=pretrained, device=device, channels_last=channels_last
    )
    if source is not None:
        load_trunk_and_neck(model, source["model"])
        if source.get("kind") == "adapt":  # allowed (adapting further, or to another target), but said
            log.info(
                "started from %s: an adaptation checkpoint (epoch %s), not a pre-trained source model; "
                "its trunk and neck are the starting point",
                cfg.source_checkpoint,
                source.get("epoch"),
            )
        else:
            log.info("started from source checkpoint %s", cfg.source_checkpoint)
    return model


def _train_loader(
    images: TargetImages,
    coarse: np.ndarray,
    cfg: AdaptConfig,
    cluster_loader: Any,
    device: torch.device,
    epoch: int,
    ranks: distributed.Ranks,
) -> Any:
    """P x K batches over the coarse labels (outliers, -1, never sampled); order set by (seed, epoch)."""
    loader = common.train_loader(
        images.paths,
        coarse.tolist(),
        images.camids,
        cfg.data,
        iterations=cfg.optim.iters_per_epoch,
        seed=cfg.run.seed,
        device=device,
        cache=False,
        ranks=ranks,
        # The extraction loader decoded every image once (data.cache_images): its pixels are shared
        # rather than decoded again for each epoch's new loader.
        pixels=cluster_loader.dataset.pixels,
    )
    loaders.set_epoch(loader, epoch)
    return loader


def _trainable(model: ReidNet, memory: MemoryBank | None, bank_weight_decay: float | None) -> list[Any]:
    """The optimizer's parameters: the network's, and the instant bank (its own decay when set)."""
    params: list[Any] = list(model.parameters())
    if not isinstance(memory, InstantMemoryBank):
        return params
    if bank_weight_decay is None:  # one group, as the reference
        return [*params, memory.weight]
    return [{"params": params}, {"params": [memory.weight], "weight_decay": bank_weight_decay}]


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
    params = _trainable(model, memory, cfg.loss.bank_weight_decay)
    optimizer = training.build_adam(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    if previous is not None and not cfg.optim.reset_each_epoch:
        kept = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for param, param_state in previous.state.items():
            if id(param) in kept:
                optimizer.state[param] = param_state
    return optimizer
