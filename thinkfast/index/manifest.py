"""The index directory's ``manifest.json``: what was built, from what, and how to read it.

The manifest is the one source of truth about an index directory: dimension, metric,
factory string, the identity of the fast model whose embeddings it holds, and one record
per shard (file names, vector counts, byte sizes used to detect truncated files). It is
rewritten after every build, ``add`` and ``remove`` so that it always matches the files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from thinkfast.errors import IndexMismatchError
from thinkfast.utils import fs

MANIFEST_NAME = "manifest.json"
TRAINED_NAME = "trained.faiss"
INDEX_FORMAT = "thinkfast-faiss-index"
INDEX_VERSION = 1
METRIC_IP = "inner_product"


@dataclass(frozen=True)
class ShardRecord:
    """One shard: ``<name>.faiss`` + ``<name>.keys.parquet`` (+ ``<name>.vectors.f32``)."""

    name: str  # file stem, e.g. "shard-00003"
    total: int  # vectors in the FAISS file (row i of the key table is FAISS id i)
    removed: int  # of those, how many are tombstoned by remove()
    index_bytes: int  # size of <name>.faiss, checked on load to catch truncated copies
    vectors_bytes: int  # size of <name>.vectors.f32 (0 when vectors are not stored)

    @property
    def count(self) -> int:
        """Live (searchable) vectors."""
        return self.total - self.removed

    @property
    def index_file(self) -> str:
        return self.name + ".faiss"

    @property
    def keys_file(self) -> str:
        return self.name + ".keys.parquet"

    @property
    def vectors_file(self) -> str:
        return self.name + ".vectors.f32"


@dataclass(frozen=True)
class IndexManifest:
    """Everything a reader needs to trust and search an index directory."""

    dim: int  # vector dimension d
    factory: str  # faiss.index_factory string every shard was built with
    metric: str = METRIC_IP  # only inner product on L2-normalised vectors is supported
    normalize: bool = True  # vectors and queries are L2-normalised before FAISS sees them
    model_identity: str | None = None  # FastModel.identity that produced the embeddings
    shards: tuple[ShardRecord, ...] = ()  # in global-id order
    search_defaults: dict[str, Any] = field(default_factory=dict)  # nprobe / efSearch / rescore tuned at build
    train_count: int = 0  # vectors the quantizers were trained on
    timings: dict[str, float] = field(default_factory=dict)  # build stage seconds (StageTimer)
    build_id: str = ""  # new per build: shard files are immutable within one build (cache key)
    quantizer: dict[str, Any] = field(default_factory=dict)  # drift statistics (thinkfast.index.drift); {} if no IVF
    last_change: dict[str, Any] = field(default_factory=dict)  # what the last append / remove did (counts, drift)
    format: str = INDEX_FORMAT
    version: int = INDEX_VERSION

    @property
    def count(self) -> int:
        """Live vectors over all shards."""
        return sum(s.count for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def stores_vectors(self) -> bool:
        return bool(self.shards) and all(s.vectors_bytes > 0 for s in self.shards)

    def next_shard_name(self) -> str:
        """A name no shard has used; ``add`` appends shards with it."""
        used = {s.name for s in self.shards}
        i = len(self.shards)
        while f"shard-{i:05d}" in used:
            i += 1
        return f"shard-{i:05d}"

    def replace(self, **changes: Any) -> "IndexManifest":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["count"] = self.count
        out["shards"] = [{**dataclasses.asdict(s), "count": s.count} for s in self.shards]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "manifest") -> "IndexManifest":
        if data.get("format") != INDEX_FORMAT:
            raise IndexMismatchError(f"{source} is not a thinkfast index manifest (format={data.get('format')!r})")
        if int(data.get("version", 0)) > INDEX_VERSION:
            raise IndexMismatchError(f"{source}: index version {data['version']} is newer than this thinkfast")
        try:
            shards = tuple(
                ShardRecord(
                    name=str(s["name"]),
                    total=int(s["total"]),
                    removed=int(s["removed"]),
                    index_bytes=int(s["index_bytes"]),
                    vectors_bytes=int(s["vectors_bytes"]),
                )
                for s in data["shards"]
            )
            manifest = cls(
                dim=int(data["dim"]),
                factory=str(data["factory"]),
                metric=str(data["metric"]),
                normalize=bool(data["normalize"]),
                model_identity=data.get("model_identity"),
                shards=shards,
                search_defaults=dict(data.get("search_defaults") or {}),
                train_count=int(data.get("train_count", 0)),
                timings=dict(data.get("timings") or {}),
                build_id=str(data.get("build_id", "")),
                quantizer=dict(data.get("quantizer") or {}),
                last_change=dict(data.get("last_change") or {}),
                format=INDEX_FORMAT,
                version=int(data["version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexMismatchError(f"{source} is incomplete or malformed ({exc!r})") from exc
        if manifest.metric != METRIC_IP:
            raise IndexMismatchError(f"{source}: metric {manifest.metric!r} is not supported")
        return manifest


def read_manifest(uri: str, s3_endpoint: str | None = None) -> IndexManifest:
    """The manifest of index directory ``uri``, validated."""
    path = fs.join(uri, MANIFEST_NAME)
    if not fs.exists(path, s3_endpoint):
        raise IndexMismatchError(f"no index at {uri} (missing {MANIFEST_NAME})")
    try:
        data = fs.read_json(path, s3_endpoint)
    except json.JSONDecodeError as exc:
        raise IndexMismatchError(f"{path} is not valid JSON ({exc})") from exc
    return IndexManifest.from_json(data, source=path)


def write_manifest(uri: str, manifest: IndexManifest, s3_endpoint: str | None = None) -> None:
    """Write the manifest last, atomically (temp file + rename locally; a single PUT on S3)."""
    path = fs.join(uri, MANIFEST_NAME)
    if fs.is_s3(uri):
        fs.write_json(path, manifest.to_json(), s3_endpoint)
        return
    local = fs.strip_scheme(path)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=True)
    os.replace(tmp, local)
