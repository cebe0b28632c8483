"""Collect the CPU-scale adaptation rows into one markdown table (issue 5).

Reads each run folder's metrics.jsonl (last epoch's target evaluation, per-epoch pseudo-label F-scores and
stage times) and, when present, the `/usr/bin/time -v` log of the run for wall time and peak memory.

    .venv/bin/python benchmarks/collect_adaptation.py runs/cpu/duke_to_market/baseline ... > table.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _time_log(run: Path) -> tuple[str, str]:
    name = "__".join(run.parts[-2:])
    log = run.parents[1] / "logs" / f"{name}.err"
    if not log.is_file():
        return "", ""
    text = log.read_text(errors="replace")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return (wall.group(1) if wall else ""), (f"{int(rss.group(1)) / 1024**2:.2f} GB" if rss else "")


def row(run: Path) -> str:
    records = _records(run)
    evals = [r for r in records if r.get("kind") == "eval_target"]
    adapts = [r for r in records if r.get("kind") == "adapt"]
    if not evals:
        return f"| {run} | (no evaluation yet) |"
    last = evals[-1]
    f_coarse = " / ".join(f"{r['coarse_fscore']:.3f}" for r in adapts if "coarse_fscore" in r)
    f_refined = " / ".join(f"{r['refined_fscore']:.3f}" for r in adapts if "refined_fscore" in r)
    wall, rss = _time_log(run)
    train_s = sum(r.get("seconds_train", 0.0) for r in adapts)
    return (
        f"| {run.name} | {100 * last['mAP']:.1f} | {100 * last['rank1']:.1f} | {100 * last['rank5']:.1f} "
        f"| {100 * last['rank10']:.1f} | {f_coarse or '-'} | {f_refined or '-'} | {train_s:.0f} s | {wall} "
        f"| {rss} |"
    )


def main(runs: list[str]) -> None:
    header = ["row", "mAP", "R1", "R5", "R10", "F coarse per epoch", "F refined per epoch"]
    print("| " + " | ".join([*header, "training", "wall", "peak RSS"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(row(Path(run)))


if __name__ == "__main__":
    main(sys.argv[1:])
