"""Procedurally rendered synthetic domain pair in Market-1501 layout.

Lets the whole method run anywhere with no data, no weights and no network: ``synth_a`` plays the labelled
source domain and ``synth_b`` the unlabelled target. Each identity is a fixed set of traits (clothing colours
and pattern, body proportions, hair, skin, accessories); each image draws a viewpoint (front, back, left,
right), pose jitter, framing jitter, background clutter and an occluder; each camera has its own colour cast,
brightness, contrast, illumination gradient, blur, noise and background. The two domains differ in clothing
palette (A: saturated, every hue; B: more blues, browns and olives, less saturated), illumination (B: warmer,
darker, stronger casts), backgrounds (A: mostly outdoor brick and pavement; B: mostly indoor shelves and
tiles), resolution (B: half resolution, blurrier, noisier) and camera count (A: 6; B: 4).

Rendering is vectorised over a batch of images with numpy; PIL only encodes JPEG. Everything random comes
from generators seeded by ``(seed, domain name)``, so the same seed gives byte-identical files.

Layout written by :func:`write_domain` (read by ``load_dataset("market1501", root)``)::

    <out>/synth_a/bounding_box_train/0007_c3s1_000012_01.jpg    pid 7, camera 3 (1-based in the name)
    <out>/synth_a/query/...          one image per (test identity, camera), each with a cross-camera match
    <out>/synth_a/bounding_box_test/...   the other test images plus distractors (pid 0000)
    <out>/synth_a/SYNTHETIC.json     generator version, seed and config; written last, inside a temporary
                                     folder that is renamed into place, so a crash never leaves a tree that
                                     looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

# Bump when the rendering changes, so cached trees written by an older generator are regenerated.
GENERATOR_VERSION = 3
MARKER_NAME = "SYNTHETIC.json"
SPLIT_DIRS = ("bounding_box_train", "query", "bounding_box_test")

_NUM_VIEWS = 4  # 0 front, 1 back, 2 facing image-left, 3 facing image-right
_MAX_CLUTTER = 3  # background objects per image (upper bound)
_RENDER_CHUNK = 256  # images rendered per vectorised batch (bounds memory at large scales)

# Rendering paints part indices into a uint8 label map, then looks colours up once per pixel: much faster
# than painting RGB floats layer by layer.
(_WALL, _GROUND, _ACCENT, _CLUTTER0) = (0, 1, 2, 3)
(_LOWER, _SKIN, _SHOES, _BACKPACK, _UPPER, _UPPER2, _LOGO, _BAG, _HAIR, _OCCLUDER) = range(
    _CLUTTER0 + _MAX_CLUTTER, _CLUTTER0 + _MAX_CLUTTER + 10
)
_NUM_PARTS = _OCCLUDER + 1

FloatArray = np.ndarray  # float32 arrays; numpy's generic aliases are too noisy in signatures here
IntArray = np.ndarray


@dataclass(frozen=True)
class DomainStyle:
    """Appearance statistics of one domain (what makes domain A look different from domain B)."""

    hue_modes: tuple[float, ...] = ()  # preferred clothing hues in [0, 1); empty = uniform hues
    hue_mode_prob: float = 0.0  # probability that a palette colour is drawn near a hue mode
    hue_mode_spread: float = 0.05  # std of the hue around its mode
    saturation: tuple[float, float] = (0.45, 0.95)  # clothing saturation range
    value: tuple[float, float] = (0.45, 0.95)  # clothing brightness range (HSV value)
    neutral_prob: float = 0.2  # probability of a grey/black/white palette colour
    palette_size: int = 14  # identities share colours from this palette, so colour alone is ambiguous
    colour_jitter: float = 0.04  # per-identity RGB jitter around the palette colour
    cast_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mean per-camera log RGB gain
    cast_sigma: float = 0.08  # spread of the per-camera log RGB gain (white balance)
    brightness: tuple[float, float] = (0.8, 1.15)  # per-camera exposure range
    contrast: tuple[float, float] = (0.85, 1.15)  # per-camera contrast range
    exposure_jitter: float = 0.08  # per-image exposure std (relative)
    blur_sigma: tuple[float, float] = (0.0, 0.7)  # per-camera Gaussian blur range, in pixels
    noise_std: float = 0.015  # per-pixel Gaussian noise std (images in [0, 1])
    downsample: int = 1  # low-resolution sensor: render 1/downsample of the size, then enlarge
    indoor_fraction: float = 0.2  # share of cameras indoors (shelves + tiles) rather than outdoors (brick +
    # pavement); mixing both in each domain keeps the backgrounds from being a give-away of the domain
    background_tint: float = 0.12  # per-image std of the log RGB gain of the background (passers-by, light)
    occlusion_prob: float = 0.3  # probability of an occluding block or pole per image
    view_bias: float = 0.5  # probability that an image takes its camera's preferred viewpoint


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and style of one synthetic domain. Defaults are sized for the 10-minute CPU demo."""

    name: str = "synth_a"  # folder name and seed salt
    num_train_ids: int = 128  # identities in bounding_box_train
    num_test_ids: int = 96  # identities split into query / bounding_box_test (disjoint from train)
    images_per_id: int = 12  # images per identity, spread over 2..num_cameras cameras
    num_cameras: int = 6  # at most 9 (one digit in Market-1501 names)
    num_distractors: int = 48  # one-image identities written to the gallery as pid 0000
    height: int = 128  # Market-1501 native image size
    width: int = 64
    jpeg_quality: int = 90
    style: DomainStyle = field(default_factory=DomainStyle)

    def __post_init__(self) -> None:
        if not 2 <= self.num_cameras <= 9:
            raise ValueError(f"num_cameras={self.num_cameras}; expected 2..9 (one digit in file names)")
        if self.images_per_id < 3:
            raise ValueError(
                f"images_per_id={self.images_per_id}; expected >= 3 (two cameras, one of them seen twice)"
            )
        if self.num_train_ids < 1 or self.num_test_ids < 1 or self.num_distractors < 0:
            raise ValueError(
                f"num_train_ids={self.num_train_ids}, num_test_ids={self.num_test_ids}, "
                f"num_distractors={self.num_distractors}; expected >= 1, >= 1, >= 0"
            )
        if self.num_train_ids + self.num_test_ids > 9999:
            raise ValueError("num_train_ids + num_test_ids must fit 4-digit pids (<= 9999)")
        if self.height < 16 or self.width < 8:
            raise ValueError(f"image size {self.height}x{self.width}; expected at least 16x8")
        if not 0.0 <= self.style.indoor_fraction <= 1.0:
            raise ValueError(f"indoor_fraction={self.style.indoor_fraction}; expected a value in [0, 1]")
        f = self.style.downsample
        if f < 1 or self.height % f or self.width % f:
            raise ValueError(
                f"downsample={f} with image size {self.height}x{self.width}; expected a factor >= 1 "
                "that divides both sides"
            )


DOMAIN_A_STYLE = DomainStyle()
DOMAIN_B_STYLE = DomainStyle(
    hue_modes=(0.6, 0.08, 0.33),  # more blues, browns and olive greens: a winter palette
    hue_mode_prob=0.4,
    saturation=(0.3, 0.85),
    value=(0.3, 0.85),
    neutral_prob=0.25,
    palette_size=14,
    colour_jitter=0.04,
    cast_mean=(0.06, 0.0, -0.08),  # warm artificial light
    cast_sigma=0.1,
    brightness=(0.7, 1.05),
    contrast=(0.8, 1.05),
    exposure_jitter=0.1,
    blur_sigma=(0.3, 0.8),
    noise_std=0.022,
    downsample=2,
    indoor_fraction=0.75,
    occlusion_prob=0.3,
    view_bias=0.5,
)


def _scaled(n: int, scale: float) -> int:
    if scale <= 0:
        raise ValueError(f"scale={scale}; expected > 0")
    return max(2, round(n * scale))


def domain_a_config(scale: float = 1.0) -> SyntheticConfig:
    """Source domain: 6 mostly outdoor cameras, saturated clothes, mild casts; `scale` multiplies ids."""
    return SyntheticConfig(
        name="synth_a",
        num_train_ids=_scaled(128, scale),
        num_test_ids=_scaled(96, scale),
        num_distractors=_scaled(48, scale),
        num_cameras=6,
        style=DOMAIN_A_STYLE,
    )


def domain_b_config(scale: float = 1.0) -> SyntheticConfig:
    """Target domain: 4 mostly indoor cameras, shifted palette, warm casts, half resolution, noise."""
    return SyntheticConfig(
        name="synth_b",
        num_train_ids=_scaled(128, scale),
        num_test_ids=_scaled(96, scale),
        num_distractors=_scaled(48, scale),
        num_cameras=4,
        style=DOMAIN_B_STYLE,
    )


# ----------------------------------------------------------------------------------------------------------
# Records: struct-of-arrays, one row per identity / camera / image.


@dataclass(frozen=True)
class IdentityTraits:
    """What stays fixed for one identity across its images. K = number of identities."""

    upper: FloatArray  # [K, 3] RGB in [0, 1], shirt / jacket
    upper2: FloatArray  # [K, 3] second colour of the upper-body pattern
    pattern: IntArray  # [K] 0 solid, 1 horizontal stripes, 2 vertical stripes, 3 checks
    pattern_period: FloatArray  # [K] stripe period in pixels at full height
    sleeve: FloatArray  # [K] fraction of the arm covered by the sleeve (short vs long)
    lower: FloatArray  # [K, 3] trousers / shorts
    lower_length: FloatArray  # [K] fraction of the leg covered (shorts ~0.45, trousers 1)
    shoes: FloatArray  # [K, 3]
    skin: FloatArray  # [K, 3]
    hair: FloatArray  # [K, 3]
    hair_long: IntArray  # [K] 0/1, long hair falls on the back
    height: FloatArray  # [K] relative body height
    build: FloatArray  # [K] relative body width
    leg_ratio: FloatArray  # [K] leg length / body height
    head_size: FloatArray  # [K] relative head size
    backpack: IntArray  # [K] 0/1, seen from behind and the side, only straps from the front
    backpack_colour: FloatArray  # [K, 3]
    bag: IntArray  # [K] 0/1, a bag hanging on one side
    bag_side: IntArray  # [K] -1/+1, the body side carrying the bag (visible in one profile only)
    bag_colour: FloatArray  # [K, 3]
    logo: IntArray  # [K] 0/1, a chest logo visible from the front only
    logo_colour: FloatArray  # [K, 3]


@dataclass(frozen=True)
class CameraParams:
    """Per-camera appearance. C = number of cameras."""

    gain: FloatArray  # [C, 3] RGB white-balance gains
    brightness: FloatArray  # [C]
    contrast: FloatArray  # [C]
    gradient: FloatArray  # [C] left-to-right illumination slope
    blur_sigma: FloatArray  # [C] Gaussian blur in pixels
    wall: FloatArray  # [C, 3] background colour above the horizon
    ground: FloatArray  # [C, 3] background colour below the horizon
    accent: FloatArray  # [C, 3] texture colour (mortar / shelves / tile joints)
    horizon: FloatArray  # [C] horizon height as a fraction of the image height
    texture_period: FloatArray  # [C] texture period in pixels
    preferred_view: IntArray  # [C] the viewpoint this camera mostly sees (walking direction)
    indoor: IntArray  # [C] 1 = indoor background (shelves + tiles), 0 = outdoor (brick + pavement)


@dataclass(frozen=True)
class ViewParams:
    """Per-image draw. N = number of images."""

    identity: IntArray  # [N] row of IdentityTraits
    camid: IntArray  # [N] 0-based camera
    view: IntArray  # [N] 0 front, 1 back, 2 facing left, 3 facing right
    shift: FloatArray  # [N, 2] (dy, dx) framing offset as a fraction of (H, W)
    scale: FloatArray  # [N] framing scale
    stride: FloatArray  # [N] leg swing in [-1, 1]
    arm_swing: FloatArray  # [N] arm swing in [-1, 1]
    exposure: FloatArray  # [N] relative exposure
    texture_phase: FloatArray  # [N, 2] background texture offset (dy, dx) in pixels
    background_gain: FloatArray  # [N, 3] per-image RGB gain of the background
    noise_seed: IntArray  # [N] seed of the image's sensor noise
    clutter: FloatArray  # [N, M, 4] background objects (y0, x0, y1, x1) as fractions; y0 >= y1 = none
    clutter_colour: FloatArray  # [N, M, 3]
    occluder: IntArray  # [N] 0 none, 1 block from the bottom / side, 2 vertical pole
    occluder_box: FloatArray  # [N, 4] (y0, x0, y1, x1) as fractions of (H, W)
    occluder_colour: FloatArray  # [N, 3]


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


# ----------------------------------------------------------------------------------------------------------
# Drawing traits.


def _hsv_to_rgb(hsv: FloatArray) -> FloatArray:
    """[..., 3] HSV in [0, 1] -> [..., 3] RGB in [0, 1]."""
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return (v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0, 1)).astype(
        np.float32
    )


def clothing_palette(style: DomainStyle, rng: np.random.Generator) -> FloatArray:
    """Draw the domain's clothing palette.

    Returns:
        [palette_size, 3] RGB colours in [0, 1].
    """
    n = style.palette_size
    hue = rng.random(n)
    if style.hue_modes:
        near_mode = rng.random(n) < style.hue_mode_prob
        modes = np.asarray(style.hue_modes)[rng.integers(0, len(style.hue_modes), n)]
        hue = np.where(near_mode, modes + rng.normal(0, style.hue_mode_spread, n), hue)
    sat = rng.uniform(*style.saturation, n)
    val = rng.uniform(*style.value, n)
    neutral = rng.random(n) < style.neutral_prob
    sat = np.where(neutral, rng.uniform(0.0, 0.08, n), sat)
    val = np.where(neutral, rng.uniform(0.08, 0.92, n), val)
    return _hsv_to_rgb(np.stack([hue, sat, val], axis=-1))


def draw_identities(
    num: int, palette: FloatArray, style: DomainStyle, rng: np.random.Generator
) -> IdentityTraits:
    """Draw ``num`` identities whose colours come from ``palette`` (plus a small per-identity jitter)."""

    def colour() -> FloatArray:
        base = palette[rng.integers(0, len(palette), num)]
        return np.clip(base + rng.normal(0, style.colour_jitter, (num, 3)), 0, 1).astype(np.float32)

    def flag(p: float) -> IntArray:
        return (rng.random(num) < p).astype(np.int64)

    skin_tone = rng.uniform(0.25, 0.95, num)[:, None]
    skin = np.clip(np.array([0.95, 0.72, 0.58]) * (0.35 + 0.65 * skin_tone), 0, 1)
    hair_kind = rng.integers(0, 4, num)
    hair_table = np.array([[0.06, 0.05, 0.04], [0.30, 0.18, 0.09], [0.75, 0.60, 0.32], [0.55, 0.55, 0.55]])
    hair = np.clip(hair_table[hair_kind] * rng.uniform(0.8, 1.2, (num, 1)), 0, 1)
    return IdentityTraits(
        upper=colour(),
        upper2=colour(),
        pattern=rng.choice(4, num, p=[0.4, 0.25, 0.15, 0.2]),
        pattern_period=rng.uniform(4.0, 9.0, num).astype(np.float32),
        sleeve=np.where(rng.random(num) < 0.7, 1.0, 0.35).astype(np.float32),
        lower=colour(),
        lower_length=np.where(rng.random(num) < 0.75, 1.0, 0.45).astype(np.float32),
        shoes=colour(),
        skin=skin.astype(np.float32),
        hair=hair.astype(np.float32),
        hair_long=flag(0.3),
        height=rng.uniform(0.88, 1.0, num).astype(np.float32),
        build=rng.uniform(0.8, 1.25, num).astype(np.float32),
        leg_ratio=rng.uniform(0.42, 0.52, num).astype(np.float32),
        head_size=rng.uniform(0.85, 1.15, num).astype(np.float32),
        backpack=flag(0.35),
        backpack_colour=colour(),
        bag=flag(0.3),
        bag_side=np.where(rng.random(num) < 0.5, -1, 1),
        bag_colour=colour(),
        logo=flag(0.3),
        logo_colour=colour(),
    )


def draw_cameras(num: int, style: DomainStyle, rng: np.random.Generator) -> CameraParams:
    """Draw per-camera appearance for a domain of ``num`` cameras."""
    gain = np.exp(np.asarray(style.cast_mean) + rng.normal(0, style.cast_sigma, (num, 3)))
    indoor = np.zeros(num, bool)
    indoor[rng.permutation(num)[: round(style.indoor_fraction * num)]] = True

    def hsv(hue: tuple[float, float], sat: tuple[float, float], val: tuple[float, float]) -> FloatArray:
        return _hsv_to_rgb(
            np.stack([rng.uniform(*hue, num), rng.uniform(*sat, num), rng.uniform(*val, num)], axis=-1)
        )

    # Outdoors: stone, concrete and brick walls over grey pavement. Indoors: painted walls with shelves
    # over tiled floors, more hue and less light.
    wall = np.where(
        indoor[:, None], hsv((0, 1), (0.15, 0.5), (0.3, 0.7)), hsv((0, 0.12), (0.05, 0.4), (0.45, 0.85))
    )
    ground = np.where(
        indoor[:, None], hsv((0, 1), (0.1, 0.4), (0.25, 0.6)), hsv((0, 1), (0, 0.12), (0.35, 0.7))
    )
    horizon = np.where(indoor, rng.uniform(0.7, 0.85, num), rng.uniform(0.55, 0.75, num))
    period = np.where(indoor, rng.uniform(10.0, 22.0, num), rng.uniform(6.0, 12.0, num))
    # Low-contrast texture: strong stripes in the background look like clothing to a small network.
    accent = np.clip(wall * rng.uniform(0.7, 1.3, (num, 1)) + rng.normal(0, 0.05, (num, 3)), 0, 1)
    return CameraParams(
        gain=gain.astype(np.float32),
        brightness=rng.uniform(*style.brightness, num).astype(np.float32),
        contrast=rng.uniform(*style.contrast, num).astype(np.float32),
        gradient=rng.uniform(-0.3, 0.3, num).astype(np.float32),
        blur_sigma=rng.uniform(*style.blur_sigma, num).astype(np.float32),
        wall=wall,
        ground=ground,
        accent=accent.astype(np.float32),
        horizon=horizon.astype(np.float32),
        texture_period=period.astype(np.float32),
        preferred_view=rng.integers(0, _NUM_VIEWS, num),
        indoor=indoor.astype(np.int64),
    )


def draw_views(
    identity: IntArray,
    camid: IntArray,
    cameras: CameraParams,
    palette: FloatArray,
    style: DomainStyle,
    rng: np.random.Generator,
) -> ViewParams:
    """Draw viewpoint, pose, framing, clutter and occlusion for images of ``identity`` seen by ``camid``."""
    n = len(identity)
    view = np.where(
        rng.random(n) < style.view_bias, cameras.preferred_view[camid], rng.integers(0, _NUM_VIEWS, n)
    )
    # Background objects: boxes of palette colours, so clutter competes with clothing for raw-pixel matching.
    y0 = rng.uniform(-0.1, 0.8, (n, _MAX_CLUTTER))
    x0 = rng.uniform(-0.3, 0.9, (n, _MAX_CLUTTER))
    size = rng.uniform(0.1, 0.4, (n, _MAX_CLUTTER, 2))
    present = np.arange(_MAX_CLUTTER)[None, :] < rng.integers(0, _MAX_CLUTTER + 1, (n, 1))
    y1 = np.where(present, y0 + size[..., 0], y0)  # y1 <= y0 disables the box
    clutter = np.stack([y0, x0, y1, x0 + size[..., 1]], axis=-1)
    clutter_colour = palette[rng.integers(0, len(palette), (n, _MAX_CLUTTER))] * rng.uniform(
        0.6, 1.1, (n, _MAX_CLUTTER, 1)
    )
    # Occluders: a block rising from the bottom or entering from a side, or a vertical pole.
    occluder = np.where(rng.random(n) < style.occlusion_prob, rng.integers(1, 3, n), 0)
    from_side = rng.random(n) < 0.4
    side_left = rng.random(n) < 0.5
    depth = rng.uniform(0.2, 0.45, n)
    block = np.where(
        from_side[:, None],
        np.stack(
            [
                rng.uniform(0.2, 0.5, n),
                np.where(side_left, -0.1, 1 - depth),
                np.ones(n) * 1.1,
                np.where(side_left, depth, 1.1),
            ],
            axis=-1,
        ),
        np.stack([1 - depth, rng.uniform(-0.2, 0.3, n), np.ones(n) * 1.1, rng.uniform(0.7, 1.2, n)], axis=-1),
    )
    pole_x = rng.uniform(0.1, 0.85, n)
    pole = np.stack([np.zeros(n) - 0.1, pole_x, np.ones(n) * 1.1, pole_x + rng.uniform(0.05, 0.13, n)], -1)
    occluder_box = np.where((occluder == 2)[:, None], pole, block)
    occluder_colour = np.where(
        rng.random((n, 1)) < 0.5, palette[rng.integers(0, len(palette), n)], rng.uniform(0.1, 0.6, (n, 1))
    )
    return ViewParams(
        identity=identity,
        camid=camid,
        view=view,
        shift=np.stack([rng.normal(0, 0.025, n), rng.normal(0, 0.06, n)], axis=-1).astype(np.float32),
        scale=np.clip(rng.normal(0.97, 0.05, n), 0.85, 1.08).astype(np.float32),
        stride=rng.uniform(-1, 1, n).astype(np.float32),
        arm_swing=rng.uniform(-1, 1, n).astype(np.float32),
        exposure=np.exp(rng.normal(0, style.exposure_jitter, n)).astype(np.float32),
        texture_phase=rng.uniform(0, 40, (n, 2)).astype(np.float32),
        background_gain=np.exp(rng.normal(0, style.background_tint, (n, 3))).astype(np.float32),
        noise_seed=rng.integers(0, 2**63, n),
        clutter=clutter.astype(np.float32),
        clutter_colour=np.clip(clutter_colour, 0, 1).astype(np.float32),
        occluder=occluder,
        occluder_box=occluder_box.astype(np.float32),
        occluder_colour=occluder_colour.astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------
# Rendering (pure: the same inputs give the same pixels).


def _paint(parts: np.ndarray, mask: np.ndarray, part: int) -> None:
    """parts [N, H, W] <- part where mask [N, H, W] (mask may broadcast from [N, 1, 1] factors)."""
    np.copyto(parts, np.uint8(part), where=mask)


def _limb(
    yy: FloatArray,
    xx: FloatArray,
    top: FloatArray,
    bottom: FloatArray,
    x_top: FloatArray,
    x_bottom: FloatArray,
    half_width: FloatArray,
) -> np.ndarray:
    """[N, H, W] mask of a slanted bar from (top, x_top) to (bottom, x_bottom); parameters are [N, 1, 1]."""
    # Everything per row is [N, H, 1]; only the final comparisons touch all N x H x W pixels.
    t = (yy - top) / np.maximum(bottom - top, 1e-3)
    centre = x_top + t * (x_bottom - x_top)
    rows = (yy >= top) & (yy < bottom)
    return ((xx >= centre - half_width) & rows) & (xx < centre + half_width)


def _box(
    yy: FloatArray, xx: FloatArray, y0: FloatArray, x0: FloatArray, y1: FloatArray, x1: FloatArray
) -> np.ndarray:
    # Rows [N, H, 1] and columns [N, 1, W] first, so one operation touches every pixel.
    return ((yy >= y0) & (yy < y1)) & ((xx >= x0) & (xx < x1))


def _background(
    views: ViewParams, cameras: CameraParams, yy: FloatArray, xx: FloatArray, height: int, line: float
) -> np.ndarray:
    """[N, H', W'] uint8 part map of the camera background (wall, ground, accent texture) sampled at the pixel
    centres ``yy`` [1, H', 1] and ``xx`` [1, 1, W'] of an image ``height`` pixels high; ``line`` is the
    width of texture lines (one sensor pixel, so that they do not alias away at low resolution)."""
    h = height
    cam = views.camid
    period = cameras.texture_period[cam][:, None, None]
    py = yy + views.texture_phase[:, 0, None, None]
    px = xx + views.texture_phase[:, 1, None, None]
    horizon = (cameras.horizon[cam] * h)[:, None, None]
    above = yy < horizon
    # Only row-wise [N, H, 1] and column-wise [N, 1, W] terms use float maths; the full-size combinations
    # are boolean (float modulo over every pixel was most of the rendering time).
    # Outdoors: brick courses above the horizon (joints offset by half a brick every other course),
    # pavement slabs below.
    course = np.floor(py / (period * 0.5))
    shifted = px / period + 0.5 * (course % 2)  # [N, H, W], in bricks
    brick = (shifted - np.floor(shifted) < 1.2 * line / period) | (py % (period * 0.5) < line)
    slab = (px % (period * 2.5) < line) | ((py - horizon) % (period * 1.5) < line)
    # Indoors: shelves (vertical bands with horizontal boards) above, a checkerboard of floor tiles below.
    shelf = ((px % (period * 1.6)) < period * 0.5) | ((py % period) < 1.5 * line)
    tile = (np.floor(px / period) % 2 == 0) == (np.floor(py / (period * 0.6)) % 2 == 0)
    indoor = (cameras.indoor[cam] > 0)[:, None, None]
    texture = np.where(above, np.where(indoor, shelf, brick), np.where(indoor, tile, slab))
    return np.where(texture, _ACCENT, np.where(above, _WALL, _GROUND)).astype(np.uint8)


def render_images(
    identities: IdentityTraits,
    cameras: CameraParams,
    views: ViewParams,
    *,
    height: int,
    width: int,
    style: DomainStyle,
) -> np.ndarray:
    """Render person images.

    Args:
        identities: traits of K identities (rows indexed by ``views.identity``).
        cameras: parameters of C cameras (rows indexed by ``views.camid``).
        views: per-image draws for N images (``views.noise_seed`` seeds each image's pixel noise, so an
            image's pixels depend only on its own row, never on the batch it is rendered in).
        height: image height H in pixels.
        width: image width W in pixels.
        style: domain style (downsampling and noise level).

    Returns:
        [N, H, W, 3] uint8 RGB images.
    """
    n = len(views.identity)
    if n == 0:
        return np.zeros((0, height, width, 3), np.uint8)
    # A low-resolution domain is rendered directly on a coarser grid (pixel centres in full-resolution
    # units, so all geometry below stays in full-resolution pixels) and enlarged at the end, like the
    # upscaled crops of a low-resolution camera; it also makes that domain four times cheaper to render.
    f = style.downsample
    yy = ((np.arange(height // f, dtype=np.float32) + 0.5) * f)[None, :, None]
    xx = ((np.arange(width // f, dtype=np.float32) + 0.5) * f)[None, None, :]
    parts = _background(views, cameras, yy, xx, height, line=float(f))

    def col(a: FloatArray) -> FloatArray:  # per-image [N, 1, 1] column of a per-image value
        return np.asarray(a, np.float32)[:, None, None]

    for m in range(views.clutter.shape[1]):
        y0, x0, y1, x1 = (col(views.clutter[:, m, j]) for j in range(4))
        _paint(parts, _box(yy, xx, y0 * height, x0 * width, y1 * height, x1 * width), _CLUTTER0 + m)

    ident = views.identity
    tr = identities
    view = views.view
    side = view >= 2
    facing = col(np.where(view == 2, -1.0, 1.0))  # image x direction the face points to in profile
    side_c = col(side.astype(np.float32))

    # Body geometry in pixels, every quantity [N, 1, 1].
    body_h = col(tr.height[ident] * views.scale) * (height * 0.92)
    top = col(views.shift[:, 0]) * height + (height - body_h) * 0.5
    cx = col(views.shift[:, 1] + 0.5) * width
    head_rv = col(tr.head_size[ident]) * 0.062 * body_h
    head_rh = head_rv * 0.78
    head_cy = top + head_rv
    shoulder = top + 2 * head_rv + 0.015 * body_h
    foot = top + body_h
    leg_len = col(tr.leg_ratio[ident]) * body_h
    hip = foot - leg_len
    torso_hw = col(tr.build[ident]) * 0.19 * width * (1.0 - 0.35 * side_c)
    arm_hw = 0.045 * width * col(tr.build[ident])
    leg_hw = torso_hw * np.where(side_c > 0, 0.55, 0.42)
    stride = col(views.stride)
    swing = col(views.arm_swing)

    # Legs: apart in front/back views (small jitter), scissoring in profile.
    leg_sep = torso_hw * 0.5 * (1 - side_c)
    foot_dx = np.where(side_c > 0, stride * 0.16 * body_h, stride * 0.03 * body_h)
    legs = []
    for sign in (-1.0, 1.0):
        legs.append(
            _limb(yy, xx, hip, foot, cx + sign * leg_sep, cx + sign * leg_sep + sign * foot_dx, leg_hw)
        )
    leg_mask = legs[0] | legs[1]
    lower_end = hip + col(tr.lower_length[ident]) * leg_len
    _paint(parts, leg_mask & (yy >= lower_end), _SKIN)
    _paint(parts, leg_mask & (yy < lower_end), _LOWER)
    _paint(
        parts,
        _box(yy, xx, hip - 0.03 * body_h, cx - torso_hw * 0.95, hip + 0.05 * body_h, cx + torso_hw * 0.95),
        _LOWER,
    )
    shoe_top = foot - 0.035 * body_h
    for sign in (-1.0, 1.0):
        x_foot = cx + sign * leg_sep + sign * foot_dx
        toe = facing * side_c * leg_hw * 0.8
        _paint(
            parts,
            _box(
                yy,
                xx,
                shoe_top,
                x_foot - leg_hw * 1.1 + np.minimum(toe, 0),
                foot + 0.5,
                x_foot + leg_hw * 1.1 + np.maximum(toe, 0),
            ),
            _SHOES,
        )

    # Backpack seen from the side sticks out behind the torso (drawn before the torso).
    pack = col(tr.backpack[ident]) > 0
    pack_top = shoulder + 0.02 * body_h
    pack_bottom = shoulder + 0.27 * body_h
    behind = cx - facing * torso_hw
    pack_side = _box(
        yy,
        xx,
        pack_top,
        np.minimum(behind, behind - facing * 0.16 * width),
        pack_bottom,
        np.maximum(behind, behind - facing * 0.16 * width),
    )
    _paint(parts, pack_side & pack & (side_c > 0), _BACKPACK)

    # Torso, slightly narrower at the waist, with the identity's pattern.
    t = np.clip((yy - shoulder) / np.maximum(hip - shoulder, 1.0), 0, 1)
    torso = (yy >= shoulder) & (yy < hip + 0.01 * body_h) & (np.abs(xx - cx) < torso_hw * (1 - 0.12 * t))
    period = col(tr.pattern_period[ident]) * (height / 128.0)
    pattern = col(tr.pattern[ident])
    stripe_y = ((yy - shoulder) % period) < period * 0.5
    stripe_x = ((xx - cx + 50.0) % period) < period * 0.5
    second = np.where(
        pattern == 1,
        stripe_y,
        np.where(pattern == 2, stripe_x, np.where(pattern == 3, stripe_y ^ stripe_x, False)),
    )
    _paint(parts, torso & ~second, _UPPER)
    _paint(parts, torso & second, _UPPER2)

    # Arms: at both sides in front/back views, one swinging arm in profile.
    arm_len = 0.36 * body_h
    sleeve_end = shoulder + col(tr.sleeve[ident]) * arm_len * 0.9
    arms = []
    for sign in (-1.0, 1.0):
        x_top = cx + sign * (torso_hw + arm_hw * 0.8)
        x_bottom = x_top + sign * (0.02 + 0.02 * swing) * body_h
        arms.append(
            _limb(yy, xx, shoulder + arm_hw, shoulder + arm_len, x_top, x_bottom, arm_hw) & (side_c == 0)
        )
    profile_arm = _limb(
        yy, xx, shoulder + arm_hw, shoulder + arm_len, cx, cx + swing * 0.14 * body_h, arm_hw
    ) & (side_c > 0)
    arm_mask = arms[0] | arms[1] | profile_arm
    _paint(parts, arm_mask & (yy < sleeve_end), _UPPER)
    _paint(parts, arm_mask & (yy >= sleeve_end), _SKIN)

    # Backpack from behind: a large block on the back; from the front: two straps.
    front = col((view == 0).astype(np.float32)) > 0
    back = col((view == 1).astype(np.float32)) > 0
    _paint(
        parts,
        pack & back & _box(yy, xx, pack_top, cx - torso_hw * 0.75, pack_bottom, cx + torso_hw * 0.75),
        _BACKPACK,
    )
    strap = (
        (np.abs(np.abs(xx - cx) - torso_hw * 0.55) < max(float(f), width / 48))
        & (yy >= shoulder)
        & (yy < shoulder + 0.18 * body_h)
    )
    _paint(parts, pack & front & strap, _BACKPACK)

    # Front logo on the chest.
    logo_half = 0.06 * body_h
    logo_cy = shoulder + 0.12 * body_h
    logo = _box(yy, xx, logo_cy - logo_half * 0.8, cx - logo_half, logo_cy + logo_half * 0.8, cx + logo_half)
    _paint(parts, logo & front & (col(tr.logo[ident]) > 0), _LOGO)

    # Bag at hip height on the carrying side: the person's side maps to image left in front views and to
    # image right from behind; in profile it shows only when the carrying side faces the camera.
    bag_side = col(tr.bag_side[ident].astype(np.float32))
    image_side = np.where(front, -bag_side, bag_side)
    bag_x = cx + image_side * (torso_hw + arm_hw * 2.2)
    bag_x = np.where(side_c > 0, cx + facing * 0.02 * width, bag_x)
    bag_visible = (col(tr.bag[ident]) > 0) & ((side_c == 0) | (bag_side == facing))
    bag = _box(yy, xx, hip - 0.05 * body_h, bag_x - 0.1 * width, hip + 0.12 * body_h, bag_x + 0.1 * width)
    _paint(parts, bag & bag_visible, _BAG)

    # Head: face and hair depend on the viewpoint; long hair falls onto the back.
    head = ((xx - cx) / head_rh) ** 2 + ((yy - head_cy) / head_rv) ** 2 < 1.0
    hair_cap = yy < head_cy - 0.3 * head_rv
    hair_back_half = (xx - cx) * facing < -0.15 * head_rh
    hair = hair_cap | back | (side_c > 0) & hair_back_half
    long_hair = col(tr.hair_long[ident]) > 0
    _paint(parts, head & ~hair, _SKIN)
    _paint(parts, head & hair, _HAIR)
    hair_fall = _box(yy, xx, head_cy, cx - head_rh * 0.9, shoulder + 0.1 * body_h, cx + head_rh * 0.9)
    hair_fall_side = _box(
        yy,
        xx,
        head_cy,
        np.minimum(cx, cx - facing * head_rh),
        shoulder + 0.08 * body_h,
        np.maximum(cx, cx - facing * head_rh),
    )
    _paint(parts, long_hair & ((back & hair_fall) | ((side_c > 0) & hair_fall_side)), _HAIR)

    # Occluder in front of everything.
    occ = views.occluder
    y0, x0, y1, x1 = (col(views.occluder_box[:, j]) for j in range(4))
    occ_mask = _box(yy, xx, y0 * height, x0 * width, y1 * height, x1 * width) & (col(occ) > 0)
    _paint(parts, occ_mask, _OCCLUDER)

    # Colours: one [P, 3] table per image, with the camera's white balance and contrast folded in (both are
    # per-channel affine maps), looked up once per pixel.
    cam = views.camid
    table = np.empty((n, _NUM_PARTS, 3), np.float32)
    table[:, _WALL] = cameras.wall[cam] * views.background_gain
    table[:, _GROUND] = cameras.ground[cam] * views.background_gain
    table[:, _ACCENT] = cameras.accent[cam] * views.background_gain
    table[:, _CLUTTER0 : _CLUTTER0 + _MAX_CLUTTER] = views.clutter_colour
    for part, colours in (
        (_LOWER, tr.lower),
        (_SKIN, tr.skin),
        (_SHOES, tr.shoes),
        (_BACKPACK, tr.backpack_colour),
        (_UPPER, tr.upper),
        (_UPPER2, tr.upper2),
        (_LOGO, tr.logo_colour),
        (_BAG, tr.bag_colour),
        (_HAIR, tr.hair),
    ):
        table[:, part] = colours[ident]
    table[:, _OCCLUDER] = views.occluder_colour
    table = (table * cameras.gain[cam][:, None, :] - 0.5) * cameras.contrast[cam][:, None, None] + 0.5
    flat_index = parts.astype(np.intp) + (np.arange(n, dtype=np.intp) * _NUM_PARTS)[:, None, None]
    img = np.take(table.reshape(n * _NUM_PARTS, 3), flat_index, axis=0)

    # Light: exposure, a left-right illumination gradient, and vertical shading (darker away from the
    # horizon, like a ceiling light or the sky falling off).
    shade = 1.0 - 0.25 * np.abs(yy / height - col(cameras.horizon[cam]))
    light = (
        col(cameras.brightness[cam] * views.exposure)
        * shade
        * (1.0 + col(cameras.gradient[cam]) * (xx / width - 0.5))
    )
    img *= light[..., None]

    # Sensor: optics blur (sigma given in full-resolution pixels), noise, then the enlargement of a
    # low-resolution domain.
    for c in np.unique(cam):
        sigma = float(cameras.blur_sigma[c]) / f
        if sigma >= 0.15:
            rows = np.flatnonzero(cam == c)
            img[rows] = ndimage.gaussian_filter(
                img[rows], sigma=(0, sigma, sigma, 0), mode="nearest", truncate=2.5
            )
    # Uniform noise with the requested std: five times cheaper to draw than Gaussian noise, and after JPEG
    # encoding the two look the same.
    noise = np.empty_like(img)
    for i, seed in enumerate(views.noise_seed.tolist()):
        np.random.default_rng(seed).random(out=noise[i], dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(style.noise_std * 255.0 * np.sqrt(12.0))
    img *= np.float32(255.0)
    img += noise
    img += np.float32(0.5)  # round to nearest on the cast below
    out = np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)
    if f > 1:
        out = np.repeat(np.repeat(out, f, axis=1), f, axis=2)
    return out


# ----------------------------------------------------------------------------------------------------------
# Planning a domain: identities, cameras, images and splits.


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


# ----------------------------------------------------------------------------------------------------------
# Writing Market-1501 trees.


def _marker(config: SyntheticConfig, seed: int) -> dict[str, object]:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "config": dataclasses.asdict(config)}


def _is_complete(path: Path, marker: dict[str, object]) -> bool:
    try:
        return bool(json.loads((path / MARKER_NAME).read_text()) == json.loads(json.dumps(marker)))
    except (OSError, ValueError):
        return False


def write_domain(out: str | Path, config: SyntheticConfig, seed: int = 0) -> Path:
    """Render one domain and write it as a Market-1501 tree ``<out>/<config.name>``.

    The tree is written into a temporary sibling folder and renamed into place, with ``SYNTHETIC.json``
    written last; an existing tree with the same generator version, seed and config is reused as is.

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
    return write_domain(out, domain_a_config(scale), seed), write_domain(out, domain_b_config(scale), seed)
