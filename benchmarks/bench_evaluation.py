"""Evaluation speed and memory: ``dualref.evaluation`` against torchreid's Cython and a sklearn loop.

Issue 2, item 5: at Market-1501 size (3,368 x 15,913) ``rank_metrics`` must be at least 2x faster than
torchreid's compiled Cython evaluation (``eval_market1501_cy``), and MSMT17 size (11,659 x 82,161,
D = 2048) must run in under 4 GB of memory.

Market case (one process, the same distance matrix for everyone):

* pids and camids are the real ones, parsed from the file names of ``--market-root`` (query and
  bounding_box_test, junk pid -1 dropped); without the data, the same sizes are drawn at random;
* distances: squared Euclidean, float32, between clustered random features (one centre per pid, a
  per-camera shift, noise), tuned to a trained-model-like mAP. Every evaluator uses only the ranking,
  and float32 distances tie now and then; torchreid's argsort (quicksort), sklearn (tied scores are
  grouped) and ours (stable by gallery index) break ties differently, so the agreement check uses a
  tie-free copy: each row's values replaced by rank / G in the same order. The raw float32 matrix is
  timed too;
* ``ours``: ``rank_metrics`` (chunked, vectorised; 1 torch thread, numpy sort is single-threaded);
* ``torchreid-cy``: ``evaluate_cy`` built from torchreid's ``rank_cy.pyx`` (see ``--torchreid-dir``);
* ``sklearn-loop``: the authors' style: full argsort, then a Python loop over queries with
  ``sklearn.metrics.average_precision_score`` for AP and a second loop for CMC (mINP added);
* timings are medians of ``--runs`` interleaved rounds, wall-clock and process CPU time; the CPU time
  moves much less with the load of the shared machine;
* peak memory of each evaluator: a child process loads the saved matrix and runs it once; the figure
  is the rise of ``ru_maxrss`` (peak RSS) over the level after loading.

MSMT17 case (child process): synthetic L2-normalised clustered features (3,060 gallery ids, 15
cameras), ``rank_metrics_from_features``; reports wall time and the peak RSS of the whole process
(inputs, Python and torch included).

Building the torchreid baseline (into benchmarks/_work, git-ignored; nothing of it is committed): the
PyPI sdists of torchreid (0.0.8 .. 0.2.5) ship ``rank_cylib/setup.py`` but not ``rank_cy.pyx``, so
the .pyx is the one of KaiyangZhou/deep-person-reid (``torchreid/metrics/rank_cylib/rank_cy.pyx``,
Market part unchanged), compiled with its setup.py in a separate venv::

    python3 -m venv benchmarks/_work/cyvenv
    benchmarks/_work/cyvenv/bin/pip install numpy==<the numpy of .venv> Cython setuptools
    cd benchmarks/_work/rank_cylib && ../cyvenv/bin/python setup.py build_ext --inplace

Usage::

    .venv/bin/python benchmarks/bench_evaluation.py [--runs 3] [--skip-msmt] [--write RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from dualref.evaluation import format_metrics, rank_metrics, rank_metrics_from_features

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "benchmarks" / "_work"
DEFAULT_MARKET = REPO.parent / "shared" / "data" / "Market-1501"
DEFAULT_TORCHREID = WORK / "rank_cylib"
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d)s\d+_\d+_\d+\.jpg")  # a few names end in .jpg.jpg


class Labels(NamedTuple):
    q_pids: np.ndarray
    g_pids: np.ndarray
    q_cams: np.ndarray
    g_cams: np.ndarray


class Result(NamedTuple):
    mAP: float  # noqa: N815
    cmc: np.ndarray
    mINP: float | None  # noqa: N815


# ------------------------------------------------------------------------------------------------
# Evaluators
# ------------------------------------------------------------------------------------------------


def evaluate_ours(dist: np.ndarray, labels: Labels) -> Result:
    m = rank_metrics(dist, *labels, max_rank=50)
    return Result(m.mAP, m.cmc, m.mINP)


def load_torchreid(folder: Path) -> Callable[[np.ndarray, Labels], Result] | None:
    """torchreid's compiled ``evaluate_cy``, or None when it has not been built."""
    if not list(folder.glob("rank_cy*.so")):
        return None
    sys.path.insert(0, str(folder))
    import rank_cy

    def evaluate(dist: np.ndarray, labels: Labels) -> Result:
        cmc, mean_ap = rank_cy.evaluate_cy(dist, *labels, 50)
        return Result(float(mean_ap), np.asarray(cmc, dtype=np.float64), None)

    return evaluate


def evaluate_sklearn_loop(dist: np.ndarray, labels: Labels) -> Result:
    """The authors' structure: argsort everything, then one sklearn call per query (and a CMC loop)."""
    q_pids, g_pids, q_cams, g_cams = labels
    max_rank = 50

    indices = np.argsort(dist, axis=1)
    matches = g_pids[indices] == q_pids[:, None]
    aps, inps = [], []
    for i in range(len(q_pids)):
        valid = (g_pids[indices[i]] != q_pids[i]) | (g_cams[indices[i]] != q_cams[i])
        y_true = matches[i, valid]
        if not y_true.any():
            continue
        aps.append(average_precision_score(y_true, -dist[i][indices[i]][valid]))
        hits = np.flatnonzero(y_true)
        inps.append(len(hits) / (hits[-1] + 1))

    indices = np.argsort(dist, axis=1)  # the reference computes CMC in a separate function
    matches = g_pids[indices] == q_pids[:, None]
    first_hits = np.zeros(max_rank)
    num_valid = 0
    for i in range(len(q_pids)):
        valid = (g_pids[indices[i]] != q_pids[i]) | (g_cams[indices[i]] != q_cams[i])
        hits = np.flatnonzero(matches[i, valid])
        if len(hits) == 0:
            continue
        num_valid += 1
        if hits[0] < max_rank:
            first_hits[hits[0]] += 1
    return Result(float(np.mean(aps)), np.cumsum(first_hits) / num_valid, float(np.mean(inps)))


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def market_labels(root: Path) -> tuple[Labels, str]:
    """Real Market-1501 query/gallery pids and 0-based camids, or random ones of the same sizes."""
    if (root / "query").is_dir() and (root / "bounding_box_test").is_dir():
        parts = []
        for split in ("query", "bounding_box_test"):
            pids, cams = [], []
            for path in sorted((root / split).glob("*.jpg")):
                found = MARKET_NAME.match(path.name)
                if found is None:
                    raise ValueError(f"unexpected Market-1501 file name: {path}")
                if int(found.group(1)) != -1:
                    pids.append(int(found.group(1)))
                    cams.append(int(found.group(2)) - 1)
            parts.append((np.array(pids, dtype=np.int64), np.array(cams, dtype=np.int64)))
        (q_pids, q_cams), (g_pids, g_cams) = parts
        return Labels(q_pids, g_pids, q_cams, g_cams), f"real Market-1501 pids/camids ({root})"
    rng = np.random.default_rng(0)
    g_pids = rng.integers(0, 751, 15913)
    q_pids = rng.choice(np.unique(g_pids[g_pids > 0]), 3368)
    labels = Labels(q_pids, g_pids, rng.integers(0, 6, 3368), rng.integers(0, 6, 15913))
    return labels, f"random pids/camids ({root} absent)"


def clustered_distances(labels: Labels, dim: int = 128, seed: int = 0) -> np.ndarray:
    """float32 squared Euclidean distances between noisy per-pid centres shifted per camera."""
    rng = np.random.default_rng(seed)
    pids = np.concatenate([labels.q_pids, labels.g_pids])
    cams = np.concatenate([labels.q_cams, labels.g_cams])
    _, pid_index = np.unique(pids, return_inverse=True)
    centres = rng.normal(size=(pid_index.max() + 1, dim))
    cam_shift = 0.6 * rng.normal(size=(cams.max() + 1, dim))
    features = centres[pid_index] + cam_shift[cams] + 1.1 * rng.normal(size=(len(pids), dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    query = torch.from_numpy(features[: len(labels.q_pids)].astype(np.float32))
    gallery = torch.from_numpy(features[len(labels.q_pids) :].astype(np.float32))
    return torch.cdist(query, gallery).square_().numpy()


def tie_free(dist: np.ndarray) -> np.ndarray:
    """Same order per row (stable by index), values rank / G: no ties, exact in float32."""
    out = np.empty_like(dist, dtype=np.float32)
    grid = np.arange(1, dist.shape[1] + 1, dtype=np.float32) / np.float32(dist.shape[1])
    for start in range(0, len(dist), 512):
        order = np.argsort(dist[start : start + 512], axis=1, kind="stable")
        np.put_along_axis(out[start : start + 512], order, grid[None, :], axis=1)
    return out


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def timed(evaluate: Callable[[np.ndarray, Labels], Result], dist: np.ndarray, labels: Labels):
    wall, cpu = time.perf_counter(), time.process_time()
    result = evaluate(dist, labels)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def max_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    VmHWM of /proc/self/status, not ru_maxrss: on Linux ru_maxrss carries the parent's peak across
    fork + exec, which would hide a child's own peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_market_memory(method: str, dist_file: Path, labels_file: Path, torchreid: Path) -> None:
    """Run one evaluator once on the saved matrix; print the peak-RSS rise as JSON."""
    torch.set_num_threads(1)
    dist = np.load(dist_file)
    with np.load(labels_file) as saved:
        labels = Labels(*(saved[k] for k in Labels._fields))
    evaluators = {"ours": evaluate_ours, "sklearn-loop": evaluate_sklearn_loop}
    cython = load_torchreid(torchreid)
    if cython is not None:
        evaluators["torchreid-cy"] = cython
    # Warm-up on a slice so that lazy imports and first-call allocations are not counted as peak.
    evaluators[method](dist[:8], labels._replace(q_pids=labels.q_pids[:8], q_cams=labels.q_cams[:8]))
    reset_peak_rss()
    before = max_rss_mb()
    evaluators[method](dist, labels)
    print(json.dumps({"before_mb": before, "peak_mb": max_rss_mb()}))


def child_msmt(chunk_size: int, threads: int) -> None:
    """MSMT17-size evaluation from features; print wall time and the process peak RSS as JSON."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    num_query, num_gallery, dim, num_ids, num_cams = 11659, 82161, 2048, 3060, 15
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_pids = rng.integers(0, num_ids, num_query)
    g_cams, q_cams = rng.integers(0, num_cams, num_gallery), rng.integers(0, num_cams, num_query)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)

    def features(pids: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), dim), dtype=np.float32)  # filled in blocks: low peak
        for start in range(0, len(pids), 4096):
            block = centres[pids[start : start + 4096]]
            block += 3.3 * rng.standard_normal(block.shape, dtype=np.float32)  # mAP ~ 50%
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start : start + 4096] = block
        return out

    query, gallery = features(q_pids), features(g_pids)
    inputs_mb = (query.nbytes + gallery.nbytes) / 2**20
    before = max_rss_mb()  # the whole-process peak is what counts here: no reset
    wall = time.perf_counter()
    m = rank_metrics_from_features(
        query, gallery, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size
    )
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - wall,
                "inputs_mb": inputs_mb,
                "before_mb": before,
                "peak_mb": max_rss_mb(),
                "metrics": format_metrics(m),
                "num_valid": m.num_valid_queries,
                "num_skipped": m.num_skipped_queries,
            }
        )
    )


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def max_difference(a: Result, b: Result) -> float:
    diffs = [abs(a.mAP - b.mAP), float(np.abs(a.cmc - b.cmc).max())]
    if a.mINP is not None and b.mINP is not None:
        diffs.append(abs(a.mINP - b.mINP))
    return max(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--market-root", type=Path, default=DEFAULT_MARKET)
    parser.add_argument("--torchreid-dir", type=Path, default=DEFAULT_TORCHREID)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--skip-sklearn", action="store_true", help="skip the slow per-query loop")
    parser.add_argument("--skip-msmt", action="store_true")
    parser.add_argument("--msmt-threads", type=int, default=2)
    parser.add_argument("--write", type=Path, help="also write the markdown report here")
    parser.add_argument("--child", choices=["market-memory", "msmt"], help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--dist-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "market-memory":
        child_market_memory(args.method, args.dist_file, args.labels_file, args.torchreid_dir)
        return
    if args.child == "msmt":
        child_msmt(args.chunk_size, args.msmt_threads)
        return

    torch.set_num_threads(1)  # single-threaded, like the Cython loop and numpy's sort
    command = " ".join(["benchmarks/bench_evaluation.py", *sys.argv[1:]])
    lines = [
        "# Evaluation benchmark (`dualref.evaluation.rank_metrics`)",
        "",
        f"Command: `.venv/bin/python {command}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(shared), Python {platform.python_version()}, numpy {np.__version__}, torch "
        f"{torch.__version__}; torch threads 1. Load average at start: {load_average()}.",
        "",
    ]

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    for line in lines:
        print(line)

    labels, source = market_labels(args.market_root)
    raw = clustered_distances(labels)
    dist = tie_free(raw)
    say(
        f"## Market-1501 size: {len(labels.q_pids)} x {len(labels.g_pids)}, {source}; "
        "clustered-feature distances (float32; tie-free copy for the checks)"
    )
    say()

    evaluators: dict[str, Callable[[np.ndarray, Labels], Result]] = {"ours": evaluate_ours}
    cython = load_torchreid(args.torchreid_dir)
    if cython is None:
        say(f"**torchreid Cython module not built** (no rank_cy*.so in {args.torchreid_dir}).")
    else:
        evaluators["torchreid-cy"] = cython
    if not args.skip_sklearn:
        evaluators["sklearn-loop"] = evaluate_sklearn_loop

    walls: dict[str, list[float]] = {name: [] for name in evaluators}
    cpus: dict[str, list[float]] = {name: [] for name in evaluators}
    results: dict[str, Result] = {}
    raw_walls: list[float] = []
    for round_index in range(args.runs):
        for name, evaluate in evaluators.items():
            results[name], wall, cpu = timed(evaluate, dist, labels)
            walls[name].append(wall)
            cpus[name].append(cpu)
            print(f"  round {round_index + 1} {name}: {wall:.3f} s wall, {cpu:.3f} s CPU", flush=True)
        raw_result, wall, _ = timed(evaluate_ours, raw, labels)
        raw_walls.append(wall)

    say("| evaluator | median wall (s) | median CPU (s) | runs (wall) | ours faster by (wall / CPU) |")
    say("|---|---|---|---|---|")
    ours_wall, ours_cpu = statistics.median(walls["ours"]), statistics.median(cpus["ours"])
    for name in evaluators:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        runs = ", ".join(f"{t:.2f}" for t in walls[name])
        say(f"| {name} | {wall:.3f} | {cpu:.3f} | {runs} | {wall / ours_wall:.2f}x / "
            f"{cpu / ours_cpu:.2f}x |")
    say(f"| ours on the raw float32 matrix (with ties) | {statistics.median(raw_walls):.3f} | | "
        f"{', '.join(f'{t:.2f}' for t in raw_walls)} | |")
    say()

    say("Agreement on the tie-free matrix (max |difference| over mAP, CMC ranks 1-50, mINP):")
    say()
    for name, result in results.items():
        if name != "ours":
            say(f"- ours vs {name}: {max_difference(results['ours'], result):.2e}")
    say(f"- ours on the raw matrix vs the tie-free one: {max_difference(raw_result, results['ours']):.2e}")
    say(f"- ours: {format_metrics(rank_metrics(dist, *labels), ranks=(1, 5, 10, 20))}")
    say()

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        dist_file, labels_file = Path(tmp) / "dist.npy", Path(tmp) / "labels.npz"
        np.save(dist_file, dist)
        np.savez(labels_file, **labels._asdict())
        say("Peak memory at Market size, one child process per evaluator (rise of peak RSS over the "
            f"level after loading the {dist.nbytes / 2**20:.0f} MB matrix):")
        say()
        for name in evaluators:
            child = run_child(
                ["--child", "market-memory", "--method", name, "--dist-file", str(dist_file),
                 "--labels-file", str(labels_file), "--torchreid-dir", str(args.torchreid_dir)],
                timeout=600,
            )
            rise = child["peak_mb"] - child["before_mb"]
            say(f"- {name}: +{rise:.0f} MB (process peak {child['peak_mb']:.0f} MB)")
        say()

    if not args.skip_msmt:
        say(f"## MSMT17 size: 11659 x 82161, D = 2048, `rank_metrics_from_features`, child process, "
            f"{args.msmt_threads} torch threads")
        say()
        child = run_child(["--child", "msmt", "--msmt-threads", str(args.msmt_threads)], timeout=3000)
        say(
            f"- wall time {child['seconds']:.1f} s (matmul + evaluation); inputs "
            f"{child['inputs_mb']:.0f} MB; process peak RSS {child['peak_mb']:.0f} MB "
            f"(before the call: {child['before_mb']:.0f} MB)"
        )
        say(f"- {child['metrics']} ({child['num_valid']} valid, {child['num_skipped']} skipped queries)")
        say()
    say(f"Load average at end: {load_average()}.")

    if args.write is not None:
        tmp_path = args.write.with_suffix(args.write.suffix + ".tmp")
        tmp_path.write_text("\n".join(lines) + "\n")
        os.replace(tmp_path, args.write)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
