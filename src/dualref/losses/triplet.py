"""Batch-hard triplet loss, soft-margin (reference) or hinge (paper) form.

Hermans et al., "In Defense of the Triplet Loss for Person Re-Identification", 2017, §2 (batch hard,
soft margin). docs/method.md §2: the reference uses the soft-margin form everywhere; the
paper states a hinge with margin 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pairwise_euclidean_distance(features: Tensor) -> Tensor:
    """[B, B] Euclidean distances sqrt(max(|a|^2 + |b|^2 - 2 a.b, 1e-12)) between rows of [B, D].

    The clamp (as in the reference) keeps the square root differentiable; the diagonal is 1e-6.
    """
    squared_norms = features.pow(2).sum(1)  # [B]
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * features @ features.T
    return squared.clamp(min=1e-12).sqrt()


def batch_hard_triplet_loss(
    features: Tensor, labels: Tensor, margin: float | None = None
) -> Tensor:
    """Batch-hard triplet loss.

    For each anchor a: d_ap = largest distance to a sample of its label (itself included, so a
    sample alone in its label has d_ap = 1e-6), d_an = smallest distance to a sample of another
    label. Per anchor: softplus(d_ap - d_an) when `margin` is None (the reference's soft margin,
    its ``--margin 0``), else relu(d_ap - d_an + margin) (the paper: 0.5). Every anchor has a
    negative as soon as the batch holds two labels; a batch of one label is an error. Computed in
    float32 even under autocast.

    Args:
        features: [B, D] embeddings (pre-BN pooled or L2-normalised BN features).
        labels: [B] integer training labels.
        margin: None for the soft-margin form, else the hinge margin (>= 0).

    Returns:
        Scalar loss: mean over anchors.

    Raises:
        ValueError: Bad shapes, a negative margin, or no anchor has a negative (one label only).
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [B, D], got shape {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels must be [{features.shape[0]}], got shape {tuple(labels.shape)}")
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be None (soft margin) or >= 0, got {margin!r}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        dist = pairwise_euclidean_distance(features.float())  # [B, B]
        same = labels[:, None] == labels[None, :]  # [B, B], diagonal True
        hardest_positive = dist.masked_fill(~same, float("-inf")).amax(1)  # [B]
        hardest_negative = dist.masked_fill(same, float("inf")).amin(1)  # [B]
        if not bool((~same).any()):
            raise ValueError(
                "batch_hard_triplet_loss needs at least two labels in the batch; "
                f"got only label {labels[0].item() if labels.numel() else None!r}"
            )
        gap = hardest_positive - hardest_negative  # [B]
        per_anchor = F.softplus(gap) if margin is None else F.relu(gap + margin)
        return per_anchor.mean()
