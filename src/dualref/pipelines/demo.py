"""`dualref demo`: the whole method on the synthetic domain pair, with no data, weights or network.

Steps: render the synthetic pair (``synth_a`` = labelled source, ``synth_b`` = unlabelled target with
look-alike identities and the demo's camera styles: `demo_target_config`), train the `tiny` network on the
source and evaluate it on the target (direct transfer, once), then adapt it to the target with the
clustering baseline and with Dual-Refinement over three seeds each (a `dualref study`, two runs at a time),
and write ``report.md`` / ``report.json`` with mean ± std, the per-epoch label figures and two plots (the
paper's Fig. 3(b) with bands, and Fig. 3(a): F-score of the coarse and refined labels). The method settings
are the shipped configs' (`AdaptConfig` defaults; the baseline adds `BASELINE_OVERRIDES`); only the length,
the image size, the network and the batch are scaled down. Every run is an ordinary run folder under ``out``
(config.yaml, run.log, metrics.jsonl, checkpoint), so each can be inspected, evaluated (`dualref evaluate`)
or re-run with `dualref pretrain` / `dualref adapt` and its config.yaml.

Sizes are chosen so that the default demo takes a few minutes on 2 CPU cores and ``--quick`` (one seed, a
smoke test whose numbers mean little) well under a minute. Torch runs one intra-op thread per run: the
network is small, and two runs side by side use two cores better than one run with two threads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dualref import io, report
from dualref.config import (
    BASELINE_OVERRIDES,
    AdaptConfig,
    ClusteringConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    save_config,
)
from dualref.data import datasets, synthetic
from dualref.pipelines import pretrain, study

log = logging.getLogger(__name__)

MARKER = "DEMO.json"
METHODS = {"baseline": "baseline", "dual_refinement": "Dual-Refinement"}  # run folder -> table name
STEP_FOLDERS = ("source", *METHODS)
REPORT_FILE = "report.md"
REPORT_JSON = "report.json"
STUDY_FILE = "demo.study.yaml"
ADAPT_CONFIG = "adapt.yaml"
MAP_PLOT = "map_per_epoch.png"
FSCORE_PLOT = "fscore_per_epoch.png"
RESULT_FILES = (REPORT_FILE, REPORT_JSON, STUDY_FILE, ADAPT_CONFIG, MAP_PLOT, FSCORE_PLOT)
# Per-epoch figures of the adapted rows kept in report.json (metrics.jsonl's names).
EPOCH_KEYS = ("mAP", "coarse_fscore", "refined_fscore", "refined_changed", "bank_cosine_to_initial")


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
    seeds: tuple[int, ...]  # of the adaptation runs (run.seed)
    # `--set` items of both adaptation rows on top of the shipped settings: none for the real demo; the
    # smoke test's 20-iteration source model needs a wider eps to form any cluster at all.
    overrides: tuple[str, ...] = ()


FULL = DemoPlan(
    scale=1.0,
    height=96,
    width=48,
    batch_size=32,
    source_epochs=20,
    source_iters=40,
    source_lr=1e-3,
    adapt_epochs=6,
    adapt_iters=60,
    seeds=(1, 2, 3),
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
    seeds=(1,),
    overrides=("clustering.dbscan_rho=0.1",),
)


def demo_target_config(scale: float) -> synthetic.SyntheticConfig:
    """The demo's target: the stock `synth_b`, look-alike identities and camera styles included.

    Its cameras shift appearance (colour cast, exposure, contrast, blur) strongly enough that the source
    model's target features split many identities by camera while DBSCAN merges look-alikes: the two
    faults of coarse clusters that the paper's refinement re-assigns samples between.
    """
    return synthetic.domain_b_config(scale)


# The rho rule's eps is the mean of the smallest rho * N (N - 1) / 2 pairwise distances: with the shipped
# rho (1.6e-3) on Market-1501's 12,936 training images, the ~10 nearest pairs per image. A data set of N
# images keeps that per-image count with rho x 12,936 / N (label-free: only N is read), the same scaling
# as the image size and the length.
REFERENCE_TARGET_IMAGES = 12936


def scaled_rho(num_images: int) -> float:
    """The shipped rho, scaled from Market-1501's training-set size to `num_images` (at most 0.5)."""
    return min(0.5, ClusteringConfig().dbscan_rho * REFERENCE_TARGET_IMAGES / num_images)


def run_demo(
    out: str | Path, *, seed: int = 0, quick: bool = False, device: str = "cpu", amp: str = "none"
) -> int:
    """Run the demo into folder `out` and print the comparison table.

    Args:
        out: output folder (created; a previous demo's results in it are replaced, its data reused).
        seed: seed of the synthetic data and of the source training; the adaptations run with seeds
            `plan.seeds` (1, 2, 3; --quick: 1).
        quick: a much smaller, shorter run with one seed (a smoke test).
        device: torch device of every run ("cpu", "cuda", ...).
        amp: mixed precision ("none", "bf16"; "fp16" on CUDA only).

    Returns:
        0 (the process exit status).
    """
    plan = QUICK if quick else FULL
    run = RunConfig(seed=seed, device=device, amp=amp, eval_every=1, progress=False, threads=1)
    out = _prepare_folder(Path(out), seed=seed, quick=quick)
    started = time.perf_counter()
    print(f"dualref demo{' --quick' if quick else ''}: results in {out}", flush=True)

    _step(1, "rendering the synthetic domain pair (synth_a: source, synth_b: target)")
    source_root = synthetic.write_domain(out / "data", synthetic.domain_a_config(plan.scale), seed=seed)
    target_root = synthetic.write_domain(out / "data", demo_target_config(plan.scale), seed=seed)

    _step(2, f"source training on synth_a ({plan.source_epochs} epochs x {plan.source_iters} iterations)")
    step_start = time.perf_counter()
    # One run alone on the machine: all its cores (threads=0, torch's default).
    source_run = dataclasses.replace(run, threads=0)
    source_dir = pretrain.pretrain_on_source(
        _pretrain_config(plan, source_root, target_root, out / "source", source_run)
    )
    source_seconds = time.perf_counter() - step_start
    transfer = json.loads((source_dir / "results.json").read_text())["direct_transfer"]

    sizes = f"{plan.adapt_epochs} epochs x {plan.adapt_iters} iterations, seeds {list(plan.seeds)}"
    _step(3, f"adapting to synth_b: clustering baseline and Dual-Refinement ({sizes})")
    step_start = time.perf_counter()
    num_images = len(datasets.load_dataset("market1501", target_root).train)
    study_file = _write_study(out, plan, target_root, source_dir / "checkpoint.pt", run, num_images)
    if study.run_study(study_file, parallel=_parallel(plan)):
        raise RuntimeError(f"an adaptation run failed; see the run.log files under {out}")
    adapt_seconds = time.perf_counter() - step_start

    _step(4, "report")
    rows = [_direct_transfer_row(transfer, seed)]
    rows += [_method_row(out, method, plan.seeds) for method in METHODS]
    print("\n" + format_table(rows), flush=True)
    total = time.perf_counter() - started
    seconds = {"source": source_seconds, "adaptation": adapt_seconds, "total": total}
    _write_report(out, plan, rows, seconds)
    print(f"\ntotal {total / 60:.1f} min; report: {out / REPORT_FILE} (and {REPORT_JSON})", flush=True)
    return 0


def _parallel(plan: DemoPlan) -> int:
    """Adaptation runs at a time: two on a machine of two or more cores (one torch thread each)."""
    return min(len(plan.seeds) * len(METHODS), os.cpu_count() or 1, 2)


def _step(number: int, text: str) -> None:
    print(f"[{number}/4] {text}", flush=True)


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
    for name in (*RESULT_FILES, *study.OUTPUT_FILES):
        (out / name).unlink(missing_ok=True)
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
        run=dataclasses.replace(run, run_dir=str(run_dir), eval_every=0),
    )


def _write_study(
    out: Path, plan: DemoPlan, target_root: Path, source: Path, run: RunConfig, num_images: int
) -> Path:
    """The adaptation rows as a study file: Dual-Refinement with the adaptation defaults (the method of
    configs/*/full.yaml), the baseline with `BASELINE_OVERRIDES` (configs/*/baseline.yaml); only the
    length, the image size, the network, the batch and the rho rule's quantile (`scaled_rho` of the
    target's `num_images`) are scaled to the demo's size."""
    defaults = AdaptConfig()
    optim = defaults.optim
    config = AdaptConfig(
        source_checkpoint=str(source.resolve()),
        data=_data(plan, None, target_root.resolve(), defaults.data.random_erasing_prob),
        model=ModelConfig(arch="tiny", pretrained=None),
        clustering=dataclasses.replace(defaults.clustering, dbscan_rho=scaled_rho(num_images)),
        optim=dataclasses.replace(
            optim,
            epochs=plan.adapt_epochs,
            iters_per_epoch=plan.adapt_iters,
            # The step schedule's shape: x0.1 halfway (the defaults: at 20 of 40 epochs).
            lr_decay_epochs=max(1, plan.adapt_epochs * optim.lr_decay_epochs // optim.epochs),
        ),
        run=dataclasses.replace(run, run_dir=str(out / "adapt")),
    )
    save_config(config, out / ADAPT_CONFIG)
    rows = [
        {
            "name": method,
            "config": str(out / ADAPT_CONFIG),
            "seeds": list(plan.seeds),
            "set": [*(BASELINE_OVERRIDES if method == "baseline" else ()), *plan.overrides],
        }
        for method in METHODS
    ]
    spec = {"out": str(out), "title": "dualref demo", "plot": list(METHODS), "rows": rows}
    io.write_text(out / STUDY_FILE, yaml.safe_dump(spec, sort_keys=False))
    return out / STUDY_FILE


@dataclass(frozen=True)
class ResultRow:
    """One line of the comparison table: scores over seeds as (mean, std), in [0, 1] (std None: one seed)."""

    method: str
    seeds: tuple[int, ...]
    mAP: tuple[float, float | None]  # noqa: N815 - the metric's usual spelling
    rank1: tuple[float, float | None]
    mINP: tuple[float, float | None]  # noqa: N815
    # Per seed, per epoch (1..E): the pseudo-labels' pairwise F-scores (monitoring only), the share of
    # clustered images whose refined label differs from the coarse one, and the bank's mean cosine to
    # its initial rows; empty for direct transfer.
    epochs: dict[str, list[list[float | None]]]


def _direct_transfer_row(transfer: dict[str, Any], seed: int) -> ResultRow:
    return ResultRow(
        method="direct transfer",
        seeds=(seed,),
        mAP=(transfer["mAP"], None),
        rank1=(transfer["rank1"], None),
        mINP=(transfer["mINP"], None),
        epochs={},
    )


def _method_row(out: Path, method: str, seeds: Sequence[int]) -> ResultRow:
    runs = [report.read_epochs(out / method / f"seed_{seed}") for seed in seeds]
    finals = []
    for seed, epochs in zip(seeds, runs, strict=True):
        final = report.final_result(epochs)
        if final is None:
            raise ValueError(f"the {method} run of seed {seed} logged no evaluation; expected one per epoch")
        finals.append(final)
    trained = [[record for record in epochs if record.get("epoch", 0) >= 1] for epochs in runs]
    return ResultRow(
        method=METHODS[method],
        seeds=tuple(seeds),
        mAP=report.mean_std([f["mAP"] for f in finals]),
        rank1=report.mean_std([f["rank1"] for f in finals]),
        mINP=report.mean_std([f["mINP"] for f in finals]),
        epochs={key: [[r.get(key) for r in epochs] for epochs in trained] for key in EPOCH_KEYS},
    )


def format_table(rows: Sequence[ResultRow]) -> str:
    """The comparison table as markdown: mean ± std over seeds in %, F-scores of the first epoch."""

    def first_epoch(row: ResultRow, key: str) -> str:
        refined = any(seed and seed[0] is not None for seed in row.epochs.get("refined_fscore", []))
        if key == "refined_changed" and not refined:
            return "-"  # no refinement computed (the baseline): nothing could move
        values = [seed[0] for seed in row.epochs.get(key, []) if seed and seed[0] is not None]
        return f"{statistics.fmean(values):.3f}" if values else "-"

    lines = [
        "| method | seeds | mAP | R1 | mINP | epoch 1: F coarse | F refined | labels moved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row.method, str(len(row.seeds))]
        cells += [report.format_mean_std(score) for score in (row.mAP, row.rank1, row.mINP)]
        cells += [first_epoch(row, key) for key in ("coarse_fscore", "refined_fscore", "refined_changed")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_record(rows: Sequence[ResultRow], plan: DemoPlan) -> dict[str, Any]:
    """report.json: per row its seeds, mAP / R1 / mINP mean and std, and the per-epoch label figures."""
    return {
        "plan": dataclasses.asdict(plan),
        "rows": [
            {
                "method": row.method,
                "seeds": list(row.seeds),
                **{
                    f"{name}_{stat}": None if value is None else round(value, 6)
                    for name, pair in (("mAP", row.mAP), ("rank1", row.rank1), ("mINP", row.mINP))
                    for stat, value in zip(("mean", "std"), pair, strict=True)
                },
                "per_epoch": row.epochs,
            }
            for row in rows
        ],
    }


def _write_report(out: Path, plan: DemoPlan, rows: Sequence[ResultRow], seconds: dict[str, float]) -> None:
    transfer, _, full = rows
    curves = {name: [report.read_epochs(out / name / f"seed_{s}") for s in plan.seeds] for name in METHODS}
    study.plot_bands(
        {METHODS[name]: seeds for name, seeds in curves.items()},
        path=out / MAP_PLOT,
        title="Target mAP per adaptation epoch (mean ± std over seeds)",
        reference=("direct transfer", 100 * transfer.mAP[0]),
    )
    study.plot_bands(
        {f"F {kind}": curves["dual_refinement"] for kind in ("coarse", "refined")},
        path=out / FSCORE_PLOT,
        title="Dual-Refinement: pairwise F-score of the coarse and refined labels (monitoring only)",
        keys={"F coarse": "coarse_fscore", "F refined": "refined_fscore"},
        ylabel="pairwise F-score",
    )
    drift = [seed[-1] for seed in full.epochs.get("bank_cosine_to_initial", []) if seed]
    text = [
        "# dualref demo",
        "",
        "Source `synth_a` (labelled) -> target `synth_b` (unlabelled; look-alike identities and the "
        "demo's camera styles: `dualref.pipelines.demo.demo_target_config`); `tiny` network at "
        f"{plan.height}x{plan.width}, batch {plan.batch_size}. Source training: {plan.source_epochs} "
        f"epochs x {plan.source_iters} iterations (data and source seed: DEMO.json); each adaptation: "
        f"{plan.adapt_epochs} epochs x {plan.adapt_iters} iterations with the method settings of the "
        "shipped configs (`adapt.yaml`; the baseline adds `BASELINE_OVERRIDES`), seeds "
        f"{list(plan.seeds)}.",
        "",
        "Scores: target query/gallery, %, the **last** epoch, mean ± std over the seeds. Epoch-1 "
        "columns: pairwise F-score of the coarse (DBSCAN) and refined labels against the hidden "
        "identities (monitoring only: training never reads them) and the share of clustered images "
        "that the refinement re-labelled, means over the seeds.",
        "",
        format_table(rows),
        "",
        f"Bank drift (Dual-Refinement): mean cosine of the bank rows to their initial rows after the last "
        f"epoch: {', '.join(f'{v:.3f}' for v in drift) or '-'} (per seed).",
        "",
        f"Source training {seconds['source']:.0f} s; the {2 * len(plan.seeds)} adaptations "
        f"{seconds['adaptation']:.0f} s ({_parallel(plan)} at a time); "
        f"total {seconds['total'] / 60:.1f} min.",
        "",
        f"![target mAP per epoch]({MAP_PLOT})",
        "",
        f"![F-score of the coarse and refined labels]({FSCORE_PLOT})",
        "",
        "Per-run details: `source/`, `<method>/seed_<s>/summary.md`; per-row table: `study.md`; "
        f"machine-readable: `{REPORT_JSON}`.",
        "",
    ]
    io.write_text(out / REPORT_FILE, "\n".join(text))
    io.write_json(out / REPORT_JSON, report_record(rows, plan))
