"""The person layers of a rendered image: body geometry per view (:class:`_Figure`) and the painting of
legs and shoes, torso and arms, accessories (backpack, logo, bag) and head and hair into the part map."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dualref.data.synthetic.scene import (
    _BACKPACK,
    _BAG,
    _HAIR,
    _LOGO,
    _LOWER,
    _SHOES,
    _SKIN,
    _UPPER,
    _UPPER2,
    _box,
    _col,
    _limb,
    _paint,
)
from dualref.data.synthetic.traits import FloatArray, IdentityTraits, IntArray, ViewParams


@dataclass(frozen=True)
class _Figure:
    """Where each image's person stands and how it is built, in full-resolution pixels. Every field is
    [N, 1, 1] (one value per image, broadcasting over rows and columns) except ``ident``."""

    ident: IntArray  # [N] row of IdentityTraits
    front: np.ndarray  # bool, front view
    back: np.ndarray  # bool, back view
    side_c: FloatArray  # 1.0 in profile views, 0.0 in front / back views
    facing: FloatArray  # image x direction the face points to in profile (-1 / +1)
    body_h: FloatArray  # body height
    cx: FloatArray  # body centre column
    head_rv: FloatArray  # vertical and horizontal head radii, head centre row
    head_rh: FloatArray
    head_cy: FloatArray
    shoulder: FloatArray  # rows of the shoulders, the soles and the hips
    foot: FloatArray
    hip: FloatArray
    leg_len: FloatArray
    torso_hw: FloatArray  # half widths of the torso, an arm and a leg
    arm_hw: FloatArray
    leg_hw: FloatArray
    stride: FloatArray  # leg swing in [-1, 1]
    swing: FloatArray  # arm swing in [-1, 1]


def _figure(identities: IdentityTraits, views: ViewParams, height: int, width: int) -> _Figure:
    """Body geometry of N images of ``height`` x ``width`` pixels (identity traits times framing)."""
    tr = identities
    ident = views.identity
    view = views.view
    side_c = _col((view >= 2).astype(np.float32))
    body_h = _col(tr.height[ident] * views.scale) * (height * 0.92)
    top = _col(views.shift[:, 0]) * height + (height - body_h) * 0.5
    head_rv = _col(tr.head_size[ident]) * 0.062 * body_h
    foot = top + body_h
    leg_len = _col(tr.leg_ratio[ident]) * body_h
    torso_hw = _col(tr.build[ident]) * 0.19 * width * (1.0 - 0.35 * side_c)
    return _Figure(
        ident=ident,
        front=_col((view == 0).astype(np.float32)) > 0,
        back=_col((view == 1).astype(np.float32)) > 0,
        side_c=side_c,
        facing=_col(np.where(view == 2, -1.0, 1.0)),
        body_h=body_h,
        cx=_col(views.shift[:, 1] + 0.5) * width,
        head_rv=head_rv,
        head_rh=head_rv * 0.78,
        head_cy=top + head_rv,
        shoulder=top + 2 * head_rv + 0.015 * body_h,
        foot=foot,
        hip=foot - leg_len,
        leg_len=leg_len,
        torso_hw=torso_hw,
        arm_hw=0.045 * width * _col(tr.build[ident]),
        leg_hw=torso_hw * np.where(side_c > 0, 0.55, 0.42),
        stride=_col(views.stride),
        swing=_col(views.arm_swing),
    )


def _backpack_rows(fig: _Figure) -> tuple[FloatArray, FloatArray]:
    """(top, bottom) rows [N, 1, 1] of the backpack, shared by its profile and back views."""
    return fig.shoulder + 0.02 * fig.body_h, fig.shoulder + 0.27 * fig.body_h


def _paint_legs(parts: np.ndarray, fig: _Figure, tr: IdentityTraits, yy: FloatArray, xx: FloatArray) -> None:
    """Legs (trousers or shorts over skin), waistband and shoes; ``parts`` is [N, H', W']."""
    cx, hip, foot, body_h, leg_hw, side_c = fig.cx, fig.hip, fig.foot, fig.body_h, fig.leg_hw, fig.side_c
    torso_hw = fig.torso_hw
    # Apart in front/back views (small jitter), scissoring in profile.
    leg_sep = torso_hw * 0.5 * (1 - side_c)
    foot_dx = np.where(side_c > 0, fig.stride * 0.16 * body_h, fig.stride * 0.03 * body_h)
    legs = []
    for sign in (-1.0, 1.0):
        legs.append(
            _limb(yy, xx, hip, foot, cx + sign * leg_sep, cx + sign * leg_sep + sign * foot_dx, leg_hw)
        )
    leg_mask = legs[0] | legs[1]
    lower_end = hip + _col(tr.lower_length[fig.ident]) * fig.leg_len
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
        toe = fig.facing * side_c * leg_hw * 0.8  # shoes stick out forwards in profile
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


def _paint_torso(
    parts: np.ndarray,
    fig: _Figure,
    tr: IdentityTraits,
    yy: FloatArray,
    xx: FloatArray,
    height: int,
    width: int,
) -> None:
    """Profile backpack (behind the torso, so painted first), then the torso with the identity's pattern."""
    cx, facing, shoulder, hip, torso_hw = fig.cx, fig.facing, fig.shoulder, fig.hip, fig.torso_hw
    pack_top, pack_bottom = _backpack_rows(fig)
    behind = cx - facing * torso_hw
    pack_side = _box(
        yy,
        xx,
        pack_top,
        np.minimum(behind, behind - facing * 0.16 * width),
        pack_bottom,
        np.maximum(behind, behind - facing * 0.16 * width),
    )
    _paint(parts, pack_side & (_col(tr.backpack[fig.ident]) > 0) & (fig.side_c > 0), _BACKPACK)

    # Slightly narrower at the waist.
    t = np.clip((yy - shoulder) / np.maximum(hip - shoulder, 1.0), 0, 1)
    torso = (yy >= shoulder) & (yy < hip + 0.01 * fig.body_h) & (np.abs(xx - cx) < torso_hw * (1 - 0.12 * t))
    period = _col(tr.pattern_period[fig.ident]) * (height / 128.0)
    pattern = _col(tr.pattern[fig.ident])
    stripe_y = ((yy - shoulder) % period) < period * 0.5
    stripe_x = ((xx - cx + 50.0) % period) < period * 0.5
    second = np.where(
        pattern == 1,
        stripe_y,
        np.where(pattern == 2, stripe_x, np.where(pattern == 3, stripe_y ^ stripe_x, False)),
    )
    _paint(parts, torso & ~second, _UPPER)
    _paint(parts, torso & second, _UPPER2)


def _paint_arms(parts: np.ndarray, fig: _Figure, tr: IdentityTraits, yy: FloatArray, xx: FloatArray) -> None:
    """Arms at both sides in front/back views, one swinging arm in profile; sleeve, then skin."""
    cx, shoulder, body_h, arm_hw = fig.cx, fig.shoulder, fig.body_h, fig.arm_hw
    side_c, swing = fig.side_c, fig.swing
    arm_len = 0.36 * body_h
    sleeve_end = shoulder + _col(tr.sleeve[fig.ident]) * arm_len * 0.9
    arms = []
    for sign in (-1.0, 1.0):
        x_top = cx + sign * (fig.torso_hw + arm_hw * 0.8)
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


def _paint_accessories(
    parts: np.ndarray,
    fig: _Figure,
    tr: IdentityTraits,
    yy: FloatArray,
    xx: FloatArray,
    width: int,
    line: float,
) -> None:
    """Backpack seen from behind or its straps from the front, chest logo, and bag; ``line`` is the
    narrowest strap width (one sensor pixel)."""
    ident, cx, shoulder, hip, body_h = fig.ident, fig.cx, fig.shoulder, fig.hip, fig.body_h
    torso_hw, front, back, facing = fig.torso_hw, fig.front, fig.back, fig.facing
    # Backpack from behind: a large block on the back; from the front: two straps.
    pack = _col(tr.backpack[ident]) > 0
    pack_top, pack_bottom = _backpack_rows(fig)
    _paint(
        parts,
        pack & back & _box(yy, xx, pack_top, cx - torso_hw * 0.75, pack_bottom, cx + torso_hw * 0.75),
        _BACKPACK,
    )
    strap = (
        (np.abs(np.abs(xx - cx) - torso_hw * 0.55) < max(line, width / 48))
        & (yy >= shoulder)
        & (yy < shoulder + 0.18 * body_h)
    )
    _paint(parts, pack & front & strap, _BACKPACK)

    # Front logo on the chest.
    logo_half = 0.06 * body_h
    logo_cy = shoulder + 0.12 * body_h
    logo = _box(yy, xx, logo_cy - logo_half * 0.8, cx - logo_half, logo_cy + logo_half * 0.8, cx + logo_half)
    _paint(parts, logo & front & (_col(tr.logo[ident]) > 0), _LOGO)

    # Bag at hip height on the carrying side: the person's side maps to image left in front views and to
    # image right from behind; in profile it shows only when the carrying side faces the camera.
    bag_side = _col(tr.bag_side[ident].astype(np.float32))
    image_side = np.where(front, -bag_side, bag_side)
    bag_x = cx + image_side * (torso_hw + fig.arm_hw * 2.2)
    bag_x = np.where(fig.side_c > 0, cx + facing * 0.02 * width, bag_x)
    bag_visible = (_col(tr.bag[ident]) > 0) & ((fig.side_c == 0) | (bag_side == facing))
    bag = _box(yy, xx, hip - 0.05 * body_h, bag_x - 0.1 * width, hip + 0.12 * body_h, bag_x + 0.1 * width)
    _paint(parts, bag & bag_visible, _BAG)


def _paint_head(parts: np.ndarray, fig: _Figure, tr: IdentityTraits, yy: FloatArray, xx: FloatArray) -> None:
    """Face and hair depending on the viewpoint; long hair falls onto the back (and the nape in profile)."""
    cx, facing, head_cy, head_rh, head_rv = fig.cx, fig.facing, fig.head_cy, fig.head_rh, fig.head_rv
    side_c, back = fig.side_c, fig.back
    head = ((xx - cx) / head_rh) ** 2 + ((yy - head_cy) / head_rv) ** 2 < 1.0
    hair_cap = yy < head_cy - 0.3 * head_rv
    hair_back_half = (xx - cx) * facing < -0.15 * head_rh
    hair = hair_cap | back | (side_c > 0) & hair_back_half
    long_hair = _col(tr.hair_long[fig.ident]) > 0
    _paint(parts, head & ~hair, _SKIN)
    _paint(parts, head & hair, _HAIR)
    hair_fall = _box(yy, xx, head_cy, cx - head_rh * 0.9, fig.shoulder + 0.1 * fig.body_h, cx + head_rh * 0.9)
    hair_fall_side = _box(
        yy,
        xx,
        head_cy,
        np.minimum(cx, cx - facing * head_rh),
        fig.shoulder + 0.08 * fig.body_h,
        np.maximum(cx, cx - facing * head_rh),
    )
    _paint(parts, long_hair & ((back & hair_fall) | ((side_c > 0) & hair_fall_side)), _HAIR)


def _paint_person(
    parts: np.ndarray,
    identities: IdentityTraits,
    views: ViewParams,
    yy: FloatArray,
    xx: FloatArray,
    *,
    height: int,
    width: int,
    line: float,
) -> None:
    """Paint each image's person into ``parts`` [N, H', W'] (pixel centres ``yy`` [1, H', 1] and ``xx``
    [1, 1, W'] in full-resolution pixels), back to front: legs, profile backpack, torso, arms, accessories,
    head."""
    fig = _figure(identities, views, height, width)
    _paint_legs(parts, fig, identities, yy, xx)
    _paint_torso(parts, fig, identities, yy, xx, height, width)
    _paint_arms(parts, fig, identities, yy, xx)
    _paint_accessories(parts, fig, identities, yy, xx, width, line)
    _paint_head(parts, fig, identities, yy, xx)
