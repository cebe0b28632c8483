"""``dualref data check``: parse a data set, optionally decode every image, report sizes and problems.

Errors (exit status 1): an image that cannot be read or decoded, a file name or list line that does
not parse, an empty split, query identities absent from the gallery. Warnings (exit status unchanged):
queries whose only gallery matches share their camera, which the evaluation protocol skips; entries the
loader does not read (links to folders, broken links, .png files where the layout reads .jpg only).
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from dualref.data import datasets, loaders
from dualref.data.records import Sample, num_cameras, num_pids

_SHOWN_IDS = 20  # identities listed one by one before "... and N more"


@dataclass(frozen=True)
class SplitStats:
    """Size of one split."""

    split: str
    num_images: int
    num_ids: int
    num_cameras: int
    num_junk: int  # images with pid -1 dropped by the parser (Market-1501 and labelled folders)


@dataclass(frozen=True)
class SizeStats:
    """Min / median / max image width and height, in pixels, over the readable images."""

    num_images: int
    width: tuple[int, float, int]
    height: tuple[int, float, int]


@dataclass(frozen=True)
class CheckResult:
    """Everything ``dualref data check`` reports."""

    dataset: str
    root: Path
    splits: list[SplitStats]
    sizes: SizeStats | None  # None when no image could be read
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_dataset(root: str | Path, *, dataset: str, verify_images: bool = True) -> CheckResult:
    """Parse the data set and look for every problem.

    Args:
        root: the data set folder or a parent holding it under its usual name.
        dataset: one of :data:`dualref.data.datasets.DATASET_NAMES`.
        verify_images: decode every image (a thread pool; ~35k small JPEGs take seconds); when False
            only the image headers are read, for the size statistics.

    Raises:
        ValueError: unknown data set name.
        FileNotFoundError: the data set folder or a required part of it is missing.
    """
    report = datasets.load_dataset_report(dataset, root)
    splits = {name: getattr(report.splits, name) for name in datasets.SPLIT_NAMES}
    errors = [f"{p.path}: {p.reason}" for p in report.problems]
    stats = [
        SplitStats(
            name,
            len(samples),
            num_pids(samples),
            num_cameras(samples),
            report.num_junk.get(name, 0),
        )
        for name, samples in splits.items()
    ]
    for name, samples in splits.items():
        if not samples and not (dataset == "unlabelled" and name != "train"):
            errors.append(f"split {name} is empty")
    warnings = [f"{p.path}: {p.reason}" for p in report.ignored]
    if dataset != "unlabelled":
        errors += _query_gallery_errors(report.splits.query, report.splits.gallery, warnings)
    paths = [s.path for samples in splits.values() for s in samples]
    sizes, bad = loaders.image_sizes(paths, decode=verify_images)
    errors += [f"{path}: unreadable image: {reason}" for path, reason in bad]
    readable = [s for s in sizes if s is not None]
    size_stats = None
    if readable:
        widths, heights = [w for w, _ in readable], [h for _, h in readable]
        size_stats = SizeStats(
            len(readable),
            (min(widths), statistics.median(widths), max(widths)),
            (min(heights), statistics.median(heights), max(heights)),
        )
    return CheckResult(dataset, report.root, stats, size_stats, errors, warnings)


def _query_gallery_errors(
    query: Sequence[Sample], gallery: Sequence[Sample], warnings: list[str]
) -> list[str]:
    """Errors for query ids absent from the gallery; appends a warning for same-camera-only matches."""
    gallery_ids = {s.pid for s in gallery}
    absent = sorted({s.pid for s in query} - gallery_ids)
    errors = []
    if absent and gallery:
        shown = ", ".join(str(pid) for pid in absent[:_SHOWN_IDS])
        more = f" ... and {len(absent) - _SHOWN_IDS} more" if len(absent) > _SHOWN_IDS else ""
        errors.append(f"{len(absent)} query identities absent from the gallery: {shown}{more}")
    gallery_cams: dict[int, set[int]] = {}
    for s in gallery:
        gallery_cams.setdefault(s.pid, set()).add(s.camid)
    # Evaluation ignores gallery images with the query's pid and camera: such a query has no valid match.
    unmatched = [
        s for s in query if s.pid in gallery_cams and not gallery_cams[s.pid] - {s.camid}
    ]
    if unmatched:
        warnings.append(
            f"{len(unmatched)} queries have gallery matches only in their own camera "
            f"(skipped by the evaluation), e.g. {unmatched[0].path}"
        )
    return errors


def format_report(result: CheckResult) -> str:
    """The human-readable report printed by ``dualref data check``."""
    lines = [f"data set {result.dataset} at {result.root}", ""]
    lines.append(f"{'split':<8} {'images':>9} {'ids':>7} {'cameras':>8} {'junk dropped':>13}")
    for s in result.splits:
        lines.append(
            f"{s.split:<8} {s.num_images:>9,} {s.num_ids:>7,} {s.num_cameras:>8,} {s.num_junk:>13,}"
        )
    lines.append("")
    if result.sizes is None:
        lines.append("image sizes: no readable image")
    else:
        (w_min, w_med, w_max), (h_min, h_med, h_max) = result.sizes.width, result.sizes.height
        lines.append(
            f"image sizes over {result.sizes.num_images:,} images (min / median / max): "
            f"width {w_min} / {w_med:g} / {w_max}, height {h_min} / {h_med:g} / {h_max}"
        )
    for kind, items in (("warning", result.warnings), ("error", result.errors)):
        lines += [f"{kind}: {item}" for item in items]  # every one: the user greps this list
    lines.append("")
    lines.append(
        f"{len(result.errors)} error(s), {len(result.warnings)} warning(s)"
        if result.errors or result.warnings
        else "no problems found"
    )
    return "\n".join(lines)


def run_check(
    root: str | Path, *, dataset: str, verify_images: bool = True, out: TextIO | None = None
) -> int:
    """Print the check report of a data set; returns the exit status (1 when there are errors)."""
    result = check_dataset(root, dataset=dataset, verify_images=verify_images)
    print(format_report(result), file=out or sys.stdout)
    return 1 if result.errors else 0
