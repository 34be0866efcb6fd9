"""FAISS index: factory choice and training (``factory``), the build from fast-embedding
Parquet (``build``), the directory's files (``files``) and manifest (``manifest``), one
loaded shard (``shard``), the sharded reader and searcher (``sharded.ShardedIndex``), and
per-call search parameters (``params``).

Nothing here imports Ray; ``pipelines/index.py`` only adds the Ray shard executor and the CLI."""
