"""Training helpers shared by the pipelines: the LR schedule, Adam, the finite-loss guard, one source epoch.

The learning rate is a pure function of the epoch (`lr_at_epoch`) applied with `set_lr` before each
epoch; there is no scheduler object to save or restore. `train_source_epoch` is the supervised step of
REFERENCE_BEHAVIOUR.md section 2: label-smoothed cross-entropy plus the soft-margin batch-hard triplet
on the pre-BN pooled feature, both with weight 1.
"""

from __future__ import annotations

import bisect
import contextlib
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dualref import losses

SCHEDULES = ("warmup_multistep", "step", "constant")
# run.amp -> autocast dtype (None: float32).
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def lr_at_epoch(
    epoch: int,
    *,
    base_lr: float,
    schedule: str,
    warmup_epochs: int = 10,
    warmup_factor: float = 0.01,
    milestones: Sequence[int] = (40, 70),
    lr_decay_epochs: int = 20,
    gamma: float = 0.1,
    reference_warmup_offset: bool = True,
) -> float:
    """Learning rate of a 0-based epoch.

    - ``"warmup_multistep"`` (source training): the reference's WarmupMultiStepLR with a linear warm-up.
      At scheduler position t the factor is ``warmup_factor * (1 - t / warmup_epochs) + t / warmup_epochs``
      while ``t < warmup_epochs`` (else 1), times ``gamma ** (number of milestones <= t)``. The reference
      calls ``scheduler.step()`` at the *start* of every epoch, so 0-based epoch e trains at t = e + 1
      (`reference_warmup_offset=True`): epoch 0 runs at 0.109 x base_lr, epoch 9 reaches base_lr, and
      with milestones (40, 70) the decays apply from epochs 39 and 69. With the offset off, t = e.
    - ``"step"`` (target training): ``base_lr * gamma ** (epoch // lr_decay_epochs)``.
    - ``"constant"``: ``base_lr``.

    Args:
        epoch: 0-based epoch (>= 0).
        base_lr: the nominal learning rate (reference: 3.5e-4).
        schedule: one of `SCHEDULES`.
        warmup_epochs: warm-up length in epochs (reference: 10); 0 disables the warm-up.
        warmup_factor: factor at t = 0 (reference: 0.01).
        milestones: increasing scheduler positions where the rate is multiplied by `gamma`.
        lr_decay_epochs: period of the step decay.
        gamma: decay factor (reference: 0.1).
        reference_warmup_offset: reproduce the reference's stepping before the first epoch.

    Returns:
        The learning rate for that epoch.
    """
    if epoch < 0:
        raise ValueError(f"epoch={epoch!r}; expected a 0-based epoch >= 0")
    if schedule == "constant":
        return base_lr
    if schedule == "step":
        if lr_decay_epochs < 1:
            raise ValueError(f"lr_decay_epochs={lr_decay_epochs!r}; expected >= 1")
        return base_lr * gamma ** (epoch // lr_decay_epochs)
    if schedule == "warmup_multistep":
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones={list(milestones)!r}; expected increasing epochs")
        position = epoch + 1 if reference_warmup_offset else epoch
        factor = 1.0
        if position < warmup_epochs:
            alpha = position / warmup_epochs
            factor = warmup_factor * (1.0 - alpha) + alpha
        return base_lr * factor * gamma ** bisect.bisect_right(list(milestones), position)
    raise ValueError(f"schedule={schedule!r} is not valid; expected one of {list(SCHEDULES)}")


def resolve_device(spec: str, *, key: str = "run.device") -> torch.device:
    """The torch device named by config `key`, or a ValueError saying why it cannot be used here."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{key}={spec!r} is not a device; expected cpu, cuda or cuda:N") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={spec!r} but this machine has no usable CUDA device; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            visible = torch.cuda.device_count()
            raise ValueError(f"{key}={spec!r} but only {visible} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"{key}={spec!r}; expected cpu, cuda or cuda:N")
    return device


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_adam(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float, weight_decay: float
) -> torch.optim.Adam:
    """Adam (betas 0.9/0.999, eps 1e-8) over the trainable parameters, as the reference builds it.

    The reference gives every parameter its own group with the same lr and weight decay; one group is
    equivalent for Adam (its state is per parameter). Parameters with ``requires_grad=False`` (the
    frozen BN-neck bias) are left out.

    Args:
        params: parameters, or parameter groups (dicts with a "params" entry and optional overrides).
        lr: learning rate of every group without its own.
        weight_decay: L2 weight decay of every group without its own.

    Returns:
        The optimizer.
    """
    items = list(params)
    is_group = [isinstance(item, dict) for item in items]
    if any(is_group) and not all(is_group):
        raise ValueError("params mixes parameters and parameter groups; pass one kind")
    groups: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, dict):
            trainable = [p for p in item["params"] if p.requires_grad]
            if trainable:
                groups.append({**item, "params": trainable})
    if not any(is_group):
        trainable = [p for p in items if isinstance(p, Tensor) and p.requires_grad]
        if trainable:
            groups.append({"params": trainable})
    if not groups:
        raise ValueError("no trainable parameter (all have requires_grad=False); nothing to optimise")
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss became NaN or infinite; raised before the optimizer step, so the weights are untouched.

    A ValueError too, so the command line reports it in one line.

    Attributes:
        value: the non-finite loss value.
        epoch, iteration: where it happened (0-based).
        checkpoint_path: the last good checkpoint, once the pipeline knows it.
    """

    def __init__(
        self, value: float, *, epoch: int, iteration: int, checkpoint_path: Path | None = None
    ) -> None:
        self.value = value
        self.epoch = epoch
        self.iteration = iteration
        self.checkpoint_path = checkpoint_path
        kept = (
            f"the last good checkpoint is kept at {checkpoint_path}"
            if checkpoint_path is not None
            else "the weights were not updated with it"
        )
        super().__init__(
            f"loss became {value} at epoch {epoch} iteration {iteration}; {kept} "
            "(try a lower optim.lr, or run.amp=none)"
        )

    def with_checkpoint(self, checkpoint_path: Path) -> NonFiniteLossError:
        """The same error, naming the last good checkpoint."""
        return NonFiniteLossError(
            self.value, epoch=self.epoch, iteration=self.iteration, checkpoint_path=checkpoint_path
        )


def check_finite(loss: Tensor, *, epoch: int, iteration: int) -> None:
    """Raise `NonFiniteLossError` when the scalar `loss` is NaN or infinite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(float(loss.detach().float().sum()), epoch=epoch, iteration=iteration)


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch did.

    Attributes:
        means: per-term means over the epoch's iterations (e.g. "ce", "triplet", "total",
            "accuracy" = training-batch top-1 of the classifier).
        iterations: optimizer steps taken.
        seconds: wall time of the epoch, data loading included.
        images_per_second: trained (source) images per second.
    """

    means: Mapping[str, float] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0

    def as_metrics(self) -> dict[str, float | int]:
        """Flat dict for `Run.log_metrics`: the means plus iterations, seconds and images_per_second."""
        return {
            **self.means,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `amp_dtype` on CUDA; elsewhere (or with None) a no-op: the run stays in float32."""
    if amp_dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


def images_to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch of images on `device`, in channels-last layout when asked for and on CUDA."""
    images = images.to(device, non_blocking=True)
    if channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_source_epoch(
    model: nn.Module,
    loader: Iterable[Sequence[Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    label_smoothing: float,
    triplet_margin: float | None,
    target_loader_iter: Iterator[Sequence[Tensor]] | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    epoch: int = 0,
) -> EpochStats:
    """One epoch of supervised source training (REFERENCE_BEHAVIOUR.md section 2).

    Per batch: ``ce = CE_ls(logits, labels)`` with label smoothing, ``triplet`` = batch-hard triplet on
    the pre-BN pooled feature (soft margin when `triplet_margin` is None), ``total = ce + triplet``;
    a non-finite total raises before the optimizer step. When `target_loader_iter` is given, one target
    batch is then pushed through the model in train mode without gradient: its outputs are discarded and
    only the BatchNorm running statistics move towards the target domain (the reference's undocumented
    quirk; it forwards the target batch between the source forward and the step, we do it right after
    the step, which differs only by one step's weight change).

    Args:
        model: a `ReidNet` (train mode is set here) returning `ReidOutput(pooled, bn, logits)`.
        loader: yields ``(images [B, 3, H, W], labels [B], camids [B], indices [B])``; its length is
            the number of iterations.
        optimizer: built by `build_adam`, learning rate already set for this epoch.
        device: where the model lives.
        label_smoothing: epsilon of the cross-entropy (reference: 0.1).
        triplet_margin: None = soft margin (reference), else the hinge margin.
        target_loader_iter: yields target batches of the same form (labels ignored), at least one per
            source batch; None disables the BatchNorm adaptation.
        amp_dtype: torch.bfloat16 / torch.float16 for autocast on CUDA; ignored on CPU.
        channels_last: channels-last inputs on CUDA (convert the model with ``model.to(memory_format=
            torch.channels_last)`` beforehand); ignored on CPU.
        progress: show a progress bar with ETA.
        epoch: 0-based epoch, for the progress bar and error messages.

    Returns:
        The epoch's `EpochStats` (means of "ce", "triplet", "total", "accuracy").

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (weights not updated with it).
    """
    model.train()
    use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
    # A fresh loss scaler per epoch: checkpoints are taken between epochs, so resume stays exact without
    # saving its state; the cost is a few skipped steps while the scale settles at each epoch start.
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    sums = {"ce": 0.0, "triplet": 0.0, "total": 0.0, "accuracy": 0.0}
    num_images = 0
    iteration = 0
    total_iterations = len(loader) if isinstance(loader, Sized) else None
    start = time.perf_counter()
    bar = tqdm(
        loader,
        total=total_iterations,
        desc=f"epoch {epoch}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        # In a log file (nohup) a bar line every 30 s is enough; on a terminal refresh normally.
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    for iteration, batch in enumerate(bar):
        images = images_to_device(batch[0], device, channels_last)
        labels = batch[1].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            out = model(images)
        ce = losses.cross_entropy_with_label_smoothing(out.logits, labels, epsilon=label_smoothing)
        triplet = losses.batch_hard_triplet_loss(out.pooled, labels, margin=triplet_margin)
        total = ce + triplet
        check_finite(total, epoch=epoch, iteration=iteration)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total.backward()
            optimizer.step()
        if target_loader_iter is not None:
            target_images = images_to_device(next(target_loader_iter)[0], device, channels_last)
            with torch.no_grad(), autocast(device, amp_dtype):
                model(target_images)
        accuracy = (out.logits.detach().argmax(1) == labels).float().mean()
        for name, value in (("ce", ce), ("triplet", triplet), ("total", total), ("accuracy", accuracy)):
            sums[name] += float(value.detach())
        num_images += int(labels.shape[0])
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{sums['total'] / (iteration + 1):.3f}")
    bar.close()
    iterations = iteration + 1 if num_images else 0
    seconds = time.perf_counter() - start
    return EpochStats(
        means={name: value / max(iterations, 1) for name, value in sums.items()},
        iterations=iterations,
        seconds=seconds,
        images_per_second=num_images / seconds if seconds > 0 else 0.0,
    )
