"""Several processes through torchrun: the rank layout, and what is gathered or broadcast where.

`torchrun --nproc_per_node=K -m dualref pretrain|adapt CONFIG` starts K processes (ranks), one per device;
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous, `init_from_env` joins the group (NCCL on
GPUs, gloo on CPU). Without torchrun, `SINGLE` (rank 0 of 1) and nothing here communicates.

The layout reproduces the authors' 4-GPU `nn.DataParallel` for any K (docs/distributed.md):

- Every rank builds the same loader (same seed, same labels), so each iteration the sampler yields the
  same global P x K batch of B images on every rank; rank r decodes and augments rows
  ``[r B/K, (r+1) B/K)`` only (`batch_rows`), with the random draws of the whole batch, so an image is
  augmented the same way for any K.
- BatchNorm normalises each rank's rows (DataParallel's shards); `model.bn_groups` splits them further,
  so K ranks x G groups = the authors' 4 shards for K in {1, 2, 4}.
- The model outputs are gathered (`gather_rows`: the global batch, in sampler order, on every rank) and
  every loss that mines inside the batch (batch-hard triplet, spread-out) sees the whole batch, as
  DataParallel's gathered outputs did. The loss is therefore the same number on every rank; each rank
  back-propagates it into its own rows only (times K, since DDP averages the ranks' gradients).
- The instant memory bank is not in DDP: every rank computes the bank's gradient from the same gathered
  features and the same bank, so the banks stay identical with no [N, D] communication at all.
- Off-line: each rank extracts a contiguous shard of the target (`shard_range`), `gather_rows_in_order`
  restores dataset order; rank 0 clusters and refines, `broadcast_object` hands the labels to the others.
- Checkpoints, logs, metrics and evaluation: rank 0 only.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")

# Rank 0 clusters and evaluates while the others wait in a collective; at paper scale that is minutes.
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank `rank` of `world_size`, device index `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes, logs and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def env_ranks() -> Ranks:
    """The ranks torchrun announced in the environment (`SINGLE` without torchrun)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as err:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun's): {err}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world}; expected 0 <= RANK < WORLD_SIZE")
    return Ranks(rank=rank, world_size=world, local_rank=local)


def init_from_env(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group (once) and pick this rank's device.

    Args:
        device: the configured device (`run.device` resolved); "cuda" becomes cuda:LOCAL_RANK.

    Returns:
        The ranks and the device this process uses. Without torchrun: (SINGLE, device).
    """
    ranks = env_ranks()
    if not ranks.distributed:
        return ranks, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    return ranks, device


def close() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def batch_rows(batch_size: int, ranks: Ranks) -> tuple[int, int] | None:
    """This rank's rows ``(start, stop)`` of every global batch; None for a single process.

    Raises:
        ValueError: `batch_size` is not a multiple of the world size.
    """
    if not ranks.distributed:
        return None
    if batch_size % ranks.world_size:
        raise ValueError(
            f"data.batch_size={batch_size} cannot be split over {ranks.world_size} ranks; expected a "
            "multiple of the number of processes (the global batch is the same for every world size)"
        )
    per_rank = batch_size // ranks.world_size
    return ranks.rank * per_rank, (ranks.rank + 1) * per_rank


def shard_range(num_items: int, ranks: Ranks) -> tuple[int, int]:
    """This rank's contiguous shard ``[start, stop)`` of `num_items` (the first shards one longer)."""
    base, extra = divmod(num_items, ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return start, start + base + (ranks.rank < extra)


class _GatherRows(torch.autograd.Function):
    """All-gather equal row blocks along dim 0; the backward keeps this rank's block, times K."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor) -> Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        blocks = [torch.empty_like(rows) for _ in range(ctx.world)]
        dist.all_gather(blocks, rows.contiguous())
        return torch.cat(blocks, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # Every rank holds the gradient of the same (replicated) loss; the other ranks' blocks are
        # back-propagated by their own ranks. DDP then averages over K: hence the factor K.
        return grad.chunk(ctx.world, dim=0)[ctx.rank] * ctx.world


def gather_rows(rows: Tensor, ranks: Ranks) -> Tensor:
    """[b, ...] on each rank -> [K b, ...] in rank order on every rank; gradients reach this rank's rows.

    For a loss computed identically on every rank from the gathered tensor and a model wrapped in DDP
    (which averages gradients): the parameters' gradient equals that of one process with the whole batch.
    Tensors without gradient (labels, indices) are gathered as they are.
    """
    if not ranks.distributed:
        return rows
    if rows.requires_grad:
        return _GatherRows.apply(rows)
    blocks = [torch.empty_like(rows) for _ in range(ranks.world_size)]
    dist.all_gather(blocks, rows.contiguous())
    return torch.cat(blocks, dim=0)


def gather_rows_in_order(shard: Tensor, num_items: int, ranks: Ranks) -> Tensor:
    """The [N, ...] tensor of which this rank holds rows `shard_range(N)`, on every rank (no gradient).

    Shards may differ by one row: each is padded to the longest before the all-gather.
    """
    if not ranks.distributed:
        return shard
    longest = shard_range(num_items, Ranks(0, ranks.world_size, 0))
    size = longest[1] - longest[0]
    padded = shard.new_zeros((size, *shard.shape[1:]))
    padded[: shard.shape[0]] = shard
    blocks = [torch.empty_like(padded) for _ in range(ranks.world_size)]
    dist.all_gather(blocks, padded)
    parts = []
    for rank, block in enumerate(blocks):
        start, stop = shard_range(num_items, Ranks(rank, ranks.world_size, 0))
        parts.append(block[: stop - start])
    return torch.cat(parts, dim=0)


def sum_over_ranks(values: Tensor, ranks: Ranks) -> Tensor:
    """The element-wise sum of `values` over the ranks (a copy; `values` itself for one process)."""
    if not ranks.distributed:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total


class RankZeroError(ValueError):
    """Rank 0 stopped at a step whose result the other ranks wait for; the message is rank 0's."""


def on_main(compute: Callable[[], T], ranks: Ranks) -> T:
    """`compute()` on rank 0, its result broadcast to every rank.

    A `ValueError` of rank 0 (e.g. a degenerate clustering) is raised there and, as `RankZeroError` with
    the same message, on every other rank: each process stops with one line instead of the others
    failing later on a closed connection.
    """
    if not ranks.distributed:
        return compute()
    result: T | None = None
    error: str | None = None
    if ranks.is_main:
        try:
            result = compute()
        except ValueError as err:
            error = str(err)
            broadcast_object((None, error), ranks)
            raise
    result, error = broadcast_object((result, error), ranks)
    if error is not None:
        raise RankZeroError(f"rank 0 stopped: {error}")
    return result  # type: ignore[return-value]


def broadcast_object(value: T | None, ranks: Ranks) -> T:
    """Rank 0's `value` on every rank (pickled; for labels, eps and small records)."""
    if not ranks.distributed:
        assert value is not None
        return value
    holder: list[Any] = [value if ranks.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_modules(modules: Sequence[nn.Module | None], ranks: Ranks) -> None:
    """Copy rank 0's parameters and buffers into every rank's `modules` (None skipped), in place.

    DDP broadcasts buffers at the start of each training forward, so after an epoch the other ranks still
    hold the running statistics of their own last rows: this makes the eval-mode model (extraction) the
    same everywhere, and costs one model's size once per epoch.
    """
    if not ranks.distributed:
        return
    with torch.no_grad():
        for module in filter(None, modules):
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def wrap(model: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (the gradients' all-reduce); the model itself otherwise.

    Wrap again whenever the parameters change (the classifier is re-created every adaptation epoch).
    Every trainable parameter gets a gradient each step (the losses use the whole output), so DDP does
    not search for unused ones.
    """
    if not ranks.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def same_on_every_rank(tensors: Sequence[Tensor], ranks: Ranks) -> bool:
    """Whether every rank holds bit-identical `tensors` (a check for tests and debugging)."""
    if not ranks.distributed:
        return True
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])  # on their device (NCCL)
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(flat, reference))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())
