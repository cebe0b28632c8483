"""`dualref study STUDY.yaml`: rows x seeds of adaptation runs, resumable, then mean ± std and Fig. 3(b).

A study file names its output folder, its rows (an adapt config plus `--set` overrides each) and their
seeds. Every (row, seed) is an ordinary `dualref adapt` run in ``OUT/ROW/seed_S``, started as a child
process with ``run.seed=S`` and ``run.threads=1`` so that `parallel` runs share the cores. A finished run
(its last epoch evaluated and summary.md written) is skipped, an interrupted one is resumed exactly, so a
study can be stopped at any moment and continued later, losing at most the current epoch of each run.
At the end (and with ``--report``) it writes ``OUT/study.md`` (mean ± std over seeds of the last epoch;
the best-on-test epoch only labelled as such; for each pair in `compare`, the difference of the two rows'
mean mAP with its standard error), ``OUT/study.json`` and ``OUT/fig3b.png`` (target mAP per epoch, mean with
a ± std band, for the rows named in `plot`).

Example (docs/study.md)::

    out: runs/study/duke_to_market
    parallel: 2
    plot: [baseline, full]
    compare: [[full, baseline]]
    rows:
      - name: baseline
        config: configs/cpu/study/duke_to_market/baseline.yaml
        seeds: [1, 2, 3]
      - name: full
        config: configs/cpu/study/duke_to_market/full.yaml
        seeds: [1, 2, 3]
        set: ["loss.spread_rampup_epochs=2"]
"""

from __future__ import annotations

import logging
import math
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dualref import io, report, runs
from dualref.config import AdaptConfig, load_config

log = logging.getLogger("dualref")

SUMMARY_FILE = "study.md"
JSON_FILE = "study.json"
PLOT_FILE = "fig3b.png"
OUTPUT_FILES = (SUMMARY_FILE, JSON_FILE, PLOT_FILE)
ROW_KEYS = ("name", "config", "seeds", "set")
STUDY_KEYS = ("out", "parallel", "plot", "compare", "rows", "title")


@dataclass(frozen=True)
class Row:
    """One row of a study: an adapt config, overrides, seeds."""

    name: str
    config: Path
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    out: Path
    rows: tuple[Row, ...]
    parallel: int = 2
    plot: tuple[str, ...] = ()
    title: str = "Adaptation study"
    compare: tuple[tuple[str, str], ...] = ()  # (a, b): report mean mAP of a - mean mAP of b, with its s.e.

    def runs(self) -> list[tuple[Row, int, Path]]:
        """Every (row, seed, run folder): the first seed of every row, then the second, ...

        Seed-major, so that a study stopped early has one seed of every row rather than every seed of
        the first rows.
        """
        depth = max(len(row.seeds) for row in self.rows)
        return [
            (row, row.seeds[i], self.out / row.name / f"seed_{row.seeds[i]}")
            for i in range(depth)
            for row in self.rows
            if i < len(row.seeds)
        ]


def load_study(path: str | Path) -> Study:
    """Parse and check a study file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with keys {list(STUDY_KEYS)}")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown or "out" not in raw or not raw.get("rows"):
        raise ValueError(
            f"{path}: unknown keys {unknown}; expected 'out', 'rows' and optionally {list(STUDY_KEYS)}"
        )
    rows = []
    for number, item in enumerate(raw["rows"]):
        where = f"{path}: rows[{number}]"
        if not isinstance(item, dict) or sorted(set(item) - set(ROW_KEYS)) or "name" not in item:
            raise ValueError(f"{where}: expected a mapping with 'name', 'config', 'seeds' and optional 'set'")
        seeds = item.get("seeds", [1])
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"{where}.seeds={seeds!r}; expected a non-empty list of integers")
        config = Path(str(item.get("config", "")))
        if not config.is_file():
            raise FileNotFoundError(f"{where}.config: {config} does not exist")
        overrides = item.get("set", [])
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"{where}.set={overrides!r}; expected a list of 'key=value' strings")
        rows.append(Row(str(item["name"]), config, tuple(seeds), tuple(overrides)))
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: row names must be unique; got {names}")
    plot = tuple(raw.get("plot", ()))
    if set(plot) - set(names):
        raise ValueError(f"{path}: plot names {sorted(set(plot) - set(names))} are not rows {names}")
    parallel = raw.get("parallel", 2)
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"{path}: parallel={parallel!r}; expected a positive integer")
    compare = raw.get("compare", [])
    pairs = compare if isinstance(compare, list) else [compare]
    if not all(isinstance(p, list) and len(p) == 2 and set(map(str, p)) <= set(names) for p in pairs):
        raise ValueError(f"{path}: compare={compare!r}; expected a list of [row, row] pairs of {names}")
    return Study(
        Path(str(raw["out"])),
        tuple(rows),
        parallel,
        plot,
        str(raw.get("title", "Adaptation study")),
        tuple((str(a), str(b)) for a, b in pairs),
    )


def run_status(run_dir: Path) -> str:
    """ "done" (last epoch evaluated, summary written), "partial" (can be resumed) or "new"."""
    if not (run_dir / runs.CONFIG_FILE).is_file():
        return "new"
    config = yaml.safe_load((run_dir / runs.CONFIG_FILE).read_text()) or {}
    epochs = int(config.get("optim", {}).get("epochs", 0))
    evaluated = {int(r["epoch"]) for r in runs.read_records(run_dir, "eval_target")}
    return "done" if epochs in evaluated and (run_dir / report.SUMMARY_FILE).is_file() else "partial"


def _command(row: Row, seed: int, run_dir: Path) -> list[str]:
    base = [sys.executable, "-m", "dualref", "adapt"]
    if run_status(run_dir) == "partial":
        return [*base, "--resume", str(run_dir)]
    sets = [
        *row.overrides,
        f"run.seed={seed}",
        f"run.run_dir={run_dir}",
        "run.threads=1",
        "run.progress=false",
    ]
    return [*base, str(row.config), *(arg for value in sets for arg in ("--set", value))]


def _check_rows(path: str | Path, pending: Sequence[tuple[Row, int, Path]]) -> None:
    """Load the config of every run that would start afresh, as `dualref adapt` will, in this process.

    Raises:
        ValueError: naming the study file and the row, with the config's own message.
    """
    for row, seed, run_dir in pending:
        if run_status(run_dir) == "partial":
            continue  # resumes with its own stored config
        try:
            load_config(AdaptConfig, str(row.config), [*row.overrides, f"run.seed={seed}"])
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"{path}: row {row.name!r} (seed {seed}): {err}") from None


def run_study(
    path: str | Path,
    *,
    only: Sequence[str] = (),
    report_only: bool = False,
    dry_run: bool = False,
    parallel: int | None = None,
) -> int:
    """Run every unfinished (row, seed) of the study, `parallel` at a time; then write the report.

    Args:
        path: the study file.
        only: restrict to these row names (all when empty).
        report_only: write the report from what exists, run nothing.
        dry_run: print the commands, run nothing.
        parallel: runs at once (default: the study file's `parallel`).

    Returns:
        0 when every run finished, 1 when some failed (their logs are in their run folders).
    """
    study = load_study(path)
    pending = [
        (r, s, d) for r, s, d in study.runs() if (not only or r.name in only) and run_status(d) != "done"
    ]
    failed: list[str] = []
    if not report_only:
        _check_rows(path, pending)  # a bad row stops the study now, not after hours of other runs
        running: list[tuple[str, subprocess.Popen[bytes], float]] = []
        for row, seed, run_dir in pending:
            if dry_run:
                print("would run: " + " ".join(_command(row, seed, run_dir)), flush=True)
                continue
            while len(running) >= (parallel or study.parallel):
                running, done = _wait(running)
                failed += done
            command = _command(row, seed, run_dir)  # after the wait: the status may have changed
            print(f"{time.strftime('%H:%M:%S')} starting: " + " ".join(command), flush=True)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            with open(run_dir.parent / f"seed_{seed}.out", "ab") as output:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
            running.append((str(run_dir), process, time.time()))
        while running:
            running, done = _wait(running)
            failed += done
    if not dry_run:
        write_study_report(study)
        print(f"report: {study.out / SUMMARY_FILE}", flush=True)
    for name in failed:
        print(f"failed: {name} (see its run.log and the .out file beside it)", file=sys.stderr)
    return 1 if failed else 0


def _wait(
    running: list[tuple[str, subprocess.Popen[bytes], float]],
) -> tuple[list[tuple[str, subprocess.Popen[bytes], float]], list[str]]:
    """Block until at least one process ends; the still-running ones and the names of those that failed."""
    while True:
        still, failed = [], []
        for name, process, started in running:
            code = process.poll()
            if code is None:
                still.append((name, process, started))
                continue
            minutes = (time.time() - started) / 60
            print(
                f"finished ({'ok' if code == 0 else f'exit {code}'}, {minutes:.1f} min): {name}", flush=True
            )
            if code != 0:
                failed.append(name)
        if len(still) < len(running):
            return still, failed
        time.sleep(5)


def _row_runs(study: Study, row: Row) -> list[list[dict[str, Any]]]:
    """The merged per-epoch records of every finished seed of a row."""
    folders = [study.out / row.name / f"seed_{seed}" for seed in row.seeds]
    return [report.read_epochs(folder) for folder in folders if run_status(folder) == "done"]


def difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b) (sample variances; None
    unless both have two values or more: one seed has no spread to estimate)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, None
    return diff, math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def _last_maps(study: Study, name: str) -> list[float]:
    row = next(r for r in study.rows if r.name == name)
    results = [report.final_result(epochs) for epochs in _row_runs(study, row)]
    return [float(f["mAP"]) for f in results if f is not None and f.get("mAP") is not None]


def comparisons(study: Study) -> list[dict[str, Any]]:
    """Per `compare` pair with finished seeds on both sides: the last-epoch mAP difference and its s.e."""
    out = []
    for a, b in study.compare:
        maps_a, maps_b = _last_maps(study, a), _last_maps(study, b)
        if maps_a and maps_b:
            diff, se = difference(maps_a, maps_b)
            out.append({"rows": [a, b], "seeds": [len(maps_a), len(maps_b)], "mAP": diff, "se": se})
    return out


def summarise(study: Study) -> list[dict[str, Any]]:
    """Per row: seeds finished, mean and std of the last epoch's scores and of the last F-scores."""
    rows = []
    for row in study.rows:
        results = [report.final_result(epochs) for epochs in _row_runs(study, row)]
        finals = [f for f in results if f is not None]
        entry: dict[str, Any] = {
            "name": row.name,
            "seeds": len(finals),
            "of": len(row.seeds),
            "set": row.overrides,
        }
        for key in ("mAP", "rank1", "rank5", "rank10", "mINP", "coarse_fscore", "refined_fscore"):
            values = [float(f[key]) for f in finals if f.get(key) is not None]
            if values:
                entry[key] = report.mean_std(values)
        best = [report.best_on_test(epochs) for epochs in _row_runs(study, row)]
        best_maps = [float(b["mAP"]) for b in best if b is not None]
        if best_maps:
            entry["best_on_test_mAP"] = report.mean_std(best_maps)
        rows.append(entry)
    return rows


def write_study_report(study: Study) -> None:
    """study.md, study.json and fig3b.png from the finished runs."""
    rows = summarise(study)
    lines = [
        f"# {study.title}",
        "",
        "Last epoch, mean ± std over the finished seeds (percent; the mean alone for one seed).",
        "`best-on-test` is the epoch with the highest test mAP, picked on the test set: optimistic, shown",
        "for reference only.",
        "",
        "| row | seeds | mAP | R1 | R5 | mINP | F coarse | F refined | best-on-test mAP | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_cell(row.get(key)) for key in ("mAP", "rank1", "rank5", "mINP")]
        cells += [_cell(row.get(key), scale=1.0, digits=3) for key in ("coarse_fscore", "refined_fscore")]
        cells.append(_cell(row.get("best_on_test_mAP")))
        overrides = ", ".join(f"`{o}`" for o in row["set"])
        lines.append(
            f"| {row['name']} | {row['seeds']}/{row['of']} | " + " | ".join(cells) + f" | {overrides} |"
        )
    differences = comparisons(study)
    if differences:
        lines += [
            "",
            "Differences of the last epoch's mean mAP (percent), with the standard error of the difference",
            "(sqrt(s_a^2 / n_a + s_b^2 / n_b); none with a single seed):",
            "",
            "| difference | seeds | mAP | s.e. |",
            "|---|---|---|---|",
        ]
        for item in differences:
            se = "" if item["se"] is None else f"{100 * item['se']:.1f}"
            (a, b), (n_a, n_b) = item["rows"], item["seeds"]
            lines.append(f"| {a} - {b} | {n_a} vs {n_b} | {100 * item['mAP']:+.1f} | {se} |")
    study.out.mkdir(parents=True, exist_ok=True)
    if study.plot:
        curves = {row.name: _row_runs(study, row) for row in study.rows if row.name in study.plot}
        plot_bands(curves, path=study.out / PLOT_FILE, title=f"{study.title}: target mAP per epoch")
        lines += ["", f"![target mAP per epoch]({PLOT_FILE})"]
    io.write_text(study.out / SUMMARY_FILE, "\n".join(lines) + "\n")
    io.write_json(study.out / JSON_FILE, {"rows": rows, "comparisons": differences})


def _cell(value: tuple[float, float | None] | None, *, scale: float = 100.0, digits: int = 1) -> str:
    return "" if value is None else report.format_mean_std(value, scale=scale, digits=digits)


def plot_bands(
    curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    *,
    path: Path,
    title: str,
    keys: Mapping[str, str] | None = None,
    ylabel: str = "target mAP (%)",
    reference: tuple[str, float] | None = None,
) -> None:
    """A per-epoch figure of several rows: the mean over seeds, with a ± std band (paper Fig. 3(b)).

    Args:
        curves: row name -> the per-epoch records of each of its seeds (`report.read_epochs`).
        path: the PNG file (written atomically).
        title: the plot's title.
        keys: row name -> the record key to draw (default "mAP" for every row, drawn in %; other keys
            are drawn as they are).
        ylabel: the y axis' label.
        reference: (label, value) of a horizontal line, e.g. direct transfer's mAP in %.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5.0, 3.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, seeds in curves.items():
        key = (keys or {}).get(name, "mAP")
        scale = 100.0 if key == "mAP" else 1.0
        by_epoch: dict[int, list[float]] = {}
        for epochs in seeds:
            for record in epochs:
                if record.get(key) is not None:
                    by_epoch.setdefault(int(record["epoch"]), []).append(scale * float(record[key]))
        xs = sorted(by_epoch)
        if not xs:
            continue
        stats = [report.mean_std(by_epoch[x]) for x in xs]
        means = [m for m, _ in stats]
        count = f"{len(seeds)} seed" + ("s" if len(seeds) > 1 else "")
        axes.plot(xs, means, marker="o", markersize=3, label=f"{name} ({count})")
        spread = [(m, s) for m, s in stats if s is not None]
        if len(spread) == len(stats):  # no band while an epoch has a single seed
            axes.fill_between(xs, [m - s for m, s in spread], [m + s for m, s in spread], alpha=0.2)
    if reference is not None:
        axes.axhline(reference[1], color="grey", linestyle="--", linewidth=1, label=reference[0])
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.set_title(textwrap.fill(title, 60), fontsize=9)  # a study's title is often wider than the plot
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    io.write_bytes(path, lambda handle: figure.savefig(handle, format="png"))
