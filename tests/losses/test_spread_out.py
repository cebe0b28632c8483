"""IM-spread-out loss: golden values by hand, naive triple-sum reference in value and gradient, and the
hand-written backward against the plain autograd formulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualref.losses import spread_out_loss
from dualref.losses.spread_out import spread_out_loss_autograd


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


def _loss_and_grads(
    fn: object,
    features: torch.Tensor,
    bank: torch.Tensor,
    indices: torch.Tensor,
    upstream: float,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feat = features.clone().requires_grad_(True)
    raw = bank.clone().requires_grad_(True)
    loss = fn(feat, raw, indices, **kwargs)  # type: ignore[operator]
    (upstream * loss).backward()
    assert feat.grad is not None and raw.grad is not None
    return loss.detach(), feat.grad, raw.grad


def _bank_with_ties(gen: torch.Generator, num_entries: int, dim: int) -> torch.Tensor:
    """Raw rows of mixed norms with exact ties: each direction twice (x and 2x normalise to the same bits)."""
    half = torch.randn(num_entries // 2, dim, generator=gen)
    rows = torch.cat([half, 2.0 * half])[torch.randperm(num_entries, generator=gen)]
    return rows * torch.rand(num_entries, 1, generator=gen).add(0.3)


@pytest.mark.parametrize("variant", ["reference", "paper"])
@pytest.mark.parametrize(("num_neighbors", "shift_bank"), [(6, False), (2, True), (0, False), (6, True)])
def test_hand_written_backward_matches_autograd(variant: str, num_neighbors: int, shift_bank: bool) -> None:
    gen = torch.Generator().manual_seed(11 + num_neighbors)
    num_entries, dim = 300, 16
    bank = _bank_with_ties(gen, num_entries, dim)
    # Repeated indices (5, 5, 5; 40, 40), and features close to their own rows so self is usually in
    # the top k; with `shift_bank` the own rows are replaced, so self is often a (reference) negative.
    indices = torch.tensor([5, 5, 5, 40, 40, 0, 299, 17, 123, 250, 6, 7])
    features = F.normalize(bank[indices] + 0.2 * torch.randn(len(indices), dim, generator=gen), dim=1)
    features[1] = features[0]  # identical rows of the batch
    if shift_bank:
        bank[indices] = torch.randn(len(indices), dim, generator=gen)
    kwargs = {"num_neighbors": num_neighbors, "margin": 0.35, "variant": variant}
    loss, feat_grad, bank_grad = _loss_and_grads(spread_out_loss, features, bank, indices, 0.1, **kwargs)
    ref_loss, ref_feat_grad, ref_bank_grad = _loss_and_grads(
        spread_out_loss_autograd, features, bank, indices, 0.1, **kwargs
    )
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(
        feat_grad, ref_feat_grad, atol=1e-6 * float(ref_feat_grad.abs().max()), rtol=1.3e-6
    )
    torch.testing.assert_close(
        bank_grad, ref_bank_grad, atol=1e-6 * float(ref_bank_grad.abs().max()), rtol=1.3e-6
    )
    # Every row of the bank receives a gradient, as through autograd (a wrong mask or scatter would not).
    assert int((bank_grad != 0).any(1).sum()) == int((ref_bank_grad != 0).any(1).sum())


def test_hand_written_backward_across_row_blocks() -> None:
    # The bank's gradient is built 1024 rows at a time: a bank of several blocks and a partial one.
    gen = torch.Generator().manual_seed(9)
    bank = _bank_with_ties(gen, 2600, 8)
    indices = torch.tensor([0, 1023, 1024, 2599, 2048, 1500])
    features = F.normalize(bank[indices] + 0.3 * torch.randn(6, 8, generator=gen), dim=1)
    ours = _loss_and_grads(spread_out_loss, features, bank, indices, 0.1)
    reference = _loss_and_grads(spread_out_loss_autograd, features, bank, indices, 0.1)
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6 * float(theirs.abs().max()), rtol=1.3e-6)


def test_hand_written_backward_zero_row_shared_tensor_and_second_backward() -> None:
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(50, 8, generator=gen)
    bank[7] = 0.0  # normalised by the eps clamp: no gradient through its norm, and no NaN
    bank[8] *= 1e-14  # shorter than the clamp's 1e-12: divided by the clamp, nothing through its norm
    indices = torch.tensor([7, 1, 8, 1])
    features = F.normalize(torch.randn(4, 8, generator=gen), dim=1)
    results = [
        _loss_and_grads(fn, features, bank, indices, 1.0)
        for fn in (spread_out_loss, spread_out_loss_autograd)
    ]
    for ours, ref in zip(*results, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref)
    # The backward turns the forward's buffer of normalised rows into the bank's gradient: a second
    # backward through the same graph (retain_graph, as the gradient diagnostics do) recomputes it and
    # must give the same gradients.
    feat = features.clone().requires_grad_(True)
    raw = bank.clone().requires_grad_(True)
    loss = spread_out_loss(feat, raw, indices)
    first = torch.autograd.grad(loss, [feat, raw], retain_graph=True)
    second = torch.autograd.grad(loss, [feat, raw])
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    # The mini-batch variant passes one tensor as both features and bank: the two gradients add up.
    shared = []
    for fn in (spread_out_loss, spread_out_loss_autograd):
        batch = features.clone().requires_grad_(True)
        fn(batch, batch, torch.arange(4), num_neighbors=1).backward()  # type: ignore[operator]
        shared.append(batch.grad)
    torch.testing.assert_close(shared[0], shared[1])


def test_hand_written_backward_without_bank_gradient() -> None:
    # A traditional memory's rows have no gradient: only the features get one, as through autograd.
    gen = torch.Generator().manual_seed(4)
    bank = torch.randn(40, 6, generator=gen)
    indices = torch.tensor([0, 3, 9])
    features = F.normalize(torch.randn(3, 6, generator=gen), dim=1)
    grads = []
    for fn in (spread_out_loss, spread_out_loss_autograd):
        feat = features.clone().requires_grad_(True)
        fn(feat, bank, indices, num_neighbors=2).backward()  # type: ignore[operator]
        grads.append(feat.grad)
    torch.testing.assert_close(grads[0], grads[1])
