"""Ranked lists as pictures (`dualref visualize`): what a model retrieves for a query, right and wrong.

For each chosen query, a PNG row of the query and its top-k gallery images in ranked order, framed green
(same identity: a true match), red (another identity) or grey (same identity on the query's camera:
junk, which the protocol skips, so it takes no rank). With a second model (`--compare`, e.g. the direct
transfer model and the adapted one) the rows of both are drawn one above the other for the same query.
An index.html shows every PNG with the query's AP under each model.

The ranked list is `ranked_list`, a pure function of one distance row (ties broken by gallery index,
as in `dualref.evaluation`); drawing uses matplotlib's object API on the Agg canvas, as `report.py`.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dualref import inference, io
from dualref.config import EvalConfig
from dualref.data import loaders
from dualref.data.records import Sample

log = logging.getLogger(__name__)

CORRECT, WRONG, JUNK = "correct", "wrong", "junk"
COLOURS = {CORRECT: "#1a9641", WRONG: "#d7191c", JUNK: "#969696", "query": "#2b83ba"}
INDEX_FILE = "index.html"
THUMBNAIL = (128, 64)  # (height, width) of every drawn image


@dataclass(frozen=True)
class RankedList:
    """The top of one query's ranked gallery.

    Attributes:
        query: the query's index.
        gallery: ``[K + J]`` gallery indices in ranked order: the first K scored entries and the J junk
            entries ranked among them.
        dist: ``[K + J]`` their distances.
        marks: ``[K + J]`` CORRECT, WRONG or JUNK.
        ranks: ``[K + J]`` 1-based rank under the protocol (junk skipped); 0 for a junk entry.
        average_precision: the query's AP under the protocol; None without a true match.
    """

    query: int
    gallery: np.ndarray
    dist: np.ndarray
    marks: list[str]
    ranks: np.ndarray
    average_precision: float | None


def ranked_list(
    dist_row: np.ndarray,
    query_pid: int,
    query_camid: int,
    gallery_pids: np.ndarray,
    gallery_camids: np.ndarray,
    *,
    top_k: int,
    query: int = 0,
) -> RankedList:
    """The top-k of a query's ranked gallery, marked, and the query's AP.

    Args:
        dist_row: ``[G]`` distances of the query to the gallery.
        query_pid, query_camid: the query's identity and camera.
        gallery_pids, gallery_camids: ``[G]`` the gallery's.
        top_k: scored entries to keep (junk entries among them are kept too, marked).
        query: the query's index (stored in the result).
    """
    if top_k < 1:
        raise ValueError(f"top_k={top_k!r}; expected >= 1")
    order = np.argsort(dist_row, kind="stable")  # [G] ties: smaller gallery index first
    match = gallery_pids[order] == query_pid
    junk = match & (gallery_camids[order] == query_camid)
    hits = match & ~junk
    rank = np.cumsum(~junk)  # [G] 1-based rank among scored entries
    found = np.cumsum(hits)
    average_precision = float(np.mean(found[hits] / rank[hits])) if hits.any() else None
    shown = rank <= top_k
    shown &= ~junk | (rank < top_k)  # junk after the k-th scored entry is not shown
    marks = np.where(junk, JUNK, np.where(match, CORRECT, WRONG))[shown]
    return RankedList(
        query=query,
        gallery=order[shown],
        dist=np.asarray(dist_row)[order[shown]],
        marks=[str(m) for m in marks],
        ranks=np.where(junk, 0, rank)[shown],
        average_precision=average_precision,
    )


def valid_queries(
    query_pids: np.ndarray, query_camids: np.ndarray, gallery_pids: np.ndarray, gallery_camids: np.ndarray
) -> np.ndarray:
    """``[Q]`` bool: queries with a true match (same pid, another camera) in the gallery."""
    cameras: dict[int, set[int]] = {}
    for pid, cam in zip(gallery_pids.tolist(), gallery_camids.tolist(), strict=True):
        cameras.setdefault(pid, set()).add(cam)
    queries = zip(query_pids.tolist(), query_camids.tolist(), strict=True)
    return np.array([bool(cameras.get(pid, set()) - {cam}) for pid, cam in queries], dtype=bool)


def choose_queries(valid: np.ndarray, num: int, seed: int) -> np.ndarray:
    """``num`` query indices drawn without replacement among the valid ones (seeded), ascending."""
    candidates = np.flatnonzero(valid)
    if not len(candidates):
        raise ValueError("no query has a true match in the gallery (same pid, another camera)")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(num, len(candidates)), replace=False))


@dataclass(frozen=True)
class Ranking:
    """A model's (or saved) distances over one query/gallery split, with the samples they index."""

    label: str  # shown beside the model's row
    dist: np.ndarray  # [Q, G]
    query: list[Sample]
    gallery: list[Sample]
    mAP: float | None = None  # noqa: N815 - of the whole split, when known


def ranking_from_checkpoint(
    checkpoint_path: str | Path,
    dataset: str,
    root: str | Path,
    *,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    options: EvalConfig = EvalConfig(),
    progress: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> Ranking:
    """A checkpoint's distances on a data set's query/gallery (the evaluation path's, at its input size;
    `amp_dtype` and `channels_last` as in `inference.checkpoint_evaluator`)."""
    model, evaluator, state = inference.checkpoint_evaluator(
        checkpoint_path,
        dataset,
        root,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        options=options,
        progress=progress,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
    )
    result = evaluator.evaluate(model, keep_dist=True)
    assert result.dist is not None
    kind = {"pretrain": "direct transfer", "adapt": "adapted"}.get(str(state.get("kind")), state.get("kind"))
    label = f"{kind}, epoch {state.get('epoch')}\n{_short(checkpoint_path, 2)}"
    return Ranking(label, result.dist, evaluator.query, evaluator.gallery, float(result.metrics.mAP))


def ranking_from_saved(folder: str | Path) -> Ranking:
    """The distances saved by `dualref evaluate --save-features FOLDER`."""
    folder = Path(folder)
    needed = ["dist.npy", *(f"{s}_{k}" for s in ("query", "gallery") for k in ("pids.npy", "camids.npy"))]
    needed += ["query_paths.txt", "gallery_paths.txt"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; expected the folder of `dualref evaluate --save-features`"
        )
    dist = np.load(folder / "dist.npy")
    splits = {}
    for name in ("query", "gallery"):
        paths = (folder / f"{name}_paths.txt").read_text().splitlines()
        pids, camids = np.load(folder / f"{name}_pids.npy"), np.load(folder / f"{name}_camids.npy")
        if not len(paths) == len(pids) == len(camids):
            raise ValueError(f"{folder}: {name} paths, pids and camids differ in length")
        splits[name] = [Sample(Path(p), int(i), int(c)) for p, i, c in zip(paths, pids, camids, strict=True)]
    if dist.shape != (len(splits["query"]), len(splits["gallery"])):
        raise ValueError(f"{folder}/dist.npy has shape {dist.shape}; expected [query, gallery] counts")
    return Ranking(f"saved\n{_short(folder, 2)}", dist, splits["query"], splits["gallery"])


def write_ranked_lists(
    rankings: Sequence[Ranking],
    out: str | Path,
    *,
    num_queries: int = 8,
    query_indices: Sequence[int] | None = None,
    top_k: int = 10,
    seed: int = 0,
) -> Path:
    """Draw the chosen (or `num_queries` random, seeded) queries' top-k lists of every ranking.

    Args:
        rankings: one or more rankings of the same query/gallery split (drawn one row each).
        out: output folder: one `query_NNNNN.png` per query and `index.html`.
        num_queries: random valid queries to draw when `query_indices` is None.
        query_indices: the queries to draw (0-based indices into the query split).
        top_k: scored gallery entries per row.
        seed: of the random choice.

    Returns:
        The path of index.html.
    """
    first = rankings[0]
    for other in rankings[1:]:
        if [s.path for s in other.query] != [s.path for s in first.query] or len(other.gallery) != len(
            first.gallery
        ):
            raise ValueError("the rankings to compare are of different query/gallery splits")
    q_pids, q_cams = (np.array([getattr(s, k) for s in first.query]) for k in ("pid", "camid"))
    g_pids, g_cams = (np.array([getattr(s, k) for s in first.gallery]) for k in ("pid", "camid"))
    if query_indices:
        bad = [i for i in query_indices if not 0 <= i < len(first.query)]
        if bad:
            raise ValueError(f"--query-index {bad}: expected 0..{len(first.query) - 1}")
        chosen = np.array(query_indices)
    else:
        chosen = choose_queries(valid_queries(q_pids, q_cams, g_pids, g_cams), num_queries, seed)
    out = Path(out)
    entries = []
    for index in chosen.tolist():
        lists = [
            ranked_list(r.dist[index], q_pids[index], q_cams[index], g_pids, g_cams, top_k=top_k, query=index)
            for r in rankings
        ]
        name = f"query_{index:05d}.png"
        rows = [(r.label, rl) for r, rl in zip(rankings, lists, strict=True)]
        draw_ranked_lists(first.query[index], rows, first.gallery, out / name)
        entries.append((index, name, lists))
    path = out / INDEX_FILE
    io.write_text(path, index_html(rankings, first.query, entries, top_k=top_k))
    return path


def draw_ranked_lists(
    query: Sample, rows: Sequence[tuple[str, RankedList]], gallery: Sequence[Sample], path: Path
) -> None:
    """One PNG: per row, the query then its ranked gallery images, framed by mark."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 1 + max(len(ranked.gallery) for _, ranked in rows)
    # Sizes in inches: a 1.05 x 2.45 cell per image, a label margin on the left, title and legend lines.
    cell_w, cell_h, label_w, top, bottom = 1.05, 2.35, 1.9, 0.35, 0.3
    width, height = label_w + cell_w * columns, top + bottom + cell_h * len(rows)
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        len(rows),
        columns,
        left=label_w / width,
        right=0.995,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=0.08,
        hspace=0.3,
    )
    for row, (label, ranked) in enumerate(rows):
        ap = ranked.average_precision
        score = "no true match" if ap is None else f"AP {100 * ap:.1f}%"
        axes = figure.add_subplot(grid[row, 0])
        _image_cell(axes, query.path, COLOURS["query"], f"query\nid {query.pid} camid {query.camid}")
        axes.set_ylabel(f"{label}\n{score}", fontsize=7.5, rotation=0, ha="right", va="center", labelpad=6)
        cells = zip(ranked.gallery, ranked.dist, ranked.marks, ranked.ranks, strict=True)
        for column, (index, dist, mark, rank) in enumerate(cells, start=1):
            sample = gallery[index]
            title = (
                "junk\n(same cam)"
                if mark == JUNK
                else f"#{rank} {dist:.3f}\nid {sample.pid} camid {sample.camid}"
            )
            _image_cell(figure.add_subplot(grid[row, column]), sample.path, COLOURS[mark], title)
    legend = (
        "green: same identity  |  red: other identity  |  grey: same identity and camera (junk, not "
        "scored)  |  #rank distance"
    )
    figure.text(0.5, 0.01, legend, ha="center", va="bottom", fontsize=7.5)
    figure.suptitle(_short(query.path), fontsize=8, y=0.995, va="top")
    io.write_bytes(path, lambda handle: figure.savefig(handle, format="png"))


def _image_cell(axes: Any, image_path: Path, colour: str, title: str) -> None:
    axes.imshow(np.asarray(loaders.read_image(image_path, THUMBNAIL)))
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
    axes.set_title(title, fontsize=7, color=colour, pad=3)


def index_html(
    rankings: Sequence[Ranking],
    queries: Sequence[Sample],
    entries: Sequence[tuple[int, str, list[RankedList]]],
    *,
    top_k: int,
) -> str:
    """The page showing every query's PNG with its AP under each ranking."""
    models = "".join(
        f"<li>{html.escape(r.label.replace(chr(10), ': '))}"
        + (f" (mAP {100 * r.mAP:.1f}% over all queries)" if r.mAP is not None else "")
        + "</li>"
        for r in rankings
    )
    sections = []
    for index, png, lists in entries:
        aps = ", ".join(
            f"{html.escape(r.label.splitlines()[0])}: "
            + ("no true match" if rl.average_precision is None else f"AP {100 * rl.average_precision:.1f}%")
            for r, rl in zip(rankings, lists, strict=True)
        )
        sample = queries[index]
        sections.append(
            f"<h2>query {index}: id {sample.pid}, camid {sample.camid}</h2>\n"
            f"<p>{html.escape(str(sample.path))}<br>{aps}</p>\n"
            f"<img src=\"{png}\" alt=\"ranked list of query {index}\">"
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dualref ranked lists</title>"
        "<style>body{font-family:sans-serif;margin:2em} img{max-width:100%}</style></head><body>\n"
        f"<h1>Ranked lists: top {top_k}</h1>\n<ul>{models}</ul>\n"
        "<p>Frames: green = same identity (true match), red = other identity, grey = same identity on the "
        "query's camera (junk: skipped by the protocol, takes no rank).</p>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _short(path: str | Path, parts: int = 3) -> str:
    """The last parts of a path: enough to tell files apart in a figure."""
    return "/".join(Path(path).parts[-parts:])
