"""Precision@k on the generated corpus: are the top results *right*?

R@K counts only the one image a caption was written for. A user typing "a small green
triangle" judges whether every image shown is a small green triangle. The generated
corpus stores each scene (``scene`` JSON column), so this is measurable exactly: a query
from a small grammar is parsed into constraints, and a result is correct when its scene
satisfies all of them.

The grammar is that of the generated captions, with the size optional::

    single:    [there is | an image of | a picture with] [a|an|the] [SIZE] COLOUR SHAPE
    two:       NP and NP
    relation:  NP [is] REL NP        (REL: "to the left of", "above", "under", ...)

A relation holds by the same geometry the captions were generated with
(``thinkfast.data.synth_geometry.relation``), so precision and captions never disagree.
Queries are a fixed, seeded set of each kind, kept only when the gallery holds at least
``min_relevant`` correct items, so precision@5 can reach 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from thinkfast.data.synth_caption import REL_WORDS
from thinkfast.data.synth_geometry import relation
from thinkfast.data.synth_scene import COLOURS, SHAPES, SIZES

ObjSpec = tuple  # (size or None, colour, shape)
KINDS = ("single", "two", "relation")
_ARTICLES = ("a", "an", "the")
# every relation phrase, longest first so "to the left of" wins over "left of"
_REL_PHRASES = sorted(((tuple(p.split()), rel) for rel, ps in REL_WORDS.items() for p in ps),
                      key=lambda x: -len(x[0]))


@dataclass(frozen=True)
class Constraints:
    """What a query asks of a scene."""

    kind: str  # "single" | "two" | "relation"
    objects: tuple[ObjSpec, ...]  # one or two object descriptions
    relation: str | None = None  # objects[0] REL objects[1], in caption words ("left of", "above", ...)


def _noun_phrase(words: list[str], i: int) -> tuple[ObjSpec, int] | None:
    if i < len(words) and words[i] in _ARTICLES:
        i += 1
    size = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i + 1 < len(words) and words[i] in COLOURS and words[i + 1] in SHAPES:
        return (size, words[i], words[i + 1]), i + 2
    return None


# lead-ins the captions (and people) put before the description; they constrain nothing
_LEAD_INS = (("there", "is"), ("an", "image", "of"), ("a", "picture", "with"), ("a", "photo", "of"),
             ("a", "picture", "of"))


def parse_query(text: str) -> Constraints | None:
    """The query's constraints, or ``None`` when it is outside the grammar (no precision then)."""
    words = text.lower().replace(",", " ").strip().rstrip(".").split()
    for lead in _LEAD_INS:
        if tuple(words[:len(lead)]) == lead and len(words) > len(lead):
            words = words[len(lead):]
            break
    first = _noun_phrase(words, 0)
    if first is None:
        return None
    a, i = first
    if i == len(words):
        return Constraints("single", (a,))
    if words[i] == "and":
        second = _noun_phrase(words, i + 1)
        if second is not None and second[1] == len(words):
            return Constraints("two", (a, second[0]))
        return None
    if words[i] == "is":
        i += 1
    for phrase, rel in _REL_PHRASES:
        if tuple(words[i:i + len(phrase)]) == phrase:
            second = _noun_phrase(words, i + len(phrase))
            if second is not None and second[1] == len(words):
                return Constraints("relation", (a, second[0]), rel)
    return None


def _matches(obj: dict[str, Any], spec: ObjSpec) -> bool:
    size, colour, shape = spec
    return (size is None or obj["size"] == size) and obj["colour"] == colour and obj["shape"] == shape


def satisfies(constraints: Constraints, scene: dict[str, Any]) -> bool:
    """Whether a stored scene (the corpus ``scene`` JSON, parsed) satisfies every constraint."""
    objs = scene.get("objects") or []
    specs = constraints.objects
    if constraints.kind == "single":
        return any(_matches(o, specs[0]) for o in objs)
    pairs = [(x, y) for ix, x in enumerate(objs) for iy, y in enumerate(objs)
             if ix != iy and _matches(x, specs[0]) and _matches(y, specs[1])]
    if constraints.kind == "two":
        return bool(pairs)
    return any(relation(tuple(x["centre"]), tuple(y["centre"])) == constraints.relation for x, y in pairs)


def _phrase(spec: ObjSpec) -> str:
    size, colour, shape = spec
    return " ".join(w for w in ("a", size, colour, shape) if w)


def query_set(scenes: Sequence[dict[str, Any]], min_relevant: int = 5, per_kind: int = 40,
              seed: int = 0) -> tuple[list[str], list[Constraints], np.ndarray]:
    """A fixed query set over the gallery: texts, their constraints and relevance ``(Q, N)`` bool.

    Single-object queries are every size-colour-shape, and colour-shape; two-object and relational ones are
    seeded samples of description pairs (relations in their first caption wording). Each
    kind keeps at most ``per_kind`` queries that have ``min_relevant`` correct items."""
    rng = np.random.default_rng(seed)
    descs = [(s, c, sh) for s in SIZES for c in COLOURS for sh in SHAPES]
    sizeless = [(None, c, sh) for c in COLOURS for sh in SHAPES]
    candidates: dict[str, list[str]] = {"single": [_phrase(d) for d in descs + sizeless], "two": [], "relation": []}
    for _ in range(per_kind * 50):
        a, b = (descs[i] for i in rng.choice(len(descs), size=2, replace=False))
        candidates["two"].append(f"{_phrase(a)} and {_phrase(b)}")
        rel = list(REL_WORDS)[int(rng.integers(len(REL_WORDS)))]
        candidates["relation"].append(f"{_phrase(a)} {REL_WORDS[rel][0]} {_phrase(b)}")
    texts: list[str] = []
    parsed: list[Constraints] = []
    rows: list[np.ndarray] = []
    for kind in KINDS:
        kept = 0
        for text in dict.fromkeys(candidates[kind]):  # unique, in order
            if kept == per_kind:
                break
            c = parse_query(text)
            assert c is not None and c.kind == kind, text
            relevant = np.fromiter((satisfies(c, s) for s in scenes), dtype=bool, count=len(scenes))
            if relevant.sum() >= min_relevant:
                texts.append(text)
                parsed.append(c)
                rows.append(relevant)
                kept += 1
    relevance = np.stack(rows) if rows else np.zeros((0, len(scenes)), dtype=bool)
    return texts, parsed, relevance


def precision_at_k(top: np.ndarray, relevance: np.ndarray, k: int = 5) -> np.ndarray:
    """Per query, the share of its first ``k`` results that are correct. ``top``: gallery
    indices ``(Q, >=k)`` best first (-1 = empty slot, counted as wrong)."""
    top = np.asarray(top)[:, :k]
    hit = np.zeros(top.shape, dtype=bool)
    valid = top >= 0
    rows = np.nonzero(valid)
    hit[rows] = relevance[rows[0], top[rows]]
    return hit.sum(axis=1) / float(k)


def summary(precision: np.ndarray, constraints: Sequence[Constraints], k: int = 5) -> dict[str, Any]:
    """``{"P@k": mean, "P@k_by_kind": {kind: mean}, "P@k_queries": {kind: count}}`` (percent)."""
    kinds = np.array([c.kind for c in constraints])
    by_kind = {kind: round(100.0 * float(precision[kinds == kind].mean()), 2) for kind in KINDS if (kinds == kind).any()}
    return {f"P@{k}": round(100.0 * float(precision.mean()), 2) if len(precision) else None,
            f"P@{k}_by_kind": by_kind,
            f"P@{k}_queries": {kind: int((kinds == kind).sum()) for kind in KINDS}}
