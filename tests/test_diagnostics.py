"""Training diagnostics: gradient shares, bank drift, bank-neighbour precision, on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualref import diagnostics


def test_gradient_norms_match_hand_computed_gradients() -> None:
    at = torch.tensor([[1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    hidden = at * 2.0  # the terms see `at` through another op, as the losses see the pooled feature
    terms = {
        "a": (hidden**2).sum() * 0.5,  # d/d at = 0.5 * 2 * hidden * 2 = 4 at
        "b": hidden.sum() * 3.0,  # d/d at = 6 everywhere
        "off": torch.zeros(()),  # a switched-off term: a constant
    }
    record = diagnostics.gradient_norms(terms, at)
    expected_a = float((4 * at.detach()).norm())
    expected_b = float(torch.full((2, 2), 6.0).norm())
    assert record["grad_a"] == pytest.approx(expected_a)
    assert record["grad_b"] == pytest.approx(expected_b)
    assert record["grad_off"] == 0.0
    assert record["grad_share_a"] == pytest.approx(expected_a / (expected_a + expected_b))
    assert record["grad_share_off"] == 0.0
    assert at.grad is None  # nothing accumulated: the training step that follows is unchanged


def test_bank_drift_cosine_and_norm() -> None:
    initial = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    record = diagnostics.bank_drift(bank, initial)
    assert record["bank_cosine_to_initial"] == pytest.approx((1.0 + 2**-0.5) / 2)
    assert record["bank_row_norm"] == pytest.approx((2.0 + 2**0.5) / 2)


def test_drift_follows_every_row_of_a_small_bank_and_every_kth_of_a_large_one() -> None:
    assert diagnostics.drift_rows(5).tolist() == [0, 1, 2, 3, 4]
    assert diagnostics.drift_rows(diagnostics.DRIFT_ROWS).tolist() == list(range(diagnostics.DRIFT_ROWS))
    market = diagnostics.drift_rows(12936)  # ceil(12936 / 2048) = 7: rows 0, 7, ..., 12929
    assert market.tolist() == list(range(0, 12936, 7)) and len(market) == 1848
    # Only the followed rows enter the cosine; the norm is over every row.
    initial = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bank = torch.tensor([[2.0, 0.0], [5.0, 5.0], [0.0, 3.0]])
    record = diagnostics.bank_drift(bank, initial, torch.tensor([0, 2]))
    assert record["bank_cosine_to_initial"] == pytest.approx(1.0)
    assert record["bank_row_norm"] == pytest.approx((2.0 + 50**0.5 + 3.0) / 3)


def test_nearest_bank_entries_equal_a_brute_force_search_and_exclude_self() -> None:
    torch.manual_seed(0)
    features = F.normalize(torch.randn(37, 8), dim=1)
    bank = torch.randn(37, 8) * 3.0  # raw rows: normalised inside
    found = diagnostics.nearest_bank_entries(features, bank, 4, chunk_size=5)
    sim = features @ F.normalize(bank, dim=1).T
    sim.fill_diagonal_(float("-inf"))
    assert torch.equal(found, sim.topk(4, dim=1).indices)
    assert not (found == torch.arange(37)[:, None]).any()


def test_neighbour_precision_counts_same_identity_neighbours() -> None:
    pids = np.array([0, 0, 1, 1])
    neighbours = np.array([[1, 2], [0, 1], [3, 0], [0, 1]])  # row 1 lists itself: counted as it is given
    # row 0: 1/2, row 1: 2/2, row 2: 1/2, row 3: 0/2
    assert diagnostics.neighbour_precision(neighbours, pids) == pytest.approx(0.5)


def test_nearest_bank_entries_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="expected"):
        diagnostics.nearest_bank_entries(torch.zeros(3, 2), torch.zeros(4, 2), 1)
