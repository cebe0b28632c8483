"""Loss functions of source training and Dual-Refinement adaptation."""

from dualref.losses.cross_entropy import cross_entropy_with_label_smoothing
from dualref.losses.memory_losses import invariance_loss
from dualref.losses.objective import LossTerms, LossWeights, dual_refinement_objective
from dualref.losses.spread_out import spread_out_loss
from dualref.losses.triplet import batch_hard_triplet_loss, pairwise_euclidean_distance

__all__ = [
    "LossTerms",
    "LossWeights",
    "batch_hard_triplet_loss",
    "cross_entropy_with_label_smoothing",
    "dual_refinement_objective",
    "invariance_loss",
    "pairwise_euclidean_distance",
    "spread_out_loss",
]
