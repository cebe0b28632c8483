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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualref import distributed, io, seeding, steps, training
from dualref.config import PretrainConfig
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits, relabel_pids
from dualref.models.reid_net import ReidNet
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
    saved = common.check_resume(run_dir, "pretrain", cfg.model.arch, ranks) if resume is not None else None
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
        state = SourceState(model, optimizer)
        if saved is not None:
            state.restore(saved)
            log.info("resumed from %s after epoch %d", run.checkpoint_path, state.epoch)
        if run.resumed:
            run.discard_records_after(state.epoch)
        if state.epoch >= cfg.optim.epochs > 0:
            finished = run.path / RESULTS_FILE
            log.info("the run had finished all %d epochs: its result is in %s", state.epoch, finished)
        source_test = common.evaluator(source, data, cfg.run, device) if ranks.is_main else None
        train_model = distributed.wrap(model, ranks, device)  # DDP when under torchrun
        for epoch in range(state.epoch, cfg.optim.epochs):
            lr = common.epoch_lr(cfg.optim, epoch)
            if cfg.optim.reset_each_epoch and epoch > 0:  # a fresh Adam, as the adaptation loop
                state.optimizer = training.build_adam(
                    model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay
                )
            training.set_lr(state.optimizer, lr)
            loaders.set_epoch(source_loader, epoch)
            target_iter = None
            if target_loader is not None:
                loaders.set_epoch(target_loader, epoch)
                target_iter = iter(target_loader)
            with common.naming_checkpoint(run.checkpoint_path):
                stats = steps.train_source_epoch(
                    train_model,
                    source_loader,
                    state.optimizer,
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
            state.epoch = epoch + 1
            if not ranks.is_main:  # rank 0 logs, evaluates and saves
                continue
            run.log_metrics(state.epoch, {"lr": lr, **stats.as_metrics()}, kind="train")
            log.info(
                "epoch %d/%d lr %.2e | ce %.3f | triplet %.3f | acc %.3f | %.1f img/s | %.0f s",
                state.epoch,
                cfg.optim.epochs,
                lr,
                stats.means["ce"],
                stats.means["triplet"],
                stats.means["accuracy"],
                stats.images_per_second,
                stats.seconds,
            )
            is_best = False
            if common.evaluation_due(cfg.run, state.epoch, cfg.optim.epochs):
                assert source_test is not None
                record = common.logged_evaluation(
                    run, source_test, model, epoch=state.epoch, kind="eval_source"
                )
                is_best = record["mAP"] > state.best_map
                state.best_map = max(state.best_map, record["mAP"])
            if is_best:  # first: a kill before checkpoint.pt reruns this epoch, which writes it again
                selected = f"best source test mAP ({source.name}), epoch {state.epoch}"
                state.save(run.path / BEST_FILE, cfg, source.name, selected_by=selected)
            state.save(run.checkpoint_path, cfg, source.name)

        if not ranks.is_main:
            return run.path
        assert source_test is not None
        if not run.checkpoint_path.is_file():  # 0 epochs: keep the initial model for `evaluate`
            state.save(run.checkpoint_path, cfg, source.name)
        # The last epoch's evaluations: logged by the loop, or by a process killed after its checkpoint.
        done = state.epoch
        results: dict[str, Any] = {
            "kind": "pretrain",
            "reported": "last epoch (model_best.pt = best source mAP, for reference only)",
            "epochs": done,
            "source": common.logged_evaluation(run, source_test, model, epoch=done, kind="eval_source"),
        }
        if cfg.evaluate_target and target is not None:
            target_test = common.evaluator(target, data, cfg.run, device)
            results["direct_transfer"] = common.logged_evaluation(
                run, target_test, model, epoch=done, kind="direct_transfer"
            )
        results["wall_seconds"] = round(time.perf_counter() - started, 1)
        io.write_json(run.path / RESULTS_FILE, results)
        log.info("results written to %s", run.path / RESULTS_FILE)
        return run.path


@dataclass
class SourceState:
    """What one pre-training epoch hands the next; checkpoint.pt holds it, so a resumed run continues
    exactly (with the RNG states, taken when saving)."""

    model: ReidNet
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed
    best_map: float = -1.0  # the best source test mAP so far (model_best.pt)

    def save(self, path: Path, cfg: PretrainConfig, source_name: str, **extra: Any) -> None:
        common.save_run_checkpoint(
            path,
            "pretrain",
            cfg,
            self.model,
            epoch=self.epoch,
            optimizer=self.optimizer.state_dict(),
            best_source_mAP=self.best_map,
            source_dataset=source_name,
            **extra,
        )

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from a checkpoint that `common.check_resume` read and checked."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        seeding.set_rng_state(saved["rng"])
        self.epoch, self.best_map = int(saved["epoch"]), float(saved["best_source_mAP"])


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
