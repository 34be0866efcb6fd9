"""FAISS index: factory choice and shard building (``build``), the sharded reader and
searcher (``sharded.ShardedIndex``), the manifest, and per-call search parameters.

Nothing here imports Ray; the distributed build lives in ``pipelines/index.py``."""
