"""Scenes of the generated corpus: what is where, before any pixel is drawn.

A scene is 1-3 coloured shapes of two sizes on a background (or, for video, one shape
moving in a straight line, maybe past a static one). Every spatial word a caption may use
is defined here by geometry, so captions are true by construction and tests can check
them against the stored scene:

* ``relation(a, b)``: "A left of B" when B's centre lies to the right of A's and the
  horizontal offset is at least twice the vertical one (likewise above / below); a
  diagonal pair has no relation and is never described with one.
* ``cell(c)``: the 3x3 grid cell of a centre ("top left", "centre", ...).
* ``path``: the axis directions a clip's mover takes, in order: ("right",) for a straight
  move, ("right", "up") for a move that turns half-way (so word order = temporal order).

Hard partners (``make_partner``) change exactly one thing: which colour goes with which
shape (``colour_swap``, between two objects of equal area), where two objects are (``relation_flip``, the two swap places),
where a lone object is (``position_flip``, mirrored), or the direction of time
(``time_reverse``). Pooled global features see the same parts in both images of a pair.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from thinkfast.data.synth_geometry import (  # noqa: F401 - re-exported: captions use them from here
    CONVERSE,
    DIRECTIONS,
    OPPOSITE,
    RELATIONS,
    Point,
    apart,
    cell,
    inside,
    relation,
    segment_distance,
    step_direction,
)

# closed vocabulary: palette colours (saturated, hues ~60 degrees apart, far from the
# low-saturation backgrounds) and shapes with distinct silhouettes at 6 px radius
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (235, 215, 40),
    "green": (40, 175, 70),
    "cyan": (40, 200, 210),
    "blue": (45, 75, 225),
    "purple": (150, 60, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
# scale R of a size word as a fraction of the image side; one R per size word per scene,
# so two "small" objects of a scene cover the same area
SIZE_RANGES = {"small": (0.075, 0.095), "large": (0.14, 0.17)}
# bounding radius of each shape relative to R, chosen so that every shape covers the same
# area (2.27 R^2, a circle of radius 0.85 R): a colour swap between shapes then leaves the
# image's colour histogram unchanged, and only the colour-shape binding tells them apart.
# (square: half side 0.8 r; triangle: apex r, base 0.75 r below centre; cross arms 0.35 r)
_SHAPE_AREA = {"circle": math.pi, "square": 2.56, "triangle": 1.75, "diamond": 2.0, "cross": 2.31}
SHAPE_EXTENT = {shape: math.sqrt(math.pi * 0.85 ** 2 / k) for shape, k in _SHAPE_AREA.items()}

_MIN_RADIUS = 3.0  # px: below this a triangle is a blob
_COLOUR_JITTER = 12  # +- per channel, so a colour is a region of RGB space, not one value
_MAX_TRIES = 200
_UNIT = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}  # y grows down
_TURN_PROB = 0.4  # share of clip movers that turn half-way (needs >= 4 frames)



@dataclass(frozen=True)
class Obj:
    """One drawn shape. ``track`` holds its centre per frame (one entry for images)."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # "small" | "large"
    radius: float  # half-extent in px; the shape fits in a circle of this radius
    angle: float  # rotation in degrees (0 for circles)
    rgb: tuple[int, int, int]  # the drawn colour: palette colour + jitter
    track: tuple[Point, ...]  # centre (x right, y down, px) per frame

    @property
    def centre(self) -> Point:
        return self.track[0]

    @property
    def desc(self) -> tuple[str, str, str]:
        """(size, colour, shape): what a caption says about the object."""
        return (self.size, self.colour, self.shape)

    @property
    def path(self) -> tuple[str, ...]:
        """Directions of the frame-to-frame steps, runs merged; () if it never moves."""
        out: list[str] = []
        for a, b in zip(self.track, self.track[1:]):
            d = step_direction(a, b)
            if d is not None and (not out or out[-1] != d):
                out.append(d)
        return tuple(out)

    @property
    def motion(self) -> str | None:
        """The direction of a straight move; None if it stays still or turns."""
        path = self.path
        return path[0] if len(path) == 1 else None

    def to_json(self) -> dict:
        out = {"shape": self.shape, "colour": self.colour, "size": self.size,
               "radius": round(self.radius, 3), "angle": round(self.angle, 2), "rgb": list(self.rgb),
               "centre": [round(self.centre[0], 3), round(self.centre[1], 3)]}
        if len(self.track) > 1:
            out["track"] = [[round(x, 3), round(y, 3)] for x, y in self.track]
            out["path"] = list(self.path)
        return out


@dataclass(frozen=True)
class Background:
    """How the backdrop is painted; ``tone`` is what captions may say about it."""

    kind: str  # "plain" | "gradient" | "checker"
    tone: str  # "dark" | "light"
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]  # start/end (gradient), base/alt (checker)
    direction: str  # gradient axis "horizontal" | "vertical" | "diagonal"; unused otherwise
    cell: int  # checker square side in px
    noise: float  # std of the additive Gaussian pixel noise
    noise_seed: int  # seeds the noise field, shared by both images of a hard pair

    def to_json(self) -> dict:
        return {"kind": self.kind, "tone": self.tone, "colours": [list(c) for c in self.colours],
                "direction": self.direction, "cell": self.cell, "noise": round(self.noise, 3)}


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and describe one image or clip."""

    size: int  # image side in px (square)
    objects: tuple[Obj, ...]
    background: Background
    num_frames: int = 1  # 1 for images
    pair: dict | None = field(default=None)  # {"kind": ..., "partner": key} for hard pairs

    @property
    def is_video(self) -> bool:
        return self.num_frames > 1

    def to_json(self, group: int, partner_key: str | None = None) -> str:
        out = {"width": self.size, "height": self.size, "num_frames": self.num_frames, "group": group,
               "background": self.background.to_json(), "objects": [o.to_json() for o in self.objects],
               "pair": None if self.pair is None else {**self.pair, "partner": partner_key}}
        return json.dumps(out, separators=(",", ":"))


# ----------------------------------------------------------------------------- sampling
def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


def sample_background(rng: np.random.Generator) -> Background:
    """Low-saturation backdrop (dark or light) so every palette colour stands out on it."""
    tone = "dark" if rng.random() < 0.5 else "light"
    lo, hi = (25, 80) if tone == "dark" else (170, 230)

    def grey() -> tuple[int, int, int]:
        g = int(rng.integers(lo, hi + 1))
        return tuple(int(np.clip(g + rng.integers(-12, 13), 0, 255)) for _ in range(3))  # type: ignore[return-value]

    kind = _choice(rng, ("plain", "gradient", "checker"))
    return Background(
        kind=kind, tone=tone, colours=(grey(), grey()),
        direction=_choice(rng, ("horizontal", "vertical", "diagonal")),
        cell=int(rng.integers(4, 17)), noise=_uniform(rng, 2.0, 9.0),
        noise_seed=int(rng.integers(2**31 - 1)),
    )


def _scales(rng: np.random.Generator, size: int) -> dict[str, float]:
    """R (px) per size word for one scene."""
    return {w: max(_uniform(rng, *SIZE_RANGES[w]) * size, _MIN_RADIUS + (2.0 if w == "large" else 0.0))
            for w in SIZES}


def _sample_look(rng: np.random.Generator, scales: dict[str, float],
                 used: set[tuple[str, str]]) -> tuple[str, str, str, float, float, tuple]:
    """Shape, colour, size word, radius, angle, drawn rgb; (colour, shape) unique in a scene."""
    while True:
        shape, colour = _choice(rng, SHAPES), _choice(rng, tuple(COLOURS))
        if (colour, shape) not in used:
            break
    size_word = _choice(rng, SIZES)
    radius = scales[size_word] * SHAPE_EXTENT[shape]
    angle = 0.0 if shape == "circle" else _uniform(rng, -12.0, 12.0)
    rgb = tuple(int(np.clip(v + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1), 0, 255)) for v in COLOURS[colour])
    used.add((colour, shape))
    return shape, colour, size_word, radius, angle, rgb


def _gap(size: int) -> float:
    return max(2.0, 0.04 * size)


def sample_image_scene(rng: np.random.Generator, size: int, num_objects: int) -> Scene:
    """A still scene of ``num_objects`` shapes whose captions can state true relations:
    with 2 objects they have a relation; with 3, relations connect all of them."""
    for _ in range(_MAX_TRIES):
        used: set[tuple[str, str]] = set()
        scales = _scales(rng, size)
        looks = [_sample_look(rng, scales, used) for _ in range(num_objects)]
        radii = [lk[3] for lk in looks]
        centres = _place(rng, size, radii)
        if centres is None:
            continue
        objects = tuple(Obj(shape=lk[0], colour=lk[1], size=lk[2], radius=lk[3], angle=lk[4], rgb=lk[5],
                            track=(c,)) for lk, c in zip(looks, centres))
        return Scene(size=size, objects=objects, background=sample_background(rng))
    if num_objects > 1:  # tiny images may not fit three large shapes: one fewer
        return sample_image_scene(rng, size, num_objects - 1)
    raise RuntimeError(f"cannot place one object in a {size}px image")


def _place(rng: np.random.Generator, size: int, radii: list[float]) -> list[Point] | None:
    gap = _gap(size)
    if len(radii) == 1:
        return [_place_in_cell(rng, size, radii[0])]
    for _ in range(_MAX_TRIES):
        # A, then B along a chosen axis direction with a small cross-axis offset
        ra, rb = radii[0], radii[1]
        a = (_uniform(rng, ra + 1, size - ra - 1), _uniform(rng, ra + 1, size - ra - 1))
        direction = _choice(rng, DIRECTIONS)
        dist = _uniform(rng, ra + rb + gap, 0.8 * size)
        off = _uniform(rng, -0.4, 0.4) * dist
        ux, uy = _UNIT[direction]
        b = (a[0] + ux * dist + uy * off, a[1] + uy * dist + ux * off)
        if not inside(b, rb, size) or not apart([(a, ra), (b, rb)], gap) or relation(a, b) is None:
            continue
        centres = [a, b]
        for r in radii[2:]:
            c = _place_related(rng, size, r, centres, radii, gap)
            if c is None:
                break
            centres.append(c)
        if len(centres) == len(radii):
            return centres
    return None


def _place_related(rng: np.random.Generator, size: int, r: float, centres: list[Point],
                   radii: list[float], gap: float) -> Point | None:
    """A centre for one more object that has a relation to at least one placed object."""
    for _ in range(_MAX_TRIES):
        c = (_uniform(rng, r + 1, size - r - 1), _uniform(rng, r + 1, size - r - 1))
        objs = list(zip(centres, radii)) + [(c, r)]
        if apart(objs, gap) and any(relation(c, o) is not None for o in centres):
            return c
    return None


def _place_in_cell(rng: np.random.Generator, size: int, r: float) -> Point:
    """A lone object well inside a random 3x3 cell, so its position words are unambiguous."""
    margin = 0.04 * size
    for _ in range(_MAX_TRIES):
        row, col = int(rng.integers(3)), int(rng.integers(3))
        lo_x, hi_x = max(col * size / 3 + margin, r + 1), min((col + 1) * size / 3 - margin, size - r - 1)
        lo_y, hi_y = max(row * size / 3 + margin, r + 1), min((row + 1) * size / 3 - margin, size - r - 1)
        if lo_x <= hi_x and lo_y <= hi_y:
            return (_uniform(rng, lo_x, hi_x), _uniform(rng, lo_y, hi_y))
    return (size / 2, size / 2)


def _mover_track(rng: np.random.Generator, size: int, r: float, num_frames: int) -> tuple[Point, ...] | None:
    """Centres per frame of a straight move (small cross-axis drift) or of a move that turns
    90 degrees at the middle frame; None if the sampled move leaves the image."""
    start = (_uniform(rng, r + 1, size - r - 1), _uniform(rng, r + 1, size - r - 1))
    first = _choice(rng, DIRECTIONS)
    ux, uy = _UNIT[first]
    if num_frames >= 4 and rng.random() < _TURN_PROB:
        second = _choice(rng, ("up", "down") if first in ("left", "right") else ("left", "right"))
        vx, vy = _UNIT[second]
        d1, d2 = _uniform(rng, 0.25, 0.4) * size, _uniform(rng, 0.25, 0.4) * size
        corner = (start[0] + ux * d1, start[1] + uy * d1)
        end = (corner[0] + vx * d2, corner[1] + vy * d2)
        k = num_frames // 2  # the turn happens exactly on frame k
        track = [(start[0] + (corner[0] - start[0]) * t / k, start[1] + (corner[1] - start[1]) * t / k)
                 for t in range(k)]
        m = num_frames - 1 - k
        track += [(corner[0] + (end[0] - corner[0]) * t / m, corner[1] + (end[1] - corner[1]) * t / m)
                  for t in range(m + 1)]
        points = (corner, end)
    else:
        dist = _uniform(rng, 0.3, 0.5) * size
        drift = _uniform(rng, -0.1, 0.1) * dist  # cross-axis wobble, well under the 2:1 rule
        end = (start[0] + ux * dist + uy * drift, start[1] + uy * dist + ux * drift)
        track = [(start[0] + (end[0] - start[0]) * t / (num_frames - 1),
                  start[1] + (end[1] - start[1]) * t / (num_frames - 1)) for t in range(num_frames)]
        points = (end,)
    if not all(inside(p, r, size) for p in points):
        return None
    return tuple(track)


def sample_video_scene(rng: np.random.Generator, size: int, num_objects: int, num_frames: int) -> Scene:
    """One shape moving along an axis (left/right/up/down), straight or turning once half-way;
    with two objects the second stays still, clear of the mover's path."""
    gap = _gap(size)
    for _ in range(_MAX_TRIES):
        used: set[tuple[str, str]] = set()
        scales = _scales(rng, size)
        looks = [_sample_look(rng, scales, used) for _ in range(num_objects)]
        r = looks[0][3]
        track = _mover_track(rng, size, r, num_frames)
        if track is None:
            continue
        objects = [Obj(*looks[0][:5], rgb=looks[0][5], track=track)]
        ok = True
        for lk in looks[1:]:
            placed = None
            for _ in range(_MAX_TRIES):
                c = (_uniform(rng, lk[3] + 1, size - lk[3] - 1), _uniform(rng, lk[3] + 1, size - lk[3] - 1))
                clear = all(segment_distance(c, a, b) >= r + lk[3] + gap for a, b in zip(track, track[1:]))
                if clear and all(math.dist(c, o.centre) >= o.radius + lk[3] + gap for o in objects[1:]):
                    placed = c
                    break
            if placed is None:
                ok = False
                break
            objects.append(Obj(*lk[:5], rgb=lk[5], track=(placed,) * num_frames))
        if ok:
            return Scene(size=size, objects=tuple(objects), background=sample_background(rng), num_frames=num_frames)
    if num_objects > 1:
        return sample_video_scene(rng, size, num_objects - 1, num_frames)
    raise RuntimeError(f"cannot fit a moving object in a {size}px clip")


# ----------------------------------------------------------------------------- hard partners
def make_partner(scene: Scene, kind: str, rng: np.random.Generator) -> Scene | None:
    """The scene's hard partner of ``kind``, or None when this scene cannot have one
    (the caller then samples another scene)."""
    objs = list(scene.objects)
    if kind == "colour_swap":
        # same size word: equal areas, so the swap keeps every colour's pixel count
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if objs[i].shape != objs[j].shape and objs[i].colour != objs[j].colour
                 and objs[i].size == objs[j].size]
        if not pairs:
            return None
        i, j = _choice(rng, pairs)
        objs[i], objs[j] = (replace(objs[i], colour=objs[j].colour, rgb=objs[j].rgb),
                            replace(objs[j], colour=objs[i].colour, rgb=objs[i].rgb))
        if len({(o.colour, o.shape) for o in objs}) < len(objs):
            return None
    elif kind == "relation_flip":
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if relation(objs[i].centre, objs[j].centre) is not None]
        if not pairs:
            return None
        i, j = _choice(rng, pairs)
        objs[i], objs[j] = replace(objs[i], track=objs[j].track), replace(objs[j], track=objs[i].track)
        if not all(inside(o.centre, o.radius, scene.size) for o in objs):
            return None
        if not apart([(o.centre, o.radius) for o in objs], _gap(scene.size)):
            return None
    elif kind == "position_flip":
        if len(objs) != 1:
            return None
        (x, y), s = objs[0].centre, scene.size
        row, col = cell((x, y), s)
        if col != "centre":
            flipped = (s - x, y)
        elif row != "middle":
            flipped = (x, s - y)
        else:
            return None
        objs[0] = replace(objs[0], track=(flipped,))
    elif kind == "time_reverse":
        objs = [replace(o, track=tuple(reversed(o.track))) for o in objs]
    else:
        raise ValueError(f"unknown hard-pair kind {kind!r}")
    return replace(scene, objects=tuple(objs))
