"""The training and clustering paths on the device under test (DUALREF_TEST_DEVICE=cuda), each compared
with a float32 CPU computation of the same thing.

Without a GPU under test they are skipped (comparing the CPU with itself proves nothing); the CPU's own
channels-last and bf16 paths are tested in tests/test_cpu_numerics.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tiny_training
from conftest import DEVICE
from dualref import extraction, losses, steps, training
from dualref.config import LossConfig
from dualref.distances import jaccard_distance, knn
from dualref.memory_bank import InstantMemoryBank
from dualref.models import ReidNet

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu",
    reason="compares the device under test with the CPU: run with DUALREF_TEST_DEVICE=cuda on a GPU machine",
)
# Relative tolerance of a device's losses against float32 on the CPU: cuDNN may use TF32 (~1e-3 per
# product) in float32; autocast keeps ~3 significant digits.
LOSS_RTOL = {"none": 1e-2, "bf16": 5e-2, "fp16": 3e-2}


def _source_totals(device: torch.device, amp: str, channels_last: bool) -> tuple[list[float], ReidNet]:
    means, model = tiny_training.source_epochs(device, amp, channels_last, lr=3e-3, num_batches=8, epochs=3)
    return [m["total"] for m in means], model


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_source_training_on_device_matches_cpu(device: torch.device, amp: str, channels_last: bool) -> None:
    expected, _ = _source_totals(torch.device("cpu"), "none", False)
    totals, model = _source_totals(device, amp, channels_last)
    assert totals == pytest.approx(expected, rel=LOSS_RTOL[amp]), (totals, expected)
    assert totals[-1] < 0.8 * totals[0], totals  # it learns: the identities are colours
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never casts the weights


def _full_objective(device: torch.device, amp: str) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """One Dual-Refinement epoch from a seeded start: loss means, bank before, bank after (on the CPU)."""
    torch.manual_seed(0)
    num_samples = 64
    model = ReidNet("tiny", num_classes=4).to(device)
    memory = InstantMemoryBank(num_samples, model.feat_dim).to(device)
    memory.init_from(torch.randn(num_samples, model.feat_dim).to(device))
    before = memory.bank().detach().cpu().clone()
    params = [p for p in model.parameters() if p.requires_grad] + [memory.weight]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    stats = steps.train_target_epoch(
        model,
        tiny_training.identity_batches(4, seed=1),
        optimizer,
        (torch.arange(num_samples) // 4) % 4,
        memory=memory,
        loss=LossConfig(ce_weight=0.5, refined_weight=0.5, spread_weight=0.1),
        device=device,
        amp_dtype=training.resolve_amp(amp, device),
        progress=False,
    )
    assert stats.iterations == 4 and memory.weight.dtype == torch.float32
    return dict(stats.means), before, memory.bank().detach().cpu()


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_full_objective_step_on_device_matches_cpu(device: torch.device, amp: str) -> None:
    """Every loss term and the bank's back-propagated rows as on the CPU in float32, within tolerance."""
    expected, start, expected_bank = _full_objective(torch.device("cpu"), "none")
    means, before, bank = _full_objective(device, amp)
    torch.testing.assert_close(before, start, rtol=0, atol=1e-6)
    for term in ("ce_coarse", "triplet_coarse", "ce_refined", "triplet_refined", "memory", "total"):
        assert means[term] == pytest.approx(expected[term], rel=LOSS_RTOL[amp]), term
    torch.testing.assert_close(bank, expected_bank, rtol=0, atol=LOSS_RTOL[amp])
    assert bool(((bank - before).norm(dim=1) > 0).all())  # every row is some sample's negative


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
    batches = tiny_training.identity_batches(2, seed=2)
    expected = extraction.extract_features(model, batches, torch.device("cpu"), progress=False)
    got = extraction.extract_features(
        model.to(device), batches, device, progress=False, amp_dtype=training.AMP_DTYPES[amp]
    ).cpu()
    assert got.shape == expected.shape == (32, model.feat_dim)
    # bf16 autocast keeps ~3 significant digits; the features are unit vectors. In float32, cuDNN may
    # use TF32 convolutions: ~1e-4.
    tolerance = 1e-3 if amp == "none" else 2e-2
    assert (got - expected).abs().max() < tolerance
