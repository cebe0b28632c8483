"""Command-line interface: `dualref <command> ...`.

Each command parses its arguments here and calls one function of the stage that does the work, imported
lazily so that `dualref --help` stays fast. Config objects stop here and in the pipelines.

Size: over 400 lines: one parser per subcommand and the one-line error handling; every handler only
calls a pipeline.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from dualref import __version__

DEBUG_ENV = "DUALREF_DEBUG"
ConfigT = TypeVar("ConfigT")
# OS errors about the user's files and disks, reported in one line with what to do; any other OSError
# is a fault of the program or the machine and keeps its traceback.
_OS_ERROR_HINTS = {
    errno.ELOOP: "a symbolic link loop: fix or remove the link",
    errno.ENOTDIR: "a file where a folder is expected: choose another path",
    errno.EISDIR: "a folder where a file is expected: choose another path",
    errno.EEXIST: "already exists: choose another path",
    errno.EACCES: "permission denied: choose a path you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose another path, or fix its permissions",
    errno.EROFS: "a read-only file system: choose a writable path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def _cmd_data_check(args: argparse.Namespace) -> int:
    from dualref.data import check

    return check.run_check(args.root, dataset=args.dataset, verify_images=not args.no_verify)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from dualref.data import synthetic

    synthetic.write_domain_pair(args.out, seed=args.seed, scale=args.scale)
    print(f"synthetic domain pair written to {args.out}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from dualref import training
    from dualref.config import ClusteringConfig
    from dualref.pipelines import cluster

    # Flags left out keep the defaults of `clustering.*` (config.ClusteringConfig), defined once there.
    given = {
        "k1": args.k1,
        "k2": args.k2,
        "dbscan_rho": args.rho,
        "dbscan_eps": args.eps,
        "max_cluster_share": args.max_cluster_share,
        "min_samples": args.min_samples,
        "num_subclusters": args.num_subclusters,
    }
    settings = ClusteringConfig(**{key: value for key, value in given.items() if value is not None})
    training.set_threads(args.threads, key="--threads")
    return cluster.run_cluster(
        Path(args.features),
        settings=settings,
        pids_path=Path(args.pids) if args.pids is not None else None,
        out=Path(args.out) if args.out is not None else None,
        seed=args.seed,
        device=training.resolve_device(args.device, key="--device"),
    )


def _config_path(args: argparse.Namespace) -> str | None:
    # `--resume RUN_DIR` alone continues with the run's own resolved config.
    if args.config is None and args.resume is not None:
        return str(Path(args.resume) / "config.yaml")
    return args.config


def _run_config(cls: type[ConfigT], args: argparse.Namespace, *, other: type, other_command: str) -> ConfigT:
    """The config of `dualref pretrain|adapt`; resuming the other command's run folder says so."""
    from dualref.config import load_config

    path = _config_path(args)
    try:
        return load_config(cls, path, args.set)
    except ValueError as err:
        if args.resume is None or args.config is not None:
            raise
        # A run folder of the other command has keys this one does not know: say so, not "unknown key".
        try:
            load_config(other, path)
        except (ValueError, FileNotFoundError):
            raise err from None
        raise ValueError(
            f"{args.resume} is a `dualref {other_command}` run folder; "
            f"resume it with `dualref {other_command} --resume {args.resume}`"
        ) from None


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from dualref import distributed
    from dualref.config import AdaptConfig, PretrainConfig
    from dualref.pipelines import pretrain

    cfg = _run_config(PretrainConfig, args, other=AdaptConfig, other_command="adapt")
    try:
        pretrain.pretrain_on_source(cfg, resume=args.resume)
    except ValueError as err:
        raise _with_resume_hint(err, Path(args.resume or cfg.run.run_dir), "pretrain") from err
    finally:
        distributed.close()  # under torchrun: leave the process group
    return 0


def _cmd_adapt(args: argparse.Namespace) -> int:
    from dualref import distributed
    from dualref.config import AdaptConfig, PretrainConfig
    from dualref.pipelines import adapt

    cfg = _run_config(AdaptConfig, args, other=PretrainConfig, other_command="pretrain")
    try:
        adapt.adapt_to_target(cfg, resume=args.resume)
    except ValueError as err:
        raise _with_resume_hint(err, Path(args.resume or cfg.run.run_dir), "adapt") from err
    finally:
        distributed.close()  # under torchrun: leave the process group
    return 0


def _with_resume_hint(err: ValueError, run_dir: Path, command: str) -> ValueError:
    """`err`, saying how to go on when the run folder was written before the error and holds no epoch
    yet (a problem found at epoch 0): the same command would be refused as "already holds a run"."""
    from dualref import runs

    if not (run_dir / runs.CONFIG_FILE).is_file() or (run_dir / runs.CHECKPOINT_FILE).is_file():
        return err
    hint = (
        f"; {run_dir} holds this run's config and no epoch yet: after fixing the cause, go on with "
        f"`dualref {command} --resume {run_dir} --set KEY=VALUE` (or remove the folder)"
    )
    return ValueError(f"{_worker_cause(err)}{hint}")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dualref import inference
    from dualref.config import EvalConfig
    from dualref.pipelines import evaluate

    try:
        ranking = EvalConfig(
            flip=args.flip,
            rerank=args.rerank,
            rerank_k1=args.rerank_k1,
            rerank_k2=args.rerank_k2,
            rerank_lambda=args.rerank_lambda,
        )
    except ValueError as err:
        # EvalConfig names its config keys (evaluation.rerank_k1); here the user typed the flags.
        message = str(err)
        for name in ("k1", "k2", "lambda"):
            message = message.replace(f"evaluation.rerank_{name}=", f"--rerank-{name}=")
        raise ValueError(message) from None
    options = evaluate.EvaluateOptions(
        ranking=ranking,
        cross_camera=args.cross_camera,
        height=args.height,
        width=args.width,
    )
    result, _ = evaluate.run_evaluate(
        args.checkpoint,
        args.dataset,
        args.root,
        options=options,
        **_compute(args),
        batch_size=args.batch_size,
        num_workers=args.workers,
        out=args.out,
        save_features=args.save_features,
    )
    rerank = f"re-ranking (k1={args.rerank_k1}, k2={args.rerank_k2}, lambda={args.rerank_lambda})"
    options_text = ", ".join(name for name, on in (("flip", args.flip), (rerank, args.rerank)) if on)
    with_options = f" with {options_text}" if options_text else ""
    print(f"{args.checkpoint} on {args.dataset} ({args.root}){with_options}")
    print(inference.format_table(result.metrics))
    if result.cross_camera is not None:
        print(inference.format_cross_camera(result.cross_camera))
    for what, where in (("results", args.out), ("features and distances", args.save_features)):
        if where is not None:
            print(f"{what} written to {where}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from dualref.pipelines import extract

    written = extract.run_extract(
        args.checkpoint,
        out=args.out,
        images_dir=args.images_dir,
        dataset=args.dataset,
        root=args.root,
        split=args.split,
        **_compute(args),
        batch_size=args.batch_size,
        num_workers=args.workers,
        flip=args.flip,
        skip_unreadable=args.skip_unreadable,
    )
    for split in written:
        print(
            f"{split.name}: {split.num_images} x {split.feat_dim} features -> {split.folder}/ "
            f"({', '.join(split.files)})"
        )
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from dualref import visualize
    from dualref.config import EvalConfig

    if (args.checkpoint is None) == (args.saved is None):
        raise ValueError("give either CHECKPOINT (with --dataset and --root) or --saved DIR")
    if args.saved is not None:
        rankings = [visualize.ranking_from_saved(args.saved)]
    else:
        if args.dataset is None or args.root is None:
            raise ValueError("CHECKPOINT needs --dataset and --root (the query/gallery to rank)")
        compute = _compute(args)
        rankings = [
            visualize.ranking_from_checkpoint(
                path,
                args.dataset,
                args.root,
                **compute,
                batch_size=args.batch_size,
                num_workers=args.workers,
                options=EvalConfig(flip=args.flip, rerank=args.rerank),
            )
            for path in (args.checkpoint, *([args.compare] if args.compare else []))
        ]
    index = visualize.write_ranked_lists(
        rankings,
        args.out,
        num_queries=args.queries,
        query_indices=args.query_index,
        top_k=args.top_k,
        seed=args.seed,
    )
    for ranking in rankings:
        score = f": mAP {100 * ranking.mAP:.1f}%" if ranking.mAP is not None else ""
        print(f"{ranking.label.replace(chr(10), ' ')}{score}")
    print(f"ranked lists written to {index}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dualref import export

    result = export.export_checkpoint(args.checkpoint, args.format, args.out, tolerance=args.tolerance)
    print(f"exported {args.checkpoint} -> {result.path} ({result.format})")
    print(f"input:  {result.metadata['input']}, any batch size B")
    print(f"        mean {result.metadata['mean']}, std {result.metadata['std']}")
    print(f"output: {result.metadata['output']}")
    print(
        f"check: the reloaded file vs PyTorch on a random batch of {result.check_batch}: "
        f"max abs difference {result.max_abs_diff:.2e} (tolerance {args.tolerance:g})"
    )
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from dualref.pipelines import release

    evaluations = [release.Evaluation.parse(text) for text in args.evaluate]
    card = release.run_release(
        args.checkpoint,
        args.out,
        evaluations=evaluations,
        weights=args.weights,
        command=args.command,
        **_compute(args),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    print(f"released {args.checkpoint} -> {args.out} ({card['bytes'] / 1e6:.1f} MB, {card['weights_dtype']})")
    print(f"sha256 {card['sha256']}")
    for dataset, scores in card["evaluation"].items():
        full = scores["full_precision"]
        print(
            f"{dataset} ({scores['role']}): mAP {100 * scores['mAP']:.2f}, R1 {100 * scores['rank1']:.2f} "
            f"(full precision: {100 * full['mAP']:.2f}, {100 * full['rank1']:.2f})"
        )
    print(f"card written to {Path(args.out).with_suffix('.json')}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from dualref.pipelines import study

    return study.run_study(
        args.study, only=args.only, report_only=args.report, dry_run=args.dry_run, parallel=args.parallel
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from dualref.pipelines import demo

    return demo.run_demo(args.out, seed=args.seed, quick=args.quick, device=args.device, amp=args.amp)


def _add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default, one per core); 1 when two commands share the cores",
    )


def _add_inference_options(parser: argparse.ArgumentParser, *, flip: bool = True) -> None:
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    if flip:
        parser.add_argument("--flip", action="store_true", help="average with horizontally flipped images")
    parser.add_argument(
        "--amp", default="none", choices=("none", "bf16", "fp16"), help="mixed precision (fp16: CUDA only)"
    )
    parser.add_argument(
        "--channels-last",
        default="auto",
        choices=("auto", "true", "false"),
        help="memory format of the network (auto: channels-last on the CPU, where it is faster)",
    )
    _add_threads_option(parser)


def _compute(args: argparse.Namespace) -> dict[str, Any]:
    """device, amp_dtype and channels_last of the inference commands' flags, checked; applies --threads."""
    from dualref import training

    training.set_threads(args.threads, key="--threads")
    device = training.resolve_device(args.device, key="--device")
    setting = {"true": True, "false": False}.get(args.channels_last, args.channels_last)
    return {
        "device": device,
        "amp_dtype": training.resolve_amp(args.amp, device, key="--amp"),
        "channels_last": training.resolve_channels_last(setting, device),
    }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dualref",
        description="Unsupervised domain adaptive person re-ID (Dual-Refinement).",
    )
    parser.add_argument("--version", action="version", version=f"dualref {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of every error (also: environment variable {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or generate data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="validate a data set folder and print its statistics")
    check.add_argument("root", help="the data set folder, or a folder holding it under its usual name")
    check.add_argument(
        "--dataset",
        required=True,
        help="market1501, dukemtmc, msmt17, folder (labelled) or unlabelled",
    )
    check.add_argument("--no-verify", action="store_true", help="skip decoding every image")
    check.set_defaults(func=_cmd_data_check)
    synth = data_sub.add_parser("synth", help="write the synthetic domain pair (Market-1501 layout)")
    synth.add_argument("out", help="output folder; gets synth_a/ and synth_b/")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scale", type=float, default=1.0, help="multiplies the number of identities")
    synth.set_defaults(func=_cmd_data_synth)

    cluster = sub.add_parser("cluster", help="Jaccard + DBSCAN + hierarchical refinement on saved features")
    cluster.add_argument("features", help="[N, D] float .npy file")
    cluster.add_argument("--pids", help="[N] int .npy of ground-truth ids, for the quality table only")
    cluster.add_argument("--out", default=None, help="output folder (default: beside FEATURES)")
    cluster.add_argument("--k1", type=int, help="k-reciprocal neighbourhood (default: clustering.k1)")
    cluster.add_argument("--k2", type=int, help="query expansion (default: clustering.k2)")
    cluster.add_argument("--rho", type=float, help="DBSCAN eps quantile, paper: rho (clustering.dbscan_rho)")
    cluster.add_argument(
        "--eps", type=float, help="fixed DBSCAN eps, overrides --rho (clustering.dbscan_eps)"
    )
    cluster.add_argument(
        "--max-cluster-share", type=float, help="cap of the rho rule (clustering.max_cluster_share)"
    )
    cluster.add_argument("--min-samples", type=int, help="DBSCAN core points (clustering.min_samples)")
    cluster.add_argument("--num-subclusters", type=int, help="paper: R (clustering.num_subclusters)")
    cluster.add_argument("--seed", type=int, default=0)
    cluster.add_argument("--device", default="cpu")
    _add_threads_option(cluster)
    cluster.set_defaults(func=_cmd_cluster)

    for name, helptext, func in (
        ("pretrain", "supervised source training + direct transfer", _cmd_pretrain),
        ("adapt", "Dual-Refinement adaptation to the unlabelled target", _cmd_adapt),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", nargs="?", default=None, help="YAML file of differences from defaults")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one config field, e.g. --set optim.lr=3.5e-4 (repeatable)",
        )
        p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this run")
        p.set_defaults(func=func)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint on a data set's query/gallery")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--root", required=True)
    evaluate.add_argument("--height", type=int, default=None, help="default: the checkpoint's")
    evaluate.add_argument("--width", type=int, default=None, help="default: the checkpoint's")
    _add_inference_options(evaluate)
    evaluate.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    evaluate.add_argument("--rerank-k1", type=int, default=20, help="re-ranking's k1 (default 20)")
    evaluate.add_argument("--rerank-k2", type=int, default=6, help="re-ranking's k2 (default 6)")
    evaluate.add_argument(
        "--rerank-lambda", type=float, default=0.3, help="re-ranking's original-distance weight (0.3)"
    )
    evaluate.add_argument(
        "--cross-camera", action="store_true", help="mAP per query camera and per camera pair"
    )
    evaluate.add_argument("--out", default=None, metavar="RESULTS_JSON", help="write the results here")
    evaluate.add_argument(
        "--save-features", default=None, metavar="DIR", help="save query/gallery features and distances"
    )
    evaluate.set_defaults(func=_cmd_evaluate)

    extract = sub.add_parser("extract", help="save a checkpoint's features of a data set or image folder")
    extract.add_argument("checkpoint")
    extract.add_argument("images_dir", nargs="?", default=None, help="a folder of images (recursive)")
    extract.add_argument("--dataset", default=None, help="instead of IMAGES_DIR: a data set ...")
    extract.add_argument("--root", default=None, help="... and its folder")
    extract.add_argument(
        "--split", default="train", choices=("train", "query", "gallery", "all"), help="of --dataset"
    )
    extract.add_argument("--out", required=True, help="output folder")
    _add_inference_options(extract)
    extract.add_argument(
        "--skip-unreadable", action="store_true", help="skip images that do not decode (logged)"
    )
    extract.set_defaults(func=_cmd_extract)

    visualize = sub.add_parser("visualize", help="ranked lists of queries as PNG grids and an HTML page")
    visualize.add_argument("checkpoint", nargs="?", default=None)
    visualize.add_argument("--dataset", default=None)
    visualize.add_argument("--root", default=None)
    visualize.add_argument(
        "--saved", default=None, metavar="DIR", help="instead of CHECKPOINT: `evaluate --save-features DIR`"
    )
    visualize.add_argument("--compare", default=None, metavar="CHECKPOINT", help="a second model's rows")
    which = visualize.add_mutually_exclusive_group()
    which.add_argument("--queries", type=int, default=8, help="random queries with a true match (default 8)")
    which.add_argument(
        "--query-index", type=int, action="append", default=None, metavar="I", help="this query (repeatable)"
    )
    visualize.add_argument("--top-k", type=int, default=10)
    visualize.add_argument("--seed", type=int, default=0, help="of the random queries")
    visualize.add_argument("--out", required=True, help="output folder")
    _add_inference_options(visualize)
    visualize.add_argument("--rerank", action="store_true", help="rank by k-reciprocal re-ranking")
    visualize.set_defaults(func=_cmd_visualize)

    export = sub.add_parser("export", help="export the inference model (TorchScript or ONNX) and check it")
    export.add_argument("checkpoint")
    export.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument(
        "--tolerance", type=float, default=1e-4, help="largest accepted difference to PyTorch (1e-4)"
    )
    export.set_defaults(func=_cmd_export)

    release = sub.add_parser(
        "release", help="a trained model as a small file with its card (float16 weights, SHA-256, scores)"
    )
    release.add_argument("checkpoint")
    release.add_argument("--out", required=True, help="the released file (.pt); its card goes beside it")
    release.add_argument(
        "--evaluate",
        action="append",
        default=[],
        metavar="DATASET=ROOT",
        help="score the release and the original on this data set's query/gallery (repeatable)",
    )
    release.add_argument("--weights", default="float16", choices=("float16", "float32"))
    release.add_argument("--command", default=None, help="how the model was trained, for the card")
    _add_inference_options(release, flip=False)
    release.set_defaults(func=_cmd_release)

    study = sub.add_parser("study", help="rows x seeds of adaptation runs, resumable; mean ± std and plot")
    study.add_argument("study", help="study YAML file (docs/study.md)")
    study.add_argument("--only", action="append", default=[], metavar="ROW", help="run only this row")
    study.add_argument("--report", action="store_true", help="only write the report of what has finished")
    study.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    study.add_argument("--parallel", type=int, default=None, help="runs at once (default: the file's)")
    study.set_defaults(func=_cmd_study)

    demo = sub.add_parser("demo", help="the whole method on the synthetic domain pair (no data needed)")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a much shorter run, for smoke tests")
    demo.add_argument("--device", default="cpu", help="torch device of every run: cpu, cuda, cuda:1, ...")
    demo.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="mixed precision: bf16 (CUDA, or a CPU with AVX512-BF16/AMX), fp16 (CUDA only)",
    )
    demo.set_defaults(func=_cmd_demo)
    return parser


def _worker_cause(err: BaseException) -> str:
    """The error's own message: a DataLoader worker's exception reaches the main process re-raised with
    the worker's traceback in its message ("Caught X in DataLoader worker process N. Original Traceback
    ... X: message"); only its last line is the message."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        # Bad input is reported in one line that names the culprit; the traceback only when debugging.
        if debug:
            traceback.print_exc()
        print(f"dualref: error: {_worker_cause(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        # An unreadable image (loaders.ImageReadError names it), a full disk (io.DiskFullError names
        # the folder) and the errors of `_OS_ERROR_HINTS` are the user's to fix; other OS errors are not.
        from dualref import io
        from dualref.data.loaders import ImageReadError  # loaded by whatever raised it: no cost here

        if isinstance(err, ImageReadError):
            skip = "--set data.skip_unreadable=true / --skip-unreadable"
            message = f"{_worker_cause(err)} (to skip unreadable images with a warning: {skip})"
        elif isinstance(err, io.DiskFullError):
            message = str(err)
        elif io.disk_full_cause(err) is not None:
            where = os.path.dirname(os.path.abspath(err.filename)) if err.filename else "the output folder"
            message = f"no space left on {where}; free space there, then run the command again"
        elif err.errno in _OS_ERROR_HINTS:
            names = " -> ".join(str(n) for n in (err.filename, err.filename2) if n is not None)
            message = f"{names or 'a path'}: {_OS_ERROR_HINTS[err.errno]}"
        else:
            raise
        if debug:
            traceback.print_exc()
        print(f"dualref: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dualref: interrupted", file=sys.stderr)
        return 130
