"""The tiny pretraining set-up shared by tests/test_pretrain.py and tests/test_faults.py (not a test module).

A synthetic domain pair of 6 training identities x 6 images each, rendered at 64x32 (well under a second),
read at 32x16 by the `tiny` trunk: two pretraining epochs of two P x K = 2 x 4 iterations.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dualref.data import synthetic


def write_domains(folder: Path) -> tuple[Path, Path]:
    """(source, target) roots in the Market-1501 layout."""
    small = {"num_train_ids": 6, "num_test_ids": 4, "images_per_id": 6, "num_distractors": 2}
    source = synthetic.write_domain(
        folder, dataclasses.replace(synthetic.domain_a_config(), height=64, width=32, **small)
    )
    target = synthetic.write_domain(
        folder, dataclasses.replace(synthetic.domain_b_config(), height=64, width=32, **small)
    )
    return source, target


def overrides(domains: tuple[Path, Path], run_dir: Path, *extra: str) -> list[str]:
    """The `--set` items of a tiny pretraining run into `run_dir`; `extra` come last and win."""
    source, target = domains
    return [
        "data.source=market1501",
        f"data.source_root={source}",
        "data.target=market1501",
        f"data.target_root={target}",
        "data.height=32",
        "data.width=16",
        "data.batch_size=8",
        "data.num_instances=4",
        "data.test_batch_size=32",
        "data.num_workers=0",
        "model.arch=tiny",
        "model.pretrained=null",
        "optim.epochs=2",
        "optim.iters_per_epoch=2",
        "optim.warmup_epochs=2",
        "optim.milestones=[2]",
        "run.eval_every=1",
        "run.progress=false",
        # One thread: on a shared, oversubscribed CPU two OpenMP threads can be 20x slower.
        "run.threads=1",
        f"run.run_dir={run_dir}",
        *extra,
    ]
