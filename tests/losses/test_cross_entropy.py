"""Cross-entropy with label smoothing: hand-computed values, naive reference, validation."""

from __future__ import annotations

import math

import pytest
import torch

from dualref.losses import cross_entropy_with_label_smoothing


def test_golden_value_uniform_logits() -> None:
    # Equal logits: log p_k = -log K for every k, and the smoothed target sums to 1,
    # so the loss is log K whatever epsilon and label.
    logits = torch.zeros(3, 4)
    labels = torch.tensor([0, 3, 1])
    loss = cross_entropy_with_label_smoothing(logits, labels, epsilon=0.1)
    torch.testing.assert_close(loss, torch.tensor(math.log(4.0)))


def test_golden_value_two_classes() -> None:
    # logits (0, ln 3): p = (1/4, 3/4). Label 1, eps 0.2, K 2: target (0.1, 0.9).
    # loss = -(0.1 ln 1/4 + 0.9 ln 3/4) = 0.1 ln 4 + 0.9 ln 4/3.
    logits = torch.tensor([[0.0, math.log(3.0)]])
    loss = cross_entropy_with_label_smoothing(logits, torch.tensor([1]), epsilon=0.2)
    expected = 0.1 * math.log(4.0) + 0.9 * math.log(4.0 / 3.0)
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_matches_naive_sum_and_plain_ce() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=gen) * 3
    labels = torch.randint(0, 5, (6,), generator=gen)
    epsilon = 0.1
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        for k, value in enumerate(row):
            target = (1 - epsilon) * (k == label) + epsilon / 5
            total -= target * (value - log_norm)
    loss = cross_entropy_with_label_smoothing(logits, labels, epsilon)
    torch.testing.assert_close(loss, torch.tensor(total / 6))
    torch.testing.assert_close(
        cross_entropy_with_label_smoothing(logits, labels, 0.0),
        torch.nn.functional.cross_entropy(logits, labels),
    )


def test_float32_output_for_half_logits() -> None:
    logits = torch.randn(4, 3).to(torch.bfloat16)
    loss = cross_entropy_with_label_smoothing(logits, torch.tensor([0, 1, 2, 0]))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("labels", "epsilon", "match"),
    [
        (torch.tensor([0, 3]), 0.1, r"\[0, 3\)"),
        (torch.tensor([-1, 0]), 0.1, "outliers"),
        (torch.tensor([0]), 0.1, r"labels must be \[2\]"),
        (torch.tensor([0, 1]), 1.0, "epsilon"),
    ],
)
def test_validation(labels: torch.Tensor, epsilon: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cross_entropy_with_label_smoothing(torch.zeros(2, 3), labels, epsilon)
