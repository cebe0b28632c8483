"""IM-spread-out loss against the instant memory bank (docs/method.md §5; paper Eq. 9).

For a sample b with L2-normalised feature f_b and dataset index i_b, with similarities
s_j = <f_b, v̂_j> to every normalised bank row v̂_j = v_j / max(|v_j|, 1e-12) (N rows), a positive set
P_b and a negative set Neg_b of similarity values:

    loss_b = log(1 + sum_{p in P_b} sum_{n in Neg_b} exp(s_n - s_p + m))

and the loss is the mean over the batch. The double sum factorises,

    sum_p sum_n exp(s_n - s_p + m) = exp(m) * (sum_n exp(s_n)) * (sum_p exp(-s_p)),

so loss_b = softplus(z_b) with z_b = m + logsumexp_n(s_n) + logsumexp_p(-s_p): stable in log space and
never materialising the B x |Neg| x |P| tensor (the reference's, about 5.8 M entries on Market).

Variants (`variant=`):

* "reference" (default, the authors' code): sort s descending. P_b = {s_self} plus the first k
  sorted values, k + 1 values; as f_b is close to its own bank row, self is usually the first sorted
  value too and so counts twice. Neg_b = sorted positions k .. N-2: the single least similar entry is
  dropped, and self is a negative whenever it falls outside the top k. Only the top k and the least
  similar entry are needed, so a top-k and an arg-min replace the sort.
* "paper": P_b = {s_self} plus the k most similar entries other than self; Neg_b = every other
  entry (self is never a negative, nothing is dropped).

Gradients flow through the selected similarity values (as autograd through sort values does) into
the features and, through the row normalisation, into every row of the raw bank. With
c_b = sigmoid(z_b) / B (times the incoming gradient):

    dL/ds_bj = c_b * (softmax over Neg_b of s_b)_j * [j in Neg_b]
               - c_b * sum_{p in P_b, column(p) = j} (softmax over P_b of -s_b)_p
    dL/df = G v̂  (G = [dL/ds_bj], [B, N]),    dL/dv̂ = G^T f,
    dL/dv_j = (dL/dv̂_j - v̂_j <dL/dv̂_j, v̂_j>) / |v_j|     (rows shorter than 1e-12: dL/dv̂_j / 1e-12).

`spread_out_loss` computes them in one custom backward: G from the saved [B, N] similarities and
logsumexps, the two matrix products, and the normalisation's backward block of rows by block of rows,
written into the forward's [N, D] buffer of v̂, which becomes the bank's gradient. The autograd graph
instead makes half a dozen fresh [N, D] tensors (66 MB each at Market size, whose page faults cost
more than the arithmetic on a CPU). It performs autograd's own operations in autograd's order, so its
loss and gradients equal those of `spread_out_loss_autograd` (the plain formulation, kept as the
reference) bit for bit on the CPU; tests check them to float32 rounding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

VARIANTS = ("reference", "paper")
NORM_EPS = 1e-12  # F.normalize's default: rows shorter than this are divided by it instead


class Pairs(NamedTuple):
    """Which similarity values of each row are positives and which are negatives."""

    positive_idx: Tensor  # [B, k + 1] int64 columns: self, then the k neighbours (a column may repeat)
    not_negative: Tensor  # [B, N] bool: True where the entry is not a negative


def select_pairs(sim: Tensor, indices: Tensor, num_neighbors: int, variant: str) -> Pairs:
    """The positives and negatives of every row of `sim` (see the module docstring).

    Args:
        sim: [B, N] similarities to the normalised bank rows.
        indices: [B] int64 column of each row's own entry.
        num_neighbors: k.
        variant: "reference" or "paper".
    """
    self_idx = indices.long().unsqueeze(1)  # [B, 1]
    if variant == "reference":
        neighbor_idx = sim.topk(num_neighbors, dim=1).indices  # [B, k], descending
        # Negatives = sorted positions k..N-2: everything but the top k and the minimum.
        not_negative = torch.zeros_like(sim, dtype=torch.bool)
        not_negative.scatter_(1, neighbor_idx, True)
        # The least similar entry outside the top k (so ties never merge the two exclusions).
        least_idx = sim.masked_fill(not_negative, float("inf")).argmin(dim=1, keepdim=True)
        not_negative.scatter_(1, least_idx, True)
    else:
        others = sim.scatter(1, self_idx, float("-inf"))  # self can never be a neighbour
        neighbor_idx = others.topk(num_neighbors, dim=1).indices  # [B, k]
        not_negative = torch.zeros_like(sim, dtype=torch.bool)
        not_negative.scatter_(1, neighbor_idx, True)
        not_negative.scatter_(1, self_idx, True)
    return Pairs(torch.cat([self_idx, neighbor_idx], dim=1), not_negative)


def similarity_gradient(
    grad_z: Tensor,
    masked_sim: Tensor,
    log_negatives: Tensor,
    neg_positive_sim: Tensor,
    log_positives: Tensor,
    pairs: Pairs,
) -> Tensor:
    """G = dL/ds [B, N] from dL/dz: softmax weights over the negatives, minus those over the positives.

    The operations are autograd's for ``logsumexp(masked_sim)``, ``masked_fill``, ``logsumexp(-pos)``,
    ``gather`` and ``topk``, in its order; an entry receives at most two terms (a negative or a
    neighbour, plus self), so the order of the scatter-add does not change the rounding.

    Args:
        grad_z: [B] dL/dz_b.
        masked_sim: [B, N] similarities with the non-negatives set to -inf.
        log_negatives: [B] logsumexp of `masked_sim`.
        neg_positive_sim: [B, k + 1] minus the positive similarities.
        log_positives: [B] logsumexp of `neg_positive_sim`.
        pairs: the selection the forward used.
    """
    grad_z = grad_z.unsqueeze(1)  # [B, 1]
    grad = (grad_z * (masked_sim - log_negatives.unsqueeze(1)).exp()).masked_fill_(pairs.not_negative, 0)
    grad_positive = (grad_z * (neg_positive_sim - log_positives.unsqueeze(1)).exp()).neg_()  # [B, k + 1]
    return grad.scatter_add_(1, pairs.positive_idx, grad_positive)


def normalize_backward_(grad_unit: Tensor, bank: Tensor, unit: Tensor, norm: Tensor, denom: Tensor) -> Tensor:
    """dL/dv from dL/dv̂ for v̂ = v / max(|v|, eps), in place: (dL/dv̂ - v̂ <dL/dv̂, v̂>) / |v| per row.

    (dL/dv̂ / eps for a row shorter than eps: the clamp passes no gradient to |v|.)

    Autograd's arithmetic for ``F.normalize`` (the division's two backwards, the norm's backward,
    their sum), written into `unit` and `grad_unit` instead of fresh tensors.

    Args:
        grad_unit: [R, D] dL/dv̂ of R rows; overwritten (scratch).
        bank: [R, D] raw rows v.
        unit: [R, D] v / denom, as the forward computed it; overwritten with the result.
        norm: [R, 1] |v|.
        denom: [R, 1] max(|v|, eps).

    Returns:
        `unit`, now dL/dv [R, D].
    """
    # Through the denominator: -sum_d dL/dv̂ * v / denom^2, zero where the clamp was active.
    radial = unit.div_(denom).mul_(grad_unit).sum(1, keepdim=True).neg_()  # [R, 1]
    radial = torch.where(norm >= NORM_EPS, radial, torch.zeros((), dtype=radial.dtype, device=radial.device))
    # Through |v|: radial * v / |v|. Autograd divides by |v|; where radial is not zero |v| = denom, and
    # elsewhere dividing by denom avoids 0 / 0 on an all-zero row.
    torch.div(bank, denom, out=unit).mul_(radial)
    return unit.add_(grad_unit.div_(denom))


def bank_gradient_(
    grad_sim: Tensor,
    features: Tensor,
    bank: Tensor,
    unit: Tensor,
    norm: Tensor,
    denom: Tensor,
    block_rows: int = 1024,
) -> Tensor:
    """dL/dv = `normalize_backward_`(G^T f), block of rows by block of rows, written into `unit`.

    Each row of G^T f is its own dot products over the batch, so row blocks give the same bits as the
    whole product (checked at Market size), but need only a [block_rows, D] scratch instead of a fresh
    [N, D] tensor, and each block's passes run in cache.

    Args:
        grad_sim: [B, N] G = dL/ds.
        features: [B, D] f.
        bank: [N, D] raw rows v.
        unit: [N, D] v / denom from the forward; overwritten with the result.
        norm: [N, 1] |v|; denom: [N, 1] max(|v|, eps).
        block_rows: rows per block.

    Returns:
        `unit`, now dL/dv [N, D].
    """
    num_rows = bank.shape[0]
    scratch = unit.new_empty(min(block_rows, num_rows), unit.shape[1])
    for start in range(0, num_rows, block_rows):
        rows = slice(start, min(start + block_rows, num_rows))
        grad_unit = torch.mm(grad_sim.t()[rows], features, out=scratch[: rows.stop - start])  # dL/dv̂
        normalize_backward_(grad_unit, bank[rows], unit[rows], norm[rows], denom[rows])
    return unit


class _SpreadOut(torch.autograd.Function):
    """The spread-out loss with its gradient written by hand (the module docstring's formulas)."""

    @staticmethod
    def forward(
        ctx: Any,
        features: Tensor,
        bank: Tensor,
        indices: Tensor,
        num_neighbors: int,
        margin: float,
        variant: str,
    ) -> Tensor:
        norm = bank.norm(2, 1, keepdim=True)  # [N, 1]; F.normalize's operations, so the same bits
        denom = norm.clamp_min(NORM_EPS)
        unit = bank / denom  # [N, D]
        sim = features @ unit.T  # [B, N]
        pairs = select_pairs(sim, indices, num_neighbors, variant)
        masked_sim = sim.masked_fill(pairs.not_negative, float("-inf"))
        log_negatives = torch.logsumexp(masked_sim, dim=1)  # [B]
        neg_positive_sim = -sim.gather(1, pairs.positive_idx)  # [B, k + 1]
        log_positives = torch.logsumexp(neg_positive_sim, dim=1)  # [B]
        z = margin + log_negatives + log_positives  # [B]
        ctx.save_for_backward(
            features, bank, norm, denom, masked_sim, log_negatives, neg_positive_sim, log_positives, z
        )
        ctx.pairs = pairs
        ctx.unit = unit  # not saved for backward: the backward writes the bank's gradient into it
        return F.softplus(z).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        features, bank, norm, denom, masked_sim, log_negatives, neg_positive_sim, log_positives, z = (
            ctx.saved_tensors
        )
        # The forward's v̂, consumed here (it becomes the bank's gradient); a second backward through
        # the graph (retain_graph, as the gradient diagnostics do) recomputes it, with the same
        # operation and so the same bits.
        unit: Tensor = ctx.unit if ctx.unit is not None else bank / denom
        ctx.unit = None
        with torch.autocast(device_type=grad_loss.device.type, enabled=False):
            # The mean's and softplus's (beta 1, threshold 20) backwards, as autograd computes them.
            grad_z = torch.ops.aten.softplus_backward(grad_loss.expand(z.shape) / z.numel(), z, 1, 20)
            grad_sim = similarity_gradient(
                grad_z, masked_sim, log_negatives, neg_positive_sim, log_positives, ctx.pairs
            )
            grad_features = grad_sim.mm(unit) if ctx.needs_input_grad[0] else None
            grad_bank = (
                bank_gradient_(grad_sim, features, bank, unit, norm, denom)
                if ctx.needs_input_grad[1]
                else None
            )
        return grad_features, grad_bank, None, None, None, None


def _check_arguments(
    features: Tensor, bank: Tensor, indices: Tensor, num_neighbors: int, variant: str
) -> None:
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
            f"indices must lie in [0, {num_entries}), got range [{int(indices.min())}, {int(indices.max())}]"
        )
    if num_neighbors < 0 or num_entries < num_neighbors + 2:
        raise ValueError(
            f"num_neighbors must be >= 0 and leave at least one negative among the "
            f"{num_entries} bank entries (N >= num_neighbors + 2); got {num_neighbors!r}"
        )


def spread_out_loss(
    features: Tensor,
    bank: Tensor,
    indices: Tensor,
    num_neighbors: int = 6,
    margin: float = 0.35,
    variant: str = "reference",
) -> Tensor:
    """IM-spread-out loss, batch mean, with the hand-written backward (see the module docstring).

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
    _check_arguments(features, bank, indices, num_neighbors, variant)
    with torch.autocast(device_type=features.device.type, enabled=False):
        loss: Tensor = _SpreadOut.apply(
            features.float(), bank.float(), indices, num_neighbors, margin, variant
        )
    return loss


def spread_out_loss_autograd(
    features: Tensor,
    bank: Tensor,
    indices: Tensor,
    num_neighbors: int = 6,
    margin: float = 0.35,
    variant: str = "reference",
) -> Tensor:
    """`spread_out_loss` through the plain autograd graph: the reference its hand-written backward must match.

    Same arguments, value and gradients; several times slower on a large bank (each [N, D] step of the
    graph allocates a fresh tensor).
    """
    _check_arguments(features, bank, indices, num_neighbors, variant)
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
