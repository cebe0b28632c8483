"""End-of-run report of an adaptation run: per-epoch plots (paper Fig. 3) and summary.md.

Reads the run folder written by `dualref.adaptation` (config.yaml, metrics.jsonl). The result of a run is
its LAST evaluated epoch; the epoch with the best test mAP is shown too, labelled as optimistic (it is
chosen on the test set, as the reference's "model_best" was).

Plots are drawn with matplotlib's object API on the Agg canvas: no pyplot global state, no display needed.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from dualref import io, runs
from dualref.runs import METRICS_FILE

SUMMARY_FILE = "summary.md"
FSCORE_PLOT = "label_fscore.png"
RANK_PLOT = "target_rank.png"
TERMS = ("ce_coarse", "triplet_coarse", "ce_refined", "triplet_refined", "memory")
# The training diagnostics of docs/study.md: file -> (series: legend -> record key, y label, title).
DIAGNOSTIC_PLOTS: dict[str, tuple[dict[str, str], str, str]] = {
    "grad_share.png": (
        {term: f"grad_share_{term}" for term in TERMS},
        "share of the gradient norm",
        "Which loss term drives the trunk",
    ),
    "clusters.png": (
        {
            "largest cluster / N": "largest_cluster_share",
            "outliers / N": "outlier_share",
            "refined label != coarse": "refined_changed",
        },
        "share of the target images",
        "Cluster profile (label-free)",
    ),
    "precision.png": (
        {
            "coarse label pairs": "coarse_precision",
            "refined label pairs": "refined_precision",
            "spread-out positives (bank k-NN)": "bank_neighbour_precision",
        },
        "precision",
        "Precision against the hidden identities (monitoring only)",
    ),
    "bank.png": (
        {"cosine to the initial row": "bank_cosine_to_initial", "row norm": "bank_row_norm"},
        "mean over rows",
        "Instant memory bank drift",
    ),
}


def read_epochs(run_dir: str | Path) -> list[dict[str, Any]]:
    """One merged record per epoch from metrics.jsonl ("adapt" and "eval_target" lines).

    A resumed run may have logged an epoch twice; the later line wins.

    Args:
        run_dir: the run folder.

    Returns:
        Records sorted by epoch (epochs completed; 0 = before adaptation), each with an "epoch" key.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected the metrics of an adaptation run")
    merged: dict[int, dict[str, Any]] = {}
    for record in runs.read_records(run_dir):
        if record.get("kind") not in ("adapt", "eval_target"):
            continue
        values = {k: v for k, v in record.items() if k not in ("kind", "time")}
        merged.setdefault(int(record["epoch"]), {}).update(values)
    return [merged[epoch] for epoch in sorted(merged)]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation over seeds; the spread is None for a single value (one seed
    has none to estimate, and 0 would claim that it has been measured)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(value: tuple[float, float | None], *, scale: float = 100.0, digits: int = 1) -> str:
    """A `mean_std` pair as a table cell, "mean ± std" (the mean alone without a spread)."""
    mean, std = value
    return f"{scale * mean:.{digits}f}" + ("" if std is None else f" ± {scale * std:.{digits}f}")


def final_result(epochs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The last evaluated epoch's record (the reported result), or None when nothing was evaluated."""
    evaluated = [record for record in epochs if record.get("mAP") is not None]
    return dict(evaluated[-1]) if evaluated else None


def best_on_test(epochs: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The record with the highest test mAP: optimistic, since it is picked on the test set."""
    evaluated = [record for record in epochs if record.get("mAP") is not None]
    return dict(max(evaluated, key=lambda r: r["mAP"])) if evaluated else None


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and summary.md of an adaptation run.

    Args:
        run_dir: the run folder (metrics.jsonl and config.yaml are read).

    Returns:
        The path of summary.md.
    """
    run_dir = Path(run_dir)
    epochs = read_epochs(run_dir)
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    plots = []
    if any("coarse_fscore" in record for record in epochs):
        plot_series(
            epochs,
            {"coarse labels": "coarse_fscore", "refined labels": "refined_fscore"},
            ylabel="pairwise F-score",
            title="Pseudo-label quality (monitoring only)",
            path=run_dir / FSCORE_PLOT,
        )
        plots.append(FSCORE_PLOT)
    if sum(record.get("mAP") is not None for record in epochs) >= 1:
        plot_series(
            epochs,
            {"mAP": "mAP", "rank-1": "rank1"},
            ylabel="target test score",
            title="Target query/gallery",
            path=run_dir / RANK_PLOT,
        )
        plots.append(RANK_PLOT)
    for name, (series, ylabel, title) in DIAGNOSTIC_PLOTS.items():
        present = {label: key for label, key in series.items() if any(key in record for record in epochs)}
        if present:
            plot_series(epochs, present, ylabel=ylabel, title=title, path=run_dir / name)
            plots.append(name)
    path = run_dir / SUMMARY_FILE
    io.write_text(path, summary_markdown(epochs, config, plots))
    return path


def summary_markdown(
    epochs: Sequence[Mapping[str, Any]], config: Mapping[str, Any], plots: Sequence[str] = ()
) -> str:
    """The markdown text of summary.md (a pure function of the records and the config)."""
    loss = config.get("loss", {})
    optim = config.get("optim", {})
    data = config.get("data", {})
    lines = [
        "# Adaptation run summary",
        "",
        f"- target: `{data.get('target')}` ({data.get('target_root')}), "
        f"source checkpoint: `{config.get('source_checkpoint')}`",
        f"- model: `{config.get('model', {}).get('arch')}` at {data.get('height')}x{data.get('width')}; "
        f"{optim.get('epochs')} epochs x {optim.get('iters_per_epoch')} iterations, "
        f"batch {data.get('batch_size')}",
        f"- loss: ce_weight (lambda) {loss.get('ce_weight')}, refined_weight (alpha) "
        f"{loss.get('refined_weight')}, spread_weight (mu) {loss.get('spread_weight')}, memory "
        f"`{loss.get('memory')}` / `{loss.get('memory_loss')}`, triplet on `{loss.get('triplet_feature')}`",
        "",
    ]
    final = final_result(epochs)
    if final is None:
        if data.get("target") == "unlabelled":  # no query/gallery: nothing to score, by design
            lines += ["No evaluation: unlabelled target (no query/gallery to score).", ""]
        else:
            lines += ["No evaluation was run.", ""]
    else:
        best = best_on_test(epochs)
        lines += [
            "## Result (last epoch)",
            "",
            "| | epoch | mAP | rank-1 | rank-5 | rank-10 | mINP |",
            "|---|---|---|---|---|---|---|",
            _result_row("**result: last epoch**", final),
        ]
        if best is not None and best["epoch"] != final["epoch"]:
            lines.append(_result_row("best epoch on the test set (optimistic)", best))
        lines.append("")
    total = sum(
        value for record in epochs for key, value in record.items()
        if key.startswith("seconds_") and isinstance(value, int | float)
    )
    lines += [f"Total time of the recorded stages: {total / 60:.1f} min.", "", "## Per epoch", ""]
    lines += _epoch_table(epochs)
    for plot in plots:
        lines += ["", f"![{plot}]({plot})"]
    return "\n".join(lines) + "\n"


def _percent(value: Any) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _result_row(name: str, record: Mapping[str, Any]) -> str:
    cells = [_percent(record.get(key)) for key in ("mAP", "rank1", "rank5", "rank10", "mINP")]
    return f"| {name} | {record['epoch']} | " + " | ".join(cells) + " |"


def _epoch_table(epochs: Sequence[Mapping[str, Any]]) -> list[str]:
    columns = (
        ("epoch", "epoch", str),
        ("eps", "eps", lambda v: f"{v:.4f}"),
        ("clusters", "num_clusters", str),
        ("outliers", "num_outliers", str),
        ("F coarse", "coarse_fscore", lambda v: f"{v:.3f}"),
        ("F refined", "refined_fscore", lambda v: f"{v:.3f}"),
        ("loss", "loss_total", lambda v: f"{v:.3f}"),
        ("memory loss", "loss_memory", lambda v: f"{v:.3f}"),
        ("mAP %", "mAP", _percent),
        ("R1 %", "rank1", _percent),
        ("train s", "seconds_train", lambda v: f"{v:.0f}"),
        ("cluster s", None, lambda v: f"{v:.0f}"),
    )
    header = "| " + " | ".join(name for name, _, _ in columns) + " |"
    rows = [header, "|" + "---|" * len(columns)]
    for record in epochs:
        cells = []
        for _, key, fmt in columns:
            if key is None:  # off-line stages: extraction, Jaccard, DBSCAN, refinement
                parts = [record.get(f"seconds_{s}") for s in ("extract", "jaccard", "dbscan", "refine")]
                value: Any = sum(p for p in parts if p is not None) if any(parts) else None
            else:
                value = record.get(key)
            cells.append("" if value is None else fmt(value))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def plot_series(
    epochs: Sequence[Mapping[str, Any]],
    series: Mapping[str, str],
    *,
    ylabel: str,
    title: str,
    path: Path,
) -> None:
    """Several record keys of one run against the epoch (e.g. coarse and refined F-score), as PNG.

    Args:
        epochs: the merged per-epoch records (`read_epochs`).
        series: legend label -> record key; epochs without the key are skipped.
        ylabel, title: axis label and title.
        path: the PNG file (written atomically).
    """
    lines = {label: _points(epochs, key) for label, key in series.items()}
    _line_plot(lines, ylabel=ylabel, title=title, path=path)


def plot_comparison(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    key: str,
    *,
    ylabel: str,
    title: str,
    path: Path,
    reference: tuple[str, float] | None = None,
) -> None:
    """One record key of several runs against the epoch (e.g. target mAP of baseline vs full), as PNG.

    Args:
        runs: legend label -> merged per-epoch records of that run (`read_epochs`).
        key: the record key to plot.
        ylabel, title: axis label and title.
        path: the PNG file (written atomically).
        reference: optional (label, value) drawn as a horizontal dashed line (e.g. direct transfer).
    """
    lines = {label: _points(epochs, key) for label, epochs in runs.items()}
    _line_plot(lines, ylabel=ylabel, title=title, path=path, reference=reference)


def _points(epochs: Sequence[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["epoch"]), float(r[key])) for r in epochs if r.get(key) is not None]


def _line_plot(
    lines: Mapping[str, list[tuple[int, float]]],
    *,
    ylabel: str,
    title: str,
    path: Path,
    reference: tuple[str, float] | None = None,
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5.0, 3.4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if reference is not None:
        axes.axhline(reference[1], color="grey", linestyle="--", label=reference[0])
    for label, points in lines.items():
        if points:
            xs, ys = zip(*points, strict=True)
            axes.plot(xs, ys, marker="o", markersize=3, label=label)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    io.write_bytes(path, lambda handle: figure.savefig(handle, format="png"))
