"""Cross-entropy with label smoothing (docs/method.md §2, "CE_ls")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy_with_label_smoothing(
    logits: Tensor, labels: Tensor, epsilon: float = 0.1
) -> Tensor:
    """Batch mean of -sum_k q_k log p_k with the smoothed target q = (1 - eps) one-hot + eps / K.

    Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016, §7; as the reference uses it.
    Computed in float32 even under autocast.

    Args:
        logits: [B, K] classifier scores.
        labels: [B] int64 targets in [0, K).
        epsilon: Smoothing mass eps in [0, 1) (reference: 0.1); 0 gives the plain cross-entropy.

    Returns:
        Scalar loss.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, K], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon!r}")
    num_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}] (outliers, label -1, are never trained on)"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_probs = F.log_softmax(logits.float(), dim=1)  # [B, K]
        true_class = log_probs.gather(1, labels.long().unsqueeze(1)).squeeze(1)  # [B]
        per_sample = -(1.0 - epsilon) * true_class - (epsilon / num_classes) * log_probs.sum(1)
        return per_sample.mean()
