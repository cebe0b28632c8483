"""Seeding and RNG state capture/restore, so CPU runs repeat and resumed runs continue exactly.

The data samplers draw from private generators seeded by ``(seed, epoch)``; what remains global (random
erasing and flips in the transforms, dropout, weight initialisation) is covered by the states here.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

_log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, numpy's global RNG, torch's CPU RNG and every CUDA device.

    Args:
        seed: any non-negative integer (numpy's global seed takes the low 32 bits).
    """
    if seed < 0:
        raise ValueError(f"seed={seed!r} is not valid; expected a non-negative integer")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily when CUDA is not initialised)


def rng_state() -> dict[str, Any]:
    """Snapshot of every global RNG: python, numpy, torch CPU and all CUDA devices when available.

    Returns:
        A dict that `torch.save` can store and `set_rng_state` restores.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs captured by `rng_state`.

    A CUDA state is restored only when CUDA is available here (a CPU machine can resume a GPU run's
    checkpoint; its CUDA streams simply do not exist). A state without the "cuda" entry leaves the CUDA
    generators untouched.

    Args:
        state: the dict returned by `rng_state` (possibly through a checkpoint round trip).
    """
    missing = [key for key in ("python", "numpy", "torch") if key not in state]
    if missing:
        raise ValueError(f"RNG state is missing {missing}; expected the dict of seeding.rng_state()")
    python_state = state["python"]
    # torch.load / pickling can turn the inner tuple into a list; random.setstate wants tuples.
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.as_tensor(s, dtype=torch.uint8).cpu() for s in state["cuda"]]
        visible = torch.cuda.device_count()
        if len(cuda_states) != visible:
            # Resuming on another machine is legitimate; only bit-exactness is lost, so say so.
            _log.warning(
                "RNG state holds %d CUDA device(s) but %d are visible; restoring the first %d",
                len(cuda_states),
                visible,
                min(visible, len(cuda_states)),
            )
        for index, cuda_state in enumerate(cuda_states[:visible]):
            torch.cuda.set_rng_state(cuda_state, device=index)
