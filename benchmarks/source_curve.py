"""Source learning curve (issue 22): pre-train at several lengths with the reference's schedule shape,
then profile the target's off-line stage with each model.

One direction per process (two side by side, one torch thread each, use the 2 cores best). For each
length L (iterations; epochs of 100 iterations) the schedule is the reference's `pretrain.sh` shape scaled
to L: warm-up over the first L/8, x0.1 at L/2 and at 7L/8 (the reference: 80 epochs, warm-up 10,
milestones 40 and 70). Every run is `dualref pretrain configs/cpu/pretrain_<source>.yaml` with `--set`
overrides into `RUNS/<source>_<L>`; a run folder without results is resumed (`--resume`), a finished one
skipped, so the script can be killed and started again at any point. After each run the target's
training images are embedded (`dualref extract`) and clustered (`dualref cluster --pids`, the paper's rho
rule, R = 5 on Market, 2 on Duke) into `RUNS/<source>_<L>/target_profile/`. 4,000 -> 8,000 is the doubling
that the issue's stopping rule reads (a length is a multiple of 800 iterations, whole 100-iteration epochs
divisible by 8, so 2,000 cannot be run).

`--report` reads every finished length and rewrites the table and plot of
benchmarks/results/source_curve.json / source_curve.png (the Markdown lives in source_training.md).

Usage::

    .venv/bin/python benchmarks/source_curve.py duke --lengths 8000,4000,1600
    .venv/bin/python benchmarks/source_curve.py market --lengths 8000,4000,1600
    .venv/bin/python benchmarks/source_curve.py --report
    .venv/bin/python benchmarks/source_curve.py duke --release 8000  # models/duke_mobilenet_v2_8000.pt, card
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RUNS = REPO / "runs" / "source_curve"
RESULTS = REPO / "benchmarks" / "results"
ITERS_PER_EPOCH = 100
# source -> (data set name, folder): each direction's source is the other's target
DATASETS = {"duke": ("dukemtmc", DATA / "DukeMTMC-reID"), "market": ("market1501", DATA / "Market-1501")}
# source -> (config, target data set, target folder, R of the refinement on that target)
DIRECTIONS = {
    "duke": ("configs/cpu/pretrain_duke.yaml", *DATASETS["market"], 5),
    "market": ("configs/cpu/pretrain_market.yaml", *DATASETS["duke"], 2),
}
DUALREF = str(REPO / ".venv" / "bin" / "dualref")
MODELS = REPO / "models"
ARCH = "mobilenet_v2"
# One torch thread for extract / cluster / release, as for the runs: two commands side by side with torch's
# default thread count oversubscribe the 2 cores and run several times slower.
ONE_THREAD = ["--threads", "1"]


def schedule(length: int) -> list[str]:
    """`--set` overrides of the reference's schedule shape at `length` iterations."""
    epochs = length // ITERS_PER_EPOCH
    if epochs * ITERS_PER_EPOCH != length or epochs % 8:
        raise ValueError(f"length {length}: expected a multiple of {8 * ITERS_PER_EPOCH} iterations")
    return [
        f"optim.epochs={epochs}",
        f"optim.iters_per_epoch={ITERS_PER_EPOCH}",
        f"optim.warmup_epochs={epochs // 8}",
        f"optim.milestones=[{epochs // 2},{7 * epochs // 8}]",
    ]


def run_dir(source: str, length: int) -> Path:
    return RUNS / f"{source}_{length}"


def _overrides(length: int, folder: Path) -> list[str]:
    """The `--set` arguments of a run of `length` iterations into `folder`."""
    command = []
    for item in [*schedule(length), f"run.run_dir={folder}", "run.progress=false"]:
        command += ["--set", item]
    return command


def pretrain_command(source: str, length: int) -> list[str]:
    """The `dualref pretrain` command of a fresh run of `length` iterations (for the release card)."""
    folder = run_dir(source, length).relative_to(REPO)
    return ["dualref", "pretrain", DIRECTIONS[source][0], *_overrides(length, folder)]


def pretrain(source: str, length: int) -> None:
    folder = run_dir(source, length)
    if (folder / "results.json").is_file():
        return
    start = ["--resume", str(folder)] if (folder / "config.yaml").is_file() else [DIRECTIONS[source][0]]
    command = [DUALREF, "pretrain", *start, *_overrides(length, folder)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def profile(source: str, length: int) -> None:
    """Extract the target's training features with the finished model and cluster them with pids."""
    folder = run_dir(source, length)
    out = folder / "target_profile"
    if (out / "cluster.txt").is_file():
        return
    _, target, root, subclusters = DIRECTIONS[source]
    # `extract --split train` writes its arrays straight into --out; `cluster` its labels beside them.
    if not (out / "features.npy").is_file():
        subprocess.run(
            [DUALREF, "extract", str(folder / "checkpoint.pt"), "--dataset", target, "--root", str(root),
             "--split", "train", "--out", str(out), "--workers", "1", *ONE_THREAD],
            check=True,
            cwd=REPO,
        )
    result = subprocess.run(
        [DUALREF, "cluster", str(out / "features.npy"), "--pids", str(out / "pids.npy"),
         "--num-subclusters", str(subclusters), *ONE_THREAD],
        check=True,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    (out / "cluster.txt").write_text(result.stdout)


def profile_row(source: str, length: int) -> dict[str, Any] | None:
    """One length's figures, or None while it is unfinished."""
    folder = run_dir(source, length)
    cluster_txt = folder / "target_profile" / "cluster.txt"
    if not (folder / "results.json").is_file() or not cluster_txt.is_file():
        return None
    results = json.loads((folder / "results.json").read_text())
    text = cluster_txt.read_text()
    eps = float(re.search(r"eps ([0-9.]+)", text).group(1))  # type: ignore[union-attr]
    quality = {}
    for line in text.splitlines():
        match = re.match(r"(coarse \(DBSCAN\)|refined R=\d+ \(outliers -1\))\s+(.*)", line)
        if match:
            values = [float(v) for v in match.group(2).split()]
            quality["coarse" if match.group(1).startswith("coarse") else "refined"] = values
    coarse = np.load(folder / "target_profile" / "coarse_labels.npy")
    refined = np.load(folder / "target_profile" / "refined_labels.npy")
    clustered = coarse >= 0
    sizes = np.bincount(coarse[clustered])
    moved = _moved_share(coarse[clustered], refined[clustered])
    return {
        "source": source,
        "iterations": length,
        "source_mAP": results["source"]["mAP"],
        "source_R1": results["source"]["rank1"],
        "transfer_mAP": results["direct_transfer"]["mAP"],
        "transfer_R1": results["direct_transfer"]["rank1"],
        "eps": eps,
        "clusters": int(quality["coarse"][0]),
        "outlier_share": float(1 - clustered.mean()),
        "largest_share": float(sizes.max() / coarse.size),
        "coarse_precision": quality["coarse"][2],
        "coarse_F": quality["coarse"][4],
        "refined_precision": quality["refined"][2],
        "refined_F": quality["refined"][4],
        "moved_share": moved,
        "wall_seconds": results.get("wall_seconds"),
    }


def _moved_share(coarse: np.ndarray, refined: np.ndarray) -> float:
    """Share of clustered samples whose refined cluster is not their coarse cluster (labels of one
    clustering map to the other by identity: refinement re-assigns samples among the coarse clusters)."""
    return float((coarse != refined).mean())


def report() -> None:
    rows = [
        row
        for source in DIRECTIONS
        for length in sorted({int(p.name.split("_")[1]) for p in RUNS.glob(f"{source}_*")})
        if (row := profile_row(source, length)) is not None
    ]
    (RESULTS / "source_curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, RESULTS / "source_curve.png")
    for row in rows:
        print(
            f"| {row['source']} | {row['iterations']} | {100 * row['source_mAP']:.1f} / "
            f"{100 * row['source_R1']:.1f} | {100 * row['transfer_mAP']:.1f} / "
            f"{100 * row['transfer_R1']:.1f} "
            f"| {row['eps']:.3f} | {row['clusters']} / {100 * row['outlier_share']:.0f} % | "
            f"{100 * row['largest_share']:.1f} % | {row['coarse_precision']:.3f} / {row['coarse_F']:.3f} | "
            f"{row['refined_precision']:.3f} / {row['refined_F']:.3f} | {100 * row['moved_share']:.0f} % |"
        )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Source and direct-transfer mAP (left) and the target clusters' pairwise F, coarse and refined (right),
    against the length, one colour per direction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (scores, quality) = plt.subplots(1, 2, figsize=(10, 4))
    for source, colour in zip(DIRECTIONS, ("tab:blue", "tab:orange"), strict=True):
        mine = sorted((r for r in rows if r["source"] == source), key=lambda r: r["iterations"])
        if not mine:
            continue
        its = [r["iterations"] for r in mine]
        target = DIRECTIONS[source][1]
        source_map = [100 * r["source_mAP"] for r in mine]
        scores.plot(its, source_map, "o--", color=colour, label=f"{source} (source)")
        scores.plot(its, [100 * r["transfer_mAP"] for r in mine], "o-", color=colour, label=f"-> {target}")
        quality.plot(its, [r["coarse_F"] for r in mine], "o--", color=colour, label=f"{target} coarse")
        quality.plot(its, [r["refined_F"] for r in mine], "o-", color=colour, label=f"{target} refined")
    lengths = sorted({r["iterations"] for r in rows})
    for axis, label in ((scores, "mAP (%)"), (quality, "pairwise F of the target's pseudo-labels")):
        axis.set_xscale("log")
        axis.set_xticks(lengths, [f"{n:,}" for n in lengths])  # the lengths run, not powers of ten
        axis.minorticks_off()
        axis.set_xlabel("source training iterations (reference: 16,000)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle("Source learning curve, MobileNetV2 128x64, reference schedule shape")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def release(source: str, length: int) -> None:
    """`dualref release` of a finished length into models/, scored on both data sets (source, target)."""
    folder = run_dir(source, length)
    if not (folder / "results.json").is_file():
        raise SystemExit(f"{folder} has not finished; release a finished length")
    _, target, target_root, _ = DIRECTIONS[source]
    # Paths relative to the repository (the command's working directory): the card records them.
    sets = (DATASETS[source], (target, target_root))
    evaluations = [f"{name}={os.path.relpath(root, REPO)}" for name, root in sets]
    out = (MODELS / f"{source}_{ARCH}_{length}.pt").relative_to(REPO)
    command = [DUALREF, "release", str((folder / "checkpoint.pt").relative_to(REPO)), "--out", str(out)]
    for item in evaluations:
        command += ["--evaluate", item]
    trained = " ".join(pretrain_command(source, length))
    command += ["--command", f"{trained}  (= benchmarks/source_curve.py {source} --lengths {length})"]
    subprocess.run([*command, "--workers", "1", *ONE_THREAD], check=True, cwd=REPO)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", choices=sorted(DIRECTIONS))
    parser.add_argument("--lengths", default="8000,4000,1600", help="iterations, in the order to run them")
    parser.add_argument("--report", action="store_true", help="only tabulate what has finished")
    parser.add_argument("--release", type=int, metavar="LENGTH", help="release a finished length")
    args = parser.parse_args()
    if args.report:
        report()
        return 0
    if args.source is None:
        parser.error("give a source (duke or market), or --report")
    if args.release:
        release(args.source, args.release)
        return 0
    for length in (int(v) for v in args.lengths.split(",")):
        pretrain(args.source, length)
        profile(args.source, length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
