"""The cost of subnormal floats on the CPU: a pre-training step from a checkpoint, with and without
`torch.set_flush_denormal(True)` (what `dualref` now sets for every run).

One process, one torch thread; the checkpoint's model and Adam state are loaded afresh for each setting
and four steps are timed on one random batch of 64 (the settings alternate twice). Also counts the
subnormal values stored in the checkpoint itself.

Usage::

    .venv/bin/python benchmarks/bench_denormals.py runs/source_curve/duke_8000/checkpoint.pt
"""

from __future__ import annotations

import argparse
import time

import torch

from dualref import checkpoint, steps, training
from dualref.models import ReidNet

CPU = torch.device("cpu")


def _subnormals(tensors: list[torch.Tensor]) -> tuple[int, int]:
    tiny = torch.finfo(torch.float32).tiny
    floats = [t for t in tensors if t.is_floating_point()]
    return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in floats), sum(t.numel() for t in floats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoint", help="a pretraining checkpoint.pt (MobileNetV2 or ResNet)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = checkpoint.load_checkpoint(args.checkpoint)
    torch.manual_seed(0)
    images = torch.randn(64, 3, args.height, args.width)
    batch = [(images, torch.arange(64) // 4, torch.zeros(64, dtype=torch.long), torch.arange(64))]
    print(f"{args.checkpoint}: epoch {state.get('epoch')}, {state['arch']}")
    for flush in (False, True, False, True):
        torch.set_flush_denormal(flush)
        model = ReidNet(state["arch"], int(state["num_classes"]))
        model.load_state_dict(state["model"])
        model = training.place_model(model, CPU, True)
        optimizer = training.build_adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
        optimizer.load_state_dict(state["optimizer"])
        seconds = []
        for _ in range(4):
            start = time.perf_counter()
            steps.train_source_epoch(
                model, batch, optimizer, device=CPU, label_smoothing=0.1, triplet_margin=None,
                channels_last=True, progress=False,
            )
            seconds.append(time.perf_counter() - start)
        print(f"flush_denormal={flush}: seconds per step {[round(s, 2) for s in seconds]}")
    stored = [*state["model"].values()]
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    print(f"subnormals stored: model {_subnormals(stored)}, optimizer {_subnormals(moments)} (count, of)")


if __name__ == "__main__":
    main()
