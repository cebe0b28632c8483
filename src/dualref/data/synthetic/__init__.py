"""Procedurally rendered synthetic domain pair in Market-1501 layout.

Lets the whole method run anywhere with no data, no weights and no network: ``synth_a`` plays the labelled
source domain and ``synth_b`` the unlabelled target. Each identity is a fixed set of traits (clothing colours
and pattern, body proportions, hair, skin, accessories); each image draws a viewpoint (front, back, left,
right), pose jitter, framing jitter, background clutter and an occluder; each camera has its own colour cast,
brightness, contrast, illumination gradient, blur, noise and background. The two domains differ in clothing
palette (A: saturated, every hue; B: more blues, browns and olives, less saturated), illumination (B: warmer,
darker, stronger casts), backgrounds (A: mostly outdoor brick and pavement; B: mostly indoor shelves and
tiles), resolution (B: half resolution, blurrier, noisier) and camera count (A: 6; B: 4). As in real re-ID
data, half of each domain's identities are look-alikes (A: pairs, B: triples) that wear the same clothes and
differ only in shoes, hair, body shape and accessories (`DomainStyle.lookalike_share`).

Rendering is vectorised over a batch of images with numpy; PIL only encodes JPEG. Everything random comes
from generators seeded by ``(seed, domain name)``, so the same seed gives byte-identical files.

Layout written by :func:`write_domain` (read by ``load_dataset("market1501", root)``)::

    <out>/synth_a/bounding_box_train/0007_c3s1_000012_01.jpg    pid 7, camera 3 (1-based in the name)
    <out>/synth_a/query/...          one image per (test identity, camera), each with a cross-camera match
    <out>/synth_a/bounding_box_test/...   the other test images plus distractors (pid 0000)
    <out>/synth_a/SYNTHETIC.json     generator version, seed and config; written last, inside a temporary
                                     folder that is renamed into place, so a crash never leaves a tree that
                                     looks complete.

Modules: :mod:`.styles` (domain styles and sizes), :mod:`.traits` (identity, camera and image draws),
:mod:`.scene`, :mod:`.person` and :mod:`.rendering` (pixels), :mod:`.planning` (a domain's images and
splits), :mod:`.writing` (Market-1501 trees on disk).
"""

from dualref.data.synthetic.planning import (
    SPLIT_DIRS,
    DomainPlan,
    RenderedDomain,
    plan_domain,
    render_domain,
    render_plan,
)
from dualref.data.synthetic.planning import _subset as _subset
from dualref.data.synthetic.rendering import render_images
from dualref.data.synthetic.styles import (
    DOMAIN_A_STYLE,
    DOMAIN_B_STYLE,
    DomainStyle,
    SyntheticConfig,
    domain_a_config,
    domain_b_config,
)
from dualref.data.synthetic.traits import (
    CameraParams,
    IdentityTraits,
    ViewParams,
    clothing_palette,
    draw_cameras,
    draw_identities,
    draw_views,
)
from dualref.data.synthetic.writing import GENERATOR_VERSION, MARKER_NAME, write_domain, write_domain_pair

__all__ = [
    "DOMAIN_A_STYLE",
    "DOMAIN_B_STYLE",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "SPLIT_DIRS",
    "CameraParams",
    "DomainPlan",
    "DomainStyle",
    "IdentityTraits",
    "RenderedDomain",
    "SyntheticConfig",
    "ViewParams",
    "clothing_palette",
    "domain_a_config",
    "domain_b_config",
    "draw_cameras",
    "draw_identities",
    "draw_views",
    "plan_domain",
    "render_domain",
    "render_images",
    "render_plan",
    "write_domain",
    "write_domain_pair",
]
