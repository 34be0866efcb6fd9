"""The embeddings directory ``<emb>`` that ``embed`` writes and index, eval, train and
serve read, defined once: sub-directory names, the ``manifest.json`` record, and the
helpers that find the files.

    <emb>/manifest.json   EmbedManifest: counts, model identities, dims, frames, timings (written last)
    <emb>/fast/           fast embeddings, Parquet (key, embedding)       -> thinkfast.store.embeddings
    <emb>/tokens/         slow visual tokens, a TokenStore                -> thinkfast.store.tokens
    <emb>/rejected/       rows that did not make it (REJECT_SCHEMA)       -> thinkfast.data.decode
    <emb>/texts/          g(y) per caption (key, caption_index, caption, embedding)

A directory without ``manifest.json`` is an unfinished run (or plain Parquet that some
other tool wrote); readers that only need the vectors accept both.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from thinkfast.store.errors import EmbedManifestError, MissingEmbedManifestError, StoreError
from thinkfast.utils import fs

logger = logging.getLogger(__name__)

FAST_DIR = "fast"
TOKENS_DIR = "tokens"
TEXTS_DIR = "texts"
REJECTED_DIR = "rejected"
EMBED_MANIFEST = "manifest.json"
# written instead of manifest.json when embed's counts do not add up (cleared by the next run)
FAILED_EMBED_MANIFEST = "failed_manifest.json"
# every directory an embed run owns (and a re-run replaces)
EMBED_OUTPUT_DIRS = (FAST_DIR, TOKENS_DIR, REJECTED_DIR, TEXTS_DIR)
# key -> content digest of every embedded key (what ``embed --incremental`` compares), and
# the keys removed from the corpus (``index --remove-keys --embeddings``): files, replaced whole
DIGESTS_FILE = "digests.parquet"
REMOVED_FILE = "removed.parquet"
# an incremental run in progress: the previous manifest, kept while manifest.json is absent
INCREMENTAL_MARKER = "incremental_in_progress.json"
EMBED_OUTPUT_FILES = (DIGESTS_FILE, REMOVED_FILE, INCREMENTAL_MARKER)
EMBED_FORMAT = "thinkfast-embeddings"
EMBED_VERSION = 1


# --------------------------------------------------------------------------- paths


def fast_dir(uri: str) -> str:
    """``<emb>/fast``: the fast-embedding Parquet files."""
    return fs.join(uri, FAST_DIR)


def tokens_dir(uri: str) -> str:
    """``<emb>/tokens``: the slow-token store."""
    return fs.join(uri, TOKENS_DIR)


def rejected_dir(uri: str) -> str:
    """``<emb>/rejected``: one row per input row that was not embedded."""
    return fs.join(uri, REJECTED_DIR)


def texts_dir(uri: str) -> str:
    """``<emb>/texts``: caption embeddings (``embed --texts``)."""
    return fs.join(uri, TEXTS_DIR)


def embed_manifest_uri(uri: str) -> str:
    """``<emb>/manifest.json``."""
    return fs.join(uri, EMBED_MANIFEST)


def token_manifest_uri(uri: str) -> str:
    """``<emb>/tokens/manifest.json``: present once the token store is finalized."""
    from thinkfast.store.tokens import TOKEN_MANIFEST

    return fs.join(tokens_dir(uri), TOKEN_MANIFEST)


def resolve_artifact_dir(uri: str, sub: str, s3_endpoint: str | None) -> str:
    """``<emb>`` or ``<emb>/<sub>`` both name the artifact: prefer the sub-directory if present."""
    candidate = fs.join(uri, sub)
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    if filesystem.isdir(fs.strip_scheme(candidate)):
        return candidate
    return str(uri)


def _with_scheme(uri: str, path: str) -> str:
    return "s3://" + path if fs.is_s3(uri) else path


def list_parquet_files(uri: str, s3_endpoint: str | None = None) -> list[str]:
    """Sorted ``.parquet`` files under ``uri`` (a file or a directory, recursively)."""
    filesystem = fs.fsspec_fs(uri, s3_endpoint)
    path = fs.strip_scheme(uri)
    if not filesystem.exists(path):
        raise StoreError(f"no such file or directory: {uri}")
    if filesystem.isfile(path):
        return [str(uri)]
    found = sorted(p for p in filesystem.find(path) if p.endswith(".parquet"))
    if not found:
        raise StoreError(f"no .parquet files under {uri}")
    return [_with_scheme(uri, p) for p in found]


# --------------------------------------------------------------------------- manifest records


@dataclass(frozen=True)
class FastModelRecord:
    """The fast model an embed run used: where from, its identity, its embedding width d."""

    uri: str
    identity: str
    dim: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FastModelRecord":
        return cls(uri=str(data["uri"]), identity=str(data["identity"]), dim=int(data["dim"]))


@dataclass(frozen=True)
class SlowModelRecord:
    """The slow model an embed run used, and its token shape (T tokens of width D)."""

    uri: str
    identity: str
    num_tokens: int
    dim: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SlowModelRecord":
        return cls(uri=str(data["uri"]), identity=str(data["identity"]),
                   num_tokens=int(data["num_tokens"]), dim=int(data["dim"]))


@dataclass(frozen=True)
class EmbedOutputs:
    """Which sub-directories the run wrote (their names relative to ``<emb>``; None = not written)."""

    fast: str | None = None
    tokens: str | None = None
    rejected: str | None = None
    texts: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EmbedOutputs":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class EmbedCounts:
    """Rows in and out. The media counts are None on a texts-only run, the caption counts
    None without ``--texts``; absent counts are left out of the JSON, as before."""

    rows_in: int  # JSON "in": input rows considered (after --limit)
    embedded: int | None = None  # rows in fast/ (and tokens/)
    rejected: int | None = None  # rows in rejected/
    rejected_by_reason: dict[str, int] | None = None  # "stage:reason" -> rows
    texts: int | None = None  # caption rows in texts/
    texts_skipped_blank: int | None = None  # null or blank captions not embedded
    skipped: int | None = None  # --incremental: rows whose key is already embedded (or was removed)

    def adds_up(self) -> bool:
        """Every input row is embedded, rejected or skipped exactly once (trivially so without media)."""
        if self.embedded is None:
            return True
        return self.embedded + (self.rejected or 0) + (self.skipped or 0) == self.rows_in

    def problem(self, duplicates_dropped: int = 0) -> str | None:
        """Why these counts make the run unusable (None: they are fine). A key kept once
        from several token shards means the corpus repeats keys; keys must be unique."""
        if duplicates_dropped:
            return f"{duplicates_dropped} key(s) occur more than once in the corpus; keys must be unique"
        if not self.adds_up():
            return (f"counts do not add up: {self.rows_in} in, {self.embedded} embedded, "
                    f"{self.rejected} rejected, {self.skipped or 0} skipped")
        return None

    @classmethod
    def from_streams(cls, rows_in: int, media: Mapping[str, Any] | None = None,
                     texts: Mapping[str, Any] | None = None) -> "EmbedCounts":
        """Counts from the summed per-bundle counts of the media and caption sinks (see
        :func:`thinkfast.store.outputs.write_media_bundle`); None = that stream did not run."""
        out = cls(rows_in=int(rows_in))
        if media is not None:
            by_reason = sorted((k.split(":", 1)[1], int(v)) for k, v in media.items() if k.startswith("rejected:"))
            out = dataclasses.replace(out, embedded=int(media.get("embedded", 0)),
                                      rejected=int(media.get("rejected", 0)), rejected_by_reason=dict(by_reason))
        if texts is not None:
            out = dataclasses.replace(out, texts=int(texts.get("texts", 0)),
                                      texts_skipped_blank=int(texts.get("texts_skipped_blank", 0)))
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"in": self.rows_in}
        for f in dataclasses.fields(self)[1:]:
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "EmbedCounts":
        def opt(name: str) -> int | None:
            return None if data.get(name) is None else int(data[name])

        by_reason = data.get("rejected_by_reason")
        return cls(
            rows_in=int(data["in"]),
            embedded=opt("embedded"),
            rejected=opt("rejected"),
            rejected_by_reason=None if by_reason is None else {str(k): int(v) for k, v in by_reason.items()},
            texts=opt("texts"),
            texts_skipped_blank=opt("texts_skipped_blank"),
            skipped=opt("skipped"),
        )


def now_iso() -> str:
    """UTC now, to the second: the manifest's ``created``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class EmbedManifest:
    """``<emb>/manifest.json``: what was read, with which models, what came out, how long it took.

    Readers use it for the fast model identity (index compatibility), ``num_frames``
    (evaluation decodes videos like embed did) and the counts; ``to_json`` is the file."""

    corpus: str  # the corpus URI embed read
    corpus_files: int  # Parquet files in it
    image_size: int  # input side S of both models
    counts: EmbedCounts
    fast: FastModelRecord | None = None  # JSON models.fast
    slow: SlowModelRecord | None = None  # JSON models.slow
    outputs: EmbedOutputs = field(default_factory=EmbedOutputs)
    media_column: str | None = None  # corpus media column embedded (None: texts-only run)
    num_frames: int | None = None  # frames sampled per video (None: an image-only corpus)
    config: dict[str, Any] = field(default_factory=dict)  # the EmbedConfig used, minus the S3 endpoint
    created: str = field(default_factory=now_iso)
    replaced_previous: tuple[str, ...] = ()  # previous outputs this run deleted first
    media_steady_rows_per_s: float | None = None  # media throughput once the stream flowed
    timings_s: dict[str, float] = field(default_factory=dict)  # StageTimer stages
    error: str | None = None  # only in failed_manifest.json: why the run was refused
    incremental: dict[str, Any] | None = None  # --incremental: what was skipped / changed, and the totals
    format: str = EMBED_FORMAT
    version: int = EMBED_VERSION

    @property
    def fast_identity(self) -> str | None:
        return self.fast.identity if self.fast is not None else None

    def replace(self, **changes: Any) -> "EmbedManifest":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "version": self.version,
            "created": self.created,
            "corpus": self.corpus,
            "corpus_files": self.corpus_files,
            "media_column": self.media_column,
            "image_size": self.image_size,
            "num_frames": self.num_frames,
            "models": {
                "fast": self.fast.to_json() if self.fast is not None else None,
                "slow": self.slow.to_json() if self.slow is not None else None,
            },
            "outputs": self.outputs.to_json(),
            "counts": self.counts.to_json(),
            "config": dict(self.config),
            "replaced_previous": list(self.replaced_previous),
            "media_steady_rows_per_s": self.media_steady_rows_per_s,
            "timings_s": dict(self.timings_s),
        }
        if self.error is not None:
            out["error"] = self.error
        if self.incremental is not None:
            out["incremental"] = dict(self.incremental)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "embed manifest") -> "EmbedManifest":
        if not isinstance(data, dict) or data.get("format") != EMBED_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise EmbedManifestError(f"{source} is not a thinkfast embed manifest (format={got!r})")
        if int(data.get("version", 0)) > EMBED_VERSION:
            raise EmbedManifestError(f"{source}: embed manifest version {data['version']} is newer than this thinkfast")
        try:
            models = data.get("models") or {}
            frames = data.get("num_frames")
            steady = data.get("media_steady_rows_per_s")
            return cls(
                corpus=str(data["corpus"]),
                corpus_files=int(data["corpus_files"]),
                image_size=int(data["image_size"]),
                counts=EmbedCounts.from_json(data["counts"]),
                fast=FastModelRecord.from_json(models["fast"]) if models.get("fast") else None,
                slow=SlowModelRecord.from_json(models["slow"]) if models.get("slow") else None,
                outputs=EmbedOutputs.from_json(data.get("outputs") or {}),
                media_column=data.get("media_column"),
                num_frames=None if frames is None else int(frames),
                config=dict(data.get("config") or {}),
                created=str(data.get("created", "")),
                replaced_previous=tuple(str(x) for x in data.get("replaced_previous") or ()),
                media_steady_rows_per_s=None if steady is None else float(steady),
                timings_s={str(k): float(v) for k, v in (data.get("timings_s") or {}).items()},
                error=data.get("error"),
                incremental=dict(data["incremental"]) if data.get("incremental") else None,
                format=EMBED_FORMAT,
                version=int(data.get("version", EMBED_VERSION)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EmbedManifestError(f"{source} is incomplete or malformed ({exc!r})") from exc


def read_embed_manifest(uri: str, s3_endpoint: str | None = None) -> EmbedManifest:
    """The manifest of embeddings directory ``uri``, validated.

    Raises :class:`MissingEmbedManifestError` when there is none (not an embed output, or
    an unfinished run) and :class:`EmbedManifestError` when it is not a valid one."""
    path = embed_manifest_uri(uri)
    if not fs.exists(path, s3_endpoint):
        raise MissingEmbedManifestError(
            f"no embed manifest at {path}: not a thinkfast embed output, or the run did not finish"
        )
    try:
        data = fs.read_json(path, s3_endpoint)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmbedManifestError(f"{path} is not valid JSON ({exc})") from exc
    return EmbedManifest.from_json(data, source=path)


def find_embed_manifest(uri: str, s3_endpoint: str | None = None) -> EmbedManifest | None:
    """:func:`read_embed_manifest`, or None where ``uri`` has no manifest (plain Parquet
    embeddings); an invalid manifest still raises."""
    try:
        return read_embed_manifest(uri, s3_endpoint)
    except MissingEmbedManifestError:
        return None


def write_embed_manifest(uri: str, manifest: EmbedManifest, s3_endpoint: str | None = None,
                         *, name: str = EMBED_MANIFEST) -> str:
    """Write ``manifest`` as ``<uri>/manifest.json`` (``name=FAILED_EMBED_MANIFEST`` for a
    refused run); returns its URI. Embed writes it last: its presence marks a finished run."""
    path = fs.join(uri, name)
    fs.write_json(path, manifest.to_json(), s3_endpoint)
    logger.debug("wrote %s", path)
    return path
