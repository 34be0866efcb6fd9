"""Artifact I/O shared by ``embed``, ``index``, ``eval``, ``train`` and ``serve``: every
format under an embeddings directory ``<emb>`` (local path or ``s3://``) defined once.

* :mod:`thinkfast.store.layout`: sub-directory names (``fast/``, ``tokens/``,
  ``rejected/``, ``texts/``), the typed ``manifest.json`` (:class:`EmbedManifest`) and the
  helpers that find files;
* :mod:`thinkfast.store.embeddings`: ``<emb>/fast/*.parquet`` (key, embedding) reader/writer;
* :mod:`thinkfast.store.tokens`: ``<emb>/tokens/``, the slow-token store
  (:class:`TokenStoreWriter` per worker, :func:`finalize_token_store` on the driver,
  :class:`TokenStore` to read K keys at once);
* :mod:`thinkfast.store.stream`: the Arrow tables that carry rows through embed's Ray
  stream (decoded pixels, model outputs, captions) and their split for the sink;
* :mod:`thinkfast.store.outputs`: what one embed write bundle puts under ``<emb>``, and
  clearing a previous run.

The names below are the public surface; the submodules' other names are for
``pipelines/embed``.
"""

from __future__ import annotations

from thinkfast.store.embeddings import (
    check_embedding_schema,
    embedding_dim,
    embedding_matrix,
    embeddings_schema,
    embeddings_table,
    iter_embeddings,
    keys_digest,
    read_embeddings,
    write_embeddings,
)
from thinkfast.store.errors import EmbedManifestError, MissingEmbedManifestError, StoreError, UnknownKeyError
from thinkfast.store.layout import (
    EMBED_FORMAT,
    EMBED_MANIFEST,
    EMBED_OUTPUT_DIRS,
    FAILED_EMBED_MANIFEST,
    FAST_DIR,
    REJECTED_DIR,
    TEXTS_DIR,
    TOKENS_DIR,
    EmbedCounts,
    EmbedManifest,
    EmbedOutputs,
    FastModelRecord,
    SlowModelRecord,
    embed_manifest_uri,
    fast_dir,
    find_embed_manifest,
    list_parquet_files,
    read_embed_manifest,
    rejected_dir,
    resolve_artifact_dir,
    texts_dir,
    token_manifest_uri,
    tokens_dir,
    write_embed_manifest,
)
from thinkfast.store.tokens import (
    MAX_OPEN_SHARDS,
    TOKEN_DTYPE,
    TOKEN_FORMAT,
    TOKEN_FORMATS,
    TOKEN_KEY_TABLE,
    TOKEN_MANIFEST,
    TokenShape,
    TokenStore,
    TokenStoreWriter,
    finalize_token_store,
)

__all__ = [
    "EMBED_FORMAT", "EMBED_MANIFEST", "EMBED_OUTPUT_DIRS", "FAILED_EMBED_MANIFEST", "FAST_DIR",
    "MAX_OPEN_SHARDS", "REJECTED_DIR", "TEXTS_DIR", "TOKENS_DIR", "TOKEN_DTYPE", "TOKEN_FORMAT", "TOKEN_FORMATS",
    "TOKEN_KEY_TABLE", "TOKEN_MANIFEST",
    "EmbedCounts", "EmbedManifest", "EmbedManifestError", "EmbedOutputs", "FastModelRecord",
    "MissingEmbedManifestError", "SlowModelRecord", "StoreError", "TokenShape", "TokenStore",
    "TokenStoreWriter", "UnknownKeyError",
    "check_embedding_schema", "embed_manifest_uri", "embedding_dim", "embedding_matrix",
    "embeddings_schema", "embeddings_table", "fast_dir", "finalize_token_store", "find_embed_manifest",
    "iter_embeddings", "keys_digest", "list_parquet_files", "read_embed_manifest", "read_embeddings",
    "rejected_dir", "resolve_artifact_dir", "texts_dir", "token_manifest_uri", "tokens_dir",
    "write_embed_manifest", "write_embeddings",
]
