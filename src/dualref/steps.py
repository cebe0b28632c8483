"""One training epoch: the skeleton every pipeline shares, and the source and target steps.

`run_epoch` owns what every epoch does the same way: train mode, the progress bar (throttled in log
files), the fp16 loss scaler, the finite-loss guard before the update, zero-grad / backward / step, the
running means and the timing. A step function only computes the loss of one batch (`StepResult`) and,
where its method needs it, what happens between backward and the update (`after_backward`) or after the
update (`after_step`).

- `train_source_epoch`: supervised source training (docs/method.md §2): label-smoothed CE plus the
  soft-margin batch-hard triplet on the pre-BN pooled feature, both with weight 1, and one target batch
  forwarded per step for the BatchNorm statistics.
- `train_target_epoch`: one on-line epoch of Dual-Refinement (docs/method.md §4-5): CE and triplet under
  the coarse and the refined labels, the memory loss, the joint objective, the instant bank's gradient
  scale, a traditional memory's momentum update; and, every `diagnostics_every` iterations, each loss
  term's share of the gradient at the trunk's output.

Size: over 400 lines, mostly docstrings: the skeleton and the two steps it runs belong together.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dualref import diagnostics, distributed, losses, training
from dualref.config import LossConfig
from dualref.losses import memory_losses, objective
from dualref.losses.objective import LossTerms, LossWeights
from dualref.memory_bank import InstantMemoryBank, MemoryBank, MomentumMemoryBank, minibatch_bank
from dualref.models.reid_net import ReidOutput

Batch = Sequence[Tensor]  # (images [B, 3, H, W], labels [B], camids [B], dataset indices [B])


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch did.

    Attributes:
        means: per-term means over the epoch's iterations (e.g. "ce", "triplet", "total",
            "accuracy" = training-batch top-1 of the classifier), plus sampled diagnostics.
        iterations: optimizer steps taken.
        seconds: wall time of the epoch, data loading included.
        images_per_second: trained images per second.
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


class StepResult(NamedTuple):
    """The loss of one batch, what to average over the epoch, and the hooks around the update."""

    total: Tensor  # scalar loss to back-propagate
    logged: dict[str, Tensor | float]  # scalars averaged over the epoch's iterations
    num_images: int
    after_backward: Callable[[], None] | None = None  # between backward and the optimizer step
    after_step: Callable[[], None] | None = None  # after the optimizer step
    sampled: dict[str, float] | None = None  # diagnostics of this iteration (averaged over samples)


def run_epoch(
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    step: Callable[[Batch, int], StepResult],
    *,
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    progress: bool,
    epoch: int,
) -> EpochStats:
    """Train `model` for one pass over `loader`, one `step` per batch.

    Per batch: ``result = step(batch, iteration)``; a non-finite ``result.total`` raises
    `training.NonFiniteLossError` before any update; zero-grad, backward (scaled with fp16 on CUDA),
    ``result.after_backward()``, the optimizer step, ``result.after_step()``.

    Args:
        loader: yields batches; its length (if sized) is the number of iterations shown.
        optimizer: learning rate already set for this epoch.
        step: computes one batch's `StepResult` (the model's forward included).
        model: put in train mode here.
        device: where the model lives (decides whether an fp16 loss scaler is needed).
        amp_dtype: the autocast dtype of the step (None: float32).
        progress: show a progress bar with ETA.
        epoch: 0-based epoch, for the bar and error messages.

    Returns:
        The epoch's means (logged terms; sampled diagnostics averaged over their samples).
    """
    model.train()
    # A fresh fp16 loss scaler per epoch: checkpoints are taken between epochs, so resume stays exact
    # without saving its state; the cost is a few skipped steps while the scale settles.
    use_scaler = amp_dtype == torch.float16 and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    sums: dict[str, float] = {}
    sampled_sums: dict[str, float] = {}
    num_sampled = 0
    iterations, num_images, start = 0, 0, time.perf_counter()
    bar = tqdm(
        loader,
        total=len(loader) if isinstance(loader, Sized) else None,
        desc=f"epoch {epoch}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        # In a log file (nohup) a bar line every 30 s is enough; on a terminal refresh normally.
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )
    divergence = training.DivergenceWatch(epoch)
    for iteration, batch in enumerate(bar):
        result = step(batch, iteration)
        training.check_finite(result.total, epoch=epoch, iteration=iteration)
        divergence.observe(result.total, iteration, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(result.total).backward()
        else:
            result.total.backward()
        if result.after_backward is not None:
            result.after_backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if result.after_step is not None:
            result.after_step()
        for name, value in result.logged.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach() if isinstance(value, Tensor) else value)
        if result.sampled is not None:
            num_sampled += 1
            for name, number in result.sampled.items():
                sampled_sums[name] = sampled_sums.get(name, 0.0) + number
        iterations, num_images = iteration + 1, num_images + result.num_images
        if progress and iteration % 10 == 0:
            bar.set_postfix(loss=f"{sums.get('total', 0.0) / iterations:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    means = {name: value / max(iterations, 1) for name, value in sums.items()}
    means.update({name: value / num_sampled for name, value in sampled_sums.items()})
    return EpochStats(
        means=means,
        iterations=iterations,
        seconds=seconds,
        images_per_second=num_images / seconds if seconds > 0 else 0.0,
    )


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.detach().argmax(1) == labels).float().mean()


def train_source_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    label_smoothing: float,
    triplet_margin: float | None,
    target_loader_iter: Iterator[Batch] | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    epoch: int = 0,
    ranks: distributed.Ranks = distributed.SINGLE,
) -> EpochStats:
    """One epoch of supervised source training (docs/method.md §2).

    Per batch: ``ce = CE_ls(logits, labels)`` with label smoothing, ``triplet`` = batch-hard triplet on
    the pre-BN pooled feature (soft margin when `triplet_margin` is None), ``total = ce + triplet``.
    When `target_loader_iter` is given, one target batch is then pushed through the model in train mode
    without gradient: only the BatchNorm running statistics move towards the target domain (the
    reference forwards it between the source forward and the step; we do it right after the step,
    which differs only by one step's weight change).

    Args:
        model: a `ReidNet` returning `ReidOutput(pooled, bn, logits)` in train mode.
        loader: yields ``(images [B, 3, H, W], labels [B], camids [B], indices [B])``.
        optimizer: learning rate already set for this epoch.
        device: where the model lives.
        label_smoothing: epsilon of the cross-entropy (reference: 0.1).
        triplet_margin: None = soft margin (reference), else the hinge margin.
        target_loader_iter: target batches of the same form (labels ignored), one per source batch;
            None disables the BatchNorm adaptation.
        amp_dtype: autocast dtype (torch.bfloat16; torch.float16 on CUDA only), None for float32.
        channels_last: channels-last inputs (the model in channels-last too).
        progress: show a progress bar with ETA.
        epoch: 0-based epoch, for the progress bar and error messages.
        ranks: under torchrun, `loader` yields this rank's rows and `model` is in DDP: the outputs are
            gathered and the losses see the global batch (`dualref.distributed`).

    Returns:
        The epoch's `EpochStats` (means of "ce", "triplet", "total", "accuracy").

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (weights not updated with it).
    """

    def forward_target_batch() -> None:
        assert target_loader_iter is not None
        images = training.images_to_device(next(target_loader_iter)[0], device, channels_last)
        with torch.no_grad(), training.autocast(device, amp_dtype):
            model(images)

    def step(batch: Batch, iteration: int) -> StepResult:
        images = training.images_to_device(batch[0], device, channels_last)
        labels = distributed.gather_rows(batch[1].to(device, non_blocking=True), ranks)
        with training.autocast(device, amp_dtype):
            out = gathered(model(images), ranks)
        ce = losses.cross_entropy_with_label_smoothing(out.logits, labels, epsilon=label_smoothing)
        triplet = losses.batch_hard_triplet_loss(out.pooled, labels, margin=triplet_margin)
        total = ce + triplet
        logged: dict[str, Tensor | float] = {"ce": ce, "triplet": triplet, "total": total}
        logged["accuracy"] = _accuracy(out.logits, labels)
        after = forward_target_batch if target_loader_iter is not None else None
        return StepResult(total, logged, int(labels.shape[0]), after_step=after)

    return run_epoch(
        loader,
        optimizer,
        step,
        model=model,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress,
        epoch=epoch,
    )


def loss_weights(loss: LossConfig, *, spread_weight: float | None = None) -> LossWeights:
    """The objective's coefficients from `loss.*` (`spread_weight` overrides mu, e.g. during a ramp)."""
    mu = loss.spread_weight if spread_weight is None else spread_weight
    return LossWeights(ce_weight=loss.ce_weight, refined_weight=loss.refined_weight, spread_weight=mu)


def train_target_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    refined_labels: Tensor,
    *,
    memory: MemoryBank | None,
    loss: LossConfig,
    device: torch.device,
    spread_weight: float | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    epoch: int = 0,
    diagnostics_every: int = 0,
    ranks: distributed.Ranks = distributed.SINGLE,
) -> EpochStats:
    """One on-line epoch of Dual-Refinement (docs/method.md §4 "Where alpha enters", §5).

    Per batch (images, coarse labels, camids, dataset indices): refined labels looked up by index; a
    train-mode forward; CE and triplet under both label sets on the same head and features; the memory
    loss; the joint objective; the bank gradient scaled; the optimizer step; a traditional memory's
    momentum update. Terms with weight 0 are not computed (they are logged as 0).

    Args:
        model: the `ReidNet` (or its DDP wrapper), its classifier already sized to the L clusters.
        loader: yields (images [B, 3, H, W], coarse labels [B], camids [B], indices [B]).
        optimizer: Adam over the network (and the instant bank), learning rate set.
        refined_labels: [N] int64 refined label of every target image.
        memory: the memory bank, or None (mini-batch variant, or no memory loss).
        loss: the loss settings (`loss.*`).
        device: where the model lives.
        spread_weight: mu for this epoch (None: `loss.spread_weight`; set by a ramp-up).
        amp_dtype: autocast dtype (None: float32; `training.resolve_amp`).
        channels_last: channels-last inputs (the model in channels-last too).
        progress: show a progress bar.
        epoch: 0-based epoch, for messages.
        diagnostics_every: every this many iterations, record each weighted term's gradient norm at
            the trunk's output (`diagnostics.gradient_norms`); 0 = never. Reads nothing but the batch
            and changes nothing: the training is the same with or without it.
        ranks: under torchrun, `loader` yields this rank's rows and `model` is in DDP: the outputs,
            labels and indices are gathered, so the losses, the bank's gradient and the momentum
            update see the global batch on every rank (`dualref.distributed`).

    Returns:
        EpochStats with the means of ce_coarse, triplet_coarse, ce_refined, triplet_refined, memory,
        total and accuracy (classifier top-1 against the coarse labels), and the sampled
        ``grad_<term>`` norms and ``grad_share_<term>`` shares.
    """
    weights = loss_weights(loss, spread_weight=spread_weight)
    bank_scale = loss.bank_gradient_scale()
    refined_labels = refined_labels.to(device)  # looked up by the batch's indices, on the same device

    def step(batch: Batch, iteration: int) -> StepResult:
        images, coarse, _camids, indices = batch
        images = training.images_to_device(images, device, channels_last)
        coarse = distributed.gather_rows(coarse.to(device, non_blocking=True), ranks)
        indices = distributed.gather_rows(indices.to(device, non_blocking=True), ranks)
        refined = refined_labels[indices]  # [B]
        with training.autocast(device, amp_dtype):
            own = model(images)  # this rank's rows (all of them in one process)
        out = gathered(own, ranks)
        features = F.normalize(out.bn.float(), dim=1)  # [B, D] spread-out / BN-triplet feature
        metric = triplet_feature(out.pooled, features, loss)
        terms = target_loss_terms(
            out.logits, metric, features, coarse, refined, indices, memory, loss, weights
        )
        total = objective.dual_refinement_objective(terms, weights)
        logged: dict[str, Tensor | float] = dict(zip(LossTerms._fields, terms, strict=True))
        logged["total"] = total
        logged["accuracy"] = _accuracy(out.logits, coarse)
        sampled = None
        if diagnostics_every and iteration % diagnostics_every == 0:
            weighted = objective.weighted_terms(terms, weights)
            sampled = diagnostics.gradient_norms(weighted, own.pooled, ranks)

        def after_backward() -> None:
            if isinstance(memory, InstantMemoryBank):
                scale_bank_gradient(memory.weight, bank_scale)

        def after_step() -> None:
            if isinstance(memory, MomentumMemoryBank):
                memory.update(features.detach(), indices)

        return StepResult(total, logged, int(coarse.shape[0]), after_backward, after_step, sampled)

    return run_epoch(
        loader,
        optimizer,
        step,
        model=model,
        device=device,
        amp_dtype=amp_dtype,
        progress=progress,
        epoch=epoch,
    )


def gathered(out: ReidOutput, ranks: distributed.Ranks) -> ReidOutput:
    """The global batch's outputs on every rank (this rank's own rows keep their gradient)."""
    if not ranks.distributed:
        return out
    return ReidOutput(*(distributed.gather_rows(tensor, ranks) for tensor in out))


def triplet_feature(pooled: Tensor, normalized: Tensor, loss: LossConfig) -> Tensor:
    """The feature the triplet loss sees (`loss.triplet_feature`, `loss.triplet_scale`).

    Args:
        pooled: [B, D] pre-BN pooled feature (the baseline script's choice).
        normalized: [B, D] L2-normalised BN-neck feature (the Dual-Refinement script's choice).
        loss: the loss settings.

    Returns:
        [B, D] float32: ``pooled``, or ``triplet_scale * normalized``. The soft-margin triplet is not
        scale-invariant: on unit vectors its gradient is ~1/|bn| of the pooled feature's.
    """
    if loss.triplet_feature == "pooled":
        return pooled.float()
    return normalized * loss.triplet_scale if loss.triplet_scale != 1.0 else normalized


def scale_bank_gradient(bank: Tensor, scale: float) -> None:
    """Multiply the instant memory bank's gradient by `scale`, in place (after backward, before the step).

    The reference multiplies it by 1/lambda with the comment that this "removes lambda's effect on
    updating the centers": a leftover from a center-loss-style module, kept for faithfulness
    (`loss.bank_grad_scale`). Adam being scale-invariant, it mainly changes the ratio between the loss
    gradient and the weight decay (docs/method.md §5 "How the bank is optimised").

    Args:
        bank: the bank parameter [N, D]; nothing happens when it has no gradient.
        scale: the multiplier.
    """
    if bank.grad is not None and scale != 1.0:
        bank.grad.mul_(scale)


def target_loss_terms(
    logits: Tensor,
    metric: Tensor,
    features: Tensor,
    coarse: Tensor,
    refined: Tensor,
    indices: Tensor,
    memory: MemoryBank | None,
    loss: LossConfig,
    weights: LossWeights,
) -> LossTerms:
    """The five terms of the joint objective for one batch; a term with weight 0 is a zero tensor.

    Args:
        logits: [B, L] classifier scores; metric: [B, D] the triplet's feature; features: [B, D]
            L2-normalised BN-neck feature (memory loss).
        coarse, refined: [B] int64 labels of the batch under each label set.
        indices: [B] dataset indices (rows of the memory bank).
        memory: the bank, or None for the mini-batch variant.
        loss: the loss settings; weights: the coefficients of this epoch.
    """
    zero = logits.new_zeros((), dtype=torch.float32)

    def ce_and_triplet(labels: Tensor) -> tuple[Tensor, Tensor]:
        ce = losses.cross_entropy_with_label_smoothing(logits, labels, epsilon=loss.label_smoothing)
        triplet = losses.batch_hard_triplet_loss(metric, labels, margin=loss.triplet_margin)
        return ce, triplet

    ce_coarse, triplet_coarse = ce_and_triplet(coarse) if weights.refined_weight < 1 else (zero, zero)
    ce_refined, triplet_refined = ce_and_triplet(refined) if weights.refined_weight > 0 else (zero, zero)
    memory_term = zero
    if weights.spread_weight > 0:
        bank, bank_indices = (memory.bank(), indices) if memory is not None else minibatch_bank(features)
        if loss.memory_loss == "invariance":
            memory_term = memory_losses.invariance_loss(
                features,
                bank,
                bank_indices,
                temperature=loss.invariance_temperature,
                num_neighbors=loss.invariance_num_neighbors,
            )
        else:
            memory_term = losses.spread_out_loss(
                features,
                bank,
                bank_indices,
                num_neighbors=loss.spread_num_neighbors,
                margin=loss.spread_margin,
                variant=loss.spread_variant,
            )
    return LossTerms(ce_coarse, triplet_coarse, ce_refined, triplet_refined, memory_term)
