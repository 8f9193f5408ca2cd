"""Shape scenes of the demo data set: the scene styles, scene sampling and anti-aliased rendering.

Each image holds a few objects, each with a shape, a colour, a size and a 3x3-grid position, on a
lightly shaded mid-tone background. A ``Style`` fixes which values occur and the image size:
``primary`` (the demo's: 32 px, 1-2 large objects, 6 shapes, 3 colours), ``small`` (the same with 6
colours: the demo's before, kept with the ablation numbers made on it) and ``classic`` (the first
demo set: 64 px, 1-3 objects, 8 shapes, 10 colours; kept so that its published numbers can be
rerun). ``captions.py`` describes the scenes in words; ``dataset.py`` writes them out as data sets.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

# Shapes with distinct silhouettes at 32 px (no hexagon/octagon: they read as circles when small).
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")
# Saturated or extreme colours; backgrounds below are muted mid-tones, so no object blends in.
COLOUR_RGB = {
    "red": (220, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 30),
    "green": (35, 165, 55),
    "cyan": (40, 215, 225),
    "blue": (35, 75, 230),
    "purple": (140, 55, 200),
    "pink": (250, 125, 195),
    "white": (248, 248, 248),
    "black": (20, 20, 20),
}
COLOURS = tuple(COLOUR_RGB)
BACKGROUNDS = {"grey": (128, 128, 128), "beige": (178, 164, 134), "slate": (92, 106, 122)}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
COUNT_WORDS = ("one", "two", "three")


@dataclass(frozen=True)
class Style:
    """What a data set's scenes are made of.

    Args:
        name: the style's name (``--style``).
        image_size: side of the rendered images in pixels.
        shapes, colours: the values objects draw from.
        sizes: size name -> radius range (centre to farthest vertex) as a fraction of the side.
        size_words: size name -> the words captions may use for it.
        max_objects: objects per scene are 1 to this many.
        edge: objects stay this far (fraction of the side) from the border (training crops ~5% per side).
        tint: each object's colour is shifted by up to this much per RGB channel (0-255 scale), so that
            neighbouring colours come close and colour takes some learning.
    """

    name: str
    image_size: int
    shapes: tuple[str, ...]
    colours: tuple[str, ...]
    sizes: dict[str, tuple[float, float]]
    size_words: dict[str, tuple[str, ...]]
    max_objects: int
    edge: float = 0.07
    tint: int = 0


STYLES = {
    "classic": Style(
        "classic",
        64,
        SHAPES,
        COLOURS,
        {"small": (0.095, 0.11), "large": (0.16, 0.18)},
        {"small": ("small", "little", "tiny"), "large": ("large", "big")},
        max_objects=3,
    ),
    # 32 px for a patch-4 ViT: 6 shapes whose silhouettes stay apart at 9-15 px across (no star: at
    # this size it reads as a cross), 6 colours of which neighbours (red/orange/yellow, blue/purple),
    # tinted, need a second look, one word per size
    "small": Style(
        "small",
        32,
        ("circle", "square", "triangle", "cross", "ring", "diamond"),
        ("red", "orange", "yellow", "green", "blue", "purple"),
        {"small": (0.14, 0.16), "large": (0.21, 0.24)},
        {"small": ("small",), "large": ("large",)},
        max_objects=2,
        edge=0.06,
        tint=40,
    ),
}
# the small style with the three primary colours: a batch of 16 captions can no longer be told apart
# by colour alone, so the contrastive loss needs size and shape as well
STYLES["primary"] = replace(STYLES["small"], name="primary", colours=("red", "yellow", "blue"))
DEFAULT_STYLE = "primary"
# the classic style's tables under their old names (the classic captions and older callers use them)
SIZES = STYLES["classic"].sizes
SIZE_WORDS = STYLES["classic"].size_words
EDGE = STYLES["classic"].edge


def get_style(name: str) -> Style:
    """The style called ``name``, or a one-line error listing the styles."""
    if name not in STYLES:
        raise ValueError(f"unknown scene style {name!r}; choose one of {', '.join(STYLES)}")
    return STYLES[name]


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of ``shape`` inside the unit circle, y pointing down."""
    ring = lambda n, r, a0=-math.pi / 2: [
        (r * math.cos(a0 + 2 * math.pi * k / n), r * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)
    ]
    if shape in ("circle", "ring"):
        return ring(48, 1.0)
    if shape == "square":  # corners slightly outside the circle, or squares look smaller than circles
        return ring(4, 1.12, -math.pi / 4)
    if shape == "triangle":  # shifted down so that its area centre sits at the object centre
        return [(x, y + 0.15) for x, y in ring(3, 1.05)]
    if shape == "star":
        outer, inner = ring(5, 1.0), ring(5, 0.45, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = 0.95, 0.33  # arm half-length and half-width
        arm, pts = [(-b, -a), (b, -a), (b, -b)], []
        for _ in range(4):  # one arm's outline, turned a quarter each time
            pts, arm = pts + arm, [(-y, x) for x, y in arm]
        return pts
    if shape == "diamond":  # taller than wide, so it never looks like a rotated square
        return [(0.0, -1.05), (0.68, 0.0), (0.0, 1.05), (-0.68, 0.0)]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 17.0))
        return pts
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


_POLYGONS = {s: _unit_polygon(s) for s in SHAPES}


def sample_scene(
    rng: random.Random, n_objects: int | None = None, style: Style = STYLES["classic"], **fixed: str
) -> dict:
    """Draw a scene of ``style``: background, light shading, non-overlapping objects with distinct looks.

    ``fixed`` pins attributes of every object (e.g. ``shape="star"``); the eval sets use it to set labels.
    """
    n = n_objects or rng.randint(1, style.max_objects)
    background = rng.choice(sorted(BACKGROUNDS))
    tone, dx, dy = rng.randint(-10, 10), rng.uniform(-14, 14), rng.uniform(-14, 14)
    shade = {"tone": tone, "dx": round(dx, 2), "dy": round(dy, 2)}  # gradient across the image, in 0-255
    for _ in range(200):  # rejection sampling; corner cells always leave room, so this never runs out
        objects, looks = [], set()
        cells = rng.sample(range(9), n)
        for cell in cells:
            obj = {
                "shape": rng.choice(style.shapes),
                "colour": rng.choice(style.colours),
                "size": rng.choice(tuple(style.sizes)),
            }
            obj.update(fixed)
            looks.add((obj["shape"], obj["colour"]))
            r = rng.uniform(*style.sizes[obj["size"]])
            row, col = divmod(cell, 3)
            lo, hi = style.edge + r, 1 - style.edge - r
            # cell centres at 0.2 / 0.5 / 0.8 of the side, jittered, clamped inside the safe border
            x = min(max(0.2 + 0.3 * col + rng.uniform(-0.05, 0.05), lo), hi)
            y = min(max(0.2 + 0.3 * row + rng.uniform(-0.05, 0.05), lo), hi)
            obj.update(row=ROWS[row], col=COLS[col], x=round(x, 4), y=round(y, 4), radius=round(r, 4))
            turns = obj["shape"] not in ("circle", "ring")
            obj["rotation"] = round(rng.uniform(-12, 12), 2) if turns else 0.0
            if style.tint:  # drawn last, so that styles without a tint keep their random stream
                obj["tint"] = [rng.randint(-style.tint, style.tint) for _ in range(3)]
            objects.append(obj)
        apart = all(
            math.dist((a["x"], a["y"]), (b["x"], b["y"])) >= a["radius"] + b["radius"] + 0.03
            for i, a in enumerate(objects)
            for b in objects[i + 1 :]
        )
        if apart and len(looks) == n:
            return {"background": background, "shade": shade, "objects": objects}
    raise RuntimeError(f"could not place {n} objects with {fixed}; relax the fixed attributes")


def object_rgb(obj: dict) -> tuple[int, int, int]:
    """The colour an object is drawn in: its colour's RGB, shifted by its tint (if its style has one)."""
    tint = obj.get("tint", (0, 0, 0))
    return tuple(min(max(c + t, 0), 255) for c, t in zip(COLOUR_RGB[obj["colour"]], tint, strict=True))


def render_scene(scene: dict, image_size: int = 64, supersample: int = 4) -> Image.Image:
    """Render a scene (as from ``sample_scene``) to an RGB image, anti-aliased by supersampling."""
    side = image_size * supersample
    # background: tone offset plus a gentle linear gradient at the output size; nearest-upscaled, since
    # the final box-reduce gives the same pixels back (and a smooth upscale costs half the render time)
    base = np.array(BACKGROUNDS[scene["background"]], np.float32) + scene["shade"]["tone"]
    g = np.linspace(-1, 1, image_size, dtype=np.float32)
    grad = scene["shade"]["dx"] * g[None, :] + scene["shade"]["dy"] * g[:, None]  # (H, W)
    bg = np.clip(base + grad[..., None], 0, 255).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(bg).resize((side, side), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        fill = object_rgb(obj)
        cx, cy, r = obj["x"] * side, obj["y"] * side, obj["radius"] * side
        if obj["shape"] == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.42 * r)))
            continue
        a = math.radians(obj["rotation"])
        ca, sa = math.cos(a), math.sin(a)
        pts = [(cx + r * (ca * u - sa * v), cy + r * (sa * u + ca * v)) for u, v in _POLYGONS[obj["shape"]]]
        draw.polygon(pts, fill=fill)
    return img.reduce(supersample) if supersample > 1 else img
