"""IM-spread-out loss: golden values by hand, naive triple-sum reference in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualref.losses import spread_out_loss


def _naive_spread_out(
    features: torch.Tensor,
    bank: torch.Tensor,
    indices: torch.Tensor,
    num_neighbors: int,
    margin: float,
    variant: str,
) -> torch.Tensor:
    """The formula as written: explicit positive/negative lists and a B x |Neg| x |P| tensor."""
    bank_unit = bank / bank.norm(dim=1, keepdim=True)
    sim = features @ bank_unit.T  # [B, N]
    num_entries = bank.shape[0]
    losses = []
    for b in range(features.shape[0]):
        self_sim = (features[b] * bank_unit[indices[b]]).sum()
        if variant == "reference":
            ordered, _ = sim[b].sort(descending=True)  # autograd through the sort values
            positives = torch.cat([self_sim[None], ordered[:num_neighbors]])
            negatives = ordered[num_neighbors : num_entries - 1]
        else:
            others = [j for j in range(num_entries) if j != int(indices[b])]
            ordered_idx = sorted(others, key=lambda j: -float(sim[b, j].detach()))
            neighbor_idx = ordered_idx[:num_neighbors]
            positives = torch.cat([self_sim[None], sim[b, neighbor_idx]])
            negatives = sim[b, ordered_idx[num_neighbors:]]
        terms = torch.exp(negatives[:, None] - positives[None, :] + margin)  # [|Neg|, |P|]
        losses.append(torch.log(1 + terms.sum()))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("variant", ["reference", "paper"])
@pytest.mark.parametrize(("num_neighbors", "shift_bank"), [(6, False), (3, True), (0, False)])
def test_matches_naive_value_and_gradients(
    variant: str, num_neighbors: int, shift_bank: bool
) -> None:
    gen = torch.Generator().manual_seed(7)
    num_entries, dim, batch = 40, 8, 6
    raw_bank = torch.randn(num_entries, dim, generator=gen, dtype=torch.float64)
    indices = torch.tensor([3, 17, 17, 0, 39, 25])
    features = F.normalize(
        raw_bank[indices] + 0.3 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1
    )
    if shift_bank:
        # Move the batch's own entries away, so self is often outside its own top k
        # (a negative too in the reference variant).
        raw_bank = raw_bank.clone()
        raw_bank[indices] = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    raw_bank = raw_bank * torch.rand(num_entries, 1, generator=gen, dtype=torch.float64).add(0.5)

    results = []
    for fn in (spread_out_loss, _naive_spread_out):
        feat = features.clone().requires_grad_(True)
        bank = raw_bank.clone().requires_grad_(True)
        loss = fn(feat, bank, indices, num_neighbors, 0.35, variant)
        loss.backward()
        assert feat.grad is not None and bank.grad is not None
        results.append((loss.detach(), feat.grad, bank.grad))
    (loss, feat_grad, bank_grad), (ref_loss, ref_feat_grad, ref_bank_grad) = results
    # Ours runs in float32, the naive one in float64.
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(feat_grad, ref_feat_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bank_grad, ref_bank_grad, atol=1e-5, rtol=1e-4)


def test_golden_value_reference_and_paper() -> None:
    # Bank of 4 unit vectors at angles 0, 90, 180, 270 degrees; one feature f = (1, 0), index 0.
    # Similarities s = (1, 0, -1, 0). k = 1, m = 0.
    # reference: sorted (1, 0, 0, -1); P = {s_self = 1, top-1 = 1}; Neg = positions 1..2 = {0, 0}
    #   (the least similar, -1, dropped). Sum = 2 positives x 2 negatives x exp(0 - 1) = 4/e.
    #   loss = log(1 + 4/e).
    # paper: P = {self 1, best other 0}; Neg = {-1, 0} (the remaining two).
    #   Sum over p in {1, 0}, n in {-1, 0}: e^-2 + e^-1 + e^-1 + e^0 = 1 + 2/e + 1/e^2.
    #   loss = log(2 + 2/e + 1/e^2).
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0  # raw norm 3
    features = torch.tensor([[1.0, 0.0]])
    indices = torch.tensor([0])
    reference = spread_out_loss(features, bank, indices, num_neighbors=1, margin=0.0)
    torch.testing.assert_close(reference, torch.tensor(math.log(1 + 4 / math.e)))
    paper = spread_out_loss(features, bank, indices, num_neighbors=1, margin=0.0, variant="paper")
    torch.testing.assert_close(paper, torch.tensor(math.log(2 + 2 / math.e + math.exp(-2))))
    # The margin multiplies the double sum by exp(m): reference with m = 0.35.
    with_margin = spread_out_loss(features, bank, indices, num_neighbors=1, margin=0.35)
    torch.testing.assert_close(with_margin, torch.tensor(math.log(1 + 4 / math.e * math.exp(0.35))))


def test_gradient_reaches_every_bank_row_and_is_tangent() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(30, 5, generator=gen).requires_grad_(True)
    features = F.normalize(torch.randn(4, 5, generator=gen), dim=1).requires_grad_(True)
    spread_out_loss(features, bank, torch.tensor([0, 1, 2, 3])).backward()
    assert bank.grad is not None and features.grad is not None
    # Only the least similar entry per sample is dropped; with 4 samples, at most 4 rows get none.
    assert int((bank.grad.norm(dim=1) > 0).sum()) >= 26
    # Rows are normalised inside, so the gradient is orthogonal to each raw row.
    radial = (bank.grad * bank.detach()).sum(1)
    torch.testing.assert_close(radial, torch.zeros(30), atol=1e-6, rtol=0)


def test_large_bank_is_finite_and_near_log_of_pair_count() -> None:
    # Random unit vectors in 64-d have similarities near 0, so every exp term is ~exp(m):
    # loss ~ log(1 + (k + 1) (N - k - 1) e^m) with self counted near e^(m - 1).
    gen = torch.Generator().manual_seed(0)
    bank = torch.randn(5000, 64, generator=gen)
    features = F.normalize(bank[:8].clone(), dim=1)
    loss = spread_out_loss(features, bank, torch.arange(8))
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(7 * 4993)) < 1.5


def test_float32_under_bfloat16_inputs() -> None:
    bank = torch.randn(20, 4)
    features = F.normalize(torch.randn(3, 4), dim=1).to(torch.bfloat16)
    assert spread_out_loss(features, bank, torch.tensor([1, 2, 3])).dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"variant": "circle"}, "circle"),
        ({"indices": torch.tensor([0, 10])}, r"\[0, 10\)"),
        ({"indices": torch.tensor([0.0, 1.0])}, "integer"),
        ({"num_neighbors": 9}, "num_neighbors"),
        ({"bank": torch.randn(10, 3)}, "same D"),
    ],
)
def test_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "features": F.normalize(torch.randn(2, 4), dim=1),
        "bank": torch.randn(10, 4),
        "indices": torch.tensor([0, 1]),
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        spread_out_loss(**args)  # type: ignore[arg-type]
