"""`dualref release`: a trained model as a small file to keep in a repository, with its card.

A run folder holds the training state (optimizer, RNG, ...): tens of MB that only resuming needs, lost with
the machine. A release keeps what a user of the model needs and nothing else:

    NAME.pt     a dualref checkpoint: the weights (float16 by default: half the size) and the metadata
                `dualref evaluate` / `adapt`'s `source_checkpoint` read (arch, input size, normalisation,
                config); no optimizer, no RNG
    NAME.json   its card: architecture, input size, normalisation, data set, iterations, the training
                config and command, the commit, the SHA-256 of NAME.pt, and the mAP / R1 of the released
                file on each data set asked for (`--evaluate DATASET=ROOT`) beside those of the
                full-precision checkpoint it came from: what the float16 rounding changed

Every float tensor of the weights is rounded to float16; loading casts back to float32 (`load_state_dict`
copies into the network's own dtype), so a released file runs exactly like a float32 checkpoint whose
weights are those rounded values.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dualref import checkpoint, inference, io
from dualref.pipelines import evaluate

WEIGHT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# What a model's user needs from a training checkpoint; the rest (optimizer, rng, ...) is training state.
KEPT_KEYS = (
    "kind",
    "epoch",
    "arch",
    "num_classes",
    "feat_dim",
    "height",
    "width",
    "model_options",
    "normalization",
    "config",
    "source_dataset",
)


@dataclass(frozen=True)
class Evaluation:
    """A data set to score the release on: `dataset` name (datasets.load_dataset) and its folder."""

    dataset: str
    root: str

    @classmethod
    def parse(cls, text: str) -> Evaluation:
        """``DATASET=ROOT`` (the `--evaluate` flag)."""
        dataset, sep, root = text.partition("=")
        if not sep or not dataset or not root:
            raise ValueError(f"--evaluate {text!r}: expected DATASET=ROOT, e.g. market1501=/data/Market-1501")
        return cls(dataset, root)


def released_state(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The kept keys of a training checkpoint's `state`, its float weights cast to `dtype` (ints kept)."""
    missing = [key for key in ("model", "arch", "num_classes") if key not in state]
    if missing or state.get("kind") not in inference.MODEL_KINDS:
        raise ValueError(
            f"lacks {missing or 'a model'} (kind {state.get('kind')!r}); expected a checkpoint of "
            "dualref pretrain/adapt"
        )
    weights = {
        key: value.to(dtype) if value.is_floating_point() else value.clone()
        for key, value in state["model"].items()
    }
    return {**{key: state[key] for key in KEPT_KEYS if key in state}, "model": weights}


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(folder: Path) -> dict[str, Any] | None:
    """The commit checked out at `folder` and whether tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": head, "modified": bool(dirty)}


def _scores(record: dict[str, Any]) -> dict[str, float]:
    return {key: record[key] for key in ("mAP", "rank1", "rank5", "rank10", "mINP")}


def _evaluate_both(
    released: Path,
    original: str | Path,
    state: dict[str, Any],
    evaluations: Sequence[Evaluation],
    run_options: dict[str, Any],
) -> tuple[dict[str, Any], str | None]:
    """Per data set: the released file's scores beside the original's; and the numerics used."""
    scores: dict[str, Any] = {}
    numerics = None
    for item in evaluations:
        results = {}
        for name, path in (("released", released), ("full_precision", original)):
            _, record = evaluate.run_evaluate(
                path, item.dataset, item.root, options=evaluate.EvaluateOptions(), **run_options
            )
            results[name] = record
        numerics = results["released"]["options"]["numerics"]
        scores[item.dataset] = {
            "role": "source" if item.dataset == state.get("source_dataset") else "direct transfer",
            "root": item.root,
            "num_query": results["released"]["num_query"],
            "num_gallery": results["released"]["num_gallery"],
            **_scores(results["released"]),
            "full_precision": _scores(results["full_precision"]),
        }
    return scores, numerics


def run_release(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    evaluations: Sequence[Evaluation] = (),
    weights: str = "float16",
    command: str | None = None,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 2,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write `out` (the released checkpoint) and its card (`out` with suffix .json); return the card.

    Args:
        checkpoint_path: a `dualref pretrain` / `adapt` checkpoint.
        out: the released file (``.pt``); the card goes beside it.
        evaluations: data sets to score the released file and the original on (query/gallery).
        weights: "float16" or "float32", the stored dtype of the float weights.
        command: how the model was trained, for the card (default: resuming from its run folder's config).
        device, batch_size, num_workers, amp_dtype, channels_last, progress: of the evaluations
            (`evaluate.run_evaluate`).
    """
    if weights not in WEIGHT_DTYPES:
        raise ValueError(f"weights={weights!r}: expected one of {sorted(WEIGHT_DTYPES)}")
    run_options = {
        "device": device,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "progress": progress,
        "amp_dtype": amp_dtype,
        "channels_last": channels_last,
    }
    out = Path(out)
    if out.suffix != ".pt":
        raise ValueError(f"release file {out}: expected a .pt name (its card is written beside it as .json)")
    source = checkpoint.load_checkpoint(checkpoint_path)
    try:
        state = released_state(source, WEIGHT_DTYPES[weights])
    except ValueError as err:
        raise ValueError(f"{checkpoint_path}: {err}") from None
    # Scored under a temporary name, renamed once every evaluation has passed: an earlier release at `out`
    # stays whole, with its card, until the new file and its card replace both.
    pending = out.with_name(f".{out.stem}.pending.pt")
    checkpoint.save_checkpoint(pending, state)
    try:
        scores, numerics = _evaluate_both(pending, checkpoint_path, state, evaluations, run_options)
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    os.replace(pending, out)

    config = state.get("config", {})
    optim = config.get("optim", {})
    epochs = int(state.get("epoch", 0))
    height, width = inference.input_size(state)
    run_dir = Path(checkpoint_path).resolve().parent
    card = {
        "file": out.name,
        "sha256": sha256(out),
        "bytes": out.stat().st_size,
        "weights_dtype": weights,
        "kind": state["kind"],
        "architecture": state["arch"],
        "model_options": state.get("model_options"),
        "feat_dim": state.get("feat_dim"),
        "num_classes": state["num_classes"],
        "input_size": {"height": height, "width": width},
        "normalization": dict(zip(("mean", "std"), inference.normalization(state), strict=True)),
        "dataset": state.get("source_dataset", config.get("data", {}).get("source")),
        "epochs": epochs,
        "iterations": epochs * int(optim["iters_per_epoch"]) if "iters_per_epoch" in optim else None,
        "evaluation": scores,
        "evaluation_options": {"flip": False, "rerank": False, "numerics": numerics},
        "command": command or f"dualref {state['kind']} --resume {run_dir}",
        "released_from": str(Path(checkpoint_path)),
        "code": git_commit(Path(__file__).resolve().parent),
        "released": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": config,
    }
    io.write_json(out.with_suffix(".json"), card)
    return card


def check_release(card_path: str | Path) -> Path:
    """The released file of a card, after checking its SHA-256 against the card."""
    card_path = Path(card_path)
    card = read_card(card_path)
    path = card_path.parent / card["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{card_path}: its file {path} does not exist")
    actual = sha256(path)
    if actual != card["sha256"]:
        raise ValueError(
            f"{path}: SHA-256 {actual} differs from its card {card_path} ({card['sha256']}); "
            "the file is damaged or not the released one"
        )
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """A release card (JSON object with at least 'file' and 'sha256')."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"card {path} cannot be read as JSON: {err}") from None
    if not isinstance(payload, dict) or not {"file", "sha256"} <= payload.keys():
        raise ValueError(f"card {path}: expected a JSON object with 'file' and 'sha256'")
    return payload
