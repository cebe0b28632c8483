"""Tiny checkpoints and the tiny synthetic target for the tests of the inference commands (not a test module).

The checkpoints hold a randomly initialised `tiny` network at 32x16, written exactly as the pipelines
write theirs (`inference.model_metadata`), so every command reads them as it reads a trained model's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dualref import checkpoint, inference
from dualref.models.reid_net import ReidNet
from tiny_adapt import write_target

HEIGHT, WIDTH = 32, 16

__all__ = ["HEIGHT", "WIDTH", "write_checkpoint", "write_target"]


def write_checkpoint(path: Path, *, seed: int = 0, kind: str = "pretrain", epoch: int = 1) -> Path:
    """A dualref checkpoint of a random `tiny` ReidNet (BN statistics made non-trivial by one forward)."""
    torch.manual_seed(seed)
    model = ReidNet("tiny", 4)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, HEIGHT, WIDTH))  # running statistics away from (0, 1)
    state = {
        "kind": kind,
        "model": model.state_dict(),
        "epoch": epoch,
        **inference.model_metadata(model, height=HEIGHT, width=WIDTH),
    }
    checkpoint.save_checkpoint(path, state)
    return path
