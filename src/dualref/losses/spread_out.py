"""IM-spread-out loss against the instant memory bank (docs/method.md §5; paper Eq. 9).

For a sample b with L2-normalised feature f_b and dataset index i_b, with similarities
s_j = <f_b, v̂_j> to every normalised bank row v̂_j (N rows), a positive set P_b and a negative set
Neg_b of similarity values:

    loss_b = log(1 + sum_{p in P_b} sum_{n in Neg_b} exp(s_n - s_p + m))

and the loss is the mean over the batch. The double sum factorises,

    sum_p sum_n exp(s_n - s_p + m) = exp(m) * (sum_n exp(s_n)) * (sum_p exp(-s_p)),

so loss_b = softplus(m + logsumexp_n(s_n) + logsumexp_p(-s_p)): stable in log space and never
materialising the B x |Neg| x |P| tensor (the reference's, about 5.8 M entries on Market).

Variants (`variant=`):

* "reference" (default, the authors' code): sort s descending. P_b = {s_self} plus the first k
  sorted values, k + 1 values; as f_b is close to its own bank row, self is usually the first sorted
  value too and so counts twice. Neg_b = sorted positions k .. N-2: the single least similar entry is
  dropped, and self is a negative whenever it falls outside the top k.
* "paper": P_b = {s_self} plus the k most similar entries other than self; Neg_b = every other
  entry (self is never a negative, nothing is dropped).

Gradients flow through the selected similarity values (as autograd through sort values does) into
the features and, through the row normalisation, into every row of the raw bank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

VARIANTS = ("reference", "paper")


def spread_out_loss(
    features: Tensor,
    bank: Tensor,
    indices: Tensor,
    num_neighbors: int = 6,
    margin: float = 0.35,
    variant: str = "reference",
) -> Tensor:
    """IM-spread-out loss, batch mean.

    Computed in float32 with autocast disabled: similarities differ in the third decimal and there
    are ~1e4 negatives, so bf16 would blur the ranking and the sums.

    Args:
        features: [B, D] L2-normalised features f (the BN-neck feature, as in the reference).
        bank: [N, D] raw memory-bank rows (a trainable parameter); rows are normalised here.
        indices: [B] int64 dataset indices of the batch (rows of `bank`); repeats are allowed.
        num_neighbors: k, bank entries counted as positives besides self (reference: 6).
        margin: m inside the exponent (reference: 0.35).
        variant: "reference" (the authors' code) or "paper"; see the module docstring.

    Returns:
        Scalar loss.

    Raises:
        ValueError: Bad shapes, dtypes, indices out of range, an unknown variant, or a bank too
            small to leave at least one negative (N < num_neighbors + 2).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown spread-out variant {variant!r}; expected one of {VARIANTS}")
    if features.dim() != 2 or bank.dim() != 2 or features.shape[1] != bank.shape[1]:
        raise ValueError(
            f"features must be [B, D] and bank [N, D] with the same D; "
            f"got {tuple(features.shape)} and {tuple(bank.shape)}"
        )
    num_entries = bank.shape[0]
    if indices.shape != features.shape[:1] or indices.dtype.is_floating_point:
        raise ValueError(
            f"indices must be an integer tensor of shape [{features.shape[0]}], "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_entries):
        raise ValueError(
            f"indices must lie in [0, {num_entries}), got range "
            f"[{int(indices.min())}, {int(indices.max())}]"
        )
    if num_neighbors < 0 or num_entries < num_neighbors + 2:
        raise ValueError(
            f"num_neighbors must be >= 0 and leave at least one negative among the "
            f"{num_entries} bank entries (N >= num_neighbors + 2); got {num_neighbors!r}"
        )
    with torch.autocast(device_type=features.device.type, enabled=False):
        bank_unit = F.normalize(bank.float(), dim=1)  # [N, D]
        sim = features.float() @ bank_unit.T  # [B, N]
        self_idx = indices.long().unsqueeze(1)  # [B, 1]
        self_sim = sim.gather(1, self_idx)  # [B, 1]
        if variant == "reference":
            neighbor_sim, neighbor_idx = sim.topk(num_neighbors, dim=1)  # [B, k], descending
            # Negatives = sorted positions k..N-2: everything but the top k and the minimum.
            not_negative = torch.zeros_like(sim, dtype=torch.bool)
            not_negative.scatter_(1, neighbor_idx, True)
            # The least similar entry outside the top k (so ties never merge the two exclusions).
            least_idx = sim.masked_fill(not_negative, float("inf")).argmin(dim=1, keepdim=True)
            not_negative.scatter_(1, least_idx, True)
        else:
            others = sim.scatter(1, self_idx, float("-inf"))  # self can never be a neighbour
            neighbor_sim, neighbor_idx = others.topk(num_neighbors, dim=1)  # [B, k]
            not_negative = torch.zeros_like(sim, dtype=torch.bool)
            not_negative.scatter_(1, neighbor_idx, True)
            not_negative.scatter_(1, self_idx, True)
        positive_sim = torch.cat([self_sim, neighbor_sim], dim=1)  # [B, k + 1]
        log_negatives = torch.logsumexp(sim.masked_fill(not_negative, float("-inf")), dim=1)  # [B]
        log_positives = torch.logsumexp(-positive_sim, dim=1)  # [B]
        return F.softplus(margin + log_negatives + log_positives).mean()
