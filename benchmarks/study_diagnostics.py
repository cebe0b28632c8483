"""The per-epoch diagnostics table of benchmarks/results/study.md, from run folders' metrics.jsonl.

One Markdown row per adaptation epoch: eps, cluster profile, refined labels that moved, label quality
(monitoring: reads the target ids), each loss term's share of the gradient at the pooled trunk feature
(coarse + refined summed), bank drift and the precision of the spread-out positives, stage times, and
the mAP where the epoch was evaluated.

Usage::

    python benchmarks/study_diagnostics.py "baseline (seed 1)=runs/study/duke_to_market/baseline/seed_1" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = (
    "| row | epoch | eps | clusters | largest / N | outliers / N | refined moved | F coarse | P coarse "
    "| F refined | grad CE (c+r) | grad triplet (c+r) | grad memory | bank cos to init | bank row norm "
    "| bank k-NN precision | train s | extract s | mAP % |"
)
# The header and its separator row.
TABLE_HEAD = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]


def _number(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def rows(label: str, run_dir: Path) -> list[str]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    maps = {r["epoch"]: r["mAP"] for r in records if r["kind"] == "eval_target"}
    out = []
    for r in records:
        if r["kind"] != "adapt":
            continue
        ce = (r.get("grad_share_ce_coarse") or 0) + (r.get("grad_share_ce_refined") or 0)
        triplet = (r.get("grad_share_triplet_coarse") or 0) + (r.get("grad_share_triplet_refined") or 0)
        cells = [
            label,
            str(r["epoch"]),
            _number(r.get("eps")),
            str(r.get("num_clusters")),
            _number(r.get("largest_cluster_share")),
            _number(r.get("outlier_share")),
            _number(r.get("refined_changed")),
            _number(r.get("coarse_fscore")),
            _number(r.get("coarse_precision")),
            _number(r.get("refined_fscore")),
            _number(ce, 2),
            _number(triplet, 2),
            _number(r.get("grad_share_memory")),
            _number(r.get("bank_cosine_to_initial"), 2),
            _number(r.get("bank_row_norm"), 2),
            _number(r.get("bank_neighbour_precision")),
            _number(r.get("seconds_train"), 0),
            _number(r.get("seconds_extract"), 0),
            _number(100 * maps[r["epoch"]], 1) if r["epoch"] in maps else "",
        ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    args = parser.parse_args()
    print("\n".join(TABLE_HEAD))
    for item in args.runs:
        label, _, folder = item.partition("=")
        print("\n".join(rows(label, Path(folder))))


if __name__ == "__main__":
    main()
