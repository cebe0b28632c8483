"""Speed and peak memory of ``dualref.distances.jaccard_distance`` against the bare exact k-NN.

Issue 3, figures for item 1. For each case, synthetic clustered unit features (about 17 noisy
vectors per identity, like a re-ID training set) are generated in a child process, which then runs
either

* ``knn``: the bare exact neighbour search that any exact method must do, ``knn(features, k1 + 1)``
  (blocked F F^T + top-k, the same block size as inside ``jaccard_distance``), or
* ``jaccard``: the whole ``jaccard_distance(features, k1=20, k2=6)``.

Each child process runs one computation, so its peak RSS (``VmHWM``) is that computation's peak;
the report gives the peak of the whole process and its rise over the level after importing torch,
numpy, scipy and dualref (before the features exist; the features themselves are counted). The two
modes are run alternately, ``--runs`` times each, and the medians of wall-clock and process CPU time
are reported (CPU time moves less with the load of the shared machine). torch uses 2 threads.

The anchors are the figures quoted in issue 3, measured on an idle machine of this type: the
faiss-based CPU implementation used by SpCL/IDM takes about 21 s / 1.8 GB at N = 12,936 and
2 min 16 s / 9.1 GB at N = 32,621 (d = 2,048).

Usage::

    .venv/bin/python benchmarks/bench_jaccard.py [--runs 3] [--cases market,msmt,large]
        [--write benchmarks/results/jaccard.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "jaccard.md"
THREADS = 2
K1, K2 = 20, 6
RERANK_QUERIES = 3_368


class Case(NamedTuple):
    name: str
    num: int
    dim: int
    runs: int | None  # None: use --runs
    anchor: str
    modes: tuple[str, str] = ("knn", "jaccard")


CASES = {
    "market": Case("market", 12_936, 2_048, None, "faiss SpCL/IDM CPU: ~21 s, 1.8 GB peak"),
    "msmt": Case("msmt", 32_621, 2_048, None, "faiss SpCL/IDM CPU: 2 min 16 s, 9.1 GB peak"),
    "large": Case("large", 100_000, 256, 1, "none (must complete)"),
    # Test-time re-ranking, Market-1501 test split: 3,368 queries + 15,913 gallery images.
    "rerank": Case(
        "rerank", RERANK_QUERIES + 15_913, 2_048, 1, "authors' path crashes", ("knn", "rerank")
    ),
    "tiny": Case("tiny", 2_000, 128, None, "none (smoke test of this script)"),
}


def _status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def run_child(mode: str, num: int, dim: int, seed: int) -> None:
    """Child process: generate the features, run one computation, print a JSON line."""
    import torch

    from dualref.distances import jaccard_distance, knn, reranked_distance

    torch.set_num_threads(THREADS)
    baseline_kb = _status_kb("VmHWM")
    features = clustered_features(num, dim, seed)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if mode == "knn":
        knn(features, K1 + 1)
        stored = 0
    elif mode == "rerank":
        split = RERANK_QUERIES
        stored = reranked_distance(features[:split], features[split:], k1=K1, k2=K2).size
    else:
        stored = jaccard_distance(features, k1=K1, k2=K2).nnz
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "baseline_kb": baseline_kb,
                "peak_kb": _status_kb("VmHWM"),
                "nnz": stored,
            }
        )
    )


def clustered_features(num: int, dim: int, seed: int):  # type: ignore[no-untyped-def]
    """[num, dim] float32 unit vectors: about num / 17 identities, ~17 noisy views each.

    Noise of norm ~0.9 around unit centres (cosine ~0.75 to the centre), which gives k-reciprocal
    sets of roughly re-ID size. Built in slices to keep the generator's own peak small.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    num_ids = max(1, round(num / 17))
    centres = torch.nn.functional.normalize(torch.randn(num_ids, dim, generator=gen), dim=1)
    ids = torch.randint(0, num_ids, (num,), generator=gen)
    out = torch.empty(num, dim)
    for start in range(0, num, 4096):
        block = centres[ids[start : start + 4096]]
        block = block + 0.9 / dim**0.5 * torch.randn(block.shape, generator=gen)
        out[start : start + 4096] = torch.nn.functional.normalize(block, dim=1)
    return out


class Measurement(NamedTuple):
    wall: float
    cpu: float
    baseline_mb: float
    peak_mb: float
    nnz: int
    load_before: float
    load_after: float


def measure(mode: str, case: Case, seed: int) -> Measurement:
    load_before = os.getloadavg()[0]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, __file__, "--child", mode, str(case.num), str(case.dim), str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{proc.stderr}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return Measurement(
        wall=row["wall"],
        cpu=row["cpu"],
        baseline_mb=row["baseline_kb"] / 1024,
        peak_mb=row["peak_kb"] / 1024,
        nnz=row["nnz"],
        load_before=load_before,
        load_after=os.getloadavg()[0],
    )


def summary_row(case: Case, mode: str, runs: list[Measurement]) -> dict[str, object]:
    peak = max(r.peak_mb for r in runs)
    baseline = min(r.baseline_mb for r in runs)
    return {
        "case": f"{case.name} N={case.num:,} d={case.dim:,}",
        "mode": mode,
        "wall": statistics.median(r.wall for r in runs),
        "walls": [r.wall for r in runs],
        "cpu": statistics.median(r.cpu for r in runs),
        "peak_mb": peak,
        "rise_mb": peak - baseline,
        "baseline_mb": baseline,
        "nnz": runs[0].nnz,
        "load": [round(x, 2) for r in runs for x in (r.load_before, r.load_after)],
    }


def format_table(rows: list[dict[str, object]]) -> str:
    head = (
        "| case | computation | wall median (s) | runs (s) | CPU median (s) | peak RSS (MB) "
        "| rise over imports (MB) | load avg (1 min, before/after each run) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        walls = ", ".join(f"{w:.2f}" for w in r["walls"])  # type: ignore[attr-defined]
        loads = " ".join(f"{x:.1f}" for x in r["load"])  # type: ignore[attr-defined]
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['wall']:.2f} | {walls} | {r['cpu']:.2f} "
            f"| {r['peak_mb']:.0f} | {r['rise_mb']:.0f} | {loads} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict[str, object]]) -> list[str]:
    out = []
    by_case: dict[object, dict[object, dict[str, object]]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["mode"]] = r
    for case, modes in by_case.items():
        for name in ("jaccard", "rerank"):
            if "knn" in modes and name in modes:
                j, k = modes[name], modes["knn"]
                out.append(
                    f"- {case}: {name} / bare kNN = {j['wall'] / k['wall']:.2f} (wall), "  # type: ignore[operator]
                    f"{j['cpu'] / k['cpu']:.2f} (CPU); stored values {j['nnz']:,}"  # type: ignore[operator]
                )
    return out


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per computation (median)")
    parser.add_argument(
        "--cases", default="market,msmt,large,rerank", help="comma list of " + ",".join(CASES)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", type=Path, default=DEFAULT_OUT, help="markdown report path")
    parser.add_argument(
        "--child", nargs=4, metavar=("MODE", "N", "D", "SEED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        mode, num, dim, seed = args.child
        run_child(mode, int(num), int(dim), int(seed))
        return

    command = " ".join([".venv/bin/python benchmarks/bench_jaccard.py", *sys.argv[1:]])
    rows: list[dict[str, object]] = []
    for name in args.cases.split(","):
        case = CASES[name]
        runs = case.runs or args.runs
        results: dict[str, list[Measurement]] = {mode: [] for mode in case.modes}
        for _ in range(runs):  # alternate, so both see the same machine load
            for mode in case.modes:
                m = measure(mode, case, args.seed)
                results[mode].append(m)
                print(
                    f"{case.name} {mode}: {m.wall:.2f} s wall, {m.cpu:.2f} s CPU, "
                    f"peak {m.peak_mb:.0f} MB (imports {m.baseline_mb:.0f} MB), "
                    f"load {m.load_before:.1f}->{m.load_after:.1f}",
                    flush=True,
                )
        for mode in case.modes:
            rows.append(summary_row(case, mode, results[mode]))
            rows[-1]["anchor"] = case.anchor
    table = format_table(rows)
    notes = ratios(rows)
    anchors = sorted({f"- {r['case']}: {r['anchor']}" for r in rows})
    print(table)
    print("\n".join(notes))
    import torch  # only for the report header

    report = "\n".join(
        [
            "# Jaccard distance: speed and peak memory",
            "",
            "Produced by `benchmarks/bench_jaccard.py` (see its docstring for the method).",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {THREADS} threads, k1={K1}, k2={K2}. "
            f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            table,
            "",
            "Ratios (medians):",
            *notes,
            "",
            "Anchors (issue 3, idle machine of this type):",
            *anchors,
            "",
        ]
    )
    write_atomically(args.write, report)
    print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
