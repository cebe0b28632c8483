"""The joint objective of Dual-Refinement (paper Eq. 12, weighted as the reference code weighs it).

docs/method.md §4-5. With alpha = `refined_weight`, lambda = `ce_weight` and mu = `spread_weight`
(the config's `loss.*` of the same names):

    L = (1 - alpha) (lambda CE_coarse + Tri_coarse) + alpha (lambda CE_refined + Tri_refined) + mu L_memory

CE is the label-smoothed cross-entropy and Tri the soft-margin batch-hard triplet, under the coarse
(DBSCAN) labels and under the refined (hierarchical) labels, on the same head and the same batch;
L_memory is the IM-spread-out loss (or a Table III variant). Reference defaults: alpha 0.5, lambda 0.5
(the code's --lmd, not in the paper), mu 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


class LossTerms(NamedTuple):
    """The five scalar terms of the joint objective (a term that is switched off is a zero tensor)."""

    ce_coarse: Tensor  # CE_ls(logits, coarse labels)
    triplet_coarse: Tensor  # batch-hard triplet under the coarse labels
    ce_refined: Tensor  # CE_ls(logits, refined labels)
    triplet_refined: Tensor  # batch-hard triplet under the refined labels
    memory: Tensor  # IM-spread-out (or invariance) loss against the memory


@dataclass(frozen=True)
class LossWeights:
    """Coefficients of the joint objective."""

    ce_weight: float = 0.5  # lambda: weight of the cross-entropy terms (reference --lmd)
    refined_weight: float = 0.5  # alpha: balance of refined- vs coarse-label losses
    spread_weight: float = 0.1  # mu: weight of the memory (spread-out) loss

    def __post_init__(self) -> None:
        if self.ce_weight < 0:
            raise ValueError(f"ce_weight={self.ce_weight!r} is not valid; expected >= 0")
        if not 0.0 <= self.refined_weight <= 1.0:
            raise ValueError(f"refined_weight={self.refined_weight!r} is not valid; expected 0..1")
        if self.spread_weight < 0:
            raise ValueError(f"spread_weight={self.spread_weight!r} is not valid; expected >= 0")


def dual_refinement_objective(terms: LossTerms, weights: LossWeights) -> Tensor:
    """Total loss L = (1-a)(l CE_c + Tri_c) + a(l CE_r + Tri_r) + mu L_mem (paper Eq. 12, code weights).

    Args:
        terms: the five scalar loss terms.
        weights: alpha (`refined_weight`), lambda (`ce_weight`), mu (`spread_weight`).

    Returns:
        Scalar total loss (differentiable through every term with a nonzero weight).
    """
    alpha, lam = weights.refined_weight, weights.ce_weight
    coarse = lam * terms.ce_coarse + terms.triplet_coarse
    refined = lam * terms.ce_refined + terms.triplet_refined
    return (1.0 - alpha) * coarse + alpha * refined + weights.spread_weight * terms.memory


def weighted_terms(terms: LossTerms, weights: LossWeights) -> dict[str, Tensor]:
    """Each term times its coefficient in the objective; they sum to `dual_refinement_objective`.

    Returns:
        name -> scalar: ce_coarse = (1-a) l CE_c, triplet_coarse = (1-a) Tri_c, ce_refined = a l CE_r,
        triplet_refined = a Tri_r, memory = mu L_mem.
    """
    alpha, lam = weights.refined_weight, weights.ce_weight
    factors = (
        (1.0 - alpha) * lam,
        1.0 - alpha,
        alpha * lam,
        alpha,
        weights.spread_weight,
    )
    return {name: factor * term for name, factor, term in zip(LossTerms._fields, factors, terms, strict=True)}
