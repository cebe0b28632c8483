"""Supervised source training and direct transfer (`dualref pretrain`).

The reference's pre-training (docs/method.md §2): a P x K loader on the labelled source, Adam with a
warm-up / multi-step learning rate that is a pure function of the epoch, CE with label smoothing +
soft-margin triplet, target batches forwarded to adapt the BatchNorm statistics, evaluation on the source
test split and, at the end, on the target test split (the "direct transfer" row of the paper's Table II).
The numbers reported are the LAST epoch's; the checkpoint with the best source mAP is kept as
``model_best.pt`` (the reference's choice), labelled.

Epoch numbers in metrics.jsonl and checkpoints count epochs *completed* (1..E).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from dualref import checkpoint, distributed, io, runs, seeding, steps, training
from dualref.config import PretrainConfig
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits, relabel_pids
from dualref.pipelines import common

RESULTS_FILE = "results.json"
BEST_FILE = "model_best.pt"

log = logging.getLogger(__name__)


def pretrain_on_source(cfg: PretrainConfig, *, resume: str | Path | None = None) -> Path:
    """Train on the labelled source, evaluate on its test split, then direct transfer to the target.

    Args:
        cfg: the resolved config.
        resume: an earlier run folder to continue (its checkpoint.pt: model, optimizer, epoch, RNG
            states). On CPU the continued run is bit-identical to an uninterrupted one.

    Returns:
        The run folder (config.yaml, run.log, metrics.jsonl, checkpoint.pt, model_best.pt, results.json).
    """
    _check_pretrain_loss(cfg)
    started = time.perf_counter()
    data = cfg.data
    run_dir = common.run_folder(cfg.run, resume)
    # Everything that can be checked is checked before the run folder is written, so that a retry into
    # the same folder starts afresh and a resumed run's config.yaml never takes a bad value.
    device, amp_dtype, channels_last = common.start_process(cfg.run)
    ranks, device = distributed.init_from_env(device)  # torchrun: this rank's device (docs/distributed.md)
    if resume is not None:
        common.check_resume(run_dir, "pretrain", cfg.model.arch, ranks)
    source, target = _parse_data(cfg)
    common.check_numerics(cfg.model, (data.height, data.width), device, amp_dtype, channels_last)
    distributed.batch_rows(data.batch_size, ranks)  # refuses a batch the ranks cannot share
    with common.open_run(run_dir, cfg, resume, ranks) as run:
        source = common.without_unreadable(source, skip_unreadable=data.skip_unreadable)
        if target is not None:
            target = common.without_unreadable(target, skip_unreadable=data.skip_unreadable)
        _require_data(cfg, source, target)  # again: dropping unreadable images may empty a split
        common.log_compute(device, amp_dtype, channels_last, ranks.world_size)
        labels = relabel_pids(source.train)
        log.info("source %s: %d images of %d identities", source.name, len(labels), max(labels) + 1)
        model = common.build_model(
            cfg.model,
            max(labels) + 1,
            pretrained=cfg.model.pretrained,
            device=device,
            channels_last=channels_last,
        )
        optimizer = training.build_adam(
            model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        source_loader = common.train_loader(
            [s.path for s in source.train],
            labels,
            [s.camid for s in source.train],
            data,
            iterations=cfg.optim.iters_per_epoch,
            seed=cfg.run.seed,
            device=device,
            cache=data.cache_images,
            ranks=ranks,
        )
        target_loader = None
        if cfg.forward_target_batches and target is not None:
            # Target pids are never read here: only the images, for the BatchNorm statistics.
            target_loader = common.image_loader(
                [s.path for s in target.train],
                data,
                iterations=cfg.optim.iters_per_epoch,
                seed=cfg.run.seed + 1,
                device=device,
                ranks=ranks,
            )
        start_epoch, best_map = 0, -1.0
        if run.resumed and run.checkpoint_path.is_file():
            start_epoch, best_map = _restore(run.checkpoint_path, model, optimizer)
        if run.resumed:
            run.discard_records_after(start_epoch)
        if start_epoch >= cfg.optim.epochs > 0:
            finished = run.path / RESULTS_FILE
            log.info("the run had finished all %d epochs: its result is in %s", start_epoch, finished)
        source_test = common.evaluator(source, data, cfg.run, device) if ranks.is_main else None
        source_record: dict[str, Any] | None = None
        train_model = distributed.wrap(model, ranks, device)  # DDP when under torchrun
        for epoch in range(start_epoch, cfg.optim.epochs):
            lr = common.epoch_lr(cfg.optim, epoch)
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
            with common.naming_checkpoint(run.checkpoint_path):
                stats = steps.train_source_epoch(
                    train_model,
                    source_loader,
                    optimizer,
                    device=device,
                    label_smoothing=cfg.loss.label_smoothing,
                    triplet_margin=cfg.loss.triplet_margin,
                    target_loader_iter=target_iter,
                    amp_dtype=amp_dtype,
                    channels_last=channels_last,
                    progress=cfg.run.progress,
                    epoch=epoch,
                    ranks=ranks,
                )
            done = epoch + 1
            if not ranks.is_main:  # rank 0 logs, evaluates and saves
                continue
            run.log_metrics(done, {"lr": lr, **stats.as_metrics()}, kind="train")
            log.info(
                "epoch %d/%d lr %.2e | ce %.3f | triplet %.3f | acc %.3f | %.1f img/s | %.0f s",
                done,
                cfg.optim.epochs,
                lr,
                stats.means["ce"],
                stats.means["triplet"],
                stats.means["accuracy"],
                stats.images_per_second,
                stats.seconds,
            )
            is_best = False
            if common.evaluation_due(cfg.run, done, cfg.optim.epochs):
                source_record = _evaluate_logged(run, source_test, model, done, "eval_source")
                is_best = source_record["mAP"] > best_map
                best_map = max(best_map, source_record["mAP"])
            state = _state(cfg, model, optimizer, done, best_map, source.name)
            if is_best:  # first: a kill before checkpoint.pt reruns this epoch, which writes it again
                selected = f"best source test mAP ({source.name}), epoch {done}"
                checkpoint.save_checkpoint(run.path / BEST_FILE, {**state, "selected_by": selected})
            checkpoint.save_checkpoint(run.checkpoint_path, state)

        done = max(start_epoch, cfg.optim.epochs)
        if not ranks.is_main:
            return run.path
        if not run.checkpoint_path.is_file():  # 0 epochs: keep the initial model for `evaluate`
            checkpoint.save_checkpoint(
                run.checkpoint_path, _state(cfg, model, optimizer, 0, best_map, source.name)
            )
        if source_record is None:  # 0 epochs, or a run resumed after its last epoch
            source_record = _logged_or_evaluated(run, source_test, model, done, "eval_source")
        results: dict[str, Any] = {
            "kind": "pretrain",
            "reported": "last epoch (model_best.pt = best source mAP, for reference only)",
            "epochs": done,
            "source": source_record,
        }
        if cfg.evaluate_target and target is not None:
            target_test = common.evaluator(target, data, cfg.run, device)
            transfer = _logged_or_evaluated(run, target_test, model, done, "direct_transfer")
            results["direct_transfer"] = transfer
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        io.write_json(run.path / RESULTS_FILE, results)
        log.info("results written to %s", run.path / RESULTS_FILE)
        return run.path


def _parse_data(cfg: PretrainConfig) -> tuple[ReidSplits, ReidSplits | None]:
    """The source (and target) splits, parsed and checked for what the run needs (no image opened)."""
    data = cfg.data
    if data.source == "unlabelled":
        raise ValueError(
            "data.source='unlabelled' has no identities to train on; expected a labelled data set "
            f"({', '.join(n for n in datasets.DATASET_NAMES if n != 'unlabelled')})"
        )
    source = datasets.load_dataset(data.source, data.source_root)
    target = None
    if cfg.forward_target_batches or cfg.evaluate_target:
        target = datasets.load_dataset(data.target, data.target_root)
    _require_data(cfg, source, target)
    return source, target


def _require_data(cfg: PretrainConfig, source: ReidSplits, target: ReidSplits | None) -> None:
    evaluation = "the source evaluation"
    needed = {"train": "source training", "query": evaluation, "gallery": evaluation}
    common.require_splits(source, "source", "data.source_root", needed)
    if target is None:
        return
    target_needs: dict[str, str] = {}
    if cfg.forward_target_batches:
        target_needs["train"] = "forward_target_batches (BatchNorm statistics; false turns it off)"
    if cfg.evaluate_target:
        transfer = "the direct-transfer evaluation (evaluate_target; false turns it off)"
        target_needs |= {"query": transfer, "gallery": transfer}
    common.require_splits(target, "target", "data.target_root", target_needs)


def _logged_or_evaluated(run: runs.AnyRun, test: Any, model: Any, epoch: int, kind: str) -> dict[str, Any]:
    """The `kind` record of `epoch` that a killed process already logged, else a new evaluation."""
    for record in runs.read_records(run.path, kind):
        if record["epoch"] == epoch:
            return {k: v for k, v in record.items() if k not in ("epoch", "kind", "time")}
    return _evaluate_logged(run, test, model, epoch, kind)


def _evaluate_logged(run: runs.AnyRun, test: Any, model: Any, epoch: int, kind: str) -> dict[str, Any]:
    record = common.evaluate(test, model)
    run.log_metrics(epoch, record, kind=kind)
    log.info(
        "%s on %s after epoch %d: mAP %.1f%% R1 %.1f%% mINP %.1f%%",
        kind,
        record["dataset"],
        epoch,
        100 * record["mAP"],
        100 * record["rank1"],
        100 * record["mINP"],
    )
    return record


def _state(
    cfg: PretrainConfig, model: Any, optimizer: Any, epoch: int, best_map: float, name: str
) -> dict[str, Any]:
    return common.checkpoint_state(
        "pretrain",
        cfg,
        model,
        epoch=epoch,
        rng=seeding.rng_state(),
        optimizer=optimizer.state_dict(),
        best_source_mAP=best_map,
        source_dataset=name,
    )


def _restore(path: Path, model: Any, optimizer: Any) -> tuple[int, float]:
    """Load model, optimizer and RNG states; returns (epochs completed, best source mAP so far)."""
    state = checkpoint.load_checkpoint(path)
    if state.get("kind") != "pretrain":
        raise ValueError(f"{path} is a {state.get('kind')!r} checkpoint; expected a pretraining checkpoint")
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
