"""Exemplar / neighbourhood invariance loss against a memory (Table III's "IN" row).

Zhong et al., "Invariance Matters: Exemplar Memory for Domain Adaptive Person Re-identification"
(ECN), CVPR 2019, §3.3, Eqs. (3)-(6). Each target image is its own class; its probability of being
memory entry j is a softmax over the similarities to every (normalised) memory row,

    p(j | x_b) = exp(<f_b, v̂_j> / T) / sum_k exp(<f_b, v̂_k> / T),

and the loss is the weighted negative log-likelihood -sum_j w_bj log p(j | x_b), with w = 1 for the
image's own entry (exemplar invariance) and, for neighbourhood invariance, w = 1 / k for each of its
k most similar other entries (ECN's Eq. 6; ECN uses k = 6, T = 0.05). The memory used with it in the
paper's Table III is the momentum-updated "traditional" one (`MomentumMemoryBank`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def invariance_loss(
    features: Tensor,
    bank: Tensor,
    indices: Tensor,
    *,
    temperature: float = 0.05,
    num_neighbors: int = 0,
) -> Tensor:
    """ECN exemplar (+ optional neighbourhood) invariance loss, batch mean.

    Args:
        features: [B, D] L2-normalised batch features.
        bank: [N, D] memory rows (normalised here; without gradient for a traditional memory).
        indices: [B] int64 dataset indices of the batch: the target class of each sample.
        temperature: T of the softmax (ECN: 0.05).
        num_neighbors: k most similar other entries each weighted 1/k (0 = exemplar invariance only).

    Returns:
        Scalar loss.
    """
    if features.dim() != 2 or bank.dim() != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(
            f"features must be [B, D] and bank [N, D] with the same D; "
            f"got {tuple(features.shape)} and {tuple(bank.shape)}"
        )
    if indices.shape != features.shape[:1] or indices.dtype.is_floating_point:
        raise ValueError(
            f"indices must be an integer tensor of shape [{features.shape[0]}], "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; expected > 0")
    num_entries = bank.shape[0]
    if not 0 <= num_neighbors < num_entries:
        raise ValueError(f"num_neighbors={num_neighbors!r}; expected 0 <= k < N={num_entries}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        sim = features.float() @ F.normalize(bank.float(), dim=1).T  # [B, N]
        log_probs = F.log_softmax(sim / temperature, dim=1)  # [B, N]
        loss = -log_probs.gather(1, indices.long().unsqueeze(1)).squeeze(1)  # [B] exemplar term
        if num_neighbors > 0:
            # Neighbours are chosen on the similarities without gradient, own entry excluded.
            masked = sim.detach().scatter(1, indices.long().unsqueeze(1), float("-inf"))
            neighbor_idx = masked.topk(num_neighbors, dim=1).indices  # [B, k]
            loss = loss - log_probs.gather(1, neighbor_idx).mean(1)
        return loss.mean()
