"""Training helpers shared by the steps and pipelines: LR schedule, Adam, devices, AMP, the finite-loss guard.

The learning rate is a pure function of the epoch (`lr_at_epoch`), given to a fresh or updated optimizer
before each epoch; there is no scheduler object to save or restore. The epochs themselves are in `steps`.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualref.memory_bank import InPlaceAdam

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=nn.Module)

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


def set_threads(count: int, *, key: str = "run.threads") -> None:
    """Set torch's intra-op thread count from config `key`; 0 keeps torch's default (one per core)."""
    if count < 0:
        raise ValueError(f"{key}={count}: expected 0 (torch's default) or a positive thread count")
    if count:
        torch.set_num_threads(count)


def resolve_device(spec: str, *, key: str = "run.device") -> torch.device:
    """The torch device named by config `key`, or a ValueError saying why it cannot be used here.

    "auto" is the first CUDA device when one is usable, else the CPU (the paper-scale configs use it, so
    that the same file runs on a GPU machine and, slowly, on a laptop); the choice is logged.
    """
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        found = "cuda (a GPU is present)" if device.type == "cuda" else "cpu (no GPU found)"
        log.info("%s=auto: running on %s", key, found)
        return device
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"{key}={spec!r} is not a device; expected cpu, cuda, cuda:N or auto") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={spec!r} but this machine has no usable CUDA device; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            visible = torch.cuda.device_count()
            raise ValueError(f"{key}={spec!r} but only {visible} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"{key}={spec!r}; expected cpu, cuda, cuda:N or auto")
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
    frozen BN-neck bias) are left out. It is `memory_bank.InPlaceAdam`: torch.optim.Adam's numbers,
    bit for bit, without its parameter-sized temporaries (which dominate the step of an instant bank).

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
    return InPlaceAdam(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)


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


# A re-ID training loss is of order 1-10: far above, or far above where the epoch started, the training
# diverges (typically a too-high learning rate) long before the loss overflows to inf.
EXPLODING_LOSS = 1e6
EXPLODING_GROWTH = 1e3


class DivergenceWatch:
    """Warns (once per epoch) when the loss explodes while still finite: above `EXPLODING_LOSS`, or
    `EXPLODING_GROWTH` times the epoch's first loss."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.first: float | None = None
        self.warned = False

    def observe(self, loss: Tensor, iteration: int, optimizer: torch.optim.Optimizer) -> None:
        if self.warned:
            return
        value = float(loss.detach().float())
        if self.first is None:
            self.first = value
        grown = self.first > 0 and value > max(EXPLODING_GROWTH * self.first, 1.0)
        if value > EXPLODING_LOSS or grown:
            self.warned = True
            lr = optimizer.param_groups[0]["lr"]
            log.warning(
                "loss %.3g at epoch %d iteration %d (the epoch started at %.3g): the training is "
                "diverging; lower optim.lr (this epoch: %.3g)",
                value,
                self.epoch,
                iteration,
                self.first,
                lr,
            )


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); else it is emulated, slowly."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_amp(amp: str, device: torch.device, *, key: str = "run.amp") -> torch.dtype | None:
    """The autocast dtype of config value `amp` (`AMP_DTYPES`) on `device`, or a ValueError.

    On the CPU, bf16 autocasts the convolutions and matrix products (oneDNN; AMX where present) while
    BatchNorm statistics, the losses and the memory bank stay in float32, as on CUDA. fp16 is refused
    there (CPU autocast has no fp16 kernels worth using and no GradScaler); bf16 on a CPU without native
    support runs in float32, said once.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"{key}={amp!r} is not valid; expected one of {list(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    if device.type != "cpu" or dtype is None:
        return dtype
    if dtype == torch.float16:
        raise ValueError(f"{key}=fp16 is not supported on the CPU; use bf16 (or none for float32)")
    if not cpu_supports_bf16():
        _warn_no_bf16(key)
        return None
    return dtype


@functools.cache
def _warn_no_bf16(key: str) -> None:
    log.warning("%s=bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX); running float32", key)


def resolve_channels_last(setting: bool | str, device: torch.device) -> bool:
    """Whether a run uses the channels-last memory format: `setting` true/false, or "auto".

    "auto" is channels-last on the CPU, where oneDNN's convolutions are faster in it for every trunk
    measured (float32 training step: MobileNetV2 1.28x, ResNet-50 1.10-1.40x; benchmarks/results/
    throughput.md), and the contiguous format on CUDA, whose fp32 step was measured only that way.
    """
    if setting == "auto":
        return device.type == "cpu"
    return bool(setting)


# bf16 features of a healthy network are within ~0.5 % of float32 (cosine > 0.99 measured for MobileNetV2 and
# the tiny net); oneDNN's bf16 convolutions on maps of a few pixels have returned wrong, run-to-run varying
# values instead (torch 2.14.1: cosine 0 for the tiny net at 32x16), which this threshold catches.
AUTOCAST_MIN_COSINE = 0.95


@torch.no_grad()
def check_autocast(
    model: nn.Module, amp_dtype: torch.dtype | None, device: torch.device, size: tuple[int, int]
) -> None:
    """Refuse an autocast that computes this network wrongly at this input size, before anything runs.

    One batch of random images (a private generator: the run's RNG streams are untouched) goes through the
    model in eval mode in float32 and twice under autocast; a feature row whose cosine to float32 is below
    `AUTOCAST_MIN_COSINE`, or two autocast passes that differ, raise a ValueError naming the setting.

    Args:
        model: a `ReidNet` on `device` (its eval output: [B, D] L2-normalised features); its mode is kept.
        amp_dtype: the autocast dtype (None: nothing to check).
        device: where the model runs.
        size: (height, width) of the network input.
    """
    if amp_dtype is None:
        return
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, *size, generator=generator).to(device)
    if is_channels_last(model):
        images = images.contiguous(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        expected = model(images).float()
        with autocast(device, amp_dtype):
            first, second = model(images).float(), model(images).float()
    finally:
        model.train(was_training)
    cosine = float(F.cosine_similarity(first, expected, dim=1).min())
    if cosine < AUTOCAST_MIN_COSINE or not torch.equal(first, second):
        name = str(amp_dtype).removeprefix("torch.")
        raise ValueError(
            f"{name} autocast computes this network wrongly on {device.type} at input size "
            f"{size[0]}x{size[1]} (feature cosine to float32 {cosine:.3f}, "
            f"{'repeatable' if torch.equal(first, second) else 'not repeatable'}; a fault of the "
            "low-precision convolutions on small feature maps): use run.amp=none (--amp none), "
            "or a larger input size"
        )


def numerics_name(amp_dtype: torch.dtype | None, channels_last: bool) -> str:
    """How a stage computes, for the log: e.g. "bf16 autocast, channels-last"."""
    precision = "float32" if amp_dtype is None else f"{str(amp_dtype).removeprefix('torch.')} autocast"
    return f"{precision}, {'channels-last' if channels_last else 'contiguous'}"


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `amp_dtype` (None: a no-op, the run stays in float32); `resolve_amp` vets the pair."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def images_to_device(images: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch of images on `device`, in channels-last layout when asked for."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def place_model(model: ModelT, device: torch.device, channels_last: bool) -> ModelT:
    """`model` on `device`, its convolutions in channels-last layout when asked (inputs then follow it:
    `images_to_device`, `extraction.extract_features`)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def is_channels_last(model: nn.Module) -> bool:
    """Whether `model`'s convolution weights are in channels-last layout (judged by the first weight
    whose two layouts differ: a 1x1 or single-channel kernel is both)."""
    for parameter in model.parameters():
        if parameter.dim() != 4:
            continue
        last = parameter.is_contiguous(memory_format=torch.channels_last)
        if last != parameter.is_contiguous():
            return last
    return False
