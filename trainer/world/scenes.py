"""The embedded "shapes" world: a procedural, seed-deterministic text-to-image data set.

Every image is a flat background with one or two flat-coloured geometric objects, rendered
anti-aliased (4x4 supersampling of exact geometric inside-tests, box-filtered down) with numpy
only. Captions come from a small grammar; attributes a caption does not name vary freely, so
"a red circle" has a whole distribution of valid images (that spread is what the diversity
metrics measure and what a reward like :func:`trainer.world.rewards.preference_reward` collapses).

Generative distribution (all coordinates are fractions of the image side, y grows downwards)
-------------------------------------------------------------------------------------------
A *prompt spec* is drawn first, then a *scene* consistent with it, then the caption is the spec
written out by the grammar -- so the images given a caption are exactly ``sample_scene(spec)``.

Spec (``sample_spec``):
  * one object, or with probability ``p_second`` (default 0.2) two objects of different colours;
  * shape uniform over :data:`SHAPES`, colour uniform over :data:`COLOURS` (the "train" split
    never draws a (colour, shape) pair of :data:`HELDOUT_COMBOS`, not even as a second object);
  * one object: a size word with probability ``p_size`` (0.3) and, independently, a position
    phrase with probability ``p_position`` (0.3);
  * two objects: a relation, "and" with probability 0.5 else one of "to the left of",
    "to the right of", "above", "below" (no size/position words for pairs).

Scene (``sample_scene``), each attribute uniform on its range unless the spec pins it:
  * size = circumradius r: :data:`SIZE_RANGE` (0.11-0.33, i.e. 7-21 px at 64 px);
    "small" -> :data:`SMALL_RANGE` (0.11-0.18), "large" -> :data:`LARGE_RANGE` (0.25-0.33);
    pairs use :data:`PAIR_SIZE_RANGE` (0.10-0.19);
  * centre (cx, cy): anywhere the whole object stays ``MARGIN`` inside the frame; "on the left":
    cx <= 0.38, "on the right": cx >= 0.62, "at the top": cy <= 0.38, "at the bottom": cy >= 0.62,
    "in the centre": |cx-0.5| <= 0.06 and |cy-0.5| <= 0.06 (the other coordinate stays free);
  * pairs: laid out side by side (horizontal) or one above the other (vertical), one object in
    each half with a gap, never overlapping, the offset across the layout axis at most 0.6x the
    offset along it (so the relation is unambiguous); "and" picks the axis and order at random;
  * rotation: uniform over the shape's symmetry period (:data:`SYMMETRY`); 0 = "upright"
    (triangle and star point up, square and cross axis-aligned);
  * object colour: the palette colour pulled towards grey by ``saturation`` in [0.65, 1] (1 = the
    palette colour) and shifted in brightness by ``shade`` in [-0.06, 0.06]; both keep the hue;
  * background: a grey of brightness ``bg_luma`` in [0.12, 0.88] plus a faint tint of chroma
    <= 0.04 in a random hue -- never confusable with an object colour (palette chroma >= 0.6).

So one simple prompt ("a red circle") has, over a continuum, 5 free attributes: position (2-D),
size, rotation (none for circle/ring), colour saturation/shade and background brightness/tint.

Vocabulary: shapes circle, square, triangle, star, cross, ring; colours red, yellow, green, cyan,
blue, purple (hues 0, 52, 120, 180, 232, 284 degrees: >= 50 degrees apart). Grammar (``format_prompt``)::

    a [small|large] <colour> <shape> [on the left|on the right|at the top|at the bottom|in the centre]
    a <colour> <shape> (and|to the left of|to the right of|above|below) a <colour> <shape>

Held-out split: the six (colour, shape) pairs of :data:`HELDOUT_COMBOS` (one per colour and one
per shape, so every word is still seen in training) never occur in the training split.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

#: rotational symmetry period of each shape in degrees (rotation is drawn in [0, period)).
SYMMETRY: dict[str, float] = {
    "circle": 360.0,
    "square": 90.0,
    "triangle": 120.0,
    "star": 72.0,
    "cross": 90.0,
    "ring": 360.0,
}
#: shapes on which rotation has no visible effect.
ROTATION_FREE: frozenset[str] = frozenset({"circle", "ring"})

#: palette, 0-255 sRGB. Hue (in the opponent plane) 0/52/120/180/232/284 deg, chroma >= 0.6.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "yellow": (235, 205, 30),
    "green": (45, 200, 45),
    "cyan": (20, 195, 195),
    "blue": (45, 75, 240),
    "purple": (170, 45, 220),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZE_WORDS: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
RELATIONS: tuple[str, ...] = ("and", "left_of", "right_of", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "and": "and",
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}

#: (colour, shape) pairs kept out of the training split (a derangement: each colour and each
#: shape appears exactly once, so all words are still trained).
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("yellow", "cross"),
    ("green", "ring"),
    ("cyan", "square"),
    ("blue", "triangle"),
    ("purple", "circle"),
)

# ----------------------------------------------------------------------------------------------
# Ranges of the generative distribution (fractions of the image side)
# ----------------------------------------------------------------------------------------------

SIZE_RANGE = (0.11, 0.33)
SMALL_RANGE = (0.11, 0.18)
LARGE_RANGE = (0.25, 0.33)
PAIR_SIZE_RANGE = (0.10, 0.19)
MARGIN = 0.02
PAIR_GAP = 0.04
PAIR_SKEW = 0.6
LEFT_MAX = 0.38
RIGHT_MIN = 0.62
TOP_MAX = 0.38
BOTTOM_MIN = 0.62
CENTRE_TOL = 0.06
SATURATION_RANGE = (0.65, 1.0)
SHADE_RANGE = (-0.06, 0.06)
BG_LUMA_RANGE = (0.12, 0.88)
BG_TINT_MAX = 0.04

# unit-shape geometry (circumradius 1)
STAR_INNER = 0.45
CROSS_HALF_WIDTH = 0.30
RING_INNER = 0.55

# ----------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene. ``size`` is the circumradius; rotation in degrees (clockwise)."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float
    rotation: float = 0.0
    saturation: float = 1.0
    shade: float = 0.0

    def rgb(self) -> np.ndarray:
        """The object's actual colour, float [3] in [0, 1] (palette pulled to grey, shaded)."""
        pal = np.asarray(COLOURS[self.colour], dtype=np.float64) / 255.0
        grey = pal.mean()
        col = grey + self.saturation * (pal - grey) + self.shade
        return np.clip(col, 0.0, 1.0)


@dataclass(frozen=True)
class Scene:
    """A scene: the first object's attributes inline, background, and an optional second object."""

    shape: str
    colour: str
    size: float
    cx: float
    cy: float
    rotation: float = 0.0
    saturation: float = 1.0
    shade: float = 0.0
    background: tuple[float, float, float] = (0.5, 0.5, 0.5)
    second: ShapeObject | None = None

    @property
    def first(self) -> ShapeObject:
        return ShapeObject(
            self.shape, self.colour, self.size, self.cx, self.cy, self.rotation, self.saturation, self.shade
        )

    @property
    def objects(self) -> tuple[ShapeObject, ...]:
        return (self.first,) if self.second is None else (self.first, self.second)

    @property
    def bg_luma(self) -> float:
        r, g, b = self.background
        return 0.299 * r + 0.587 * g + 0.114 * b

    @classmethod
    def from_objects(cls, objects: Sequence[ShapeObject], background) -> Scene:
        o = objects[0]
        return cls(
            o.shape,
            o.colour,
            o.size,
            o.cx,
            o.cy,
            o.rotation,
            o.saturation,
            o.shade,
            tuple(float(v) for v in background),
            objects[1] if len(objects) > 1 else None,
        )


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt says about one object (``None`` = not named, free)."""

    shape: str
    colour: str
    size: str | None = None  # "small" | "large"
    position: str | None = None  # one of POSITIONS


@dataclass(frozen=True)
class PromptSpec:
    """Parsed prompt: one or two objects; ``relation`` only for two (one of RELATIONS)."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self):
        if len(self.objects) not in (1, 2):
            raise ValueError("a prompt names one or two objects")
        if len(self.objects) == 2 and self.relation not in RELATIONS:
            raise ValueError(f"two objects need a relation in {RELATIONS}")
        if len(self.objects) == 1 and self.relation is not None:
            raise ValueError("a single object has no relation")

    @property
    def shape(self) -> str:
        return self.objects[0].shape

    @property
    def colour(self) -> str:
        return self.objects[0].colour

    @property
    def text(self) -> str:
        return format_prompt(self)

    @classmethod
    def simple(cls, colour: str, shape: str, size=None, position=None) -> PromptSpec:
        return cls((ObjectSpec(shape, colour, size, position),))


# ----------------------------------------------------------------------------------------------
# Geometry and rendering
# ----------------------------------------------------------------------------------------------


def _regular(n: int, start_deg: float, radius: float = 1.0) -> np.ndarray:
    a = np.radians(start_deg + 360.0 / n * np.arange(n))
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def convex_pieces(shape: str) -> list[np.ndarray]:
    """The unit shape (circumradius 1, upright, centred at 0) as a union of convex polygons.

    Not used for circle and ring (those are tested analytically). Screen coordinates: y down,
    so the angle -90 deg points up.
    """
    if shape == "square":
        return [_regular(4, 45.0)]
    if shape == "triangle":
        return [_regular(3, -90.0)]
    if shape == "star":
        outer = _regular(5, -90.0)
        inner = _regular(5, -90.0 + 36.0, STAR_INNER)
        pieces = [inner]
        for k in range(5):
            pieces.append(np.stack([inner[k - 1], outer[k], inner[k]]))
        return pieces
    if shape == "cross":
        t = CROSS_HALF_WIDTH
        arm = math.sqrt(1.0 - t * t)
        return [
            np.array([[-arm, -t], [arm, -t], [arm, t], [-arm, t]]),
            np.array([[-t, -arm], [t, -arm], [t, arm], [-t, arm]]),
        ]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _inside_convex(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    pos = np.ones(px.shape, dtype=bool)
    neg = np.ones(px.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % n]
        cr = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
        pos &= cr >= 0
        neg &= cr <= 0
    return pos | neg


def inside_shape(
    shape: str,
    px: np.ndarray,
    py: np.ndarray,
    cx: float = 0.0,
    cy: float = 0.0,
    radius: float = 1.0,
    rotation: float = 0.0,
) -> np.ndarray:
    """Boolean inside-test of a shape (circumradius ``radius``) at arbitrary points."""
    dx = np.asarray(px, dtype=np.float64) - cx
    dy = np.asarray(py, dtype=np.float64) - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= radius * radius) & (d2 >= (RING_INNER * radius) ** 2)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}")
    # undo the rotation on the points instead of rotating the polygon
    t = math.radians(rotation)
    c, s = math.cos(t), math.sin(t)
    ux = (c * dx + s * dy) / radius
    uy = (-s * dx + c * dy) / radius
    out = np.zeros(ux.shape, dtype=bool)
    for piece in convex_pieces(shape):
        out |= _inside_convex(ux, uy, piece)
    return out


def shape_area(shape: str) -> float:
    """Area of the unit shape (circumradius 1)."""
    if shape == "circle":
        return math.pi
    if shape == "ring":
        return math.pi * (1.0 - RING_INNER**2)
    if shape == "square":
        return 2.0
    if shape == "triangle":
        return 3.0 * math.sqrt(3.0) / 4.0
    if shape == "star":
        return 5.0 * STAR_INNER * math.sin(math.radians(36.0))
    if shape == "cross":
        t = CROSS_HALF_WIDTH
        arm = math.sqrt(1.0 - t * t)
        return 2 * (2 * arm) * (2 * t) - (2 * t) ** 2
    raise ValueError(f"unknown shape {shape!r}")


def coverage(obj: ShapeObject, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage [size, size] in [0, 1] of one object (box filter over s x s samples)."""
    s = supersample
    n = size * s
    # sample points at the centres of the sub-pixels, in units of the image side
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    r = obj.size
    x0, x1 = max(0, int((obj.cx - r) * n) - 1), min(n, int((obj.cx + r) * n) + 2)
    y0, y1 = max(0, int((obj.cy - r) * n) - 1), min(n, int((obj.cy + r) * n) + 2)
    hi = np.zeros((n, n), dtype=np.float32)
    if x1 > x0 and y1 > y0:
        px, py = np.meshgrid(t[x0:x1], t[y0:y1])
        hi[y0:y1, x0:x1] = inside_shape(obj.shape, px, py, obj.cx, obj.cy, r, obj.rotation)
    return hi.reshape(size, s, size, s).mean(axis=(1, 3))


def render(scene: Scene, size: int = 64, supersample: int = 4) -> np.ndarray:
    """Render a scene to uint8 RGB [size, size, 3]."""
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = np.asarray(scene.background, dtype=np.float64)
    for obj in scene.objects:
        cov = coverage(obj, size, supersample)[..., None].astype(np.float64)
        img = img * (1.0 - cov) + obj.rgb() * cov
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Grammar: spec <-> text
# ----------------------------------------------------------------------------------------------


def _object_text(o: ObjectSpec) -> str:
    words = ["a"]
    if o.size:
        words.append(o.size)
    words += [o.colour, o.shape]
    if o.position:
        words.append(POSITION_PHRASES[o.position])
    return " ".join(words)


def format_prompt(spec: PromptSpec) -> str:
    """Write a spec out with the grammar (the canonical caption)."""
    if len(spec.objects) == 1:
        return _object_text(spec.objects[0])
    return f"{_object_text(spec.objects[0])} {RELATION_PHRASES[spec.relation]} {_object_text(spec.objects[1])}"


_SIZE_SYNONYMS = {
    "small": "small",
    "little": "small",
    "tiny": "small",
    "large": "large",
    "big": "large",
    "huge": "large",
}
_COLOUR_SYNONYMS = {c: c for c in COLOURS} | {"violet": "purple", "turquoise": "cyan"}
_SHAPE_SYNONYMS = {s: s for s in SHAPES} | {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "stars": "star",
    "crosses": "cross",
    "rings": "ring",
    "plus": "cross",
    "disc": "circle",
    "disk": "circle",
}
_POSITION_PATTERNS = [
    (r"\b(?:on|at|to) the left\b|\bleft\b", "left"),
    (r"\b(?:on|at|to) the right\b|\bright\b", "right"),
    (r"\b(?:at|on) the top\b|\btop\b", "top"),
    (r"\b(?:at|on) the bottom\b|\bbottom\b", "bottom"),
    (r"\bin the (?:centre|middle)\b|\bcentred\b|\bcentre\b|\bmiddle\b", "centre"),
]
_RELATION_PATTERNS = [
    (r"\s+(?:to the |on the )?left of\s+", "left_of"),
    (r"\s+(?:to the |on the )?right of\s+", "right_of"),
    (r"\s+(?:above|over)\s+", "above"),
    (r"\s+(?:below|under|beneath)\s+", "below"),
    (r"\s+(?:and|with|next to|beside)\s+", "and"),
]


def _normalise(text: str) -> str:
    t = text.lower().replace("center", "centre").replace("color", "colour")
    t = re.sub(r"[^a-z ]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def _parse_object(chunk: str) -> ObjectSpec:
    words = chunk.split()
    colours = [_COLOUR_SYNONYMS[w] for w in words if w in _COLOUR_SYNONYMS]
    shapes = [_SHAPE_SYNONYMS[w] for w in words if w in _SHAPE_SYNONYMS]
    sizes = [_SIZE_SYNONYMS[w] for w in words if w in _SIZE_SYNONYMS]
    if len(colours) != 1 or len(shapes) != 1:
        raise ValueError(f"cannot parse object {chunk!r}: need exactly one colour and one shape")
    position = None
    for pat, name in _POSITION_PATTERNS:
        if re.search(pat, chunk):
            position = name
            break
    return ObjectSpec(shapes[0], colours[0], sizes[0] if sizes else None, position)


def parse_prompt(text) -> PromptSpec:
    """Parse a caption of the grammar (tolerant of case, punctuation, a/an, a few synonyms).

    Raises ``ValueError`` when the text does not name one colour and one shape per object.
    A :class:`PromptSpec` is returned unchanged.
    """
    if isinstance(text, PromptSpec):
        return text
    t = _normalise(str(text))
    t = re.sub(r"^(?:an? )?(?:image|picture|photo|drawing|render) of ", "", t)
    for pat, rel in _RELATION_PATTERNS:
        m = re.search(pat, t)
        if m:
            left, right = t[: m.start()], t[m.end() :]
            try:
                a, b = _parse_object(left), _parse_object(right)
            except ValueError:
                continue
            return PromptSpec((a, b), rel)
    return PromptSpec((_parse_object(t),))


# ----------------------------------------------------------------------------------------------
# Scene <-> spec
# ----------------------------------------------------------------------------------------------


def size_word(r: float) -> str | None:
    """The size word a circumradius earns (``None`` in the gap between small and large)."""
    if SMALL_RANGE[0] - 1e-9 <= r <= SMALL_RANGE[1] + 1e-9:
        return "small"
    if LARGE_RANGE[0] - 1e-9 <= r <= LARGE_RANGE[1] + 1e-9:
        return "large"
    return None


def position_word(cx: float, cy: float) -> str | None:
    """The first position phrase (centre, left, right, top, bottom) that is true, or ``None``."""
    if abs(cx - 0.5) <= CENTRE_TOL + 1e-9 and abs(cy - 0.5) <= CENTRE_TOL + 1e-9:
        return "centre"
    if cx <= LEFT_MAX + 1e-9:
        return "left"
    if cx >= RIGHT_MIN - 1e-9:
        return "right"
    if cy <= TOP_MAX + 1e-9:
        return "top"
    if cy >= BOTTOM_MIN - 1e-9:
        return "bottom"
    return None


def _position_holds(pos: str, cx: float, cy: float) -> bool:
    e = 1e-9
    return {
        "left": cx <= LEFT_MAX + e,
        "right": cx >= RIGHT_MIN - e,
        "top": cy <= TOP_MAX + e,
        "bottom": cy >= BOTTOM_MIN - e,
        "centre": abs(cx - 0.5) <= CENTRE_TOL + e and abs(cy - 0.5) <= CENTRE_TOL + e,
    }[pos]


def relation_of(a: ShapeObject, b: ShapeObject) -> str:
    """Spatial relation of a to b along the axis on which they are further apart."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if abs(dx) >= abs(dy):
        return "left_of" if dx > 0 else "right_of"
    return "above" if dy > 0 else "below"


def spec_of(scene: Scene, mention: Iterable[str] = ()) -> PromptSpec:
    """The spec of a scene naming the attributes in ``mention`` ("size", "position", "relation").

    A size (position) is named only when the scene's value falls in a named range.
    """
    mention = set(mention)
    unknown = mention - {"size", "position", "relation"}
    if unknown:
        raise ValueError(f"unknown attributes to mention: {sorted(unknown)}")
    if scene.second is None:
        return PromptSpec(
            (
                ObjectSpec(
                    scene.shape,
                    scene.colour,
                    size_word(scene.size) if "size" in mention else None,
                    position_word(scene.cx, scene.cy) if "position" in mention else None,
                ),
            )
        )
    a, b = scene.first, scene.second
    rel = relation_of(a, b) if "relation" in mention else "and"
    return PromptSpec((ObjectSpec(a.shape, a.colour), ObjectSpec(b.shape, b.colour)), rel)


def caption(scene: Scene, mention: Iterable[str] = ()) -> str:
    """Caption a scene; shape and colour always, ``mention`` picks size/position/relation."""
    return format_prompt(spec_of(scene, mention))


def scene_matches(scene: Scene, spec) -> bool:
    """True when the scene satisfies every attribute the spec (or prompt text) names."""
    spec = parse_prompt(spec)
    objs = scene.objects
    if len(objs) != len(spec.objects):
        return False
    for o, s in zip(objs, spec.objects):
        if (o.shape, o.colour) != (s.shape, s.colour):
            return False
        if s.size is not None and size_word(o.size) != s.size:
            return False
        if s.position is not None and not _position_holds(s.position, o.cx, o.cy):
            return False
    if len(objs) == 2 and spec.relation != "and":
        return relation_of(objs[0], objs[1]) == spec.relation
    return True


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

SPLITS = ("train", "heldout", "all")


def combos(split: str = "all") -> list[tuple[str, str]]:
    """(colour, shape) pairs of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    all_pairs = [(c, s) for c in COLOUR_NAMES for s in SHAPES]
    if split == "all":
        return all_pairs
    held = set(HELDOUT_COMBOS)
    if split == "heldout":
        return [p for p in all_pairs if p in held]
    return [p for p in all_pairs if p not in held]


def sample_spec(
    rng: np.random.Generator, split: str = "train", p_second: float = 0.2, p_size: float = 0.3, p_position: float = 0.3
) -> PromptSpec:
    """Draw a prompt spec (see the module docstring). The held-out split has single objects only."""
    pairs = combos(split)
    two = split != "heldout" and rng.random() < p_second
    if not two:
        c, s = pairs[rng.integers(len(pairs))]
        size = SIZE_WORDS[rng.integers(2)] if rng.random() < p_size else None
        pos = POSITIONS[rng.integers(len(POSITIONS))] if rng.random() < p_position else None
        return PromptSpec((ObjectSpec(s, c, size, pos),))
    c1, s1 = pairs[rng.integers(len(pairs))]
    rest = [p for p in pairs if p[0] != c1]
    c2, s2 = rest[rng.integers(len(rest))]
    rel = "and" if rng.random() < 0.5 else RELATIONS[1 + rng.integers(4)]
    return PromptSpec((ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel)


def _rotation(rng: np.random.Generator, shape: str) -> float:
    u = float(rng.random())
    return 0.0 if shape in ROTATION_FREE else u * SYMMETRY[shape]


def _appearance(rng: np.random.Generator) -> tuple[float, float]:
    return float(rng.uniform(*SATURATION_RANGE)), float(rng.uniform(*SHADE_RANGE))


def _background(rng: np.random.Generator) -> tuple[float, float, float]:
    luma = rng.uniform(*BG_LUMA_RANGE)
    chroma = rng.uniform(0.0, BG_TINT_MAX)
    h = rng.uniform(0.0, 2 * math.pi)
    # a unit-chroma direction in the opponent plane (orthogonal to grey)
    d = np.array([math.cos(h), math.cos(h - 2 * math.pi / 3), math.cos(h + 2 * math.pi / 3)])
    d = d / (d.max() - d.min())
    rgb = np.clip(luma + chroma * d, 0.0, 1.0)
    return tuple(float(v) for v in rgb)


def _uniform(rng, lo, hi) -> float:
    if hi < lo:  # cannot happen with the module's ranges; keep it safe for edited constants
        lo = hi = 0.5 * (lo + hi)
    return float(rng.uniform(lo, hi))


def sample_scene(rng: np.random.Generator, spec=None, split: str = "all") -> Scene:
    """Draw a scene consistent with ``spec`` (a :class:`PromptSpec` or prompt text).

    ``spec=None`` first draws a spec with :func:`sample_spec` (from ``split``).
    """
    if spec is None:
        spec = sample_spec(rng, split)
    spec = parse_prompt(spec)
    if len(spec.objects) == 1:
        o = spec.objects[0]
        rng_r = {None: SIZE_RANGE, "small": SMALL_RANGE, "large": LARGE_RANGE}[o.size]
        r = _uniform(rng, *rng_r)
        lo, hi = r + MARGIN, 1.0 - r - MARGIN
        xr, yr = (lo, hi), (lo, hi)
        if o.position == "left":
            xr = (lo, min(hi, LEFT_MAX))
        elif o.position == "right":
            xr = (max(lo, RIGHT_MIN), hi)
        elif o.position == "top":
            yr = (lo, min(hi, TOP_MAX))
        elif o.position == "bottom":
            yr = (max(lo, BOTTOM_MIN), hi)
        elif o.position == "centre":
            xr = yr = (max(lo, 0.5 - CENTRE_TOL), min(hi, 0.5 + CENTRE_TOL))
        cx, cy = _uniform(rng, *xr), _uniform(rng, *yr)
        rot = _rotation(rng, o.shape)
        sat, shade = _appearance(rng)
        bg = _background(rng)
        return Scene(o.shape, o.colour, r, cx, cy, rot, sat, shade, bg)
    if any(o.size or o.position for o in spec.objects):
        raise ValueError("two-object prompts take no size or position words")
    if spec.objects[0].colour == spec.objects[1].colour:
        raise ValueError("the two objects of a scene have different colours")
    rel = spec.relation
    if rel == "and":
        horizontal = bool(rng.random() < 0.5)
        first_low = bool(rng.random() < 0.5)  # first object left / on top
    else:
        horizontal = rel in ("left_of", "right_of")
        first_low = rel in ("left_of", "above")
    objs = []
    for k, o in enumerate(spec.objects):
        r = _uniform(rng, *PAIR_SIZE_RANGE)
        low = (k == 0) == first_low
        if low:
            along = _uniform(rng, r + MARGIN, 0.5 - PAIR_GAP / 2 - r)
        else:
            along = _uniform(rng, 0.5 + PAIR_GAP / 2 + r, 1.0 - r - MARGIN)
        objs.append([o, r, along])
    # the cross-axis coordinates: keep the relation unambiguous (|d_across| <= PAIR_SKEW * |d_along|)
    (o1, r1, a1), (o2, r2, a2) = objs
    lim = PAIR_SKEW * abs(a2 - a1)
    for _ in range(64):
        c1 = _uniform(rng, r1 + MARGIN, 1.0 - r1 - MARGIN)
        c2 = _uniform(rng, r2 + MARGIN, 1.0 - r2 - MARGIN)
        if abs(c2 - c1) <= lim:
            break
    else:  # practically never (the acceptance rate is > 40%)
        c2 = min(max(c2, c1 - lim), c1 + lim)
    objs = [(o1, r1, a1, c1), (o2, r2, a2, c2)]
    objs = [(o, r, a, c) if horizontal else (o, r, c, a) for o, r, a, c in objs]
    out = []
    for o, r, cx, cy in objs:
        rot = _rotation(rng, o.shape)
        sat, shade = _appearance(rng)
        out.append(ShapeObject(o.shape, o.colour, r, cx, cy, rot, sat, shade))
    return Scene.from_objects(out, _background(rng))


# ----------------------------------------------------------------------------------------------
# Data set and prompt lists
# ----------------------------------------------------------------------------------------------


def index_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` of a data set with ``seed`` (order-independent)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index)]))


class ShapesDataset:
    """``n`` (image, caption) pairs, deterministic from ``seed``, index-addressable.

    Item ``i`` depends only on ``(seed, i)`` (and the generation parameters), never on the order
    of access. ``ds[i]`` returns ``(image, caption)`` with image a float32 torch tensor [3, H, W]
    in [0, 1] (``as_tensor=True``, default) or a uint8 numpy array [H, W, 3].
    """

    def __init__(
        self,
        n: int,
        seed: int = 0,
        size: int = 64,
        split: str = "train",
        p_second: float = 0.2,
        p_size: float = 0.3,
        p_position: float = 0.3,
        as_tensor: bool = True,
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        self.n, self.seed, self.size, self.split = int(n), int(seed), int(size), split
        self.p_second, self.p_size, self.p_position = p_second, p_size, p_position
        self.as_tensor = as_tensor

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i

    def spec(self, i: int) -> PromptSpec:
        i = self._check(i)
        return sample_spec(index_rng(self.seed, i), self.split, self.p_second, self.p_size, self.p_position)

    def scene(self, i: int) -> Scene:
        i = self._check(i)
        rng = index_rng(self.seed, i)
        spec = sample_spec(rng, self.split, self.p_second, self.p_size, self.p_position)
        return sample_scene(rng, spec)

    def caption(self, i: int) -> str:
        return format_prompt(self.spec(i))

    def captions(self) -> list[str]:
        return [self.caption(i) for i in range(self.n)]

    def image(self, i: int) -> np.ndarray:
        """uint8 [H, W, 3]."""
        return render(self.scene(i), self.size)

    def images(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """uint8 [N, H, W, 3] for ``indices`` (all items by default)."""
        idx = range(self.n) if indices is None else indices
        return np.stack([self.image(i) for i in idx])

    def __getitem__(self, i: int):
        img = self.image(i)
        cap = self.caption(i)
        if self.as_tensor:
            import torch

            return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0), cap
        return img, cap


def train_prompts(extended: bool = False) -> list[str]:
    """Fixed training prompts: "a <colour> <shape>" for the 30 training pairs.

    ``extended`` adds, per pair, the two size words and the five position phrases (240 total).
    """
    return _prompts("train", extended)


def heldout_prompts(extended: bool = False) -> list[str]:
    """Fixed held-out prompts: the 6 pairs of :data:`HELDOUT_COMBOS` (48 with ``extended``)."""
    return _prompts("heldout", extended)


def _prompts(split: str, extended: bool) -> list[str]:
    out = []
    for c, s in combos(split):
        out.append(format_prompt(PromptSpec.simple(c, s)))
        if extended:
            out += [format_prompt(PromptSpec.simple(c, s, size=w)) for w in SIZE_WORDS]
            out += [format_prompt(PromptSpec.simple(c, s, position=p)) for p in POSITIONS]
    return out


def all_captions(split: str = "all") -> list[str]:
    """Every caption the grammar can produce for a split (single objects; pairs for non-held-out)."""
    out = []
    pairs = combos(split)
    for c, s in pairs:
        for w in (None,) + SIZE_WORDS:
            for p in (None,) + POSITIONS:
                out.append(format_prompt(PromptSpec.simple(c, s, w, p)))
    if split != "heldout":
        for c1, s1 in pairs:
            for c2, s2 in pairs:
                if c1 != c2:
                    for rel in RELATIONS:
                        out.append(format_prompt(PromptSpec((ObjectSpec(s1, c1), ObjectSpec(s2, c2)), rel)))
    return out
