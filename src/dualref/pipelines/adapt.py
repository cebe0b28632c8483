"""Dual-Refinement adaptation to the unlabelled target domain (`dualref adapt`).

The alternating loop of the paper's Algorithm 1 as the reference code runs it (docs/method.md §3-5).
Every epoch, off-line (`pseudo_labels`): extract the target features, k-reciprocal Jaccard distance, DBSCAN
(eps fixed at epoch 0) -> coarse labels, hierarchical refinement -> refined labels; classifier rows <-
cluster centroids. On-line (`steps.train_target_epoch`): P x K batches over the coarse labels, the joint
objective, a fresh Adam over the network and the instant memory bank. Every ablation of the paper's Tables
II and III is a config (configs/*/): baseline (alpha = mu = 0), only LR (mu = 0), only IM-SP (alpha = 0).

Target ground truth: training sees the target training images through `TargetImages` (paths and cameras
only). The target `pid`s are read in exactly two places, both for measurement: `_monitoring_pids` (label
and bank-neighbour precision, paper Fig. 3) and the `Evaluator` (query/gallery mAP and CMC).

Run folder (`dualref.runs`): config.yaml, run.log, metrics.jsonl with one "adapt" record per epoch (eps,
cluster profile, loss terms, gradient shares, bank drift, seconds per stage, label quality) and an
"eval_target" record per evaluation, checkpoint.pt (exact resume), and at the end plots + summary.md
(`dualref.report`). Records use `epoch` = number of adaptation epochs completed (0 = direct transfer).

Size: over 400 lines: the loop (one screen) and its set-up, checks, checkpoint and monitoring helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from dualref import (
    checkpoint,
    clustering,
    diagnostics,
    distributed,
    extraction,
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
    cluster_device = training.resolve_device(cfg.clustering.device or cfg.run.device, key="clustering.device")
    if ranks.distributed and cluster_device.type == "cuda":
        cluster_device = device
    run_dir = common.run_folder(cfg.run, resume)
    # Everything that can be checked is checked before the run folder is written, so that a retry into
    # the same folder starts afresh and a resumed run's config.yaml never takes a bad value.
    own_checkpoint = resume is not None and common.check_resume(run_dir, "adapt", cfg.model.arch, ranks)
    source = None if own_checkpoint else _source_state(cfg)  # a run's own checkpoint holds the weights
    target = _parse_target(cfg)
    common.check_numerics(cfg.model, (cfg.data.height, cfg.data.width), device, amp_dtype, channels_last)
    distributed.batch_rows(cfg.data.batch_size, ranks)  # refuses a batch the ranks cannot share
    with common.open_run(run_dir, cfg, resume, ranks) as run:
        target = _load_target(cfg, target)
        common.log_compute(device, amp_dtype, channels_last, ranks.world_size)
        images = TargetImages(paths=[s.path for s in target.train], camids=[s.camid for s in target.train])
        monitor_pids = _monitoring_pids(target.train)
        model = _build_model(cfg, device, channels_last, source, resumed=own_checkpoint)
        # An unlabelled target (no query, no gallery) trains all the same, without target scores; one
        # split without the other was refused by `_require_target`. Only rank 0 evaluates.
        labelled = bool(target.query or target.gallery)
        scored = labelled and ranks.is_main
        test = common.evaluator(target, cfg.data, cfg.run, device, cfg.evaluation) if scored else None
        if not labelled:
            log.info("target %s has no query/gallery: no target evaluation", target.name)
        if cfg.optim.epochs == 0:  # direct transfer: evaluate the starting model only
            _evaluate_missing(run, test, model, cfg, epoch=0)
            if ranks.is_main:
                report.write_report(run.path)
            return run.path
        cluster_loader = common.test_loader(images.paths, cfg.data, device)
        memory = _build_memory(cfg, len(images.paths), model.feat_dim, device)
        decay = cfg.loss.bank_weight_decay
        state = _restore(run.checkpoint_path, model, memory, device, decay) if resume is not None else None
        eps = state.eps if state else None  # None: derived from clustering.* at epoch 0, then fixed
        optimizer = state.optimizer if state else None
        bank_start = state.bank_start if state else None  # rows at the bank's last (re)initialisation
        if resume is not None:
            run.discard_records_after(state.epoch if state else 0)
        if state is not None and state.epoch >= cfg.optim.epochs:
            summary = run.path / report.SUMMARY_FILE
            log.info("the run had finished all %d epochs: its result is in %s", state.epoch, summary)
        _evaluate_missing(run, test, model, cfg, epoch=state.epoch if state else 0)
        for epoch in range(state.epoch if state else 0, cfg.optim.epochs):
            seconds: dict[str, float] = {}
            with timed(seconds, "extract"):
                features = _extract(model, cluster_loader, device, amp_dtype, cfg, ranks)  # [N, D]
            labels = _pseudo_labels(features, eps, cluster_device, epoch, cfg, ranks)  # rank 0's
            eps = labels.eps
            if memory is not None and (epoch == 0 or cfg.loss.bank_refresh):
                memory.init_from(features)  # the reference: once, from the source model's features
                bank_start = memory.bank().detach().clone() if isinstance(memory, InstantMemoryBank) else None
            monitoring = (
                _monitoring_record(labels, features, memory, monitor_pids, cfg.loss.spread_num_neighbors)
                if ranks.is_main
                else {}
            )
            centroids = clustering.cluster_centroids(features, labels.coarse, labels.num_clusters)
            model.reset_classifier(labels.num_clusters, centroids.to(device))
            loader = _train_loader(images, labels.coarse, cfg, cluster_loader, device, epoch, ranks)
            lr, mu = common.epoch_lr(cfg.optim, epoch), cfg.loss.spread_weight_at(epoch)
            optimizer = _build_optimizer(model, memory, lr, cfg, previous=optimizer)
            with timed(seconds, "train"), common.naming_checkpoint(run.checkpoint_path):
                stats = steps.train_target_epoch(
                    distributed.wrap(model, ranks, device),  # DDP over the new classifier too
                    loader,
                    optimizer,
                    torch.as_tensor(labels.refined_or_coarse(), device=device),
                    memory=memory,
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
            distributed.broadcast_modules([model, memory], ranks)
            drift = (
                diagnostics.bank_drift(memory.bank(), bank_start) if memory and bank_start is not None else {}
            )
            record = _epoch_record(
                labels, stats, lr, mu, seconds | labels.seconds, {**drift, **monitoring}, cfg
            )
            run.log_metrics(epoch + 1, record, kind="adapt")
            log.info("epoch %d/%d: %s", epoch + 1, cfg.optim.epochs, _epoch_summary(record))
            rng = seeding.rng_state()
            if ranks.is_main:
                _save(run.checkpoint_path, cfg, model, memory, optimizer, eps, epoch + 1, rng, bank_start)
            if common.evaluation_due(cfg.run, epoch + 1, cfg.optim.epochs):
                _evaluate_logged(run, test, model, epoch=epoch + 1)
            seeding.set_rng_state(rng)  # evaluation must not change what the next epoch draws
        if ranks.is_main:
            report.write_report(run.path)
        distributed.barrier(ranks)  # the others leave once rank 0 has written everything
        return run.path


def _extract(
    model: ReidNet,
    loader: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    cfg: AdaptConfig,
    ranks: distributed.Ranks,
) -> Tensor:
    """[N, D] target features in dataset order; under torchrun each rank extracts its shard."""
    num_images = len(loader.dataset)
    if ranks.distributed:
        start, stop = distributed.shard_range(num_images, ranks)
        shard = common.test_loader(loader.dataset.paths[start:stop], cfg.data, device, cache=False)
        if loader.dataset.pixels is not None:  # a view of the decoded images, not a copy
            shard.dataset.pixels = loader.dataset.pixels[start:stop]
        loader = shard
    features = extraction.extract_features(
        model, loader, device, progress=cfg.run.progress, amp_dtype=amp_dtype
    )
    if not ranks.distributed:
        return features
    return distributed.gather_rows_in_order(features.to(device), num_images, ranks).cpu()


def _pseudo_labels(
    features: Tensor,
    eps: float | None,
    device: torch.device,
    epoch: int,
    cfg: AdaptConfig,
    ranks: distributed.Ranks,
) -> pseudo_labels.PseudoLabels:
    """The off-line stage's labels: computed by rank 0 and broadcast (the same on every rank)."""

    def compute() -> pseudo_labels.PseudoLabels:
        refine = cfg.loss.refined_weight > 0
        labels = pseudo_labels.compute_pseudo_labels(
            features, cfg.clustering, eps=eps, refine=refine, seed=cfg.run.seed, device=device
        )
        _check_clusters(labels, epoch, cfg)
        return labels

    return distributed.on_main(compute, ranks)


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
    if source.get("kind") not in ("pretrain", "adapt"):
        raise ValueError(
            f"source_checkpoint {path} is a {source.get('kind')!r} checkpoint; expected one written by "
            "`dualref pretrain` or `dualref adapt`"
        )
    if source.get("arch", cfg.model.arch) != cfg.model.arch:
        raise ValueError(
            f"source checkpoint {path} holds arch {source['arch']!r} but "
            f"model.arch={cfg.model.arch!r}; set model.arch={source['arch']}"
        )
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
    labels: pseudo_labels.PseudoLabels,
    stats: steps.EpochStats,
    lr: float,
    mu: float,
    seconds: dict[str, float],
    extra: dict[str, float],
    cfg: AdaptConfig,
) -> dict[str, Any]:
    """One "adapt" line of metrics.jsonl: labels, losses (loss_<term>), gradient shares, timings, extra."""
    return {
        **pseudo_labels.label_record(labels, num_instances=cfg.data.num_instances),
        "lr": lr,
        "spread_weight": mu,
        **{name if name.startswith("grad_") else f"loss_{name}": v for name, v in stats.means.items()},
        **{f"seconds_{name}": round(value, 3) for name, value in seconds.items()},
        **extra,
    }


def _evaluate_missing(
    run: runs.AnyRun, test: Any | None, model: ReidNet, cfg: AdaptConfig, *, epoch: int
) -> None:
    """Evaluate the checkpoint's epoch if its evaluation was due but the run stopped before logging it.

    The checkpoint is written before the evaluation, so a run killed during an evaluation resumes after
    that epoch; without this, its record (the result itself, after the last epoch) would be lost. Epoch
    0 of a direct-transfer run (`optim.epochs = 0`) is evaluated here too. No-op without an evaluation.
    """
    if test is None:
        return
    due = epoch == cfg.optim.epochs or (epoch > 0 and common.evaluation_due(cfg.run, epoch, cfg.optim.epochs))
    if due and not any(record["epoch"] == epoch for record in runs.read_records(run.path, "eval_target")):
        _evaluate_logged(run, test, model, epoch=epoch)


def _evaluate_logged(run: runs.AnyRun, test: Any | None, model: ReidNet, *, epoch: int) -> None:
    if test is None:  # unlabelled target: nothing to score
        return
    record = common.evaluate(test, model)
    run.log_metrics(epoch, record, kind="eval_target")
    log.info(
        "epoch %d target: mAP %.1f%% R1 %.1f%% mINP %.1f%%",
        epoch,
        100 * record["mAP"],
        100 * record["rank1"],
        100 * record["mINP"],
    )


def _monitoring_pids(samples: Sequence[Sample]) -> np.ndarray | None:
    """MONITORING ONLY: target ground-truth ids for the quality records (None if unknown)."""
    pids = np.array([s.pid for s in samples], dtype=np.int64)
    return pids if (pids >= 0).all() else None


def _monitoring_record(
    labels: pseudo_labels.PseudoLabels,
    features: Tensor,
    memory: MemoryBank | None,
    pids: np.ndarray | None,
    k: int,
) -> dict[str, float]:
    """MONITORING ONLY: label quality, and the precision of the spread-out loss's k positives."""
    record = pseudo_labels.label_quality_record(labels, pids)
    if pids is not None and memory is not None and 1 <= k < len(pids):
        neighbours = diagnostics.nearest_bank_entries(features, memory.bank().detach(), k)
        record["bank_neighbour_precision"] = diagnostics.neighbour_precision(neighbours, pids)
    return record


def _check_clusters(labels: pseudo_labels.PseudoLabels, epoch: int, cfg: AdaptConfig) -> None:
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
    profile = pseudo_labels.cluster_profile(labels.coarse, num_instances=cfg.data.num_instances)
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
        cfg.model, 1, pretrained=pretrained, device=torch.device("cpu"), channels_last=False
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
    return training.place_model(model, device, channels_last)


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
        cache=False,  # shares the extraction loader's pixels instead (below)
        ranks=ranks,
    )
    # The extraction loader already decoded every image once (data.cache_images): share its pixels
    # rather than decoding the whole set again for each epoch's new loader.
    cached = getattr(cluster_loader.dataset, "pixels", None)
    if cached is not None and isinstance(loader.dataset, loaders.ImageDataset):
        loader.dataset.pixels = cached
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


class _ResumeState(NamedTuple):
    epoch: int  # epochs completed
    eps: float
    optimizer: torch.optim.Optimizer | None  # only kept when optim.reset_each_epoch is False
    bank_start: Tensor | None  # the instant bank's rows at its last (re)initialisation (drift diagnostic)


def _save(
    path: Path,
    cfg: AdaptConfig,
    model: ReidNet,
    memory: MemoryBank | None,
    optimizer: torch.optim.Optimizer | None,
    eps: float,
    epoch: int,
    rng: dict[str, Any],
    bank_start: Tensor | None,
) -> None:
    # A fresh Adam each epoch (the default) needs no state; otherwise its moments must survive.
    keep_optimizer = optimizer is not None and not cfg.optim.reset_each_epoch
    state = common.checkpoint_state(
        "adapt",
        cfg,
        model,
        epoch=epoch,
        rng=rng,
        eps=eps,
        memory=memory.state_dict() if memory is not None else None,
        optimizer=optimizer.state_dict() if keep_optimizer and optimizer is not None else None,
        bank_start=bank_start,
    )
    checkpoint.save_checkpoint(path, state)


def _restore(
    path: Path,
    model: ReidNet,
    memory: MemoryBank | None,
    device: torch.device,
    bank_weight_decay: float | None,
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
        params = _trainable(model, memory, bank_weight_decay)
        optimizer = training.build_adam(params, lr=0.0, weight_decay=0.0)
        optimizer.load_state_dict(state["optimizer"])
    seeding.set_rng_state(state["rng"])
    log.info("resumed after epoch %d (eps %.4f)", state["epoch"], state["eps"])
    bank_start = state.get("bank_start")
    return _ResumeState(int(state["epoch"]), float(state["eps"]), optimizer, bank_start)
