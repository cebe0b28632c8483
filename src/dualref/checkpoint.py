"""Atomic save and checked load of training state.

A checkpoint is a dict written with `torch.save`. Conventional keys (all optional except the marker):

- ``"model"``: the network's state dict; ``"optimizer"``, ``"scheduler"`` (if any): their state dicts;
- ``"epoch"``: epochs completed; ``"rng"``: `seeding.rng_state()`; ``"config"``: `config_to_dict`;
- ``"kind"``: ``"pretrain"`` or ``"adapt"``;
- ``"arch"``, ``"num_classes"``, ``"feat_dim"``, ``"height"``, ``"width"``: what `dualref evaluate` needs to
  rebuild the network without the config;
- anything else the pipeline wants to keep (best mAP so far, ...).

`save_checkpoint` adds a ``"format"`` marker so `load_checkpoint` can tell a dualref checkpoint from any
other pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dualref import io

FORMAT = "dualref-checkpoint-v1"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` so that the file is either the old one or the complete new one.

    Written through `io.atomic_write`: a failure at any point leaves the previous file intact.

    Args:
        path: destination file; its folder is created if needed.
        state: the dict to store (tensors, numbers, strings, nested dicts/lists).
    """
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint state must be a dict, got {type(state).__name__}")
    io.write_bytes(path, lambda handle: torch.save({**state, "format": FORMAT}, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded (default CPU; move the model afterwards).

    Returns:
        The stored dict (with its ``"format"`` marker).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: the file cannot be read (truncated, corrupt) or is not a dualref checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        inside = " (it holds checkpoint.pt)" if (path / "checkpoint.pt").is_file() else ""
        raise ValueError(
            f"checkpoint {path} is a folder{inside}; expected a checkpoint file, e.g. {path}/checkpoint.pt"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # weights_only=False: the state holds the numpy RNG state and plain Python objects. Only load
        # checkpoints you wrote yourself (pickle can execute code).
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch.load raises many types for a damaged file; name the file.
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
            "the file is truncated, corrupt or not a torch file"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a dualref checkpoint (no {FORMAT!r} marker); "
            "expected a file written by `dualref pretrain` or `dualref adapt`"
        )
    return state
