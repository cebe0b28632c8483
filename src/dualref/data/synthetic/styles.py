"""Domain styles and sizes: :class:`DomainStyle`, :class:`SyntheticConfig` and the stock source / target
configurations :func:`domain_a_config` and :func:`domain_b_config`."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Look-alikes, as in real re-ID data (people in the same clothes: uniforms, a season's fashion): this
    # share of the identities comes in groups of `lookalike_group_size` that wear the same clothes (colours,
    # pattern, sleeve and leg length) and differ only in smaller traits (shoes, hair, height, build, bag,
    # backpack, logo). A clustering merges such groups into one cluster; the features that split them
    # are the subtle ones. Groups never mix train and test identities.
    lookalike_share: float = 0.0
    lookalike_group_size: int = 3


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
        if not 0.0 <= self.style.lookalike_share <= 1.0 or self.style.lookalike_group_size < 2:
            raise ValueError(
                f"lookalike_share={self.style.lookalike_share}, lookalike_group_size="
                f"{self.style.lookalike_group_size}; expected a share in [0, 1] and groups of >= 2"
            )
        f = self.style.downsample
        if f < 1 or self.height % f or self.width % f:
            raise ValueError(
                f"downsample={f} with image size {self.height}x{self.width}; expected a factor >= 1 "
                "that divides both sides"
            )


DOMAIN_A_STYLE = DomainStyle(lookalike_share=0.5, lookalike_group_size=2)
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
    lookalike_share=0.5,
    lookalike_group_size=3,
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
