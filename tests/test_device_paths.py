"""The training and clustering paths on the device under test (DUALREF_TEST_DEVICE; cpu by default).

On CUDA these run the mixed-precision and channels-last paths; on the CPU `amp_dtype` and
`channels_last` are documented as ignored, so the same tests check that too. Each compares the device
result with a float32 CPU computation of the same thing.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualref import extraction, losses, steps, training
from dualref.config import LossConfig
from dualref.distances import jaccard_distance, knn
from dualref.memory_bank import InstantMemoryBank
from dualref.models import ReidNet


def _identity_batches(num_batches: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
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


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_source_training_learns_on_device(device: torch.device, amp: str, channels_last: bool) -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=4).to(device)
    optimizer = training.build_adam(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = _identity_batches(8, seed=0)
    stats = [
        steps.train_source_epoch(
            model,
            batches,
            optimizer,
            device=device,
            label_smoothing=0.1,
            triplet_margin=None,
            amp_dtype=training.AMP_DTYPES[amp],
            channels_last=channels_last,
            progress=False,
            epoch=epoch,
        )
        for epoch in range(3)
    ]
    totals = [s.means["total"] for s in stats]
    assert all(math.isfinite(t) for t in totals), totals
    assert totals[-1] < totals[0], totals
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the weights


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_full_objective_step_on_device(device: torch.device, amp: str) -> None:
    """One Dual-Refinement epoch: every loss finite, and the instant memory bank trained by backprop."""
    torch.manual_seed(0)
    num_samples = 64
    model = ReidNet("tiny", num_classes=4).to(device)
    memory = InstantMemoryBank(num_samples, model.feat_dim).to(device)
    memory.init_from(torch.randn(num_samples, model.feat_dim, device=device))
    before = memory.bank().detach().clone()
    params = [p for p in model.parameters() if p.requires_grad] + [memory.weight]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    settings = LossConfig(ce_weight=0.5, refined_weight=0.5, spread_weight=0.1)
    refined = (torch.arange(num_samples) // 4) % 4
    stats = steps.train_target_epoch(
        model,
        _identity_batches(4, seed=1),
        optimizer,
        refined,
        memory=memory,
        loss=settings,
        device=device,
        amp_dtype=training.AMP_DTYPES[amp],
        progress=False,
    )
    assert stats.iterations == 4
    assert all(math.isfinite(v) for v in stats.means.values()), stats.means
    assert stats.means["memory"] > 0
    assert memory.weight.dtype == torch.float32
    moved = (memory.bank().detach() - before).norm(dim=1) > 0
    assert bool(moved.all())  # every entry is a negative of some batch sample, so every row moves


def test_spread_out_on_device_matches_cpu(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(3)
    features = F.normalize(torch.randn(32, 64, generator=generator), dim=1)
    bank = torch.randn(500, 64, generator=generator)
    indices = torch.randperm(500, generator=generator)[:32]
    results = []
    for where in (torch.device("cpu"), device):
        feats = features.detach().clone().to(where).requires_grad_(True)
        raw = bank.detach().clone().to(where).requires_grad_(True)
        loss = losses.spread_out_loss(feats, raw, indices.to(where), num_neighbors=6, margin=0.35)
        loss.backward()
        assert feats.grad is not None and raw.grad is not None
        results.append((loss.detach().cpu(), feats.grad.cpu(), raw.grad.cpu()))
    for cpu_value, device_value in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(device_value, cpu_value, rtol=1e-4, atol=1e-5)


def test_knn_and_jaccard_on_device_match_cpu(device: torch.device) -> None:
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(40, 32, generator=generator)
    feats = centres.repeat_interleave(15, dim=0) + 0.3 * torch.randn(600, 32, generator=generator)
    on_cpu = knn(feats, 20, device="cpu")
    on_device = knn(feats, 20, device=device)
    torch.testing.assert_close(on_device.sims.cpu(), on_cpu.sims, rtol=0, atol=1e-5)
    # Indices may differ only where two similarities tie to float precision.
    same = on_device.indices.cpu() == on_cpu.indices
    assert same.float().mean() > 0.99
    expected = jaccard_distance(feats, k1=20, k2=6, device="cpu").toarray()
    got = jaccard_distance(feats, k1=20, k2=6, device=device).toarray()
    assert abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_extraction_on_device_matches_cpu(device: torch.device, amp: str) -> None:
    torch.manual_seed(0)
    model = ReidNet("tiny", num_classes=4).eval()
    batches = _identity_batches(2, seed=2)
    expected = extraction.extract_features(model, batches, torch.device("cpu"), progress=False)
    got = extraction.extract_features(
        model.to(device), batches, device, progress=False, amp_dtype=training.AMP_DTYPES[amp]
    ).cpu()
    assert got.shape == expected.shape == (32, model.feat_dim)
    # bf16 autocast keeps ~3 significant digits; the features are unit vectors. In float32, cuDNN may
    # use TF32 convolutions (and other kernels for channels-last images): ~1e-4.
    tolerance = 1e-5 if device.type == "cpu" else 1e-3 if amp == "none" else 2e-2
    assert (got - expected).abs().max() < tolerance
