"""A tiny adaptation set-up shared by the wiring tests (test_wiring.py, test_config_keys.py).

The synthetic target of tests/test_adapt.py (156 training images at 32x16), the `tiny` trunk, P x K = 4 x 4
batches: a whole adaptation epoch runs in about half a second on one CPU thread. Not a test module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dualref import report
from dualref.checkpoint import load_checkpoint
from dualref.config import AdaptConfig, load_config
from dualref.data import loaders, synthetic

# The options of the tiny set-up; every test adds its own overrides after them.
TINY_OVERRIDES = (
    "data.target=market1501",
    "data.height=32",
    "data.width=16",
    "data.batch_size=16",
    "data.num_instances=4",
    "data.num_workers=0",
    "data.test_batch_size=64",
    "data.cache_images=true",
    "model.arch=tiny",
    "model.pretrained=null",
    "optim.epochs=2",
    "optim.iters_per_epoch=3",
    "clustering.dbscan_rho=0.05",
    "clustering.k1=10",
    "run.progress=false",
    "run.threads=1",
    "run.eval_every=0",
)


def without_lookalikes(config: synthetic.SyntheticConfig) -> synthetic.SyntheticConfig:
    """`config` without look-alike identities: the tiny tests' set-ups (e.g. the clusters that the config-key
    rows describe) were measured on that data, which generator 4 still writes byte for byte this way."""
    return dataclasses.replace(config, style=dataclasses.replace(config.style, lookalike_share=0.0))


def write_target(folder: Path) -> Path:
    """The synthetic target domain (Market-1501 layout) of tests/test_adapt.py."""
    return synthetic.write_domain(folder, without_lookalikes(synthetic.domain_b_config(scale=0.1)), seed=0)


def tiny_config(target_root: Path, run_dir: Path, *overrides: str) -> AdaptConfig:
    return load_config(
        AdaptConfig,
        None,
        [*TINY_OVERRIDES, f"data.target_root={target_root}", f"run.run_dir={run_dir}", *overrides],
    )


@contextlib.contextmanager
def quiet_pipeline() -> Iterator[pytest.MonkeyPatch]:
    """One torch thread, no end-of-run plots (they come after the training and cost a second a run), and each
    image file decoded once per context (the runs decode the same few hundred files again and again).

    Yields a MonkeyPatch undone on exit, for further recorders (module-scoped fixtures use it).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    real_read = loaders.read_image
    decoded: dict[tuple[Path, tuple[int, int] | None], Image.Image] = {}

    def read_once(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
        if (path, size) not in decoded:
            decoded[path, size] = real_read(path, size)
        return decoded[path, size]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "write_report", lambda path: None)
        patch.setattr(loaders, "read_image", read_once)
        yield patch
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Outcome:
    """What one adaptation run trained: its per-epoch losses and its final weights."""

    losses: list[dict[str, float]]  # per epoch, the logged loss_* means
    model: dict[str, torch.Tensor]
    memory: dict[str, torch.Tensor] | None
    records: list[dict[str, Any]]  # per epoch, the whole "adapt" record (lr, mu, eps, clusters, ...)
    config: dict[str, Any]  # the run's resolved config


def outcome(run_dir: Path) -> Outcome:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if r["kind"] == "adapt"]
    losses = [{k: v for k, v in r.items() if k.startswith("loss_")} for r in records]
    state = load_checkpoint(run_dir / "checkpoint.pt")
    return Outcome(losses, dict(state["model"]), state["memory"], records, state["config"])


def same_training(a: Outcome, b: Outcome) -> bool:
    """Bit-identical losses and final weights (model and memory)."""
    if a.losses != b.losses or a.model.keys() != b.model.keys():
        return False
    if any(not torch.equal(a.model[k], b.model[k]) for k in a.model):
        return False
    if (a.memory is None) != (b.memory is None):
        return False
    if a.memory is not None and b.memory is not None:
        if a.memory.keys() != b.memory.keys():
            return False
        return all(torch.equal(a.memory[k], b.memory[k]) for k in a.memory)
    return True
