"""Planning a domain (every identity, camera and image drawn, no pixels yet: :class:`DomainPlan`,
:func:`plan_domain`) and rendering a plan in memory (:func:`render_plan`, :func:`render_domain`)."""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np

from dualref.data.synthetic.rendering import render_images
from dualref.data.synthetic.styles import SyntheticConfig
from dualref.data.synthetic.traits import (
    CameraParams,
    IdentityTraits,
    IntArray,
    ViewParams,
    clothing_palette,
    draw_cameras,
    draw_identities,
    draw_views,
    dress_alike,
    lookalike_groups,
)

SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")
_RENDER_CHUNK = 256  # images rendered per vectorised batch (bounds memory at large scales)


@dataclass(frozen=True)
class DomainPlan:
    """Everything drawn for one domain before rendering. N images in file order."""

    config: SyntheticConfig
    identities: IdentityTraits
    cameras: CameraParams
    views: ViewParams
    pids: IntArray  # [N] ground-truth pid written in the file name (0 = distractor)
    splits: IntArray  # [N] index into SPLIT_DIRS
    frames: IntArray  # [N] frame number, unique per camera
    seed: int

    @property
    def file_names(self) -> list[str]:
        """Market-1501 names ``PPPP_cCs1_FFFFFF_01.jpg`` (camera 1-based)."""
        return [
            f"{pid:04d}_c{cam + 1}s1_{frame:06d}_01.jpg"
            for pid, cam, frame in zip(
                self.pids.tolist(), self.views.camid.tolist(), self.frames.tolist(), strict=True
            )
        ]


@dataclass(frozen=True)
class RenderedDomain:
    """A small domain rendered in memory (for tests and benchmarks; :func:`write_domain` streams)."""

    images: np.ndarray  # [N, H, W, 3] uint8
    pids: IntArray  # [N]
    camids: IntArray  # [N] 0-based
    splits: IntArray  # [N] index into SPLIT_DIRS


def _domain_rng(seed: int, name: str, stream: int) -> np.random.Generator:
    # crc32 of the name (not hash(), which is salted per process) keeps files identical across runs.
    return np.random.default_rng([seed, zlib.crc32(name.encode()), stream])


def plan_domain(config: SyntheticConfig, seed: int) -> DomainPlan:
    """Draw every identity, camera and image of one domain (no pixels yet).

    Train and test identities are disjoint; each identity is seen by 2..num_cameras cameras. The query holds
    the first image of each (test identity, camera) that has a match in another camera of the gallery (so
    no query is skipped by the evaluation); the gallery holds the rest plus the distractors. ``splits``
    indexes ``SPLIT_DIRS`` (0 train, 1 query, 2 gallery).
    """
    rng = _domain_rng(seed, config.name, 0)
    style = config.style
    palette = clothing_palette(style, rng)
    num_real = config.num_train_ids + config.num_test_ids
    identities = draw_identities(num_real + config.num_distractors, palette, style, rng)
    cameras = draw_cameras(config.num_cameras, style, rng)
    if style.lookalike_share > 0:  # its own stream: without look-alikes every other draw stays the same
        train_rows, test_rows = np.arange(config.num_train_ids), np.arange(config.num_train_ids, num_real)
        groups = lookalike_groups([train_rows, test_rows], style, _domain_rng(seed, config.name, 1))
        identities = dress_alike(identities, groups)

    # Pids 1..num_real shuffled between train and test, like Market-1501's interleaved ids.
    pid_of_identity = rng.permutation(num_real) + 1
    identity_list: list[IntArray] = []
    camid_list: list[IntArray] = []
    split_list: list[IntArray] = []
    for k in range(num_real):
        # 2..num_cameras cameras, and at least one camera with two images (so there is a query to make).
        num_cams = int(rng.integers(2, min(config.num_cameras, config.images_per_id - 1) + 1))
        cams = rng.choice(config.num_cameras, num_cams, replace=False)
        # Every chosen camera gets at least one image; the rest are spread at random.
        camids = np.sort(np.concatenate([cams, rng.choice(cams, config.images_per_id - num_cams)]))
        split = np.zeros(len(camids), np.int64)
        if k >= config.num_train_ids:
            # Query: the first image of a camera, if another camera keeps an image in the gallery (a camera
            # with two or more images always keeps one), so every query has a cross-camera match.
            cam_values, counts = np.unique(camids, return_counts=True)
            multi = cam_values[counts >= 2]
            first = np.r_[True, camids[1:] != camids[:-1]]
            has_match = np.array([np.any(multi != c) for c in camids])
            split = np.where(first & has_match, 1, 2)
        identity_list.append(np.full(len(camids), k))
        camid_list.append(camids)
        split_list.append(split)
    distractors = np.arange(num_real, num_real + config.num_distractors)
    identity_list.append(distractors)
    camid_list.append(rng.integers(0, config.num_cameras, config.num_distractors))
    split_list.append(np.full(config.num_distractors, 2))
    identity = np.concatenate(identity_list).astype(np.int64)
    camid = np.concatenate(camid_list).astype(np.int64)
    splits = np.concatenate(split_list).astype(np.int64)
    # Training ids must not be test ids: pids follow identity rows, distractors are pid 0.
    pids = np.where(identity < num_real, pid_of_identity[np.minimum(identity, num_real - 1)], 0)

    views = draw_views(identity, camid, cameras, palette, style, rng)
    # Frame numbers: a running count per camera in a shuffled order, so names do not reveal identities.
    order = rng.permutation(len(identity))
    frames = np.zeros(len(identity), np.int64)
    for c in range(config.num_cameras):
        idx = order[camid[order] == c]
        frames[idx] = np.arange(len(idx)) * 7 + 1
    return DomainPlan(
        config=config,
        identities=identities,
        cameras=cameras,
        views=views,
        pids=pids,
        splits=splits,
        frames=frames,
        seed=seed,
    )


def _subset(views: ViewParams, rows: IntArray) -> ViewParams:
    return ViewParams(**{f.name: getattr(views, f.name)[rows] for f in dataclasses.fields(ViewParams)})


def render_plan(plan: DomainPlan, rows: IntArray | None = None) -> np.ndarray:
    """Render the images of ``plan`` (all, or the given rows), in chunks to bound memory.

    A row's pixels do not depend on which other rows are rendered with it.

    Returns:
        [N, H, W, 3] uint8 images in row order.
    """
    rows = np.arange(len(plan.pids)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), plan.config.height, plan.config.width, 3), np.uint8)
    for start in range(0, len(rows), _RENDER_CHUNK):
        chunk = rows[start : start + _RENDER_CHUNK]
        out[start : start + len(chunk)] = _render_rows(plan, chunk)
    return out


def _render_rows(plan: DomainPlan, rows: IntArray) -> np.ndarray:
    return render_images(
        plan.identities,
        plan.cameras,
        _subset(plan.views, rows),
        height=plan.config.height,
        width=plan.config.width,
        style=plan.config.style,
    )


def render_domain(config: SyntheticConfig, seed: int = 0) -> RenderedDomain:
    """Render a whole domain in memory (use for small configs; :func:`write_domain` streams to disk)."""
    plan = plan_domain(config, seed)
    return RenderedDomain(
        images=render_plan(plan), pids=plan.pids, camids=plan.views.camid, splits=plan.splits
    )
