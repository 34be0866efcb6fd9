"""Spatial words of the generated corpus, defined by geometry so that captions are true by
construction: relations between two centres, a mover's step direction, the 3x3 grid cell
of a centre, and the overlap tests the scene sampler uses."""

from __future__ import annotations

import math
from typing import Sequence

RELATIONS = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
DIRECTIONS = ("right", "left", "up", "down")
OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
_DOMINANCE = 2.0  # a relation needs |main-axis offset| >= 2 x |cross-axis offset|

Point = tuple[float, float]


def relation(a: Point, b: Point) -> str | None:
    """Relation of the object at ``a`` to the one at ``b`` ("left of" = a is left of b)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) > 0 and abs(dx) >= _DOMINANCE * abs(dy):
        return "left of" if dx > 0 else "right of"
    if abs(dy) > 0 and abs(dy) >= _DOMINANCE * abs(dx):
        return "above" if dy > 0 else "below"  # y grows downwards
    return None


def step_direction(a: Point, b: Point) -> str | None:
    """Axis direction of a move from ``a`` to ``b`` (2:1 dominance), None if still or diagonal."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if max(abs(dx), abs(dy)) < 1e-6:
        return None
    if abs(dx) >= _DOMINANCE * abs(dy):
        return "right" if dx > 0 else "left"
    if abs(dy) >= _DOMINANCE * abs(dx):
        return "down" if dy > 0 else "up"
    return None


def cell(c: Point, size: int) -> tuple[str, str]:
    """(row, column) of the 3x3 grid cell holding centre ``c``."""
    col = COLS[min(int(3 * c[0] / size), 2)]
    row = ROWS[min(int(3 * c[1] / size), 2)]
    return row, col


def inside(c: Point, r: float, size: int) -> bool:
    return r + 1 <= c[0] <= size - r - 1 and r + 1 <= c[1] <= size - r - 1


def apart(objs: Sequence[tuple[Point, float]], gap: float) -> bool:
    """No two (centre, radius) circles closer than ``gap`` px (segments for moving ones are
    checked by the video sampler)."""
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            (ci, ri), (cj, rj) = objs[i], objs[j]
            if math.dist(ci, cj) < ri + rj + gap:
                return False
    return True


def segment_distance(p: Point, a: Point, b: Point) -> float:
    ax, ay, bx, by = a[0], a[1], b[0], b[1]
    vx, vy = bx - ax, by - ay
    t = ((p[0] - ax) * vx + (p[1] - ay) * vy) / max(vx * vx + vy * vy, 1e-12)
    t = min(max(t, 0.0), 1.0)
    return math.dist(p, (ax + t * vx, ay + t * vy))
