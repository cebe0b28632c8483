"""The joint objective combines its terms exactly like the formula in its docstring (paper Eq. 12)."""

from __future__ import annotations

import pytest
import torch

from dualref.losses import LossTerms, LossWeights, dual_refinement_objective


def _weights(lam: float, alpha: float, mu: float) -> LossWeights:
    return LossWeights(ce_weight=lam, refined_weight=alpha, spread_weight=mu)


def _terms(values: tuple[float, float, float, float, float]) -> LossTerms:
    return LossTerms(*(torch.tensor(v, requires_grad=True) for v in values))


def test_golden_value_with_reference_weights() -> None:
    # alpha 0.5, lambda 0.5, mu 0.1 on CE_c=2, Tri_c=1, CE_r=4, Tri_r=3, L_mem=10, by hand:
    # 0.5 * (0.5*2 + 1) + 0.5 * (0.5*4 + 3) + 0.1 * 10 = 0.5*2 + 0.5*5 + 1 = 4.5
    terms = _terms((2.0, 1.0, 4.0, 3.0, 10.0))
    total = dual_refinement_objective(terms, _weights(0.5, 0.5, 0.1))
    assert total.item() == pytest.approx(4.5)


def test_golden_value_with_unequal_weights() -> None:
    # alpha 0.25, lambda 2, mu 0.5 on (1, 2, 3, 4, 6):
    # 0.75 * (2*1 + 2) + 0.25 * (2*3 + 4) + 0.5 * 6 = 3 + 2.5 + 3 = 8.5
    terms = _terms((1.0, 2.0, 3.0, 4.0, 6.0))
    total = dual_refinement_objective(terms, _weights(2.0, 0.25, 0.5))
    assert total.item() == pytest.approx(8.5)


def test_gradients_are_the_formula_coefficients() -> None:
    alpha, lam, mu = 0.3, 0.7, 0.2
    terms = _terms((1.0, 1.0, 1.0, 1.0, 1.0))
    dual_refinement_objective(terms, _weights(lam, alpha, mu)).backward()
    grads = [t.grad.item() for t in terms]  # type: ignore[union-attr]
    expected = [(1 - alpha) * lam, 1 - alpha, alpha * lam, alpha, mu]
    assert grads == pytest.approx(expected)


def test_ablation_weights_switch_terms_off() -> None:
    terms = _terms((1.0, 2.0, 30.0, 40.0, 500.0))
    baseline = dual_refinement_objective(terms, _weights(0.5, 0.0, 0.0))
    assert baseline.item() == pytest.approx(0.5 * 1 + 2)  # refined and memory terms ignored
    refined_only = dual_refinement_objective(terms, LossWeights(refined_weight=1.0, spread_weight=0.0))
    assert refined_only.item() == pytest.approx(0.5 * 30 + 40)


def test_random_terms_match_a_naive_expression() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        values = torch.rand(5, generator=generator) * 10
        lam, alpha, mu = (torch.rand(3, generator=generator) * torch.tensor([2.0, 1.0, 1.0])).tolist()
        total = dual_refinement_objective(
            LossTerms(*values), _weights(lam, alpha, mu)
        )
        ce_c, tri_c, ce_r, tri_r, mem = values.tolist()
        naive = (1 - alpha) * lam * ce_c + (1 - alpha) * tri_c + alpha * lam * ce_r + alpha * tri_r + mu * mem
        assert total.item() == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ce_weight": -1.0}, "ce_weight"),
        ({"refined_weight": 1.5}, "refined_weight"),
        ({"spread_weight": -0.1}, "spread_weight"),
    ],
)
def test_invalid_weights_are_rejected(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LossWeights(**kwargs)
