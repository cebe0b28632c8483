"""Training diagnostics: what a researcher reads when adaptation does not work (docs/study.md).

Cheap enough to stay on. Label-free figures may be logged at any time; the two functions that read target
ground truth (`neighbour_precision`) say so and are called by the pipeline's monitoring only, never by
training code.

- `gradient_norms`: each weighted loss term's gradient norm at the trunk's output (the pooled feature)
  and its share of their sum: which term drives the network.
- `bank_drift`: how far the instant memory bank moved from its initial rows, and its row norms.
- `neighbour_precision` (MONITORING ONLY): the share of the k nearest bank entries of each feature that
  hold its identity: the precision of the spread-out loss's positives.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dualref import distributed

DRIFT_ROWS = 2048  # bank rows followed by the drift diagnostic (`drift_rows`)


def gradient_norms(
    weighted_terms: Mapping[str, Tensor], at: Tensor, ranks: distributed.Ranks = distributed.SINGLE
) -> dict[str, float]:
    """Norm of each term's gradient with respect to `at`, and each term's share of their sum.

    Uses `torch.autograd.grad` with the graph retained: nothing accumulates into `.grad`, no random
    number is drawn, so the training step that follows is unchanged.

    Args:
        weighted_terms: name -> scalar term, already multiplied by its coefficient in the objective
            (a switched-off term may be a constant without gradient).
        at: the tensor the norms are measured at, e.g. the [B, D] pooled trunk feature.
        ranks: under torchrun `at` is this rank's rows before `distributed.gather_rows`: the squared
            norms are summed over the ranks and the gather's factor K divided out, so the record is
            the one process's. Every rank must call this at the same iterations.

    Returns:
        ``grad_<name>`` (Frobenius norm of d term / d at) and ``grad_share_<name>`` (norm / sum of the
        norms; 0 when every norm is 0) for every term.
    """
    local = []
    for term in weighted_terms.values():
        grad = None
        if term.requires_grad:
            (grad,) = torch.autograd.grad(term, at, retain_graph=True, allow_unused=True)
        local.append(at.new_zeros((), dtype=torch.float32) if grad is None else grad.float().norm())
    norms_now = torch.stack(local)
    if ranks.distributed:  # the ranks' blocks of one gradient: sum the squares, undo the gather's K
        norms_now = (distributed.sum_over_ranks(norms_now.square(), ranks) / ranks.world_size**2).sqrt()
    norms = dict(zip(weighted_terms, norms_now.tolist(), strict=True))
    total = sum(norms.values())
    record = {f"grad_{name}": value for name, value in norms.items()}
    record.update(
        {f"grad_share_{name}": value / total if total > 0 else 0.0 for name, value in norms.items()}
    )
    return record


def drift_rows(num_rows: int) -> Tensor:
    """[M] the bank rows the drift diagnostic follows: all of them up to `DRIFT_ROWS`, else every k-th row
    with k = ceil(N / DRIFT_ROWS), so M <= DRIFT_ROWS (Market's 12,936 rows: every 7th, 1,848). A run keeps
    the initial values of these rows only, instead of a second copy of the bank."""
    return torch.arange(0, num_rows, -(-num_rows // DRIFT_ROWS))


@torch.no_grad()
def bank_drift(bank: Tensor, initial: Tensor, rows: Tensor | None = None) -> dict[str, float]:
    """How far the bank rows moved since they were (re)initialised.

    Args:
        bank: [N, D] raw bank rows now.
        initial: [M, D] rows `rows` of the bank right after initialisation (unit rows).
        rows: [M] their indices (`drift_rows`); None: all N rows.

    Returns:
        ``bank_cosine_to_initial`` (mean over the M rows of cos(row, initial row)) and ``bank_row_norm``
        (mean norm of all N rows: the loss normalises rows, so the norm only measures how far weight
        decay and the updates pulled them).
    """
    followed = bank if rows is None else bank[rows.to(bank.device)]
    cosine = F.cosine_similarity(followed.float(), initial.float().to(bank.device), dim=1)
    return {
        "bank_cosine_to_initial": float(cosine.mean()),
        "bank_row_norm": float(bank.float().norm(dim=1).mean()),
    }


@torch.no_grad()
def nearest_bank_entries(features: Tensor, bank: Tensor, k: int, *, chunk_size: int = 1024) -> Tensor:
    """Indices of the k most similar bank rows of every feature row (self excluded by index).

    Args:
        features: [N, D] L2-normalised features in dataset order (row i = bank row i's image).
        bank: [N, D] raw bank rows (normalised here).
        k: neighbours per row, 1 <= k < N.
        chunk_size: feature rows per similarity block ([chunk, N] floats at a time).

    Returns:
        [N, k] int64 bank indices, most similar first.
    """
    num_rows = features.shape[0]
    if bank.shape[0] != num_rows or not 1 <= k < num_rows:
        raise ValueError(
            f"features {tuple(features.shape)}, bank {tuple(bank.shape)}, k={k}: expected N == N, 1 <= k < N"
        )
    unit = F.normalize(bank.float(), dim=1)
    out = torch.empty(num_rows, k, dtype=torch.int64)
    for start in range(0, num_rows, chunk_size):
        sim = features[start : start + chunk_size].float().to(unit.device) @ unit.T  # [c, N]
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        sim[torch.arange(sim.shape[0], device=sim.device), rows] = float("-inf")  # self is not a neighbour
        out[start : start + sim.shape[0]] = sim.topk(k, dim=1).indices.cpu()
    return out


def neighbour_precision(neighbours: np.ndarray | Tensor, pids: np.ndarray) -> float:
    """MONITORING ONLY: mean share of each row's neighbours that have its ground-truth identity.

    Args:
        neighbours: [N, k] indices into the same N samples.
        pids: [N] ground-truth identities of the target training images.

    Returns:
        The mean over rows and neighbours of ``pids[neighbour] == pids[row]``.
    """
    neighbours = np.asarray(neighbours)
    return float((pids[neighbours] == pids[:, None]).mean())
