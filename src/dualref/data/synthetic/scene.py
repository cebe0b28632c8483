"""The part-label map that rendering paints into, its mask primitives, and the layers around the person:
camera background, background clutter and the occluder in front."""

from __future__ import annotations

import numpy as np

from dualref.data.synthetic.traits import _MAX_CLUTTER, CameraParams, FloatArray, ViewParams

# Rendering paints part indices into a uint8 label map, then looks colours up once per pixel: much faster
# than painting RGB floats layer by layer.
(_WALL, _GROUND, _ACCENT, _CLUTTER0) = (0, 1, 2, 3)
(_LOWER, _SKIN, _SHOES, _BACKPACK, _UPPER, _UPPER2, _LOGO, _BAG, _HAIR, _OCCLUDER) = range(
    _CLUTTER0 + _MAX_CLUTTER, _CLUTTER0 + _MAX_CLUTTER + 10
)
_NUM_PARTS = _OCCLUDER + 1


def _col(a: FloatArray) -> FloatArray:
    """[N] per-image values -> [N, 1, 1] float32, broadcasting over an image's rows and columns."""
    return np.asarray(a, np.float32)[:, None, None]


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


def _paint_clutter(
    parts: np.ndarray, views: ViewParams, yy: FloatArray, xx: FloatArray, height: int, width: int
) -> None:
    """Paint the background objects ``views.clutter`` [N, M, 4] into ``parts`` [N, H', W'] (part
    ``_CLUTTER0 + m`` for object m, so each object keeps its own colour)."""
    for m in range(views.clutter.shape[1]):
        y0, x0, y1, x1 = (_col(views.clutter[:, m, j]) for j in range(4))
        _paint(parts, _box(yy, xx, y0 * height, x0 * width, y1 * height, x1 * width), _CLUTTER0 + m)


def _paint_occluder(
    parts: np.ndarray, views: ViewParams, yy: FloatArray, xx: FloatArray, height: int, width: int
) -> None:
    """Paint each image's occluder (``views.occluder_box`` [N, 4], where ``views.occluder`` > 0) into
    ``parts`` [N, H', W']; painted last, in front of everything."""
    occ = views.occluder
    y0, x0, y1, x1 = (_col(views.occluder_box[:, j]) for j in range(4))
    occ_mask = _box(yy, xx, y0 * height, x0 * width, y1 * height, x1 * width) & (_col(occ) > 0)
    _paint(parts, occ_mask, _OCCLUDER)
