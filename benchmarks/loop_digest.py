"""Digests of the training loops on tiny runs: a refactor that must not change behaviour keeps them equal.

Runs five tiny adaptations (the full method; the baseline; Adam moments carried and the bank refreshed; the
traditional memory; three epochs with an evaluation after each) and one tiny pre-training, each from a
fresh folder under OUT, and prints one SHA-256 prefix per run over its final weights, its memory and every
metrics.jsonl record without the wall-clock fields. CPU runs repeat bit for bit, so two trees that train the
same way print the same lines. To compare a change with the commit before it:

    git worktree add /tmp/before HEAD~1
    PYTHONPATH=/tmp/before/src .venv/bin/python benchmarks/loop_digest.py /tmp/digest_before > before.txt
    PYTHONPATH=src .venv/bin/python benchmarks/loop_digest.py /tmp/digest_after > after.txt
    diff before.txt after.txt && echo identical

(The tests' tiny set-ups, tests/tiny_adapt.py and tests/tiny_pretrain.py, are read from this tree.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import tiny_adapt  # noqa: E402  (the tests' helpers, after the path is set)
import tiny_pretrain  # noqa: E402
from dualref.checkpoint import load_checkpoint  # noqa: E402
from dualref.config import PretrainConfig, load_config  # noqa: E402
from dualref.pipelines.adapt import adapt_to_target  # noqa: E402
from dualref.pipelines.pretrain import pretrain_on_source  # noqa: E402

VARIANTS = {
    "full": (),
    "baseline": ("loss.refined_weight=0", "loss.spread_weight=0"),
    "carry_adam_refresh_bank": ("optim.reset_each_epoch=false", "loss.bank_refresh=true"),
    "traditional_memory": ("loss.memory=traditional",),
    "evaluated_3_epochs": ("run.eval_every=1", "optim.epochs=3"),
}
WALL_CLOCK = {"time", "seconds", "images_per_second"}


def digest(run: Path) -> str:
    """SHA-256 prefix of the final weights, the memory and the records without wall-clock fields."""
    sha = hashlib.sha256()
    state = load_checkpoint(run / "checkpoint.pt")
    for group in (state["model"], state.get("memory") or {}):
        for key, value in sorted(group.items()):
            sha.update(key.encode())
            sha.update(value.numpy().tobytes())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = {
            k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK and not k.startswith("seconds")
        }
        sha.update(json.dumps(record, sort_keys=True).encode())
    return sha.hexdigest()[:16]


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    target = tiny_adapt.write_target(out / "target")
    domains = tiny_pretrain.write_domains(out / "pretrain_data")
    for name, overrides in VARIANTS.items():
        adapt_to_target(tiny_adapt.tiny_config(target, out / name, *overrides))
        print(f"adapt {name} {digest(out / name)}", flush=True)
    cfg = load_config(PretrainConfig, None, tiny_pretrain.overrides(domains, out / "pretrain"))
    pretrain_on_source(cfg)
    print(f"pretrain {digest(out / 'pretrain')}", flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: loop_digest.py OUT  (an empty or new folder)")
    sys.exit(main(Path(sys.argv[1])))
