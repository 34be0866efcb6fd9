"""``thinkfast index --append``: add the keys of an embeddings directory that the index lacks.

A growing corpus is embedded incrementally into one embeddings directory, so an append
sees every key again: the ones already indexed are *skipped* (counted, not an error),
the new ones are added as new shards cloned from ``trained.faiss`` (no retraining). A key
already indexed whose vector differs from the stored one (the media changed and
``embed --reembed-changed`` re-embedded it) is *changed*: reported and left as it is,
unless ``replace_changed`` (``--replace-changed``), which tombstones the old vector and adds
the new one. Changes can only be seen when the index stores its raw vectors (the
default); without them, known keys are skipped unseen and the count says so.

The counts and the drift verdict (:mod:`thinkfast.index.drift`) go into the manifest's
``last_change``, so the index itself says what the last append did and whether a rebuild
is due.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from thinkfast.index.factory import prepare_vectors
from thinkfast.index.manifest import IndexManifest
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

CHANGED_ATOL = 1e-5  # a stored float32 vector and a re-read one agree to this (both normalised)


def stored_vectors(index: "ShardedIndex", keys: Sequence[str]) -> np.ndarray | None:  # noqa: F821
    """The stored normalised vectors (N, d) of live ``keys``; None when the index keeps none."""
    if not index.manifest.stores_vectors:
        return None
    with index._lock:  # the index's own position table: one lookup per key, no scan
        live = index._live_positions()
        shards = index._shards
        out = np.zeros((len(keys), index.dim), np.float32)
        for i, key in enumerate(keys):
            s, row = live[key]
            out[i] = shards[s].vectors[row]
    return out


def append_new_keys(embeddings: str, index_uri: str, shard_size: int | None = None,
                    s3_endpoint: str | None = None, *, replace_changed: bool = False) -> IndexManifest:
    """Add the keys of ``embeddings`` not yet in the index at ``index_uri`` as new shards
    of about ``shard_size`` vectors (default: the mean shard size); returns the manifest.
    The embeddings' fast model must be the index's (``IndexMismatchError`` otherwise)."""
    from thinkfast.index.build import identity_from_embeddings
    from thinkfast.index.sharded import ShardedIndex
    from thinkfast.store import read_embeddings

    fs.check_writable(index_uri, s3_endpoint)
    index = ShardedIndex.load(index_uri, s3_endpoint=s3_endpoint)
    index.check_compatible(model_identity=identity_from_embeddings(embeddings, s3_endpoint))
    keys, vectors = read_embeddings(embeddings, s3_endpoint)
    x = prepare_vectors(vectors, index.dim, normalize=index.manifest.normalize)
    known = [i for i, k in enumerate(keys) if k in index]
    new = [i for i, k in enumerate(keys) if k not in index]
    changed: list[int] = []
    old = stored_vectors(index, [keys[i] for i in known])
    if old is not None and known:
        differs = ~np.all(np.abs(old - x[known]) <= CHANGED_ATOL, axis=1)
        changed = [known[j] for j in np.nonzero(differs)[0].tolist()]
    replaced = 0
    if replace_changed and changed:
        # old vector out, new one in; a loaded service keeps its own copy until it reloads
        replaced = index.remove([keys[i] for i in changed])
        new = sorted(new + changed)
    size = shard_size or max(1, int(np.ceil(index.manifest.count / max(1, index.num_shards))))
    for start in range(0, len(new), size):
        rows = new[start : start + size]
        index.add([keys[i] for i in rows], x[rows])
    drift = index.drift()
    change = {
        "kind": "append",
        "source": str(embeddings),
        "input": len(keys),
        "added": len(new),
        "skipped": len(known) - replaced,
        "changed": len(changed),
        "changed_examples": [keys[i] for i in changed[:5]],
        "replaced": replaced,
        "compared_vectors": old is not None,
        "drift": drift.to_json(),
    }
    index.record_change(change)
    if changed and not replace_changed:
        logger.warning("%d indexed key(s) have a different vector in %s (e.g. %s); left as they are "
                       "(--replace-changed replaces them)", len(changed), embeddings, change["changed_examples"])
    if drift.rebuild_due:
        logger.warning("%s", drift.describe())
    logger.info("append to %s: %d added, %d skipped, %d changed, %d replaced", index_uri, len(new),
                change["skipped"], len(changed), replaced)
    return index.manifest


def describe_change(change: dict) -> str:
    """One line for the CLI from a manifest's ``last_change`` of an append."""
    parts = [f"added {change.get('added', 0)}", f"skipped {change.get('skipped', 0)} already indexed"]
    if change.get("changed"):
        verb = "replaced" if change.get("replaced") else "left as they are (--replace-changed replaces them)"
        parts.append(f"{change['changed']} with a changed vector {verb}, e.g. {change.get('changed_examples')}")
    elif not change.get("compared_vectors", True):
        parts.append("(no stored vectors: changed vectors cannot be detected)")
    return ", ".join(parts)
