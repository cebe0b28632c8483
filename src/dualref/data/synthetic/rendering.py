"""Rendering person images (pure: the same inputs give the same pixels). :func:`render_images` paints the
part-label map layer by layer, then applies the camera: colour lookup with white balance and contrast,
lighting, and the sensor (blur, noise, quantisation, low-resolution enlargement)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dualref.data.synthetic.person import _paint_person
from dualref.data.synthetic.scene import (
    _ACCENT,
    _BACKPACK,
    _BAG,
    _CLUTTER0,
    _GROUND,
    _HAIR,
    _LOGO,
    _LOWER,
    _NUM_PARTS,
    _OCCLUDER,
    _SHOES,
    _SKIN,
    _UPPER,
    _UPPER2,
    _WALL,
    _background,
    _col,
    _paint_clutter,
    _paint_occluder,
)
from dualref.data.synthetic.styles import DomainStyle
from dualref.data.synthetic.traits import _MAX_CLUTTER, CameraParams, FloatArray, IdentityTraits, ViewParams


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
    # units, so all geometry stays in full-resolution pixels) and enlarged at the end, like the upscaled
    # crops of a low-resolution camera; it also makes that domain four times cheaper to render.
    f = style.downsample
    yy = ((np.arange(height // f, dtype=np.float32) + 0.5) * f)[None, :, None]
    xx = ((np.arange(width // f, dtype=np.float32) + 0.5) * f)[None, None, :]
    # Layers back to front; texture lines and straps are at least one sensor pixel wide.
    parts = _background(views, cameras, yy, xx, height, line=float(f))
    _paint_clutter(parts, views, yy, xx, height, width)
    _paint_person(parts, identities, views, yy, xx, height=height, width=width, line=float(f))
    _paint_occluder(parts, views, yy, xx, height, width)
    img = _colour(parts, identities, cameras, views)
    _light(img, cameras, views, yy, xx, height, width)
    return _sensor(img, cameras, views, style)


def _colour(
    parts: np.ndarray, identities: IdentityTraits, cameras: CameraParams, views: ViewParams
) -> FloatArray:
    """[N, H', W'] uint8 part map -> [N, H', W', 3] float32 RGB.

    One [P, 3] colour table per image, with the camera's white balance and contrast folded in (both are
    per-channel affine maps), looked up once per pixel.
    """
    n = len(views.identity)
    ident = views.identity
    tr = identities
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
    img: FloatArray = np.take(table.reshape(n * _NUM_PARTS, 3), flat_index, axis=0)
    return img


def _light(
    img: FloatArray,
    cameras: CameraParams,
    views: ViewParams,
    yy: FloatArray,
    xx: FloatArray,
    height: int,
    width: int,
) -> None:
    """Scale ``img`` [N, H', W', 3] in place by exposure, a left-right illumination gradient, and vertical
    shading (darker away from the horizon, like a ceiling light or the sky falling off)."""
    cam = views.camid
    shade = 1.0 - 0.25 * np.abs(yy / height - _col(cameras.horizon[cam]))
    light = (
        _col(cameras.brightness[cam] * views.exposure)
        * shade
        * (1.0 + _col(cameras.gradient[cam]) * (xx / width - 0.5))
    )
    img *= light[..., None]


def _sensor(img: FloatArray, cameras: CameraParams, views: ViewParams, style: DomainStyle) -> np.ndarray:
    """[N, H', W', 3] float RGB in [0, 1] (modified in place) -> [N, H, W, 3] uint8: optics blur (sigma given
    in full-resolution pixels), noise, rounding, then the enlargement of a low-resolution domain."""
    f = style.downsample
    cam = views.camid
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
