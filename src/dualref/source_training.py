"""Supervised source training and direct transfer (`dualref pretrain`); checkpoint evaluation.

`pretrain_on_source` reproduces the reference's pre-training (REFERENCE_BEHAVIOUR.md section 2): a P x K
loader on the labelled source, Adam with a warm-up / multi-step learning rate that is a pure function of
the epoch, CE with label smoothing + soft-margin triplet, target batches forwarded to adapt BatchNorm
statistics, evaluation on the source test split, and at the end on the target test split (the
"direct transfer" row of the paper's Table II). The numbers reported are the LAST epoch's; the
checkpoint with the best source mAP is also kept as ``model_best.pt`` (the reference's choice), labelled.

Epoch numbers in metrics.jsonl and checkpoints count epochs *completed* (1..E), so "epoch 40" is the
reference's evaluation after 40 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dualref import checkpoint, evaluation, extraction, runs, seeding, training
from dualref.config import PretrainConfig, config_to_dict
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits, relabel_pids
from dualref.evaluation import RankMetrics
from dualref.models import ReidNet

RESULTS_FILE = "results.json"
BEST_FILE = "model_best.pt"

log = logging.getLogger(__name__)


def pretrain_on_source(cfg: PretrainConfig, *, resume: str | Path | None = None) -> Path:
    """Train on the labelled source, evaluate on its test split, then direct transfer to the target.

    Args:
        cfg: the resolved config.
        resume: an earlier run folder to continue (its checkpoint.pt: model, optimizer, epoch, RNG
            states); the run folder of `cfg` is then ignored. On CPU the continued run is bit-identical
            to an uninterrupted one.

    Returns:
        The run folder (config.yaml, run.log, metrics.jsonl, checkpoint.pt, model_best.pt,
        results.json).
    """
    if resume is not None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=str(resume)))
    _check_pretrain_loss(cfg)
    device = training.resolve_device(cfg.run.device)
    amp_dtype = training.AMP_DTYPES[cfg.run.amp]
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    started = time.perf_counter()
    with runs.open_run(cfg.run.run_dir, cfg, resume=resume is not None) as run:
        seeding.seed_everything(cfg.run.seed)
        source = _load_splits(cfg.data.source, cfg.data.source_root, cfg.data.skip_unreadable)
        target = None
        if cfg.forward_target_batches or cfg.evaluate_target:
            target = _load_splits(cfg.data.target, cfg.data.target_root, cfg.data.skip_unreadable)
        labels = relabel_pids(source.train)
        num_classes = max(labels) + 1
        log.info("source %s: %d images of %d identities", source.name, len(labels), num_classes)

        model = _build_model(cfg, num_classes, device)
        optimizer = training.build_adam(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        source_loader = _source_loader(cfg, source, labels, device)
        target_loader = None
        if cfg.forward_target_batches and target is not None:
            target_loader = _target_loader(cfg, target, device)
        start_epoch, best_map = 0, -1.0
        if run.resumed and run.checkpoint_path.is_file():
            start_epoch, best_map = _restore(run.checkpoint_path, model, optimizer)

        source_metrics: RankMetrics | None = None
        for epoch in range(start_epoch, cfg.optim.epochs):
            lr = _epoch_lr(cfg, epoch)
            if cfg.optim.reset_each_epoch and epoch > 0:  # a fresh Adam, as the adaptation loop
                optimizer = training.build_adam(
                    model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay
                )
            training.set_lr(optimizer, lr)
            loaders.set_epoch(source_loader, epoch)
            target_iter = None
            if target_loader is not None:
                loaders.set_epoch(target_loader, epoch)
                target_iter = iter(target_loader)
            try:
                stats = training.train_source_epoch(
                    model,
                    source_loader,
                    optimizer,
                    device=device,
                    label_smoothing=cfg.loss.label_smoothing,
                    triplet_margin=cfg.loss.triplet_margin,
                    target_loader_iter=target_iter,
                    amp_dtype=amp_dtype,
                    channels_last=cfg.run.channels_last,
                    progress=cfg.run.progress,
                    epoch=epoch,
                )
            except training.NonFiniteLossError as err:
                if run.checkpoint_path.is_file():
                    raise err.with_checkpoint(run.checkpoint_path) from None
                raise
            done = epoch + 1
            run.log_metrics(done, {"lr": lr, **stats.as_metrics()}, kind="train")
            log.info(
                "epoch %d/%d lr %.2e | ce %.3f | triplet %.3f | acc %.3f | %.1f img/s | %.0f s",
                done, cfg.optim.epochs, lr, stats.means["ce"], stats.means["triplet"],
                stats.means["accuracy"], stats.images_per_second, stats.seconds,
            )  # fmt: skip
            is_best = False
            if done == cfg.optim.epochs or (cfg.run.eval_every and done % cfg.run.eval_every == 0):
                source_metrics = _evaluate_logged(run, model, source, cfg, device, done, "eval_source")
                is_best = source_metrics.mAP > best_map
                best_map = max(best_map, source_metrics.mAP)
            state = _training_state(cfg, model, optimizer, done, best_map, source.name)
            checkpoint.save_checkpoint(run.checkpoint_path, state)
            if is_best:
                state["selected_by"] = f"best source test mAP ({source.name}), epoch {done}"
                checkpoint.save_checkpoint(run.path / BEST_FILE, state)

        done = max(start_epoch, cfg.optim.epochs)
        if not run.checkpoint_path.is_file():  # 0 epochs: keep the initial model for `evaluate`
            state = _training_state(cfg, model, optimizer, 0, best_map, source.name)
            checkpoint.save_checkpoint(run.checkpoint_path, state)
        if source_metrics is None:  # 0 epochs, or a finished run resumed
            source_metrics = _evaluate_logged(run, model, source, cfg, device, done, "eval_source")
        results: dict[str, Any] = {
            "kind": "pretrain",
            "reported": "last epoch (model_best.pt = best source mAP, for reference only)",
            "epochs": done,
            "source": {"dataset": source.name, **_metrics_dict(source_metrics)},
        }
        if cfg.evaluate_target and target is not None:
            transfer = _evaluate_logged(run, model, target, cfg, device, done, "direct_transfer")
            results["direct_transfer"] = {"dataset": target.name, **_metrics_dict(transfer)}
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        _write_json(run.path / RESULTS_FILE, results)
        log.info("results written to %s", run.path / RESULTS_FILE)
        return run.path


def _build_model(cfg: PretrainConfig, num_classes: int, device: torch.device) -> ReidNet:
    model = ReidNet(
        cfg.model.arch,
        num_classes,
        pretrained=cfg.model.pretrained,
        last_stride=cfg.model.last_stride,
        stem_relu=cfg.model.stem_relu,
        neck_relu=cfg.model.neck_relu,
    ).to(device)
    if cfg.run.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _source_loader(
    cfg: PretrainConfig, source: ReidSplits, labels: list[int], device: torch.device
) -> DataLoader[loaders.Item]:
    return loaders.train_loader(
        [s.path for s in source.train],
        labels,
        [s.camid for s in source.train],
        height=cfg.data.height,
        width=cfg.data.width,
        batch_size=cfg.data.batch_size,
        num_instances=cfg.data.num_instances,
        num_iterations=cfg.optim.iters_per_epoch,
        seed=cfg.run.seed,
        random_erasing_prob=cfg.data.random_erasing_prob,
        num_workers=cfg.data.num_workers,
        cache=cfg.data.cache_images,
        pin_memory=device.type == "cuda",
    )


def _target_loader(cfg: PretrainConfig, target: ReidSplits, device: torch.device) -> DataLoader[loaders.Item]:
    # Target pids are never read here: only the images, for BatchNorm statistics.
    return loaders.random_loader(
        [s.path for s in target.train],
        height=cfg.data.height,
        width=cfg.data.width,
        batch_size=cfg.data.batch_size,
        num_iterations=cfg.optim.iters_per_epoch,
        seed=cfg.run.seed + 1,
        num_workers=cfg.data.num_workers,
        cache=cfg.data.cache_images,
        pin_memory=device.type == "cuda",
    )


def _epoch_lr(cfg: PretrainConfig, epoch: int) -> float:
    return training.lr_at_epoch(
        epoch,
        base_lr=cfg.optim.lr,
        schedule=cfg.optim.schedule,
        warmup_epochs=cfg.optim.warmup_epochs,
        warmup_factor=cfg.optim.warmup_factor,
        milestones=cfg.optim.milestones,
        lr_decay_epochs=cfg.optim.lr_decay_epochs,
        gamma=cfg.optim.gamma,
        reference_warmup_offset=cfg.optim.reference_warmup_offset,
    )


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """Load model, optimizer and RNG states; returns (epochs completed, best source mAP so far)."""
    state = checkpoint.load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    seeding.set_rng_state(state["rng"])
    log.info("resumed from %s after epoch %d", path, int(state["epoch"]))
    return int(state["epoch"]), float(state["best_source_mAP"])


def _check_pretrain_loss(cfg: PretrainConfig) -> None:
    """Refuse loss settings that source training does not use, rather than ignore them silently."""
    unused = {
        "loss.ce_weight": (cfg.loss.ce_weight, 1.0),
        "loss.spread_weight": (cfg.loss.spread_weight, 0.0),
        "loss.triplet_feature": (cfg.loss.triplet_feature, "pooled"),
    }
    for key, (value, supported) in unused.items():
        if value != supported:
            raise ValueError(
                f"{key}={value!r} is not supported by `dualref pretrain`; expected {supported!r} "
                "(source training is CE + triplet on the pooled feature, both with weight 1)"
            )


def _load_splits(name: str, root: str, skip_unreadable: bool) -> ReidSplits:
    splits = datasets.load_dataset(name, root)
    if not skip_unreadable:
        return splits
    return dataclasses.replace(
        splits,
        train=loaders.drop_unreadable(splits.train, log),
        query=loaders.drop_unreadable(splits.query, log),
        gallery=loaders.drop_unreadable(splits.gallery, log),
    )


def _training_state(
    cfg: PretrainConfig,
    model: ReidNet,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    best_map: float,
    source_name: str,
) -> dict[str, Any]:
    return {
        "kind": "pretrain",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": None,  # the learning rate is a pure function of the epoch (training.lr_at_epoch)
        "epoch": epoch,
        "rng": seeding.rng_state(),
        "config": config_to_dict(cfg),
        "arch": cfg.model.arch,
        "num_classes": model.num_classes,
        "feat_dim": model.feat_dim,
        "height": cfg.data.height,
        "width": cfg.data.width,
        "best_source_mAP": best_map,
        "source_dataset": source_name,
    }


def _evaluate_logged(
    run: runs.Run,
    model: nn.Module,
    splits: ReidSplits,
    cfg: PretrainConfig,
    device: torch.device,
    epoch: int,
    kind: str,
) -> RankMetrics:
    # Evaluation draws no random numbers today; restoring the RNGs guarantees that the evaluation
    # cadence (run.eval_every) can never change the training that follows.
    rng = seeding.rng_state()
    metrics = evaluate_model(
        model,
        splits,
        device=device,
        height=cfg.data.height,
        width=cfg.data.width,
        batch_size=cfg.data.test_batch_size,
        num_workers=cfg.data.num_workers,
        amp_dtype=training.AMP_DTYPES[cfg.run.amp],
        progress=cfg.run.progress,
    )
    seeding.set_rng_state(rng)
    run.log_metrics(epoch, {"dataset": splits.name, **_metrics_dict(metrics)}, kind=kind)
    log.info("%s on %s after epoch %d: %s", kind, splits.name, epoch, evaluation.format_metrics(metrics))
    return metrics


def evaluate_model(
    model: nn.Module,
    splits: ReidSplits,
    *,
    device: torch.device,
    height: int,
    width: int,
    batch_size: int = 128,
    num_workers: int = 2,
    flip: bool = False,
    rerank: bool = False,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> RankMetrics:
    """Rank metrics of a model on a data set's query/gallery split (REFERENCE_BEHAVIOUR.md section 6).

    Query and gallery are extracted in one pass (eval mode, L2-normalised BN-neck features); the
    distance is squared Euclidean, or the k-reciprocal re-ranked distance (k1=20, k2=6, lambda=0.3).

    Returns:
        mAP, CMC, mINP and the number of valid queries.
    """
    samples = [*splits.query, *splits.gallery]
    loader = loaders.test_loader(
        [s.path for s in samples],
        height=height,
        width=width,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    features = extraction.extract_features(
        model, loader, device, flip=flip, progress=progress, desc=f"extract {splits.name}",
        amp_dtype=amp_dtype,
    )  # fmt: skip
    num_query = len(splits.query)
    query_features, gallery_features = features[:num_query], features[num_query:]  # [Q, D], [G, D]
    query_pids = np.array([s.pid for s in splits.query])
    gallery_pids = np.array([s.pid for s in splits.gallery])
    query_camids = np.array([s.camid for s in splits.query])
    gallery_camids = np.array([s.camid for s in splits.gallery])
    if rerank:
        from dualref import distances

        dist = distances.reranked_distance(query_features, gallery_features, k1=20, k2=6, lambda_value=0.3)
        return evaluation.rank_metrics(dist, query_pids, gallery_pids, query_camids, gallery_camids)
    return evaluation.rank_metrics_from_features(
        query_features, gallery_features, query_pids, gallery_pids, query_camids, gallery_camids
    )


def _metrics_dict(metrics: RankMetrics) -> dict[str, float | int]:
    return {
        "mAP": float(metrics.mAP),
        "rank1": float(metrics.cmc[0]),
        "rank5": float(metrics.cmc[min(4, len(metrics.cmc) - 1)]),
        "rank10": float(metrics.cmc[min(9, len(metrics.cmc) - 1)]),
        "mINP": float(metrics.mINP),
        "num_valid_queries": int(metrics.num_valid_queries),
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_from_checkpoint(state: dict[str, Any]) -> ReidNet:
    """Rebuild the network stored in a checkpoint (pretrain or adapt), weights loaded, on the CPU."""
    missing = [key for key in ("model", "arch", "num_classes") if key not in state]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}; expected a checkpoint of dualref pretrain/adapt")
    model_cfg = state.get("config", {}).get("model", {})
    model = ReidNet(
        state["arch"],
        int(state["num_classes"]),
        pretrained=None,
        last_stride=int(model_cfg.get("last_stride", 1)),
        stem_relu=bool(model_cfg.get("stem_relu", False)),
        neck_relu=bool(model_cfg.get("neck_relu", False)),
    )
    model.load_state_dict(state["model"])
    return model


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
        batch_size, num_workers: of the extraction loader.
        flip: average features with horizontally flipped images.
        rerank: k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3).
        height, width: input size; default the checkpoint's training size.
        progress: progress bar.

    Returns:
        The metrics.
    """
    state = checkpoint.load_checkpoint(checkpoint_path)
    model = model_from_checkpoint(state).to(device)
    splits = datasets.load_dataset(dataset, root)
    return evaluate_model(
        model,
        splits,
        device=device,
        height=height or int(state["height"]),
        width=width or int(state["width"]),
        batch_size=batch_size,
        num_workers=num_workers,
        flip=flip,
        rerank=rerank,
        progress=progress,
    )


def format_table(metrics: RankMetrics) -> str:
    """The standard table: mAP, R1, R5, R10, mINP in percent, and the number of valid queries."""
    row = _metrics_dict(metrics)
    header = f"{'mAP':>6} {'R1':>6} {'R5':>6} {'R10':>6} {'mINP':>6} {'valid queries':>14}"
    values = " ".join(f"{100 * row[k]:6.1f}" for k in ("mAP", "rank1", "rank5", "rank10", "mINP"))
    return f"{header}\n{values} {row['num_valid_queries']:>14d}"


def evaluate_checkpoint_command(args: argparse.Namespace) -> int:
    """`dualref evaluate CHECKPOINT --dataset NAME --root PATH [...]`: print the metrics table."""
    metrics = evaluate_checkpoint(
        args.checkpoint,
        args.dataset,
        args.root,
        device=training.resolve_device(args.device, key="--device"),
        batch_size=args.batch_size,
        num_workers=args.workers,
        flip=args.flip,
        rerank=args.rerank,
        height=args.height,
        width=args.width,
    )
    options = ", ".join(name for name, on in (("flip", args.flip), ("re-ranking", args.rerank)) if on)
    print(f"{args.checkpoint} on {args.dataset} ({args.root}){f' with {options}' if options else ''}")
    print(format_table(metrics))
    return 0
