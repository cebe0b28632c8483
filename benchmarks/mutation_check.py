"""Mutation check of the method's wiring and maths (issue 14): do the tests notice a broken Dual-Refinement?

Each mutant is one plausible break of src/dualref (an exact text replaced by another). For each one, a scratch
copy of the repository (without .venv, runs, .git and caches) gets the edit, and a fixed list of fast test
files runs there (`pytest -x -q`, the scratch's src first on PYTHONPATH, this repository's .venv python).
A mutant is *killed* when a test fails, *survives* when every test passes, and is an *error* when its old
text is not found exactly once (never silently skipped) or pytest could not run (exit status >= 2). The
unmodified copy must pass first. Not part of CI: about 15 minutes on two busy cores.

    nice -n 10 .venv/bin/python benchmarks/mutation_check.py               # all mutants, writes the table
    .venv/bin/python benchmarks/mutation_check.py --check                   # only check every old text
    .venv/bin/python benchmarks/mutation_check.py --only M01 M02 --keep     # some mutants, keep the copy

Results: benchmarks/results/mutation_check.md (with the command that produced them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
RESULTS = REPO / "benchmarks" / "results" / "mutation_check.md"
IGNORED = (
    ".venv", "runs", ".git", ".mypy_cache", ".ruff_cache", "__pycache__", ".pytest_cache", "*.egg-info"
)
# Fast tests that guard the method, most discriminating first (pytest -x stops at the first failure).
TESTS = (
    "tests/test_wiring.py",
    "tests/losses",
    "tests/test_config_keys.py",
    "tests/test_adapt.py",
)


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/dualref
    old: str  # must occur exactly once in the file
    new: str
    description: str


ADAPT, STEPS, OBJECTIVE = "pipelines/adapt.py", "steps.py", "losses/objective.py"
LABELS_THEN_OPTIMIZER = """\
            state.take_labels(prepared, features, refresh_bank=epoch == 0 or cfg.loss.bank_refresh)
            monitoring = _monitoring_record(prepared, features, state.memory, monitor_pids, cfg, ranks)
            loader = _train_loader(images, prepared.labels.coarse, cfg, cluster_loader, device, epoch, ranks)
            lr, mu = common.epoch_lr(cfg.optim, epoch), cfg.loss.spread_weight_at(epoch)
            state.optimizer = _build_optimizer(model, state.memory, lr, cfg, previous=state.optimizer)
"""
OPTIMIZER_THEN_LABELS = """\
            lr, mu = common.epoch_lr(cfg.optim, epoch), cfg.loss.spread_weight_at(epoch)
            state.optimizer = _build_optimizer(model, state.memory, lr, cfg, previous=state.optimizer)
            state.take_labels(prepared, features, refresh_bank=epoch == 0 or cfg.loss.bank_refresh)
            monitoring = _monitoring_record(prepared, features, state.memory, monitor_pids, cfg, ranks)
            loader = _train_loader(images, prepared.labels.coarse, cfg, cluster_loader, device, epoch, ranks)
"""

MUTANTS = [
    # off-line stage -> on-line stage (the adaptation loop)
    Mutant("M01", STEPS, "refined = refined_labels[indices]  # [B]", "refined = coarse  # [B]",
           "step: refined labels replaced by the coarse ones (label refinement silently off)"),
    Mutant("M02", ADAPT, "reset_classifier(prepared.labels.num_clusters, prepared.centroids)",
           "reset_classifier(prepared.labels.num_clusters)",
           "loop: classifier no longer initialised from the cluster centroids"),
    Mutant("M03", ADAPT, "torch.from_numpy(prepared.labels.refined_or_coarse())",
           "torch.from_numpy(prepared.labels.coarse)",
           "loop: the step is handed the coarse labels as refined ones"),
    Mutant("M04", ADAPT, "refine=cfg.loss.refined_weight > 0,", "refine=False,",
           "loop: refinement never computed (refined falls back to coarse)"),
    Mutant("M05", ADAPT, "loader = _train_loader(images, prepared.labels.coarse, cfg",
           "loader = _train_loader(images, prepared.labels.refined_or_coarse(), cfg",
           "loop: sampler drawn over the refined labels (outliers sampled)"),
    Mutant("M06", ADAPT, "self.eps = prepared.labels.eps", "self.eps = None  # recomputed every epoch",
           "loop: eps recomputed every epoch instead of fixed at epoch 0"),
    Mutant("M07", ADAPT, "refresh_bank=epoch == 0 or", "refresh_bank=epoch >= 0 or",
           "loop: bank re-initialised every epoch"),
    Mutant("M08", ADAPT, "refresh_bank=epoch == 0 or cfg.loss.bank_refresh)", "refresh_bank=epoch == 0)",
           "loop: loss.bank_refresh ignored"),
    Mutant("M09", ADAPT, "refresh_bank=epoch == 0 or",
           "refresh_bank=epoch == cfg.optim.epochs - 1 or",
           "loop: bank initialised at the wrong epoch (last instead of first)"),
    Mutant("M10", ADAPT, "clustering.cluster_centroids(features, labels.coarse, labels.num_clusters)",
           "clustering.cluster_centroids(features, labels.refined_or_coarse(), labels.num_clusters)",
           "loop: classifier centroids from the refined labels (outliers included)"),
    Mutant("M11", ADAPT, "common.epoch_lr(cfg.optim, epoch)", "common.epoch_lr(cfg.optim, 0)",
           "loop: learning rate of epoch 0 kept for every epoch"),
    Mutant("M12", ADAPT, "cfg.loss.spread_weight_at(epoch)", "cfg.loss.spread_weight",
           "loop: mu ramp-up (loss.spread_rampup_epochs) ignored"),
    Mutant("M13", ADAPT, LABELS_THEN_OPTIMIZER, OPTIMIZER_THEN_LABELS,
           "loop: Adam built before the classifier is replaced (new classifier never trained)"),
    Mutant("M14", ADAPT, "return [*params, memory.weight]", "return params",
           "loop: instant bank left out of the optimizer"),
    Mutant("M15", ADAPT, "if previous is not None and not cfg.optim.reset_each_epoch:",
           "if previous is not None:", "loop: Adam moments carried over despite optim.reset_each_epoch"),
    Mutant("M16", ADAPT, "loaders.set_epoch(loader, epoch)", "loaders.set_epoch(loader, 0)",
           "loop: the sampler draws epoch 0's order every epoch"),
    Mutant("M17", ADAPT, "memory.init_from(features)", "memory.init_from(features.flip(0))",
           "loop: bank rows misaligned with the dataset indices"),
    Mutant("M18", ADAPT, "prepared.centroids)", "prepared.centroids.flip(0))",
           "loop: classifier rows in the wrong cluster order"),
    Mutant("M19", ADAPT, "        images.camids,\n", "        [0] * len(images.camids),\n",
           "loop: sampler given no cameras (camera-aware P x K off)"),
    Mutant("M20", ADAPT, "refined_weight > 0,\n        seed=cfg.run.seed,",
           "refined_weight > 0,\n        seed=0,",
           "loop: k-means restarts of the refinement no longer seeded by run.seed"),
    # batch -> loss terms (the step)
    Mutant("M21", STEPS, "metric = triplet_feature(out.pooled, features, loss)", "metric = features",
           "step: loss.triplet_feature ignored (always the normalised BN feature)"),
    Mutant("M22", STEPS,
           "return normalized * loss.triplet_scale if loss.triplet_scale != 1.0 else normalized",
           "return normalized", "step: loss.triplet_scale ignored"),
    Mutant("M23", STEPS, "scale_bank_gradient(memory.weight, bank_scale)",
           "scale_bank_gradient(memory.weight, 1.0)", "step: bank gradient scale ignored"),
    Mutant("M24", STEPS, "(memory.bank(), indices) if memory is not None",
           "(memory.bank(), indices.roll(1)) if memory is not None",
           "step: memory loss sees a neighbour's dataset index"),
    Mutant("M25", STEPS, "losses.spread_out_loss(\n                features,",
           "losses.spread_out_loss(\n                metric,",
           "step: memory loss fed the triplet feature instead of the unit BN feature"),
    Mutant("M26", STEPS, "ce_coarse, triplet_coarse = ce_and_triplet(coarse)",
           "ce_coarse, triplet_coarse = ce_and_triplet(refined)",
           "step: coarse terms computed with the refined labels"),
    Mutant("M27", STEPS, "features = F.normalize(out.bn.float(), dim=1)",
           "features = F.normalize(out.pooled.float(), dim=1)",
           "step: memory / BN-triplet feature taken before the BN neck"),
    Mutant("M28", STEPS, "memory.update(features.detach(), indices)",
           "memory.update(features.detach(), indices.roll(1))",
           "step: traditional memory updates a neighbour's row"),
    Mutant("M29", STEPS, "mu = loss.spread_weight if spread_weight is None else spread_weight",
           "mu = loss.spread_weight", "step: the epoch's mu (ramp-up) ignored by the step"),
    Mutant("M30", STEPS, "epsilon=loss.label_smoothing", "epsilon=0.1",
           "step: loss.label_smoothing ignored"),
    Mutant("M31", STEPS, "margin=loss.triplet_margin", "margin=None", "step: loss.triplet_margin ignored"),
    # the objective's weights
    Mutant("M32", OBJECTIVE,
           "return (1.0 - alpha) * coarse + alpha * refined + weights.spread_weight * terms.memory",
           "return alpha * coarse + (1.0 - alpha) * refined + weights.spread_weight * terms.memory",
           "objective: alpha and 1 - alpha swapped (invisible at alpha = 0.5)"),
    Mutant("M33", OBJECTIVE, "coarse = lam * terms.ce_coarse + terms.triplet_coarse",
           "coarse = terms.ce_coarse + lam * terms.triplet_coarse",
           "objective: lambda weighs the coarse triplet instead of the coarse CE"),
    Mutant("M34", OBJECTIVE, "refined = lam * terms.ce_refined + terms.triplet_refined",
           "refined = terms.ce_refined + terms.triplet_refined",
           "objective: lambda dropped on the refined side"),
    Mutant("M35", OBJECTIVE, "+ weights.spread_weight * terms.memory", "+ 0.1 * terms.memory",
           "objective: mu hard-coded to its default"),
    Mutant("M36", "config.py", "return 1.0 / self.ce_weight if self.ce_weight > 0 else 1.0", "return 2.0",
           "config: bank scale hard-coded to the default 1/lambda = 2"),
    Mutant("M37", "config.py", "min(1.0, epoch / self.spread_rampup_epochs)",
           "min(1.0, (epoch + 1) / self.spread_rampup_epochs)", "config: mu ramp one epoch early"),
    # the losses' maths
    Mutant("M38", "losses/cross_entropy.py", "(epsilon / num_classes) * log_probs.sum(1)",
           "(epsilon / (num_classes - 1)) * log_probs.sum(1)", "CE: smoothing mass over K - 1 classes"),
    Mutant("M39", "losses/triplet.py", 'dist.masked_fill(same, float("inf")).amin(1)',
           'dist.masked_fill(~same, float("inf")).amin(1)',
           "triplet: hardest negative taken among positives"),
    Mutant("M40", "losses/spread_out.py", "z = margin + log_negatives + log_positives  # [B]",
           "z = log_negatives + log_positives  # [B]", "spread-out: margin m dropped"),
    Mutant("M41", "losses/spread_out.py",
           "keepdim=True)\n        not_negative.scatter_(1, least_idx, True)\n    else:",
           "keepdim=True)\n    else:",
           "spread-out: reference variant keeps the least similar entry as a negative"),
    # off-line stage internals
    Mutant("M42", "pseudo_labels.py", "refinement.refine_labels(features, coarse, settings.num_subclusters,",
           "refinement.refine_labels(features, coarse, 2,",
           "off-line: R (clustering.num_subclusters) ignored"),
    Mutant("M43", "pseudo_labels.py", "distances.jaccard_distance(features, settings.k1, settings.k2,",
           "distances.jaccard_distance(features, settings.k1, 6,", "off-line: clustering.k2 ignored"),
    Mutant("M44", "pseudo_labels.py",
           "coarse = np.asarray(clustering.cluster_dbscan(dist, eps, settings.min_samples), dtype=np.int64)",
           "coarse = np.asarray(clustering.cluster_dbscan(dist, eps, 4), dtype=np.int64)",
           "off-line: clustering.min_samples ignored"),
    Mutant("M45", "clustering.py", "return torch.nn.functional.normalize(sums, dim=1)", "return sums",
           "off-line: centroids not L2-normalised (classifier rows = sums)"),
    Mutant("M46", "memory_bank.py",
           "mixed = self.momentum * self.features[indices] + (1.0 - self.momentum) * features",
           "mixed = (1.0 - self.momentum) * self.features[indices] + self.momentum * features",
           "memory: momentum and 1 - momentum swapped (invisible at m = 0.5)"),
]


def _copy_repository(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    return dest


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(scratch / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _imports_scratch(scratch: Path) -> None:
    out = subprocess.run(
        [str(PYTHON), "-c", "import dualref; print(dualref.__file__)"],
        cwd=scratch, env=_env(scratch), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(scratch.resolve()):
        raise SystemExit(f"the scratch copy is not the one imported: dualref comes from {out}")


def _run_tests(scratch: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """(status, detail, seconds): killed / survived / error / timeout, the first failing test."""
    command = [str(PYTHON), "-m", "pytest", "-p", "no:cacheprovider", "-x", "-q", "-rf", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, cwd=scratch, env=_env(scratch), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "survived", "all tests pass", seconds
    if proc.returncode == 1:
        failed = re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)
        return "killed", failed[0] if failed else "a test failed", seconds
    tail = " / ".join(line for line in output.strip().splitlines()[-3:])
    return "error", f"pytest exit {proc.returncode}: {tail[:200]}", seconds


def _apply(scratch: Path, mutant: Mutant, originals: dict[str, str]) -> str | None:
    """Write the mutated file; an error message when the old text is not found exactly once."""
    path = scratch / "src" / "dualref" / mutant.file
    if mutant.file not in originals:
        if not path.is_file():
            return f"file src/dualref/{mutant.file} not found"
        originals[mutant.file] = path.read_text()
    text = originals[mutant.file]
    count = text.count(mutant.old)
    if count != 1:
        return f"old text found {count} times in src/dualref/{mutant.file}; expected exactly once"
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


def _restore(scratch: Path, originals: dict[str, str]) -> None:
    for file, text in originals.items():
        (scratch / "src" / "dualref" / file).write_text(text)


def _table(rows: list[tuple[Mutant, str, str, float]]) -> str:
    lines = ["| mutant | file | break | result | caught by | s |", "|---|---|---|---|---|---|"]
    for mutant, status, detail, seconds in rows:
        shown = detail.replace("|", "\\|")
        lines.append(
            f"| {mutant.name} | {mutant.file} | {mutant.description} | {status} | {shown} | {seconds:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants (e.g. M01 M02)")
    parser.add_argument("--check", action="store_true", help="only check that every old text is found once")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (default 600)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(mutants) != len(set(args.only)):
        parser.error(f"unknown mutant in {args.only}; known: {[m.name for m in MUTANTS]}")
    scratch = Path(tempfile.mkdtemp(prefix="dualref_mutants_")) / "repo"
    _copy_repository(scratch)
    originals: dict[str, str] = {}
    rows: list[tuple[Mutant, str, str, float]] = []
    try:
        if args.check:
            bad = [(m.name, _apply(scratch, m, originals)) for m in mutants]
            _restore(scratch, originals)
            for name, error in bad:
                print(f"{name}: {error or 'ok'}")
            return 1 if any(error for _, error in bad) else 0
        _imports_scratch(scratch)
        status, detail, seconds = _run_tests(scratch, TESTS, args.timeout)
        print(f"unmodified copy: {status} ({detail}, {seconds:.0f} s)", flush=True)
        if status != "survived":
            print("the tests fail without any mutation; fix them first", file=sys.stderr)
            return 2
        start = time.perf_counter()
        for mutant in mutants:
            error = _apply(scratch, mutant, originals)
            if error is not None:
                rows.append((mutant, "error", error, 0.0))
            else:
                rows.append((mutant, *_run_tests(scratch, TESTS, args.timeout)))
            _restore(scratch, originals)
            print(f"{mutant.name} {rows[-1][1]:8s} {rows[-1][3]:4.0f} s  {mutant.description}", flush=True)
        total = time.perf_counter() - start
    finally:
        if args.keep:
            print(f"scratch copy kept at {scratch}")
        else:
            shutil.rmtree(scratch.parent, ignore_errors=True)

    statuses = ("killed", "survived", "error", "timeout")
    counts = {s: sum(1 for _, status, _, _ in rows if status == s) for s in statuses}
    summary = (
        f"{len(rows)} mutants: {counts['killed']} killed, {counts['survived']} survived, "
        f"{counts['error']} errors, {counts['timeout']} timeouts; {total / 60:.1f} min "
        f"(tests: {' '.join(TESTS)})"
    )
    table = _table(rows)
    print(f"\n{table}\n\n{summary}")
    if not args.no_write:
        command = "nice -n 10 .venv/bin/python benchmarks/mutation_check.py" + (
            f" --only {' '.join(args.only)}" if args.only else ""
        )
        args.out.write_text(
            "# Mutation check of the method's wiring and maths (issue 14)\n\n"
            f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, "
            f"PyTorch from `.venv`).\n\n"
            "Each mutant edits one text of `src/dualref` in a scratch copy of the repository; the tests "
            f"`{' '.join(TESTS)}` then run there with `pytest -x -q`. killed = a test failed; survived = all "
            "passed; error = the old text was not found exactly once, or pytest could not run.\n\n"
            f"{table}\n\n{summary}\n"
        )
        print(f"written to {args.out}")
    return 0 if counts["survived"] == counts["error"] == counts["timeout"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
