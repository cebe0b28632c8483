"""Source training of the `tiny` network on learnable batches, shared by tests/test_cpu_numerics.py and
tests/test_device_paths.py (not a test module)."""

from __future__ import annotations

import torch

from dualref import steps, training
from dualref.models import ReidNet


def identity_batches(num_batches: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """P x K = 4 x 4 batches of 64x32 images whose colour depends on the identity (learnable)."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(4, 3, 1, 1, generator=generator) * 2 - 1
    labels = torch.arange(4).repeat_interleave(4)
    batches = []
    for b in range(num_batches):
        images = colours[labels] + 0.5 * torch.randn(16, 3, 64, 32, generator=generator)
        indices = torch.arange(16) + 16 * b
        batches.append((images, labels, torch.zeros(16, dtype=torch.long), indices))
    return batches


def source_epochs(
    device: torch.device, amp: str, channels_last: bool, *, lr: float, num_batches: int, epochs: int
) -> tuple[list[dict[str, float]], ReidNet]:
    """Per-epoch loss means of source training from one seeded start under the given numerics, and the
    trained model."""
    torch.manual_seed(0)
    model = training.place_model(ReidNet("tiny", num_classes=4), device, channels_last)
    optimizer = training.build_adam(model.parameters(), lr=lr, weight_decay=0.0)
    batches = identity_batches(num_batches, seed=0)
    means = []
    for epoch in range(epochs):
        stats = steps.train_source_epoch(
            model,
            batches,
            optimizer,
            device=device,
            label_smoothing=0.1,
            triplet_margin=None,
            amp_dtype=training.resolve_amp(amp, device),
            channels_last=channels_last,
            progress=False,
            epoch=epoch,
        )
        means.append(dict(stats.means))
    return means, model
