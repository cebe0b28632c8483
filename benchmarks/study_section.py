"""Refresh one section of benchmarks/results/study.md from a `dualref study` output folder.

The section holds three marked blocks, filled from the study folder as its runs finish::

    <!-- NAME:rows --> ... <!-- /NAME:rows -->        the mean ± std table of OUT/study.md
    <!-- NAME:compare --> ... <!-- /NAME:compare -->  its table of differences with their s.e.
    <!-- NAME:diag --> ... <!-- /NAME:diag -->        per-epoch diagnostics of every finished seed
                                                      (benchmarks/study_diagnostics.py)

Text outside the markers is left as it is; the file is rewritten atomically. With `--figure`, the
study's Fig. 3(b) (OUT/fig3b.png) is copied there. Run `dualref study STUDY.yaml --report` first so
that OUT/study.md is current.

Usage::

    python benchmarks/study_section.py runs/study/released16/duke_to_market benchmarks/results/study.md \\
        --name d2m16 --figure benchmarks/results/study_released16_duke_to_market_fig3b.png
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dualref import io
from dualref.pipelines.study import JSON_FILE, PLOT_FILE, SUMMARY_FILE, run_status
from study_diagnostics import TABLE_HEAD, rows


def tables(markdown: str) -> list[list[str]]:
    """The Markdown tables of a text, in order: runs of consecutive lines that start with '|'."""
    found: list[list[str]] = []
    current: list[str] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def diagnostics(out: Path, skip: set[str]) -> list[str]:
    """The per-epoch diagnostics table of every finished seed, in the study's row order."""
    lines = list(TABLE_HEAD)
    names = [row["name"] for row in json.loads((out / JSON_FILE).read_text())["rows"]]
    for name in (n for n in names if n not in skip):
        seeds = sorted(int(p.name.removeprefix("seed_")) for p in (out / name).glob("seed_*") if p.is_dir())
        for seed in seeds:
            if run_status(out / name / f"seed_{seed}") == "done":
                lines += rows(f"{name} (seed {seed})", out / name / f"seed_{seed}")
    return lines


def replace_block(text: str, name: str, body: list[str], *, path: Path) -> str:
    """Put `body` between <!-- name --> and <!-- /name -->, which must each occur exactly once."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"{path}: expected one '{start}' and one '{end}', found {text.count(start)} and "
                         f"{text.count(end)}")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return head + start + "\n" + "\n".join(body) + "\n" + end + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("out", type=Path, help="the study's output folder (its `out`)")
    parser.add_argument("results", type=Path, help="the Markdown file holding the marked section")
    parser.add_argument("--name", required=True, help="the markers' prefix, e.g. d2m16")
    parser.add_argument("--figure", type=Path, help="copy the study's Fig. 3(b) (OUT/fig3b.png) here")
    parser.add_argument(
        "--skip", default="direct_transfer", help="rows left out of the diagnostics (comma-separated)"
    )
    args = parser.parse_args()
    summary = args.out / SUMMARY_FILE
    if not summary.exists():
        raise SystemExit(f"{summary} does not exist: run `dualref study STUDY.yaml --report` first")
    found = tables(summary.read_text())
    text = args.results.read_text()
    text = replace_block(text, f"{args.name}:rows", found[0], path=args.results)
    if len(found) > 1:  # the differences appear once both rows of a pair have a finished seed
        text = replace_block(text, f"{args.name}:compare", found[1], path=args.results)
    skip = set(filter(None, args.skip.split(",")))
    text = replace_block(text, f"{args.name}:diag", diagnostics(args.out, skip), path=args.results)
    io.write_text(args.results, text)
    if args.figure is not None:
        shutil.copyfile(args.out / PLOT_FILE, args.figure)
    print(f"updated {args.results} ({args.name})")


if __name__ == "__main__":
    main()
