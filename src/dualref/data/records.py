"""Typed records passed between the data stages.

Vocabulary (project-wide): ``pid`` is a ground-truth identity (evaluation and source training only);
``labels`` are training targets (relabelled source ids or target pseudo-labels). Target ``pid`` values
must never reach training code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One image of a re-ID data set."""

    path: Path
    pid: int  # ground-truth identity parsed from the file name (-1 = unknown / unlabelled)
    camid: int  # 0-based camera index


@dataclass(frozen=True)
class ReidSplits:
    """The three standard splits of a re-ID data set."""

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]


def relabel_pids(samples: Sequence[Sample]) -> list[int]:
    """Map the ground-truth pids of a labelled training split to contiguous labels 0..K-1.

    Labels follow the sorted order of the pids, so the mapping does not depend on file order.

    Args:
        samples: labelled samples (pid >= 0).

    Returns:
        One training label per sample, in the same order.
    """
    unknown = sorted({s.pid for s in samples if s.pid < 0})
    if unknown:
        raise ValueError(f"cannot relabel samples with unknown pids {unknown}; expected pids >= 0")
    index = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    return [index[s.pid] for s in samples]


def num_pids(samples: Sequence[Sample]) -> int:
    """Number of distinct ground-truth identities."""
    return len({s.pid for s in samples})


def num_cameras(samples: Sequence[Sample]) -> int:
    """Number of distinct cameras."""
    return len({s.camid for s in samples})
