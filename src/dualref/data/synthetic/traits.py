"""What is drawn before rendering: the struct-of-arrays records :class:`IdentityTraits`,
:class:`CameraParams` and :class:`ViewParams`, and the functions that draw them from a domain's style
(:func:`clothing_palette`, :func:`draw_identities`, :func:`draw_cameras`, :func:`draw_views`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dualref.data.synthetic.styles import DomainStyle

_NUM_VIEWS = 4  # 0 front, 1 back, 2 facing image-left, 3 facing image-right
_MAX_CLUTTER = 3  # background objects per image (upper bound)

FloatArray = np.ndarray  # float32 arrays; numpy's generic aliases are too noisy in signatures here
IntArray = np.ndarray

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


# The traits a look-alike group shares: what a person wears above the shoes.
CLOTHING_TRAITS = ("upper", "upper2", "pattern", "pattern_period", "sleeve", "lower", "lower_length")


def lookalike_groups(blocks: list[IntArray], style: DomainStyle, rng: np.random.Generator) -> list[IntArray]:
    """Groups of `style.lookalike_group_size` identity rows drawn inside each block of rows (e.g. the train
    and the test identities), covering about `style.lookalike_share` of every block."""
    groups = []
    size = style.lookalike_group_size
    for rows in blocks:
        num_groups = min(round(style.lookalike_share * len(rows) / size), len(rows) // size)
        chosen = rng.permutation(rows)[: num_groups * size]
        groups += [np.sort(group) for group in chosen.reshape(num_groups, size)]
    return groups


def dress_alike(identities: IdentityTraits, groups: list[IntArray]) -> IdentityTraits:
    """`identities` with every group wearing its first member's clothes (`CLOTHING_TRAITS`)."""
    changed = {}
    for name in CLOTHING_TRAITS:
        values = getattr(identities, name).copy()
        for group in groups:
            values[group] = values[group[0]]
        changed[name] = values
    return dataclasses.replace(identities, **changed)


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
