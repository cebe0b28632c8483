"""Set-up shared by the pipelines: config -> data sets, model, loaders, evaluator, checkpoint state.

Config objects stop here: everything these helpers build takes plain values or frozen sub-configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dualref import checkpoint, distributed, inference, runs, seeding, training
from dualref.config import DataConfig, EvalConfig, ModelConfig, OptimConfig, RunConfig, config_to_dict
from dualref.data import datasets, loaders
from dualref.data.records import ReidSplits
from dualref.models.reid_net import ReidNet

log = logging.getLogger("dualref")


def start_process(run: RunConfig) -> tuple[torch.device, torch.dtype | None, bool]:
    """Seed every RNG, set the torch threads; the run's device, AMP dtype and channels-last choice.

    Every stage that runs the network (training, extraction for clustering, evaluation) computes this
    way; the pipelines log it once the run folder is open (`log_compute`).
    """
    seeding.seed_everything(run.seed)
    training.set_threads(run.threads)
    # Subnormal floats (activations and gradients a few epochs into training) run many times slower on
    # x86 CPUs: measured 2.5x on a MobileNetV2 pre-training step at epoch 20 (benchmarks/results/
    # throughput.md). Flushing them to zero changes values below 1.2e-38 only.
    torch.set_flush_denormal(True)
    device = training.resolve_device(run.device)
    amp_dtype = training.resolve_amp(run.amp, device)
    return device, amp_dtype, training.resolve_channels_last(run.channels_last, device)


def log_compute(
    device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, processes: int
) -> None:
    """The run log's line on where and how the network computes, in every stage."""
    numerics = training.numerics_name(amp_dtype, channels_last)
    log.info("device %s, %d process(es); training, extraction, evaluation: %s", device, processes, numerics)


def run_folder(run: RunConfig, resume: str | Path | None) -> Path:
    """The folder of a fresh run (`run.run_dir`) or of the run being resumed."""
    return Path(resume) if resume is not None else Path(run.run_dir)


def load_splits(name: str, root: str, *, skip_unreadable: bool) -> ReidSplits:
    """A data set's splits; unreadable images dropped (and logged) when asked to."""
    return without_unreadable(datasets.load_dataset(name, root), skip_unreadable=skip_unreadable)


def require_splits(splits: ReidSplits, role: str, root_key: str, needed: dict[str, str]) -> None:
    """Refuse empty splits before anything is trained or written, naming the split and who needs it.

    Args:
        splits: the parsed data set.
        role: "source" or "target", for the message.
        root_key: the config key of its folder (e.g. "data.source_root").
        needed: split name ("train", "query", "gallery") -> what needs it (e.g. "the source evaluation").
    """
    for split, purpose in needed.items():
        if not getattr(splits, split):
            raise ValueError(
                f"the {split} split of the {role} data set {splits.name!r} ({root_key}) is empty; "
                f"{purpose} needs it: check the folder with `dualref data check`"
            )


def check_model_checkpoint(state: dict[str, Any], path: Path, kinds: Sequence[str], arch: str) -> None:
    """Refuse a checkpoint of another command (`kinds`: those accepted) or another trunk than `arch`."""
    if state.get("kind") not in kinds:
        expected = " or ".join(f"`dualref {kind}`" for kind in kinds)
        raise ValueError(
            f"{path} is a {state.get('kind')!r} checkpoint; expected one written by {expected}"
        )
    if state.get("arch", arch) != arch:
        raise ValueError(
            f"{path} holds arch {state['arch']!r} but model.arch={arch!r}; set model.arch={state['arch']}"
        )


def check_resume(
    run_dir: Path, kind: str, arch: str, ranks: distributed.Ranks = distributed.SINGLE
) -> dict[str, Any] | None:
    """The checkpoint to resume `run_dir` from (None: the run stopped before its first one), checked:
    refuses one of another command or trunk, or one written with another number of processes (the run
    would not continue exactly).

    Called before the run folder is opened, so that a wrong `--resume` writes nothing into it; the
    pipelines restore from the state returned (read and checked once).
    """
    path = run_dir / runs.CHECKPOINT_FILE
    if not path.is_file():
        return None
    state = checkpoint.load_checkpoint(path)
    if state.get("kind") != kind:
        raise ValueError(
            f"{path} is a {state.get('kind')!r} checkpoint, not a {kind!r} one: {run_dir} is a "
            f"`dualref {state.get('kind')}` run; resume it with that command"
        )
    check_model_checkpoint(state, path, (kind,), arch)
    written = int(state.get("world_size", 1))
    if written != ranks.world_size:
        how = "without torchrun" if written == 1 else f"with torchrun --nproc_per_node={written} (in all)"
        raise ValueError(
            f"{path} was written by {written} process(es) but this run has {ranks.world_size}; resume it "
            f"{how}: BatchNorm's shards and the sums' order depend on the number of processes, so "
            "another number would not continue the run exactly"
        )
    return state


def open_run(run_dir: Path, cfg: Any, resume: str | Path | None, ranks: distributed.Ranks) -> runs.AnyRun:
    """Rank 0's run folder (`runs.open_run`); the other ranks' read-only view of it."""
    if ranks.is_main:
        return runs.open_run(run_dir, cfg, resume=resume is not None)
    return runs.FollowerRun(run_dir, resumed=resume is not None, rank=ranks.rank)


def without_unreadable(splits: ReidSplits, *, skip_unreadable: bool) -> ReidSplits:
    """The splits without the images that do not decode (each logged), when asked to."""
    if not skip_unreadable:
        return splits
    return dataclasses.replace(
        splits,
        train=loaders.drop_unreadable(splits.train, log),
        query=loaders.drop_unreadable(splits.query, log),
        gallery=loaders.drop_unreadable(splits.gallery, log),
    )


def build_model(
    model_cfg: ModelConfig,
    num_classes: int,
    *,
    pretrained: str | None,
    device: torch.device,
    channels_last: bool,
) -> ReidNet:
    """The re-ID network of `model.*` on `device` (channels-last when asked)."""
    model = ReidNet(
        model_cfg.arch,
        num_classes,
        pretrained=pretrained,
        last_stride=model_cfg.last_stride,
        stem_relu=model_cfg.stem_relu,
        neck_relu=model_cfg.neck_relu,
        bn_groups=model_cfg.bn_groups,
    )
    return training.place_model(model, device, channels_last)


def check_numerics(
    model_cfg: ModelConfig,
    size: tuple[int, int],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> None:
    """`training.check_autocast` on a randomly initialised network of the run's architecture, before the
    run folder is written (the fault it catches depends on the shapes, not on the weights)."""
    if amp_dtype is None:
        return
    with torch.random.fork_rng(devices=[]):  # the probe's initialisation must not move the run's stream
        probe = build_model(model_cfg, 1, pretrained=None, device=device, channels_last=channels_last)
    training.check_autocast(probe, amp_dtype, device, size)


def test_loader(
    paths: Sequence[Path],
    data: DataConfig,
    device: torch.device,
    *,
    cache: bool | None = None,
    pixels: torch.Tensor | None = None,
) -> Any:
    """Eval-transform loader over `paths`, in order (extraction); `cache` overrides data.cache_images,
    `pixels` shares images already decoded (`loaders.ImageDataset`)."""
    return loaders.test_loader(
        paths,
        height=data.height,
        width=data.width,
        batch_size=data.test_batch_size,
        num_workers=data.num_workers,
        cache=data.cache_images if cache is None else cache,
        pin_memory=device.type == "cuda",
        pixels=pixels,
    )


def train_loader(
    paths: Sequence[Path],
    labels: Sequence[int],
    camids: Sequence[int],
    data: DataConfig,
    *,
    iterations: int,
    seed: int,
    device: torch.device,
    cache: bool,
    ranks: distributed.Ranks = distributed.SINGLE,
    pixels: torch.Tensor | None = None,
) -> Any:
    """P x K training batches over `labels` (-1 never sampled), `iterations` per epoch.

    Under torchrun every rank samples the same global batches and loads its own rows of each. `pixels`:
    images already decoded, shared instead of `cache` (`loaders.ImageDataset`).
    """
    return loaders.train_loader(
        paths,
        labels,
        camids,
        height=data.height,
        width=data.width,
        batch_size=data.batch_size,
        num_instances=data.num_instances,
        num_iterations=iterations,
        seed=seed,
        random_erasing_prob=data.random_erasing_prob,
        num_workers=data.num_workers,
        cache=cache,
        pin_memory=device.type == "cuda",
        rows=distributed.batch_rows(data.batch_size, ranks),
        pixels=pixels,
    )


def image_loader(
    paths: Sequence[Path],
    data: DataConfig,
    *,
    iterations: int,
    seed: int,
    device: torch.device,
    ranks: distributed.Ranks = distributed.SINGLE,
) -> Any:
    """Random unlabelled batches of `paths` (images only), `iterations` per epoch.

    Under torchrun every rank draws the same global batches and loads its own rows of each, as
    `train_loader`.
    """
    return loaders.random_loader(
        paths,
        height=data.height,
        width=data.width,
        batch_size=data.batch_size,
        num_iterations=iterations,
        seed=seed,
        num_workers=data.num_workers,
        cache=data.cache_images,
        pin_memory=device.type == "cuda",
        rows=distributed.batch_rows(data.batch_size, ranks),
    )


def evaluator(
    splits: ReidSplits,
    data: DataConfig,
    run: RunConfig,
    device: torch.device,
    options: EvalConfig = EvalConfig(),
) -> inference.Evaluator:
    """The query/gallery evaluation of `splits` at the run's input size (`options`: flip, re-ranking)."""
    return inference.Evaluator(
        splits,
        height=data.height,
        width=data.width,
        device=device,
        batch_size=data.test_batch_size,
        num_workers=data.num_workers,
        cache=data.cache_images,
        amp_dtype=training.resolve_amp(run.amp, device),
        options=options,
        progress=run.progress,
    )


def evaluate(evaluator: inference.Evaluator, model: nn.Module) -> dict[str, Any]:
    """An evaluation record that leaves every RNG as it found it.

    Evaluation draws no random numbers today; restoring the RNGs guarantees that the evaluation
    cadence (run.eval_every) can never change the training that follows.
    """
    rng = seeding.rng_state()
    record = evaluator.record(model)
    seeding.set_rng_state(rng)
    return record


def logged_evaluation(
    run: runs.AnyRun, evaluator: inference.Evaluator, model: nn.Module, *, epoch: int, kind: str
) -> dict[str, Any]:
    """The `kind` evaluation of `epoch`: the record already in metrics.jsonl, else a new one, logged.

    Checkpoints are written before their evaluation, so a run killed during an evaluation resumes after
    that epoch with the evaluation missing; reading the record first makes the resumed run evaluate it
    exactly once. Both pipelines evaluate only through here.
    """
    for record in runs.read_records(run.path, kind):
        if record["epoch"] == epoch:
            return {k: v for k, v in record.items() if k not in ("epoch", "kind", "time")}
    record = evaluate(evaluator, model)
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


def evaluation_due(run: RunConfig, epochs_done: int, total_epochs: int) -> bool:
    """Every `run.eval_every` epochs, and always after the last one (0 = only after the last)."""
    every = run.eval_every
    return epochs_done == total_epochs or (every > 0 and epochs_done % every == 0)


def epoch_lr(optim: OptimConfig, epoch: int) -> float:
    """The learning rate of a 0-based epoch under `optim.*`."""
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


def save_run_checkpoint(path: Path, kind: str, cfg: Any, model: ReidNet, *, epoch: int, **extra: Any) -> None:
    """Write a run's checkpoint (atomic): what exact resume needs (with the RNG states as they are now)
    and what inference needs to rebuild the model; `extra` adds the pipeline's own state."""
    state = {
        "kind": kind,
        "model": model.state_dict(),
        "epoch": epoch,
        "rng": seeding.rng_state(),
        "config": config_to_dict(cfg),
        "world_size": distributed.env_ranks().world_size,
        **inference.model_metadata(model, height=cfg.data.height, width=cfg.data.width),
        **extra,
    }
    checkpoint.save_checkpoint(path, state)


@contextlib.contextmanager
def naming_checkpoint(path: Path) -> Iterator[None]:
    """A non-finite loss error names the last good checkpoint, when there is one."""
    try:
        yield
    except training.NonFiniteLossError as err:
        if path.is_file():
            raise err.with_checkpoint(path) from None
        raise
