"""Tests of dualref.training: LR schedule, Adam construction, the finite-loss guard, one source epoch."""

from __future__ import annotations

import bisect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualref import steps, training
from dualref.models import ReidOutput

BASE = 3.5e-4


def reference_lr(epoch: int, base_lr: float = BASE) -> float:
    """Naive replay of the reference: WarmupMultiStepLR(milestones 40/70, gamma 0.1, factor 0.01,
    10 linear warm-up 'iterations') whose step() is called at the start of every epoch, starting at
    last_epoch = 0 (PyTorch >= 1.1 semantics: the constructor already stepped once)."""
    lr = math.nan
    for last_epoch in range(1, epoch + 2):  # scheduler.step() before each epoch trains
        factor = 1.0
        if last_epoch < 10:
            alpha = last_epoch / 10
            factor = 0.01 * (1 - alpha) + alpha
        lr = base_lr * factor * 0.1 ** bisect.bisect_right([40, 70], last_epoch)
    return lr


def source_lr(epoch: int, **kwargs: object) -> float:
    return training.lr_at_epoch(epoch, base_lr=BASE, schedule="warmup_multistep", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("epoch", "factor"),
    [
        (0, 0.109),  # t = 1: 0.01 * 0.9 + 0.1
        (1, 0.208),  # t = 2: 0.01 * 0.8 + 0.2
        (8, 0.901),  # t = 9: 0.01 * 0.1 + 0.9
        (9, 1.0),  # t = 10: warm-up over
        (38, 1.0),  # t = 39 < 40
        (39, 0.1),  # t = 40: first milestone
        (68, 0.1),
        (69, 0.01),  # t = 70: second milestone
        (79, 0.01),
    ],
)
def test_warmup_multistep_golden_values(epoch: int, factor: float) -> None:
    assert source_lr(epoch) == pytest.approx(BASE * factor, rel=1e-12)


def test_warmup_multistep_matches_naive_reference_replay() -> None:
    for epoch in range(80):
        assert source_lr(epoch) == pytest.approx(reference_lr(epoch), rel=1e-12), epoch


def test_warmup_without_reference_offset_starts_at_the_warmup_factor() -> None:
    assert source_lr(0, reference_warmup_offset=False) == pytest.approx(BASE * 0.01)
    assert source_lr(5, reference_warmup_offset=False) == pytest.approx(BASE * 0.505)  # 0.01*.5+.5
    assert source_lr(10, reference_warmup_offset=False) == pytest.approx(BASE)
    assert source_lr(39, reference_warmup_offset=False) == pytest.approx(BASE)
    assert source_lr(40, reference_warmup_offset=False) == pytest.approx(BASE * 0.1)


def test_scaled_schedule_and_no_warmup() -> None:
    # A CPU-scale schedule: 3 warm-up epochs, decay at 8. Epoch 0: t=1, 0.01*(2/3) + 1/3.
    kwargs = {"warmup_epochs": 3, "milestones": (8,)}
    assert source_lr(0, **kwargs) == pytest.approx(BASE * (0.01 * 2 / 3 + 1 / 3))
    assert source_lr(2, **kwargs) == pytest.approx(BASE)
    assert source_lr(6, **kwargs) == pytest.approx(BASE)
    assert source_lr(7, **kwargs) == pytest.approx(BASE * 0.1)
    assert source_lr(0, warmup_epochs=0, milestones=()) == pytest.approx(BASE)


def test_step_and_constant_schedules() -> None:
    def step(epoch: int) -> float:
        return training.lr_at_epoch(epoch, base_lr=BASE, schedule="step", lr_decay_epochs=20, gamma=0.1)

    assert [step(e) / BASE for e in (0, 19, 20, 39, 40)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert training.lr_at_epoch(57, base_lr=0.3, schedule="constant") == 0.3


def test_schedule_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="cosine"):
        training.lr_at_epoch(0, base_lr=BASE, schedule="cosine")
    with pytest.raises(ValueError, match="epoch=-1"):
        training.lr_at_epoch(-1, base_lr=BASE, schedule="constant")


def test_set_lr_sets_every_group() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    optimizer = training.build_adam([{"params": [a]}, {"params": [b], "lr": 1.0}], 0.1, 0.0)
    training.set_lr(optimizer, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.25, 0.25]


def test_build_adam_skips_frozen_parameters() -> None:
    neck = nn.BatchNorm1d(4)
    neck.bias.requires_grad_(False)
    optimizer = training.build_adam(neck.parameters(), lr=3.5e-4, weight_decay=5e-4)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is neck.weight
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (
        3.5e-4,
        5e-4,
        (0.9, 0.999),
        1e-8,
    )
    with pytest.raises(ValueError, match="no trainable parameter"):
        training.build_adam([neck.bias], lr=0.1, weight_decay=0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_raises_with_position(bad: float) -> None:
    with pytest.raises(training.NonFiniteLossError, match=r"at epoch 3 iteration 17") as info:
        training.check_finite(torch.tensor(bad), epoch=3, iteration=17)
    assert info.value.epoch == 3 and info.value.iteration == 17
    assert isinstance(info.value, ValueError)  # the CLI reports it in one line
    named = info.value.with_checkpoint(Path("run/ckpt.pt"))
    assert "last good checkpoint is kept at run/ckpt.pt" in str(named)
    training.check_finite(torch.tensor(1.5), epoch=0, iteration=0)  # finite: no error


class MicroReidNet(nn.Module):
    """A very small stand-in for ReidNet with the same train/eval contract (fast unit tests)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.neck = nn.BatchNorm1d(16)
        self.neck.bias.requires_grad_(False)
        self.classifier = nn.Linear(16, num_classes, bias=False)

    def forward(self, x: Tensor) -> ReidOutput | Tensor:
        pooled = F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1)
        bn = self.neck(pooled)
        if not self.training:
            return F.normalize(bn, dim=1)
        return ReidOutput(pooled=pooled, bn=bn, logits=self.classifier(bn))


def tiny_batches(num_batches: int, seed: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """P x K = 4 x 2 batches of 16x8 images whose colour depends on the identity (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(4, 3, 1, 1, generator=generator) * 2 - 1
    batches = []
    for _ in range(num_batches):
        labels = torch.arange(4).repeat_interleave(2)
        noise = 0.3 * torch.randn(8, 3, 16, 8, generator=generator)
        images = colours[labels] + noise
        batches.append((images, labels, torch.zeros(8, dtype=torch.long), torch.arange(8)))
    return batches


def run_epochs(model: nn.Module, num_epochs: int, target: bool) -> list[steps.EpochStats]:
    optimizer = training.build_adam(model.parameters(), lr=1e-2, weight_decay=0.0)
    batches = tiny_batches(6, seed=0)
    target_batches = tiny_batches(6 * num_epochs, seed=1)
    target_iter = iter(target_batches) if target else None
    return [
        steps.train_source_epoch(
            model,
            batches,
            optimizer,
            device=torch.device("cpu"),
            label_smoothing=0.1,
            triplet_margin=None,
            target_loader_iter=target_iter,
            progress=False,
            epoch=epoch,
        )
        for epoch in range(num_epochs)
    ]


def test_train_source_epoch_decreases_the_loss() -> None:
    torch.manual_seed(0)
    stats = run_epochs(MicroReidNet(num_classes=4), num_epochs=4, target=False)
    totals = [s.means["total"] for s in stats]
    assert all(math.isfinite(t) for t in totals)
    assert totals[-1] < 0.8 * totals[0], totals
    first = stats[0]
    assert first.iterations == 6
    assert first.means["total"] == pytest.approx(first.means["ce"] + first.means["triplet"])
    assert 0.0 <= first.means["accuracy"] <= 1.0
    assert first.images_per_second > 0 and first.seconds > 0
    metrics = first.as_metrics()
    assert metrics["iterations"] == 6 and "ce" in metrics and "images_per_second" in metrics


def test_target_batches_move_only_the_batchnorm_statistics() -> None:
    # The target forward happens after each optimizer step without gradient: the weights are the
    # same with and without it, the BN running statistics are not.
    torch.manual_seed(0)
    plain = MicroReidNet(num_classes=4)
    with_target = MicroReidNet(num_classes=4)
    with_target.load_state_dict(plain.state_dict())
    run_epochs(plain, num_epochs=1, target=False)
    run_epochs(with_target, num_epochs=1, target=True)
    for (name, a), b in zip(plain.named_parameters(), with_target.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert not torch.allclose(plain.neck.running_mean, with_target.neck.running_mean)
    assert int(with_target.neck.num_batches_tracked) == 2 * int(plain.neck.num_batches_tracked)


def test_non_finite_loss_stops_before_the_optimizer_step() -> None:
    torch.manual_seed(0)
    model = MicroReidNet(num_classes=4)
    optimizer = training.build_adam(model.parameters(), lr=1e-2, weight_decay=0.0)
    batches = tiny_batches(3, seed=0)
    images, labels, camids, indices = batches[1]
    batches[1] = (images.clone().fill_(math.nan), labels, camids, indices)
    with pytest.raises(training.NonFiniteLossError, match="at epoch 5 iteration 1"):
        steps.train_source_epoch(
            model,
            batches,
            optimizer,
            device=torch.device("cpu"),
            label_smoothing=0.1,
            triplet_margin=0.5,
            progress=False,
            epoch=5,
        )
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name


def test_resolve_device_names_the_key_and_the_problem() -> None:
    assert training.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"run.device='gpu0' is not a device"):
        training.resolve_device("gpu0")
    with pytest.raises(ValueError, match=r"clustering.device='meta'; expected cpu, cuda"):
        training.resolve_device("meta", key="clustering.device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"run.device='cuda' but this machine has no usable CUDA"):
            training.resolve_device("cuda")
    else:
        count = torch.cuda.device_count()
        assert training.resolve_device("cuda:0") == torch.device("cuda:0")
        with pytest.raises(ValueError, match="CUDA device"):
            training.resolve_device(f"cuda:{count}")
