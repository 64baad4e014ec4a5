"""The embedded default dataset: a procedurally generated multimodal world.

No dataset can be downloaded, so the default data is made here. Each sample is a scene drawn from
latent attributes (shape, colour, size, position, count, background pattern); the image is rendered
from them and the captions are written from them, so an image and its captions are paired only
through the attributes. The image label is the shape (10 classes), the text label is the background
pattern (4 classes). Random tints, pattern periods/phases/angles, colour jitter, rotation, sub-pixel
placement and pixel noise keep the tasks from being solvable by a lookup: a model has to learn them.

Rendering is fast because shapes are stamped from cached anti-aliased alpha masks (drawn once with
PIL at 4x and box-filtered down), while backgrounds and noise are computed for whole batches in numpy.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmfed.config import register
from mmfed.data.samples import MultimodalSplit

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "diamond", "pentagon", "hexagon", "heart", "ring",
)  # fmt: skip
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SIZES: tuple[str, ...] = ("small", "medium", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
SCENES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
COUNTS: tuple[int, ...] = (1, 2, 3)

# --- caption vocabulary ---------------------------------------------------------------------------------
# Every caption names the shape with one of SHAPE_SYNONYMS[shape] (singular or plural form) and the
# scene with one of the words in SCENE_WORDS[scene]; no scene word occurs in any other phrase, and no
# shape word in another shape's phrases, so both are recoverable from the text alone.
SHAPE_SYNONYMS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("square shape", "square shapes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("triangular shape", "triangular shapes"), ("wedge", "wedges")),
    "star": (("star", "stars"), ("star shape", "star shapes"), ("five-pointed star", "five-pointed stars")),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs"), ("plus shape", "plus shapes")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")),
    "pentagon": (("pentagon", "pentagons"), ("five-sided shape", "five-sided shapes")),
    "hexagon": (("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")),
    "heart": (("heart", "hearts"), ("heart shape", "heart shapes"), ("love heart", "love hearts")),
    "ring": (("ring", "rings"), ("hoop", "hoops"), ("donut shape", "donut shapes")),
}
# The first name is used most of the time; the rarer synonyms appear sparingly.
COLOUR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "amber"),
    "yellow": ("yellow", "gold", "lemon"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure", "navy"),
    "purple": ("purple", "violet"),
    "white": ("white", "snow-white"),
    "black": ("black", "jet-black"),
}
SIZE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized", "moderately sized"),
    "large": ("large", "big", "huge"),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "towards the left side", "in the left half"),
    "right": ("on the right", "at the right", "towards the right side", "in the right half"),
    "top": ("at the top", "near the top", "in the upper part", "towards the top"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part", "towards the bottom"),
    "centre": ("in the centre", "in the middle", "in the center", "right in the middle"),
}
# Noun phrases ("on {np}") and adjectives ("the background is {adj}") for each scene.
SCENE_NOUNS: dict[str, tuple[str, ...]] = {
    "plain": ("a plain background", "a plain backdrop", "a blank background", "a solid background",
              "a uniform backdrop"),
    "striped": ("a striped background", "a striped backdrop", "a background of stripes", "a lined background",
                "a stripy backdrop"),
    "dotted": ("a dotted background", "a polka-dot backdrop", "a background of dots", "a spotted background",
               "a dotted backdrop"),
    "checkered": ("a checkered background", "a checkerboard", "a chequered backdrop",
                  "a checked background", "a checkerboard pattern"),
}  # fmt: skip
SCENE_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "blank", "uniform", "solid"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted", "polka-dot"),
    "checkered": ("checkered", "chequered", "checked"),
}
SCENE_PREDICATES: dict[str, tuple[str, ...]] = {  # "the background is ..."
    "plain": ("plain", "blank", "uniform", "solid"),
    "striped": ("striped", "stripy", "lined", "covered in stripes"),
    "dotted": ("dotted", "spotted", "polka-dot", "covered in dots"),
    "checkered": ("checkered", "chequered", "checked", "a checkerboard"),
}
SCENE_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "blank", "solid", "uniform"),
    "striped": ("striped", "stripes", "stripy", "lined"),
    "dotted": ("dotted", "dots", "polka-dot", "spotted"),
    "checkered": ("checkered", "chequered", "checkerboard", "checked"),
}
COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("a", "one", "a single"),
    2: ("two", "a pair of"),
    3: ("three",),
}

# Templates: {obj} noun phrase, {pos} position phrase (may be empty), {scene} scene noun phrase,
# {scene_adj} scene adjective, {scene_pred} scene predicate, {be} "is"/"are" agreeing with {obj}.
TEMPLATES: tuple[str, ...] = (
    "{obj} {pos} on {scene}.",
    "{obj} on {scene}, {pos}.",
    "{scene} with {obj} {pos}.",
    "there {be} {obj} {pos} against {scene}.",
    "{obj} drawn {pos} over {scene}.",
    "a picture of {obj} {pos} on {scene}.",
    "{scene} behind {obj} {pos}.",
    "{obj} {be} shown {pos}; the background is {scene_pred}.",
    "an image showing {obj} {pos} with {scene}.",
    "{scene} featuring {obj} {pos}.",
    "on {scene}, {obj} {be} placed {pos}.",
    "a {scene_adj} scene with {obj} {pos}.",
)

# --- rendering constants --------------------------------------------------------------------------------
_COLOUR_RGB = np.array(
    [
        [0.86, 0.12, 0.10],  # red
        [0.98, 0.55, 0.08],  # orange
        [0.96, 0.90, 0.12],  # yellow
        [0.12, 0.68, 0.20],  # green
        [0.12, 0.28, 0.92],  # blue
        [0.58, 0.16, 0.80],  # purple
        [0.97, 0.97, 0.97],  # white
        [0.05, 0.05, 0.05],  # black
    ],
    dtype=np.float32,
)
_SIZE_FRACTION = np.array([0.27, 0.37, 0.49], dtype=np.float32)  # object extent / image side, one object
_COUNT_SCALE = np.array([1.0, 0.84, 0.72], dtype=np.float32)  # several objects are drawn a bit smaller
_POSITION_XY = np.array([[0.28, 0.5], [0.72, 0.5], [0.5, 0.28], [0.5, 0.72], [0.5, 0.5]], dtype=np.float32)
# Cluster layouts in units of the object extent; for left/right the pair is stacked vertically.
_LAYOUT_ROW2 = np.array([[-0.62, 0.0], [0.62, 0.0]], dtype=np.float32)
_LAYOUT_COL2 = np.array([[0.0, -0.62], [0.0, 0.62]], dtype=np.float32)
_LAYOUT_TRI3 = np.array([[0.0, -0.56], [-0.64, 0.5], [0.64, 0.5]], dtype=np.float32)
_MAX_ROTATION_DEG = 15.0
_ROTATION_STEP_DEG = 5.0
_EXTENT_STEP = 1 / 64  # object extents are quantised to 1/64 of the image side (half a pixel at 32x32)
_SUPERSAMPLE = 4
_NOISE_STD = 0.025
_CHUNK = 1024


@register("data", "synthetic")
class SyntheticWorld:
    """Deterministic from seed; splits generated on first use and kept in memory.

    Options that change the world (each off by default, so the default world stays the same):
    `sizes` / `counts` / `positions` draw objects from fewer sizes / counts / places (an easier
    world: `experiment=testbed` centres one large object, so a small model learns the shapes within a
    minute); `styles` (two or
    more of STYLES) renders each row in a style drawn uniformly and records it as the row's domain,
    so `layout.skew=domain` can give clients different visual domains (feature skew) while the
    val/test splits mix all styles.
    """

    SPLITS = ("train", "public", "val", "test")

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 32,
        n_train: int = 12000,
        n_public: int = 2000,
        n_val: int = 500,
        n_test: int = 1000,
        captions_per_image: int = 5,
        sizes: tuple[str, ...] = SIZES,
        counts: tuple[int, ...] = COUNTS,
        positions: tuple[str, ...] = POSITIONS,
        styles: tuple[str, ...] = ("photo",),
    ) -> None:
        _check_int("seed", seed, 0)
        _check_int("image_size", image_size, 32)
        for arg, value in (
            ("n_train", n_train),
            ("n_public", n_public),
            ("n_val", n_val),
            ("n_test", n_test),
        ):
            _check_int(arg, value, 1)
        _check_int("captions_per_image", captions_per_image, 1)
        self.size_choices = _check_subset("sizes", sizes, SIZES)
        self.count_choices = _check_subset("counts", counts, COUNTS)
        self.position_choices = _check_subset("positions", positions, POSITIONS)
        self.styles = tuple(list(STYLES)[i] for i in _check_subset("styles", styles, tuple(STYLES)))
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.captions_per_image = int(captions_per_image)
        self.sizes = {"train": int(n_train), "public": int(n_public), "val": int(n_val), "test": int(n_test)}
        self._splits: dict[str, MultimodalSplit] = {}
        self._attributes: dict[str, list[dict[str, Any]]] = {}

    @classmethod
    def tiny(cls, seed: int = 0, n: int = 64, image_size: int = 32) -> SyntheticWorld:
        """A small world for tests and smoke runs: n train rows, n // 2 (at least 1) in each other split."""
        m = max(1, n // 2)
        return cls(seed=seed, image_size=image_size, n_train=n, n_public=m, n_val=m, n_test=m)

    @property
    def image_classes(self) -> list[str]:
        return list(SHAPES)

    @property
    def text_classes(self) -> list[str]:
        return list(SCENES)

    def split(self, name: str) -> MultimodalSplit:
        """Split `name` (one of SPLITS), generated on first use."""
        if name not in self._splits:
            self._generate(name)
        return self._splits[name]

    def attributes(self, name: str) -> list[dict[str, Any]]:
        """The latent attributes of each row of split `name` (for debugging and tests)."""
        if name not in self._attributes:
            self._generate(name)
        return [dict(a) for a in self._attributes[name]]

    def _generate(self, name: str) -> None:
        if name not in self.SPLITS:
            raise ValueError(f"unknown split '{name}'; allowed: {', '.join(self.SPLITS)}")
        n = self.sizes[name]
        # Own stream per split: generating one split never depends on another having been generated.
        rng = np.random.default_rng([self.seed, self.SPLITS.index(name)])
        attrs = _sample_attributes(rng, n, self.size_choices, self.count_choices, self.position_choices)
        images = _render(rng, attrs, self.image_size)
        captions = _write_captions(rng, attrs, self.captions_per_image)
        domains = None
        if len(self.styles) > 1:
            # own stream (after everything else), so a one-style world is the same as before styles existed
            style_rng = np.random.default_rng([self.seed, self.SPLITS.index(name), 101])
            domains = style_rng.integers(0, len(self.styles), n)
            images = _stylize(images, domains, self.styles)
        self._splits[name] = MultimodalSplit(
            name=name,
            ids=[f"syn-{name}-{i:06d}" for i in range(n)],
            images=images,
            captions=captions,
            image_labels=torch.from_numpy(attrs["shape"].astype(np.int64)),
            text_labels=torch.from_numpy(attrs["scene"].astype(np.int64)),
            image_classes=list(SHAPES),
            text_classes=list(SCENES),
            domains=None if domains is None else torch.from_numpy(domains.astype(np.int64)),
            domain_names=list(self.styles) if domains is not None else [],
        )
        self._attributes[name] = [
            {
                "shape": SHAPES[attrs["shape"][i]],
                "colour": COLOURS[attrs["colour"][i]],
                "size": SIZES[attrs["size"][i]],
                "position": POSITIONS[attrs["position"][i]],
                "scene": SCENES[attrs["scene"][i]],
                "count": int(COUNTS[attrs["count"][i]]),
                "style": self.styles[int(domains[i])] if domains is not None else self.styles[0],
            }
            for i in range(n)
        ]


def _check_int(arg: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"SyntheticWorld: {arg} must be an int >= {minimum}, got {value!r}")


def _check_subset(arg: str, values: Any, allowed: tuple[Any, ...]) -> tuple[int, ...]:
    """Indices into `allowed` of a non-empty, duplicate-free selection of its values."""
    values = tuple(values) if isinstance(values, list | tuple) else (values,)
    bad = [v for v in values if v not in allowed]
    if not values or bad or len(set(values)) != len(values):
        problem = f"unknown {bad[0]!r}" if bad else ("empty" if not values else "duplicates")
        raise ValueError(
            f"SyntheticWorld: {arg} must list distinct values of {list(allowed)} ({problem}), "
            f"got {list(values)}"
        )
    return tuple(allowed.index(v) for v in values)


def _sample_attributes(
    rng: np.random.Generator,
    n: int,
    sizes: tuple[int, ...] = (0, 1, 2),
    counts: tuple[int, ...] = (0, 1, 2),
    positions: tuple[int, ...] = (0, 1, 2, 3, 4),
) -> dict[str, np.ndarray]:
    """Independent uniform attributes, so every label is balanced in expectation.

    `sizes` / `counts` / `positions` are the allowed indices into SIZES / COUNTS / POSITIONS (an
    easier world draws from fewer); with all of them the draws are exactly those of the world
    before the options existed.
    """
    return {
        "shape": rng.integers(0, len(SHAPES), n),
        "colour": rng.integers(0, len(COLOURS), n),
        "size": np.asarray(sizes)[rng.integers(0, len(sizes), n)],
        "position": np.asarray(positions)[rng.integers(0, len(positions), n)],
        "scene": rng.integers(0, len(SCENES), n),
        "count": np.asarray(counts)[rng.integers(0, len(counts), n)],
    }


# --- images ---------------------------------------------------------------------------------------------


def _shape_outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of a shape, centred on its bounding box whose longer side is 1 (None for round shapes)."""
    raw = _raw_outline(shape)
    if raw is None:
        return None
    pts = np.array(raw, dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts = (pts - (lo + hi) / 2) / float((hi - lo).max())
    return [(float(x), float(y)) for x, y in pts]


def _raw_outline(shape: str) -> list[tuple[float, float]] | None:

    def regular(k: int, radius: float, offset: float) -> list[tuple[float, float]]:
        return [
            (radius * math.cos(offset + 2 * math.pi * j / k), radius * math.sin(offset + 2 * math.pi * j / k))
            for j in range(k)
        ]

    if shape == "square":
        return [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    if shape == "triangle":
        return [(0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    if shape == "star":
        outer = regular(5, 0.5, -math.pi / 2)
        inner = regular(5, 0.22, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner, strict=True) for p in pair]
    if shape == "cross":
        a, b = 0.5, 0.17
        return [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b),
                (-a, -b), (-b, -b)]  # fmt: skip
    if shape == "diamond":
        return [(0.0, -0.5), (0.34, 0.0), (0.0, 0.5), (-0.34, 0.0)]
    if shape == "pentagon":
        return regular(5, 0.5, -math.pi / 2)
    if shape == "hexagon":
        return regular(6, 0.5, 0.0)
    if shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        return list(zip(x.tolist(), y.tolist(), strict=True))
    return None


_MASK_CACHE: dict[tuple[int, int, int, int, int, int], np.ndarray] = {}
_MASK_CACHE_BUDGET = 256 * 2**20  # bytes; past it (only at large image sizes) masks are drawn each time
_mask_cache_bytes = 0


def _shape_mask(shape: int, image_size: int, extent_q: int, rot_q: int, sub_x: int, sub_y: int) -> np.ndarray:
    """Anti-aliased alpha mask [m, m] of a shape; its centre sits at (m // 2 + sub/2) in pixel units.

    Parameters are quantised (extent in 1/64 of the image side, rotation in 5-degree steps, half-pixel
    offsets) so a few thousand cached masks cover every sample; drawing is 4x supersampled then
    box-filtered. The cache never changes the output, only the speed.
    """
    global _mask_cache_bytes
    key = (shape, image_size, extent_q, rot_q, sub_x, sub_y)
    cached = _MASK_CACHE.get(key)
    if cached is not None:
        return cached
    extent = extent_q * _EXTENT_STEP * image_size
    m = int(math.ceil(extent * 1.5)) + 3
    ss = _SUPERSAMPLE
    cx = (m // 2 + 0.5 * sub_x) * ss
    cy = (m // 2 + 0.5 * sub_y) * ss
    scale = extent * ss
    canvas = Image.new("L", (m * ss, m * ss), 0)
    draw = ImageDraw.Draw(canvas)
    name = SHAPES[shape]
    outline = _shape_outline(name)
    if outline is None:  # circle / ring
        r = 0.5 * scale
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if name == "ring":
            ri = 0.26 * scale
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        theta = math.radians(rot_q * _ROTATION_STEP_DEG)
        c, s = math.cos(theta), math.sin(theta)
        draw.polygon(
            [(cx + scale * (c * x - s * y), cy + scale * (s * x + c * y)) for x, y in outline], fill=255
        )
    mask = np.asarray(canvas.resize((m, m), Image.Resampling.BOX), dtype=np.float32) / 255.0
    if _mask_cache_bytes + mask.nbytes <= _MASK_CACHE_BUDGET:
        _MASK_CACHE[key] = mask
        _mask_cache_bytes += mask.nbytes
    return mask


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB; inputs [n] in [0, 1], output [n, 3]."""
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32)[None, :] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _edge(d: np.ndarray) -> np.ndarray:
    """Coverage of a pixel at signed distance d (pixels) inside an edge: a 1-pixel anti-aliasing ramp."""
    return np.clip(d + 0.5, 0.0, 1.0)


def _backgrounds(rng: np.random.Generator, scenes: np.ndarray, size: int) -> np.ndarray:
    """Background images [n, size, size, 3] float32: a two-tone pattern with a random tint.

    Tint, pattern period, phase and angle are random per image, and the second tone is only a little
    lighter or darker, so the pattern is a texture to recognise, not a colour to look up.
    """
    n = len(scenes)
    unit = size / 32.0
    hue = rng.random(n, dtype=np.float32)
    sat = rng.uniform(0.05, 0.35, n).astype(np.float32)
    val = rng.uniform(0.35, 0.68, n).astype(np.float32)
    delta = rng.uniform(0.13, 0.22, n).astype(np.float32) * rng.choice(np.array([-1.0, 1.0], np.float32), n)
    val2 = np.clip(val + delta, 0.18, 0.85)
    tone1 = _hsv_to_rgb(hue, sat, val)
    tone2 = _hsv_to_rgb(hue, sat, val2)
    angle = rng.uniform(0.0, math.pi, n).astype(np.float32)
    # checker cells are half a period, so checkers get longer periods than stripes and dots
    period = rng.uniform(4.5, 8.0, n).astype(np.float32) * unit
    period[scenes == SCENES.index("checkered")] *= 1.4
    phase = rng.random((n, 2), dtype=np.float32)
    dot_radius = rng.uniform(0.2, 0.3, n).astype(np.float32) * period
    ramp_dir = rng.uniform(0.0, 2 * math.pi, n).astype(np.float32)
    ramp_amp = rng.uniform(-0.06, 0.06, n).astype(np.float32)

    coords = np.arange(size, dtype=np.float32) + 0.5
    x = coords[None, None, :]
    y = coords[None, :, None]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u = (x * ca + y * sa) / period[:, None, None] + phase[:, 0, None, None]  # in periods
    v = (-x * sa + y * ca) / period[:, None, None] + phase[:, 1, None, None]
    fu, fv = u - np.floor(u), v - np.floor(v)
    p = np.zeros((n, size, size), dtype=np.float32)
    per = period[:, None, None]
    striped = scenes == SCENES.index("striped")
    # stripes: half of each period is the second tone; distance to the nearest stripe edge in pixels
    p[striped] = _edge((0.25 - np.abs(fu[striped] - 0.5)) * per[striped])
    dotted = scenes == SCENES.index("dotted")
    dist = np.hypot(fu[dotted] - 0.5, fv[dotted] - 0.5) * per[dotted]
    p[dotted] = _edge(dot_radius[dotted, None, None] - dist)
    checkered = scenes == SCENES.index("checkered")
    # checks: cells of half a period; the product of two signed square waves, anti-aliased per axis
    half = per[checkered] / 2  # cell side in pixels
    du = (0.5 - np.abs(2 * fu[checkered] % 1.0 - 0.5)) * half  # distance to the nearest cell edge
    dv = (0.5 - np.abs(2 * fv[checkered] % 1.0 - 0.5)) * half
    flip = np.where((np.floor(2 * u[checkered]) + np.floor(2 * v[checkered])) % 2 == 0, 1.0, -1.0)
    p[checkered] = 0.5 + 0.5 * flip * np.clip(2 * du, 0.0, 1.0) * np.clip(2 * dv, 0.0, 1.0)
    ramp_x = (np.cos(ramp_dir) * ramp_amp / size)[:, None, None]
    ramp_y = (np.sin(ramp_dir) * ramp_amp / size)[:, None, None]
    ramp = (x - size / 2) * ramp_x + (y - size / 2) * ramp_y
    img = tone1[:, None, None, :] + p[..., None] * (tone2 - tone1)[:, None, None, :]
    return img + ramp[..., None]


def _render(rng: np.random.Generator, attrs: dict[str, np.ndarray], size: int) -> torch.Tensor:
    """Render all images as uint8 [N, 3, size, size], in fixed-size chunks (deterministic given N)."""
    n = len(attrs["shape"])
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        chunk = {k: v[start:stop] for k, v in attrs.items()}
        out[start:stop] = _render_chunk(rng, chunk, size)
    return torch.from_numpy(out)


def _render_chunk(rng: np.random.Generator, attrs: dict[str, np.ndarray], size: int) -> np.ndarray:
    n = len(attrs["shape"])
    img = _backgrounds(rng, attrs["scene"], size)
    # object colour: the named colour with a per-sample jitter of its exact RGB
    rgb = _COLOUR_RGB[attrs["colour"]] + rng.uniform(-0.07, 0.07, (n, 3)).astype(np.float32)
    rgb = np.clip(rgb, 0.0, 1.0)
    extent = (
        _SIZE_FRACTION[attrs["size"]] * _COUNT_SCALE[attrs["count"]] * rng.uniform(0.9, 1.1, n) * size
    ).astype(np.float32)
    centre = (_POSITION_XY[attrs["position"]] + rng.uniform(-0.06, 0.06, (n, 2))) * size
    jitter = rng.uniform(-0.08, 0.08, (n, 3, 2)).astype(np.float32)
    rotation = rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG, (n, 3))
    for i in range(n):
        count = COUNTS[attrs["count"][i]]
        if count == 1:
            layout = np.zeros((1, 2), dtype=np.float32)
        elif count == 2:
            layout = _LAYOUT_COL2 if POSITIONS[attrs["position"][i]] in ("left", "right") else _LAYOUT_ROW2
        else:
            layout = _LAYOUT_TRI3
        e = float(extent[i])
        offsets = (layout + jitter[i, :count]) * e
        # keep the whole cluster inside the image: it stays on its side, just pulled in from the edge
        lo = (offsets.min(axis=0) - 0.5 * e) + centre[i]
        hi = (offsets.max(axis=0) + 0.5 * e) + centre[i]
        shift = np.maximum(0.5 - lo, 0.0) - np.maximum(hi - (size - 0.5), 0.0)
        for j in range(count):
            cx, cy = centre[i] + shift + offsets[j]
            _stamp(img[i], int(attrs["shape"][i]), e, float(rotation[i, j]), float(cx), float(cy), rgb[i])
    img += _NOISE_STD * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8).transpose(0, 3, 1, 2)


def _stamp(
    img: np.ndarray, shape: int, extent: float, rotation: float, cx: float, cy: float, rgb: np.ndarray
) -> None:
    """Alpha-blend one object (centre cx, cy in pixels) into img [H, W, 3] in place."""
    h, w = img.shape[:2]
    extent_q = max(4, int(round(extent / (_EXTENT_STEP * w))))
    rot_q = int(round(rotation / _ROTATION_STEP_DEG))
    # continuous coordinates (pixel k spans [k, k + 1]); the mask centre lands at ix + sub / 2
    hx, hy = round(2 * cx), round(2 * cy)
    ix, sub_x = divmod(hx, 2)
    iy, sub_y = divmod(hy, 2)
    mask = _shape_mask(shape, w, extent_q, rot_q, sub_x, sub_y)
    m = mask.shape[0]
    x0, y0 = ix - m // 2, iy - m // 2
    ax0, ay0 = max(0, x0), max(0, y0)
    ax1, ay1 = min(w, x0 + m), min(h, y0 + m)
    if ax0 >= ax1 or ay0 >= ay1:
        return
    a = mask[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0, None]
    region = img[ay0:ay1, ax0:ax1]
    region += a * (rgb - region)


def _stylize(images: torch.Tensor, domains: np.ndarray, styles: tuple[str, ...]) -> torch.Tensor:
    """Row i rendered in visual style styles[domains[i]] (a domain shift that captions do not name)."""
    out = images.clone()
    for d, style in enumerate(styles):
        rows = torch.from_numpy(np.flatnonzero(domains == d))
        if len(rows):
            out[rows] = STYLES[style](images[rows])
    return out


def _grey(x: torch.Tensor) -> torch.Tensor:
    y = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).round().clamp(0, 255).to(torch.uint8)
    return y[:, None].expand(-1, 3, -1, -1).contiguous()


def _faded(x: torch.Tensor) -> torch.Tensor:
    return (x.float() * 0.4 + 0.6 * 160.0).round().clamp(0, 255).to(torch.uint8)


# Visual styles (domains): each is a fixed map of the rendered uint8 image, like the photo / sketch /
# painting domains of DomainNet-style feature skew. Captions never name the style.
STYLES: dict[str, Any] = {
    "photo": lambda x: x,
    "inverted": lambda x: 255 - x,
    "grey": _grey,
    "swapped": lambda x: x[:, [2, 0, 1]],  # channels rotated: red objects look green, ...
    "faded": _faded,  # low contrast, washed out towards light grey
}


# --- captions -------------------------------------------------------------------------------------------

_DRAWS_PER_CAPTION = 12


def _pick(options: tuple[str, ...], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption(attrs: dict[str, np.ndarray], i: int, template: str, u: np.ndarray) -> str:
    """One caption for row i; u holds the uniform draws that choose its words."""
    shape, colour = SHAPES[attrs["shape"][i]], COLOURS[attrs["colour"][i]]
    size, position = SIZES[attrs["size"][i]], POSITIONS[attrs["position"][i]]
    scene, count = SCENES[attrs["scene"][i]], COUNTS[attrs["count"][i]]
    synonyms = SHAPE_SYNONYMS[shape]
    singular, plural = synonyms[min(int(u[0] * len(synonyms)), len(synonyms) - 1)]
    noun = singular if count == 1 else plural
    colour_syn = COLOUR_SYNONYMS[colour]
    colour_word = colour_syn[0] if u[1] < 0.8 else _pick(colour_syn[1:], u[2])
    use_colour, use_size, use_pos = u[3] < 0.85, u[4] < 0.5, u[5] < 0.6
    size_word = _pick(SIZE_SYNONYMS[size], u[6])
    if use_colour and u[7] < 0.25:  # "two stars in red" instead of "two red stars"
        adjectives = [size_word] if use_size else []
        tail = f" in {colour_word}" if u[8] < 0.5 else f" coloured {colour_word}"
    else:
        adjectives = ([size_word] if use_size else []) + ([colour_word] if use_colour else [])
        tail = ""
    head = " ".join([*adjectives, noun])
    count_word = _pick(COUNT_WORDS[count], u[9])
    if count_word == "a":
        count_word = _article(head)
    obj = f"{count_word} {head}{tail}"
    text = template.format(
        obj=obj,
        pos=_pick(POSITION_PHRASES[position], u[10]) if use_pos else "",
        scene=_pick(SCENE_NOUNS[scene], u[11]),
        scene_adj=_pick(SCENE_ADJECTIVES[scene], u[11]),
        scene_pred=_pick(SCENE_PREDICATES[scene], u[11]),
        be="is" if count == 1 else "are",
    )
    text = re.sub(r"\s+", " ", text).strip()
    text = text.replace(" ,", ",").replace(" .", ".").replace(" ;", ";").replace(",.", ".").replace(";.", ".")
    return text[0].upper() + text[1:]


def _write_captions(
    rng: np.random.Generator, attrs: dict[str, np.ndarray], per_image: int
) -> list[list[str]]:
    """`per_image` distinct captions per row, each from a different template while templates last."""
    n = len(attrs["shape"])
    n_templates = len(TEMPLATES)
    orders = np.argsort(rng.random((n, n_templates)), axis=1)
    extra_tries = 20 + per_image
    draws = rng.random((n, per_image + extra_tries, _DRAWS_PER_CAPTION))
    captions: list[list[str]] = []
    for i in range(n):
        caps: list[str] = []
        seen: set[str] = set()
        k = 0
        while len(caps) < per_image:
            if k >= per_image + extra_tries:
                raise RuntimeError(f"could not write {per_image} distinct captions for row {i}")
            text = _caption(attrs, i, TEMPLATES[orders[i, k % n_templates]], draws[i, k])
            k += 1
            if text not in seen:
                seen.add(text)
                caps.append(text)
        captions.append(caps)
    return captions
