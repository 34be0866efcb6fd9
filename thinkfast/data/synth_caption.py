"""Captions of generated scenes: paraphrase templates over *facts* that hold in the scene.

Each caption is rendered from a small set of facts (``("rel", A, "left of", B)``,
``("pos", A, "top", "left")``, ``("move", A, "right")``...). A fact is checked against a
scene's geometry by ``fact_holds``, so a caption is true of its image by construction and
can be checked against any other scene. For a hard pair, captions whose facts also hold in
the partner are dropped: every caption then names the one difference (a colour-shape
binding, a relation, a position, a direction), while its bag of words is often *identical*
to one of the partner's ("a red circle left of a blue square" vs "a blue square left of a
red circle" after the two swap places), so neither pooled image features nor a
bag-of-words text encoder can tell the pair apart.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from thinkfast.data.synth_scene import CONVERSE, Obj, Scene, cell, relation

Desc = tuple[str, str, str]
Fact = tuple

REL_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
POS_WORDS = {
    ("top", "left"): ("in the top left corner", "at the top left"),
    ("top", "centre"): ("at the top", "near the top"),
    ("top", "right"): ("in the top right corner", "at the top right"),
    ("middle", "left"): ("on the left", "on the left side"),
    ("middle", "centre"): ("in the centre", "in the middle"),
    ("middle", "right"): ("on the right", "on the right side"),
    ("bottom", "left"): ("in the bottom left corner", "at the bottom left"),
    ("bottom", "centre"): ("at the bottom", "near the bottom"),
    ("bottom", "right"): ("in the bottom right corner", "at the bottom right"),
}
DIR_WORDS = {
    "right": ("to the right", "right", "rightwards"),
    "left": ("to the left", "left", "leftwards"),
    "up": ("up", "upwards"),
    "down": ("down", "downwards"),
}
# a mover "approaches" when its distance to the other object shrinks below this fraction
_APPROACH = 0.7


def noun_phrase(desc: Desc, definite: bool = False) -> str:
    size, colour, shape = desc
    return f"{'the' if definite else 'a'} {size} {colour} {shape}"


# ----------------------------------------------------------------------------- truth
def _objs(scene: Scene, desc: Desc) -> list[Obj]:
    return [o for o in scene.objects if o.desc == tuple(desc)]


def fact_holds(fact: Fact, scene: Scene) -> bool:
    """Whether one fact is true of ``scene`` (by its geometry, not by how it was made)."""
    kind = fact[0]
    if kind == "tone":
        return scene.background.tone == fact[1]
    if kind == "pos":
        _, desc, row, col = fact
        return any(cell(o.centre, scene.size) == (row, col) for o in _objs(scene, desc))
    if kind == "rel":
        _, a, rel, b = fact
        return any(relation(x.centre, y.centre) == rel
                   for x in _objs(scene, a) for y in _objs(scene, b) if x is not y)
    if kind == "move":
        return any(o.motion == fact[2] for o in _objs(scene, fact[1]))
    if kind == "path":
        return any(o.path == tuple(fact[2]) for o in _objs(scene, fact[1]))
    if kind == "still":
        return any(len(set(o.track)) == 1 for o in _objs(scene, fact[1]))
    if kind in ("towards", "away"):
        for x in _objs(scene, fact[1]):
            for y in _objs(scene, fact[2]):
                d0, d1 = math.dist(x.track[0], y.centre), math.dist(x.track[-1], y.centre)
                if (kind == "towards" and d1 <= _APPROACH * d0) or (kind == "away" and d0 <= _APPROACH * d1):
                    return True
        return False
    raise ValueError(f"unknown fact {fact!r}")


def caption_holds(facts: Sequence[Fact], scene: Scene, cache: dict | None = None) -> bool:
    """All facts true of ``scene``; ``cache`` (fact -> bool) saves re-checking shared facts."""
    if cache is None:
        return all(fact_holds(f, scene) for f in facts)
    for f in facts:
        if f not in cache:
            cache[f] = fact_holds(f, scene)
        if not cache[f]:
            return False
    return True


# ----------------------------------------------------------------------------- candidates
def _single(scene: Scene) -> list[tuple[str, tuple]]:
    obj = scene.objects[0]
    pos = ("pos", obj.desc, *cell(obj.centre, scene.size))
    tone = ("tone", scene.background.tone)
    a = noun_phrase(obj.desc)
    out = []
    for p in POS_WORDS[pos[2:]]:
        out += [
            (f"{a} {p}", (pos,)),
            (f"there is {a} {p}", (pos,)),
            (f"an image of {a} {p}", (pos,)),
            (f"a picture with {a} {p}", (pos,)),
            (f"{p}, there is {a}", (pos,)),
            (f"{a} {p} on a {tone[1]} background", (pos, tone)),
        ]
    return out


def _clause(objs: Sequence[Obj], i: int, j: int, rel: str, converse: bool, mentioned: set[int],
            copula: bool, synonym: int) -> str:
    if converse:
        i, j, rel = j, i, CONVERSE[rel]
    words = REL_WORDS[rel][synonym % len(REL_WORDS[rel])]
    subj = noun_phrase(objs[i].desc, definite=i in mentioned)
    mentioned.add(i)
    obj = noun_phrase(objs[j].desc, definite=j in mentioned)
    mentioned.add(j)
    return f"{subj} {'is ' if copula else ''}{words} {obj}"


def _multi(scene: Scene, rng: np.random.Generator) -> list[tuple[str, tuple]]:
    objs = scene.objects
    n = len(objs)
    rels = [(i, j, r) for i in range(n) for j in range(i + 1, n)
            if (r := relation(objs[i].centre, objs[j].centre)) is not None]
    if n == 2:
        fact_sets = [[r] for r in rels]
    else:  # two relations that together mention all three objects
        fact_sets = [[p, q] for k, p in enumerate(rels) for q in rels[k + 1:]
                     if {p[0], p[1], q[0], q[1]} == set(range(n))]
        fact_sets += [[q, p] for p, q in fact_sets]
    tone = ("tone", scene.background.tone)
    out = []
    for fs in fact_sets:
        facts = tuple(("rel", objs[i].desc, r, objs[j].desc) for i, j, r in fs)
        for flags in ([False], [True]) if n == 2 else ([False, False], [False, True], [True, False], [True, True]):
            syn = int(rng.integers(6))

            def clauses(copula: bool) -> list[str]:
                mentioned: set[int] = set()
                return [_clause(objs, i, j, r, conv, mentioned, copula, syn + k)
                        for k, ((i, j, r), conv) in enumerate(zip(fs, flags))]

            c, c_is = clauses(False), clauses(True)
            if n == 2:
                out += [(c[0], facts), (c_is[0], facts), (f"there is {c[0]}", facts),
                        (f"an image of {c[0]}", facts), (f"a picture with {c[0]}", facts),
                        (f"{c[0]} on a {tone[1]} background", facts + (tone,))]
            else:
                out += [(f"{c[0]}, and {c[1]}", facts), (f"there is {c[0]} and {c[1]}", facts),
                        (f"{c_is[0]}, and {c_is[1]}", facts),
                        (f"{c[0]} and {c[1]} on a {tone[1]} background", facts + (tone,))]
    return out


def _turning(scene: Scene, mover: Obj) -> list[tuple[str, tuple]]:
    """A move that turns: the order of the two direction words is the order in time."""
    d1_key, d2_key = mover.path
    path = ("path", mover.desc, mover.path)
    tone = ("tone", scene.background.tone)
    a = noun_phrase(mover.desc)
    others = [o for o in scene.objects if o is not mover]
    out = []
    for k, d1 in enumerate(DIR_WORDS[d1_key]):
        d2 = DIR_WORDS[d2_key][k % len(DIR_WORDS[d2_key])]
        moves = [f"{a} moves {d1}, then {d2}", f"{a} moves {d1} and then {d2}",
                 f"{a} first moves {d1}, then {d2}", f"{a} goes {d1}, then {d2}"]
        if not others:
            out += [(m, (path,)) for m in moves]
            out += [(f"a video of {a} moving {d1}, then {d2}", (path,)),
                    (f"{moves[0]} on a {tone[1]} background", (path, tone))]
            continue
        b = noun_phrase(others[0].desc)
        still = ("still", others[0].desc)
        out += [(f"{m} while {b} stays still", (path, still)) for m in moves[:2]]
        out += [(f"{b} stays still while {moves[2]}", (path, still))]
    return out


def _video(scene: Scene) -> list[tuple[str, tuple]]:
    mover = next((o for o in scene.objects if o.path), None)
    if mover is None:
        return []
    if len(mover.path) == 2:
        return _turning(scene, mover)
    if mover.motion is None:
        return []
    move = ("move", mover.desc, mover.motion)
    tone = ("tone", scene.background.tone)
    a = noun_phrase(mover.desc)
    others = [o for o in scene.objects if o is not mover]
    out = []
    for d in DIR_WORDS[mover.motion]:
        if not others:
            out += [(f"{a} moves {d}", (move,)), (f"{a} is moving {d}", (move,)), (f"{a} slides {d}", (move,)),
                    (f"{a} goes {d}", (move,)), (f"a video of {a} moving {d}", (move,)),
                    (f"{a} moves {d} on a {tone[1]} background", (move, tone))]
            continue
        other = others[0]
        b = noun_phrase(other.desc)
        still = ("still", other.desc)
        out += [(f"{a} moves {d} while {b} stays still", (move, still)),
                (f"{b} stays still while {a} moves {d}", (move, still)),
                (f"a video of {a} moving {d} and {b} not moving", (move, still)),
                (f"{a} moves {d} and {b} does not move", (move, still))]
        for rel_kind, text in (("towards", f"{a} moves {d} towards {b}"), ("away", f"{a} moves {d}, away from {b}")):
            fact = (rel_kind, mover.desc, other.desc)
            if fact_holds(fact, scene):
                out.append((text, (move, fact)))
    return out


def candidate_captions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, tuple]]:
    """Every (text, facts) paraphrase this scene supports."""
    if scene.is_video:
        cands = _video(scene)
    elif len(scene.objects) == 1:
        cands = _single(scene)
    else:
        cands = _multi(scene, rng)
    cache: dict = {}
    for text, facts in cands:
        if not caption_holds(facts, scene, cache):
            raise RuntimeError(f"caption generator produced a false caption: {text!r}")
    return cands


def make_captions(scene: Scene, n: int, rng: np.random.Generator, partner: Scene | None = None) -> list[str] | None:
    """``n`` captions for ``scene`` (distinct while the templates allow, then cycling),
    none of which is also true of ``partner``; None if the scene has no such caption."""
    seen: set[str] = set()
    texts: list[str] = []
    cache: dict = {}
    for text, facts in candidate_captions(scene, rng):
        if text in seen or (partner is not None and caption_holds(facts, partner, cache)):
            continue
        seen.add(text)
        texts.append(text)
    if not texts:
        return None
    order = rng.permutation(len(texts))
    return [texts[order[k % len(texts)]] for k in range(n)]
