"""Per-call FAISS search parameters (nprobe, efSearch, tombstone filter).

FAISS has two ways to set ``nprobe``: mutate the index (``ParameterSpace``), which races
when several threads search one index with different settings, or pass a
``SearchParameters`` object per call. We build the per-call object, nested the way the
index is nested (pre-transform -> IVF -> HNSW quantizer), and put the ID selector that
hides removed vectors at the level that owns the ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss

from thinkfast.errors import IndexMismatchError


@dataclass(frozen=True)
class SearchSettings:
    """Knobs of one search call; ``None`` means the index's tuned default."""

    nprobe: int | None = None  # IVF: inverted lists visited per query
    efSearch: int | None = None  # HNSW (or the IVF's HNSW quantizer): candidate list size


def index_kind(index: faiss.Index) -> str:
    """``ivf``, ``hnsw``, or ``flat`` (anything else searched exhaustively: Flat, PQ, SQ)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    return "flat"


def ivf_nlist(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    return int(ivf.nlist) if ivf is not None else 0


def has_hnsw_quantizer(index: faiss.Index) -> bool:
    ivf = faiss.try_extract_index_ivf(index)
    return ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)


def make_search_params(
    index: faiss.Index, settings: SearchSettings, selector: faiss.IDSelector | None = None, k: int = 1
) -> tuple[faiss.SearchParameters | None, list[Any]]:
    """Parameters for ``index.search(..., params=)`` and the objects they reference.

    HNSW's candidate list is raised to at least ``k``: a shorter one cannot return k
    results. SWIG does not keep nested parameter objects alive, so the caller must hold
    the returned list until the search returns."""
    keep: list[Any] = []
    if selector is not None:
        keep.append(selector)
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexPreTransform) else outer
    kind = index_kind(index)
    params: faiss.SearchParameters | None
    if kind == "ivf":
        params = faiss.SearchParametersIVF()
        if settings.nprobe is not None:
            params.nprobe = int(min(max(1, settings.nprobe), inner.nlist))
        else:
            params.nprobe = int(inner.nprobe)
        if has_hnsw_quantizer(inner):
            qp = faiss.SearchParametersHNSW()
            # the quantizer must return nprobe lists: its candidate list must be at least that long
            qp.efSearch = int(max(settings.efSearch or 0, params.nprobe, 16))
            keep.append(qp)
            params.quantizer_params = qp
    elif kind == "hnsw":
        params = faiss.SearchParametersHNSW()
        ef = settings.efSearch if settings.efSearch is not None else inner.hnsw.efSearch
        params.efSearch = int(max(ef, k))
    elif selector is not None:
        params = faiss.SearchParameters()
    else:
        params = None
    if params is not None and selector is not None:
        params.sel = selector
    if params is not None and inner is not outer:
        wrapper = faiss.SearchParametersPreTransform()
        wrapper.index_params = params
        keep.append(params)
        params = wrapper
    return params, keep


def search_with(
    index: faiss.Index, queries: Any, k: int, settings: SearchSettings, selector: faiss.IDSelector | None = None
) -> tuple[Any, Any]:
    """``index.search`` with per-call settings; FAISS refusals become IndexMismatchError."""
    params, keep = make_search_params(index, settings, selector, k)
    try:
        if params is None:
            return index.search(queries, k)
        return index.search(queries, k, params=params)
    except RuntimeError as exc:
        raise IndexMismatchError(f"FAISS refused the search on this index type: {exc}") from exc
    finally:
        del keep
