"""`dualref demo`: the whole method on the synthetic domain pair, with no data, weights or network.

Steps: render the synthetic pair (``synth_a`` = labelled source, ``synth_b`` = unlabelled target, with
milder per-camera variation than the stock one: `demo_target_config`), train the `tiny` network on the
source, evaluate it on the target (direct transfer), adapt it to the target with the clustering baseline and
with Dual-Refinement, then print a comparison table and write ``report.md`` with plots. Every step is an
ordinary run folder under ``out`` (config.yaml, run.log, metrics.jsonl, checkpoint), so each can be
inspected, evaluated (`dualref evaluate`) or re-run with `dualref pretrain` / `dualref adapt` and the saved
config.yaml.

Sizes are chosen so that the default demo takes a few minutes on 2 CPU cores and ``--quick`` well under a
minute (a smoke test: its numbers mean little). Torch runs one intra-op thread: the network is small, and on
a shared machine two threads can be many times slower than one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualref import io, report
from dualref.config import (
    AdaptConfig,
    ClusteringConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
)
from dualref.data import synthetic
from dualref.pipelines import adapt, pretrain

log = logging.getLogger(__name__)

MARKER = "DEMO.json"
STEP_FOLDERS = ("source", "baseline", "dual_refinement")
REPORT_FILE = "report.md"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo."""

    scale: float  # multiplies the synthetic identities (1.0: 128 train ids x 12 images per domain)
    height: int  # network input size
    width: int
    batch_size: int  # P x K with K = 4
    source_epochs: int
    source_iters: int  # iterations per source epoch
    source_lr: float
    adapt_epochs: int
    adapt_iters: int  # iterations per adaptation epoch
    adapt_lr: float
    dbscan_rho: float  # eps quantile; larger than the reference's 1.6e-3 because N is tiny
    num_subclusters: int  # R


FULL = DemoPlan(
    scale=1.0,
    height=96,
    width=48,
    batch_size=32,
    source_epochs=30,
    source_iters=40,
    source_lr=1e-3,
    adapt_epochs=6,
    adapt_iters=30,
    adapt_lr=3.5e-4,
    dbscan_rho=5e-3,
    num_subclusters=2,
)
QUICK = DemoPlan(
    scale=0.25,
    height=32,
    width=16,
    batch_size=16,
    source_epochs=2,
    source_iters=10,
    source_lr=1e-3,
    adapt_epochs=2,
    adapt_iters=5,
    adapt_lr=3.5e-4,
    dbscan_rho=2e-2,
    num_subclusters=2,
)


@dataclass(frozen=True)
class ResultRow:
    """One line of the comparison table (scores in [0, 1]; None = not applicable)."""

    method: str
    mAP: float  # noqa: N815 - the metric's usual spelling
    rank1: float
    rank5: float
    rank10: float
    mINP: float  # noqa: N815
    coarse_fscore: float | None
    refined_fscore: float | None
    seconds: float


def demo_target_config(scale: float) -> synthetic.SyntheticConfig:
    """The demo's target: `synth_b` with less camera-to-camera variation than `domain_b_config`.

    Measured with the demo's source model (tiny, 96x48): on the stock `synth_b` the cameras dominate the
    target features (5 nearest neighbours share the camera 66% of the time, chance 25%), so DBSCAN splits
    identities by camera, and training on camera-fragmented clusters lowers cross-camera mAP (even with
    ground-truth (pid, camera) labels: 42.0 -> 28.1 mAP after 2 epochs). With the per-camera colour cast,
    exposure, contrast and blur narrowed as below, the domain-wide gap (palette, warm light, indoor
    backgrounds, low resolution, noise) remains and clustering links cameras (same-camera 5-NN 50%).
    """
    config = synthetic.domain_b_config(scale)
    style = dataclasses.replace(
        config.style,
        cast_sigma=0.03,  # stock B: 0.1
        brightness=(0.85, 1.0),  # stock B: (0.7, 1.05)
        contrast=(0.9, 1.0),  # stock B: (0.8, 1.05)
        blur_sigma=(0.5, 0.6),  # stock B: (0.3, 0.8); the same blur for every camera
    )
    return dataclasses.replace(config, style=style)


def run_demo(
    out: str | Path, *, seed: int = 0, quick: bool = False, device: str = "cpu", amp: str = "none"
) -> int:
    """Run the demo into folder `out` and print the comparison table.

    Args:
        out: output folder (created; a previous demo's results in it are replaced, its data reused).
        seed: seed of the synthetic data and of every run.
        quick: a much smaller, shorter run (a smoke test).
        device: torch device of every run ("cpu", "cuda", ...).
        amp: mixed precision on CUDA ("none", "bf16", "fp16").

    Returns:
        0 (the process exit status).
    """
    plan = QUICK if quick else FULL
    run = RunConfig(seed=seed, device=device, amp=amp, eval_every=1, progress=False, threads=1)
    out = _prepare_folder(Path(out), seed=seed, quick=quick)
    started = time.perf_counter()
    print(f"dualref demo{' --quick' if quick else ''}: results in {out}", flush=True)

    step_start = time.perf_counter()
    _step(1, "rendering the synthetic domain pair (synth_a: source, synth_b: target)")
    source_root = synthetic.write_domain(out / "data", synthetic.domain_a_config(plan.scale), seed=seed)
    target_root = synthetic.write_domain(out / "data", demo_target_config(plan.scale), seed=seed)
    data_seconds = time.perf_counter() - step_start

    step_start = time.perf_counter()
    _step(2, f"source training on synth_a ({plan.source_epochs} epochs x {plan.source_iters} iterations)")
    source_dir = pretrain.pretrain_on_source(
        _pretrain_config(plan, source_root, target_root, out / "source", run)
    )
    source_seconds = time.perf_counter() - step_start
    transfer = json.loads((source_dir / "results.json").read_text())["direct_transfer"]

    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for number, (name, title) in enumerate(
        (("baseline", "clustering baseline"), ("dual_refinement", "Dual-Refinement")), start=3
    ):
        sizes = f"{plan.adapt_epochs} epochs x {plan.adapt_iters} iterations"
        _step(number, f"adapting to synth_b: {title} ({sizes})")
        step_start = time.perf_counter()
        cfg = _adapt_config(plan, target_root, source_dir / "checkpoint.pt", out / name, run, name)
        runs[name] = adapt.adapt_to_target(cfg)
        seconds[name] = time.perf_counter() - step_start

    epochs = {name: report.read_epochs(path) for name, path in runs.items()}
    rows = [_direct_transfer_row(transfer, epochs["dual_refinement"], source_seconds)]
    rows += [
        _adapted_row("baseline", epochs["baseline"], seconds["baseline"]),
        _adapted_row("Dual-Refinement", epochs["dual_refinement"], seconds["dual_refinement"]),
    ]
    total = time.perf_counter() - started
    _step(5, "report")
    table = format_table(rows)
    print("\n" + table, flush=True)
    _write_report(out, plan, rows, epochs, data_seconds=data_seconds, total_seconds=total)
    print(f"\ntotal {total / 60:.1f} min; report: {out / REPORT_FILE}", flush=True)
    return 0


def _step(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", flush=True)


def _prepare_folder(out: Path, *, seed: int, quick: bool) -> Path:
    """Create `out`, or clear the results of an earlier demo there (never a folder the demo did not make)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(
            f"demo output folder {out} is not empty and holds no {MARKER}; expected a new folder or an "
            "earlier demo's (choose another --out)"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in STEP_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    (out / REPORT_FILE).unlink(missing_ok=True)
    (out / MARKER).write_text(json.dumps({"seed": seed, "quick": quick}) + "\n")
    return out


def _data(plan: DemoPlan, source_root: Path | None, target_root: Path, random_erasing: float) -> DataConfig:
    return DataConfig(
        source="market1501",
        source_root=str(source_root) if source_root is not None else "data",
        target="market1501",
        target_root=str(target_root),
        height=plan.height,
        width=plan.width,
        batch_size=plan.batch_size,
        num_instances=4,
        random_erasing_prob=random_erasing,
        test_batch_size=128,
        num_workers=0,
        cache_images=True,
    )


def _pretrain_config(
    plan: DemoPlan, source_root: Path, target_root: Path, run_dir: Path, run: RunConfig
) -> PretrainConfig:
    return PretrainConfig(
        data=_data(plan, source_root, target_root, random_erasing=0.0),
        model=ModelConfig(arch="tiny", pretrained=None),
        optim=OptimConfig(
            lr=plan.source_lr,
            epochs=plan.source_epochs,
            iters_per_epoch=plan.source_iters,
            schedule="warmup_multistep",
            warmup_epochs=max(1, plan.source_epochs // 6),
            milestones=(max(1, plan.source_epochs * 3 // 4),),
        ),
        loss=LossConfig(ce_weight=1.0, refined_weight=0.0, spread_weight=0.0, triplet_feature="pooled"),
        run=dataclasses.replace(run, run_dir=str(run_dir), eval_every=0),
    )


def _adapt_config(
    plan: DemoPlan, target_root: Path, source_checkpoint: Path, run_dir: Path, run: RunConfig, method: str
) -> AdaptConfig:
    if method == "baseline":
        # As the reference's baseline script: coarse labels only, no memory, triplet on the pooled
        # feature, constant learning rate.
        loss = LossConfig(refined_weight=0.0, spread_weight=0.0, triplet_feature="pooled")
        schedule = "constant"
    else:
        # Dual-Refinement as the reference weighs it, except the triplet feature: at this toy scale the
        # reference's L2-normalised BN triplet costs about 8 mAP against the pooled one (measured: 55.5
        # vs 63.4 mAP after 3 epochs from the same start), so the demo keeps the feature the source model was
        # trained with, as the baseline does. configs/ keep the reference setting.
        loss = LossConfig(triplet_feature="pooled")
        schedule = "step"
    return AdaptConfig(
        source_checkpoint=str(source_checkpoint),
        # No random erasing (the reference uses 0.5 on the target): the source model was trained without it,
        # and at 96x48 an erased block hides much of a person. Measured on the demo's pair (last epoch,
        # Dual-Refinement): 61.2 mAP with 0.5, below direct transfer (61.6); 69.9 without.
        data=_data(plan, None, target_root, random_erasing=0.0),
        model=ModelConfig(arch="tiny", pretrained=None),
        optim=OptimConfig(
            lr=plan.adapt_lr,
            epochs=plan.adapt_epochs,
            iters_per_epoch=plan.adapt_iters,
            schedule=schedule,
            lr_decay_epochs=max(1, plan.adapt_epochs * 2 // 3),
        ),
        clustering=ClusteringConfig(dbscan_rho=plan.dbscan_rho, num_subclusters=plan.num_subclusters),
        loss=loss,
        run=dataclasses.replace(run, run_dir=str(run_dir)),
    )


def _direct_transfer_row(
    transfer: dict[str, Any], full_epochs: list[dict[str, Any]], seconds: float
) -> ResultRow:
    # The first adaptation epoch clusters the source model's features: its label quality is the
    # direct-transfer model's.
    first = full_epochs[0] if full_epochs and full_epochs[0].get("epoch") == 1 else {}
    return ResultRow(
        method="direct transfer",
        mAP=transfer["mAP"],
        rank1=transfer["rank1"],
        rank5=transfer["rank5"],
        rank10=transfer["rank10"],
        mINP=transfer["mINP"],
        coarse_fscore=first.get("coarse_fscore"),
        refined_fscore=first.get("refined_fscore"),
        seconds=seconds,
    )


def _adapted_row(method: str, epochs: list[dict[str, Any]], seconds: float) -> ResultRow:
    final = report.final_result(epochs)
    if final is None:
        raise ValueError(f"the {method} run logged no evaluation; expected one per epoch")
    last_labels: dict[str, Any] = next((r for r in reversed(epochs) if "coarse_fscore" in r), {})
    return ResultRow(
        method=method,
        mAP=final["mAP"],
        rank1=final["rank1"],
        rank5=final["rank5"],
        rank10=final["rank10"],
        mINP=final["mINP"],
        coarse_fscore=last_labels.get("coarse_fscore"),
        refined_fscore=last_labels.get("refined_fscore"),
        seconds=seconds,
    )


def format_table(rows: list[ResultRow]) -> str:
    """The comparison table as markdown (scores in %, F-scores in [0, 1])."""

    def score(value: float | None, percent: bool = True) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f}" if percent else f"{value:.3f}"

    lines = [
        "| method | mAP | R1 | R5 | R10 | mINP | F coarse | F refined | time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            row.method,
            *(score(v) for v in (row.mAP, row.rank1, row.rank5, row.rank10, row.mINP)),
            score(row.coarse_fscore, percent=False),
            score(row.refined_fscore, percent=False),
            f"{row.seconds:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_report(
    out: Path,
    plan: DemoPlan,
    rows: list[ResultRow],
    epochs: dict[str, list[dict[str, Any]]],
    *,
    data_seconds: float,
    total_seconds: float,
) -> None:
    transfer = rows[0]
    report.plot_comparison(
        {"baseline": epochs["baseline"], "Dual-Refinement": epochs["dual_refinement"]},
        "mAP",
        ylabel="target mAP",
        title="Target mAP per adaptation epoch",
        path=out / "map_per_epoch.png",
        reference=("direct transfer", transfer.mAP),
    )
    report.plot_comparison(
        {"baseline (coarse)": epochs["baseline"], "Dual-Refinement (coarse)": epochs["dual_refinement"]},
        "coarse_fscore",
        ylabel="pairwise F-score",
        title="Pseudo-label quality per epoch (monitoring only)",
        path=out / "fscore_per_epoch.png",
    )
    text = "\n".join(
        [
            "# dualref demo",
            "",
            "Source `synth_a` (labelled) -> target `synth_b` (unlabelled), synthetic identities rendered by "
            "`dualref.data.synthetic` (the target with milder camera-to-camera variation than the stock "
            "`synth_b`: see `dualref.pipelines.demo.demo_target_config`); `tiny` network at "
            f"{plan.height}x{plan.width}, batch {plan.batch_size}. Source training: {plan.source_epochs} "
            f"epochs x {plan.source_iters} iterations; each adaptation: {plan.adapt_epochs} epochs x "
            f"{plan.adapt_iters} iterations, R = {plan.num_subclusters}, rho = {plan.dbscan_rho}.",
            "",
            "Scores are on the target query/gallery, in %, from the **last** epoch. F coarse / F refined: "
            "pairwise F-score of the pseudo-labels of the last epoch against the hidden target identities "
            "(monitoring only; direct transfer: the clustering of the source model's features). Time: "
            "wall time of the step (direct transfer: source training + its evaluations).",
            "",
            format_table(rows),
            "",
            f"Data rendering: {data_seconds:.0f} s; total: {total_seconds / 60:.1f} min.",
            "",
            "![target mAP per epoch](map_per_epoch.png)",
            "",
            "![pseudo-label F-score per epoch](fscore_per_epoch.png)",
            "",
            "Per-run details: `source/`, `baseline/summary.md`, `dual_refinement/summary.md` "
            "(refined-label F-score plot: `dual_refinement/label_fscore.png`).",
            "",
        ]
    )
    io.write_text(out / REPORT_FILE, text)
