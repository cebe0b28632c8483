"""Cost of the instant memory bank in the CPU-scale Dual-Refinement step (issue 10, item 7).

One process, random inputs (no data, no pretrained weights): MobileNetV2 at 128x64, batch 64 = 16
identities x 4, an instant bank of 12,936 x 1,280 rows (Market-1501's training set), Adam with weight
decay 5e-4, `steps.train_target_epoch` over K copies of one fixed batch. Four steps:

* ``baseline-before``: coarse CE + pooled triplet, no memory (alpha = mu = 0), ``torch.optim.Adam``;
* ``full-before``: the full objective (defaults: alpha 0.5, mu 0.1, normalised triplet, spread-out
  against the bank, bank gradient x 2) with the bank in ``torch.optim.Adam`` and the spread-out loss
  through plain autograd (`spread_out_loss_autograd`): the code before the change;
* ``baseline-after`` / ``full-after``: the same with ``training.build_adam`` (`InPlaceAdam`) and
  `spread_out_loss` (hand-written backward): the code now;
* ``nobank-after``: the full objective without the memory term (mu = 0, no bank), to split the full
  step's extra cost into the bank's and the other terms'.

The five are timed in turn, round after round (the order rotates), after one warm-up each; a figure is
the median over the rounds of seconds per iteration, wall and process CPU time (user + system, which
the load of other processes inflates less than wall time), with the minor page faults per iteration
(fresh [N, D] tensors are page-faulted in: 16 k faults each). The overhead of the bank is
``full / baseline - 1`` within "before" and within "after": the ratio of the medians, and the
median over the rounds of the ratio within a round ("paired", robust to the load drifting between
rounds). Peak RSS is the process's high-water mark
during that step, reset before each timed run (Linux ``/proc/self/clear_refs``); all five steps live
in the process, so only differences between the rows mean something.

``--check S`` first runs S steps of full-before and full-after (and of the two baselines) from the same
initial weights and bank and prints the largest differences of the per-step losses, the network
weights and the bank. ``--profile`` prints where a full step's bank-related time goes: the spread-out
forward and backward, the gradient scale and Adam over the bank, each before and after.

Usage::

    PYTHONPATH=src python benchmarks/bench_bank_step.py --threads 1 [--runs 5] [--iters 5]
        [--check 3] [--profile] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

from dualref import losses, steps, training
from dualref.config import LossConfig
from dualref.losses.spread_out import spread_out_loss, spread_out_loss_autograd
from dualref.memory_bank import InPlaceAdam, InstantMemoryBank
from dualref.models import ReidNet

NUM_SAMPLES, HEIGHT, WIDTH, BATCH, NUM_CLASSES = 12_936, 128, 64, 64, 700
LR, WEIGHT_DECAY = 3.5e-4, 5e-4
STEPS = ("baseline-before", "full-before", "baseline-after", "full-after", "nobank-after")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _batch() -> Batch:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, HEIGHT, WIDTH, generator=generator)
    labels = torch.arange(BATCH // 4).repeat_interleave(4)
    indices = torch.randperm(NUM_SAMPLES, generator=generator)[:BATCH]
    return images, labels, torch.zeros(BATCH, dtype=torch.long), indices


@contextlib.contextmanager
def _code(after: bool) -> Iterator[None]:
    """Run the step with the spread-out loss of before (autograd) or after (hand-written backward)."""
    loss = spread_out_loss if after else spread_out_loss_autograd
    with mock.patch.object(losses, "spread_out_loss", loss):
        yield


class Step:
    """One of `STEPS`: a model, maybe a bank, an optimizer, and ``run(batches)`` = one epoch over them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.full = name.startswith("full")
        self.after = name.endswith("after")
        nobank = name.startswith("nobank")
        torch.manual_seed(0)
        self.model = ReidNet("mobilenet_v2", num_classes=NUM_CLASSES)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.memory = None
        if self.full:
            self.memory = InstantMemoryBank(NUM_SAMPLES, self.model.feat_dim)
            generator = torch.Generator().manual_seed(1)
            self.memory.init_from(torch.randn(NUM_SAMPLES, self.model.feat_dim, generator=generator))
            params.append(self.memory.weight)
        self.optimizer: torch.optim.Adam = (
            training.build_adam(params, lr=LR, weight_decay=WEIGHT_DECAY)
            if self.after
            else torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999), eps=1e-8)
        )
        if self.full:
            self.loss = LossConfig()
        elif nobank:  # the full objective without its memory term: what the bank adds is full - nobank
            self.loss = LossConfig(spread_weight=0.0)
        else:
            self.loss = LossConfig(refined_weight=0.0, spread_weight=0.0, triplet_feature="pooled")
        self.refined = torch.randint(
            0, NUM_CLASSES, (NUM_SAMPLES,), generator=torch.Generator().manual_seed(2)
        )

    def run(self, batches: list[Batch]) -> steps.EpochStats:
        with _code(self.after):
            return steps.train_target_epoch(
                self.model,
                batches,
                self.optimizer,
                self.refined,
                memory=self.memory,
                loss=self.loss,
                device=torch.device("cpu"),
                progress=False,
            )


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(runs: int, iters: int) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """(per step: medians over the rounds, per step: the per-round figures)."""
    batches = [_batch()] * iters
    cases = {name: Step(name) for name in STEPS}
    for case in cases.values():
        case.run(batches[:1])  # warm-up: first-touch of the weights, Adam state, scratch
    wall: dict[str, list[float]] = {name: [] for name in STEPS}
    cpu: dict[str, list[float]] = {name: [] for name in STEPS}
    faults: dict[str, list[float]] = {name: [] for name in STEPS}
    peak: dict[str, float] = dict.fromkeys(STEPS, 0.0)
    for round_index in range(runs):
        order = STEPS[round_index % len(STEPS) :] + STEPS[: round_index % len(STEPS)]
        for name in order:
            _reset_peak_rss()
            start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            cases[name].run(batches)
            wall[name].append((time.perf_counter() - start_wall) / iters)
            cpu[name].append((time.process_time() - start_cpu) / iters)
            faults[name].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults) / iters)
            peak[name] = max(peak[name], _peak_rss_mib())
        print(json.dumps({"round": round_index, **{n: round(wall[n][-1], 3) for n in STEPS}}), flush=True)
    summary = {
        name: {
            "wall_s": statistics.median(wall[name]),
            "wall_min_s": min(wall[name]),
            "wall_max_s": max(wall[name]),
            "cpu_s": statistics.median(cpu[name]),
            "minor_faults": statistics.median(faults[name]),
            "peak_rss_mib": peak[name],
        }
        for name in STEPS
    }
    return summary, {name: {"wall": wall[name], "cpu": cpu[name]} for name in STEPS}


def check(num_steps: int) -> dict[str, float | bool]:
    """Largest differences after `num_steps` steps of before vs after from the same initial state."""
    batch = _batch()
    result: dict[str, float | bool] = {}
    compared: list[tuple[torch.Tensor, torch.Tensor]] = []
    for kind in ("baseline", "full"):
        before, after = Step(f"{kind}-before"), Step(f"{kind}-after")
        losses_before = [before.run([batch]).means for _ in range(num_steps)]
        losses_after = [after.run([batch]).means for _ in range(num_steps)]
        loss_diff = max(
            abs(b[key] - a[key]) for b, a in zip(losses_before, losses_after, strict=True) for key in b
        )
        weights = [
            (p.detach(), q.detach())
            for p, q in zip(before.model.parameters(), after.model.parameters(), strict=True)
        ]
        result[f"{kind}_loss_max_abs_diff"] = loss_diff
        result[f"{kind}_weights_max_abs_diff"] = max(float((p - q).abs().max()) for p, q in weights)
        result[f"{kind}_weights_bit_identical"] = all(torch.equal(p, q) for p, q in weights)
        if before.memory is not None and after.memory is not None:
            weights.append((before.memory.weight.detach(), after.memory.weight.detach()))
            bank_before, bank_after = weights[-1]
            result["full_bank_max_abs_diff"] = float((bank_before - bank_after).abs().max())
            result["full_bank_bit_identical"] = torch.equal(bank_before, bank_after)
        result[f"{kind}_total_loss_step0"] = losses_after[0]["total"]
        compared.extend(weights)
    print(json.dumps({"check_steps": num_steps, **result}), flush=True)
    for before_value, after_value in compared:  # float32 rounding at most (default tolerances)
        torch.testing.assert_close(after_value, before_value)
    return result


def profile(runs: int) -> dict[str, Any]:
    """Milliseconds of each bank-related part of one full step, before and after, at the step's sizes.

    The parts are timed alone on one batch (features near their own rows, as after a few epochs), in
    turn round after round (medians), then torch.profiler's top operators of the whole bank part
    (loss forward and backward, gradient scale, Adam over the bank) are listed.
    """
    generator = torch.Generator().manual_seed(3)
    dim = 1280
    indices = _batch()[3]
    bank_rows = F.normalize(torch.randn(NUM_SAMPLES, dim, generator=generator), dim=1)
    features = F.normalize(bank_rows[indices] + 0.5 * torch.randn(BATCH, dim, generator=generator), dim=1)
    features.requires_grad_(True)
    parts: dict[str, Callable[[], Any]] = {}
    bank_parts: dict[str, Callable[[], None]] = {}
    for label, loss_fn, adam_cls in (
        ("before", spread_out_loss_autograd, torch.optim.Adam),
        ("after", spread_out_loss, InPlaceAdam),
    ):
        bank = torch.nn.Parameter(bank_rows.clone())
        optimizer = adam_cls([bank], lr=LR, weight_decay=WEIGHT_DECAY, betas=(0.9, 0.999), eps=1e-8)

        def forward(
            loss_fn: Callable[..., torch.Tensor] = loss_fn, bank: torch.Tensor = bank
        ) -> torch.Tensor:
            return 0.1 * loss_fn(features, bank, indices)

        def forward_backward(
            forward: Callable[[], torch.Tensor] = forward, bank: torch.Tensor = bank
        ) -> None:
            bank.grad = None
            features.grad = None
            forward().backward()

        def whole(
            forward_backward: Callable[[], None] = forward_backward,
            bank: torch.Tensor = bank,
            optimizer: torch.optim.Optimizer = optimizer,
        ) -> None:
            forward_backward()
            steps.scale_bank_gradient(bank, 2.0)
            optimizer.step()

        forward_backward()
        parts[f"{label}_spread_forward"] = forward
        parts[f"{label}_spread_forward_backward"] = forward_backward
        parts[f"{label}_scale_bank_gradient"] = partial(steps.scale_bank_gradient, bank, 2.0)
        parts[f"{label}_adam_bank"] = optimizer.step
        bank_parts[label] = whole
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(runs + 1):  # the first round is a warm-up
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            times[name].append(1000 * (time.perf_counter() - start))
    result: dict[str, Any] = {name: statistics.median(values[1:]) for name, values in times.items()}
    for label in ("before", "after"):
        result[f"{label}_spread_backward"] = (
            result[f"{label}_spread_forward_backward"] - result[f"{label}_spread_forward"]
        )
    print(json.dumps({"profile_ms": {k: round(v, 1) for k, v in result.items()}}), flush=True)
    for label, fn in bank_parts.items():
        with torch.profiler.profile() as prof:
            for _ in range(2):
                fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
        print(f"torch.profiler, bank part {label} (2 iterations):\n{table}", flush=True)
        result[f"{label}_profiler_table"] = table
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (medians over them)")
    parser.add_argument("--iters", type=int, default=5, help="training steps per timed run")
    parser.add_argument("--check", type=int, default=0, help="compare before/after over this many steps")
    parser.add_argument("--profile", action="store_true", help="time the bank-related parts alone")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    print(json.dumps(info), flush=True)
    results: dict[str, Any] = {"info": info}
    if args.check:
        results["check"] = check(args.check)
    if args.profile:
        results["profile"] = profile(args.runs)
    timings, rounds = bench(args.runs, args.iters)
    results["steps"] = timings
    results["rounds"] = rounds
    for label in ("before", "after"):
        base, full = f"baseline-{label}", f"full-{label}"
        results[f"overhead_{label}"] = {
            # ratio of the medians, and median of the ratios within each round (the two steps ran
            # seconds apart there, so a load change between rounds cancels)
            **{
                clock: timings[full][f"{clock}_s"] / timings[base][f"{clock}_s"] - 1
                for clock in ("wall", "cpu")
            },
            **{
                f"{clock}_paired": statistics.median(
                    f / b - 1 for f, b in zip(rounds[full][clock], rounds[base][clock], strict=True)
                )
                for clock in ("wall", "cpu")
            },
        }
    results["info"]["loadavg_end"] = os.getloadavg()
    for name, row in timings.items():
        print(json.dumps({"step": name, **{k: round(v, 4) for k, v in row.items()}}), flush=True)
    for label in ("before", "after"):
        overhead = results[f"overhead_{label}"]
        figures = ", ".join(
            f"{clock} {100 * overhead[clock]:+.1f} % (paired {100 * overhead[clock + '_paired']:+.1f} %)"
            for clock in ("wall", "cpu")
        )
        print(f"overhead {label}: {figures}", flush=True)
    print(json.dumps({"loadavg_end": results["info"]["loadavg_end"]}), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
