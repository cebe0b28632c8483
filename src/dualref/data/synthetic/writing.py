"""Writing Market-1501 trees: :func:`write_domain` streams one rendered domain to disk behind a completion
marker, :func:`write_domain_pair` writes the stock source and target domains."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from dualref.data.synthetic.planning import _RENDER_CHUNK, SPLIT_DIRS, _render_rows, plan_domain
from dualref.data.synthetic.styles import SyntheticConfig, domain_a_config, domain_b_config

# Bump when the rendering changes, so cached trees written by an older generator are regenerated.
GENERATOR_VERSION = 4
MARKER_NAME = "SYNTHETIC.json"


def _marker(config: SyntheticConfig, seed: int) -> dict[str, object]:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "config": dataclasses.asdict(config)}


def _is_complete(path: Path, marker: dict[str, object]) -> bool:
    try:
        return bool(json.loads((path / MARKER_NAME).read_text()) == json.loads(json.dumps(marker)))
    except (OSError, ValueError):
        return False


def _check_replaceable(final: Path) -> None:
    """Refuse to replace a folder (or file, or link) that a generator did not write: it has no marker."""
    if os.path.lexists(final) and not (final / MARKER_NAME).is_file():
        raise ValueError(
            f"{final} exists and was not written by `dualref data synth` (it holds no {MARKER_NAME}); "
            "it is left untouched: move it away or choose another output folder"
        )


def write_domain(out: str | Path, config: SyntheticConfig, seed: int = 0) -> Path:
    """Render one domain and write it as a Market-1501 tree ``<out>/<config.name>``.

    The tree is written into a temporary sibling folder and renamed into place, with ``SYNTHETIC.json``
    written last; an existing tree with the same generator version, seed and config is reused as is,
    another generated tree (older version, other seed) is replaced, and anything else is refused.

    Args:
        out: parent folder (created if needed).
        config: size and style of the domain.
        seed: random seed; the same seed gives byte-identical files.

    Returns:
        The data set folder ``<out>/<config.name>``.
    """
    out = Path(out)
    final = out / config.name
    marker = _marker(config, seed)
    if _is_complete(final, marker):
        return final
    _check_replaceable(final)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{config.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split in SPLIT_DIRS:
            (tmp / split).mkdir(parents=True)
        plan = plan_domain(config, seed)
        names = plan.file_names
        for start in range(0, len(names), _RENDER_CHUNK):
            rows = np.arange(start, min(start + _RENDER_CHUNK, len(names)))
            images = _render_rows(plan, rows)
            for row, image in zip(rows.tolist(), images, strict=True):
                path = tmp / SPLIT_DIRS[plan.splits[row]] / names[row]
                Image.fromarray(image).save(path, format="JPEG", quality=config.jpeg_quality)
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        # Swap the finished tree in; an old (stale or partial) tree is moved aside first because
        # os.replace cannot overwrite a non-empty folder.
        old = out / f".{config.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_domain_pair(out: str | Path, *, seed: int = 0, scale: float = 1.0) -> tuple[Path, Path]:
    """Write the source domain ``<out>/synth_a`` and the target domain ``<out>/synth_b``.

    Args:
        out: parent folder.
        seed: random seed (each domain salts it with its name).
        scale: multiplies the numbers of identities and distractors.

    Returns:
        (source folder, target folder), each readable by ``load_dataset("market1501", folder)``.
    """
    configs = domain_a_config(scale), domain_b_config(scale)
    for config in configs:  # both before writing either: never half a pair next to a refusal
        if not _is_complete(Path(out) / config.name, _marker(config, seed)):
            _check_replaceable(Path(out) / config.name)
    return write_domain(out, configs[0], seed), write_domain(out, configs[1], seed)
