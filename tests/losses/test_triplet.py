"""Batch-hard triplet: naive loop over all (anchor, positive, negative), hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualref.losses import batch_hard_triplet_loss


def _naive_batch_hard(features: torch.Tensor, labels: list[int], margin: float | None) -> float:
    """Worst triple loss per anchor over every (p, n) (the loss is monotone in d_ap - d_an).

    A positive may be the anchor itself (distance 0).
    """
    rows = features.tolist()

    def dist(i: int, j: int) -> float:
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True)))

    def triple(d_ap: float, d_an: float) -> float:
        gap = d_ap - d_an
        return math.log1p(math.exp(gap)) if margin is None else max(0.0, gap + margin)

    per_anchor = []
    for a in range(len(rows)):
        worst = None
        for p in range(len(rows)):
            for n in range(len(rows)):
                if labels[p] == labels[a] and labels[n] != labels[a]:
                    value = triple(dist(a, p), dist(a, n))
                    worst = value if worst is None else max(worst, value)
        assert worst is not None
        per_anchor.append(worst)
    return sum(per_anchor) / len(per_anchor)


@pytest.mark.parametrize("margin", [None, 0.5, 0.0])
@pytest.mark.parametrize("normalise", [False, True])
def test_matches_naive_loop(margin: float | None, normalise: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(12, 5, generator=gen)
    if normalise:
        features = F.normalize(features, dim=1)
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4]  # label 4 alone: its hardest positive is itself
    loss = batch_hard_triplet_loss(features, torch.tensor(labels), margin)
    expected = _naive_batch_hard(features, labels, margin)
    torch.testing.assert_close(loss, torch.tensor(expected), atol=2e-5, rtol=1e-5)


def test_golden_values_on_a_line() -> None:
    # Points 0, 1 (label 0) and 3 (label 1) on a line.
    # anchor 0: d_ap = 1, d_an = 3 -> gap -2;  anchor 1: d_ap = 1, d_an = 2 -> gap -1;
    # anchor 3: d_ap = 1e-6 (self, sqrt of the 1e-12 clamp), d_an = 2 -> gap -2.
    features = torch.tensor([[0.0], [1.0], [3.0]])
    labels = torch.tensor([0, 0, 1])
    soft = batch_hard_triplet_loss(features, labels)
    expected_soft = (2 * math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 3
    torch.testing.assert_close(soft, torch.tensor(expected_soft))
    # Hinge, margin 1.5: relu(-0.5), relu(0.5), relu(-0.5 + 1e-6) -> mean 0.5 / 3.
    hinge = batch_hard_triplet_loss(features, labels, margin=1.5)
    torch.testing.assert_close(hinge, torch.tensor(0.5 / 3), atol=1e-6, rtol=0)


def test_gradient_is_finite_with_duplicate_points() -> None:
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = batch_hard_triplet_loss(features, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert features.grad is not None and torch.isfinite(features.grad).all()


def test_single_label_batch_is_an_error() -> None:
    # With two labels every anchor has a negative; with one label no anchor has.
    features = torch.randn(3, 4)
    with pytest.raises(ValueError, match="two labels"):
        batch_hard_triplet_loss(features, torch.tensor([2, 2, 2]))


def test_permutation_invariant() -> None:
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(8, 6, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    perm = torch.randperm(8, generator=gen)
    torch.testing.assert_close(
        batch_hard_triplet_loss(features, labels),
        batch_hard_triplet_loss(features[perm], labels[perm]),
    )


def test_validation() -> None:
    with pytest.raises(ValueError, match="margin"):
        batch_hard_triplet_loss(torch.randn(2, 3), torch.tensor([0, 1]), margin=-0.1)
    with pytest.raises(ValueError, match="labels"):
        batch_hard_triplet_loss(torch.randn(2, 3), torch.tensor([0, 1, 2]))
