"""Typed errors. Every user-facing failure is one of these, so the CLI can print one
clear line (``thinkfast: error: ...``) and exit non-zero instead of a traceback."""

from __future__ import annotations


class ThinkfastError(Exception):
    """Base of every error caused by bad input (paths, schemas, files, queries)."""


class CorpusSchemaError(ThinkfastError):
    """The corpus Parquet lacks a required column or has one of the wrong type."""


class DecodeError(ThinkfastError):
    """An image or video could not be decoded. ``reason`` is a short machine-readable tag
    (``empty``, ``corrupt``, ``truncated``, ``too_large``, ``unsupported``, ``no_frames``...)
    and ``detail`` a human sentence; both go to the ``rejected/`` output."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class CheckpointError(ThinkfastError):
    """A model directory is missing, incomplete or not a thinkfast checkpoint."""


class IndexMismatchError(ThinkfastError):
    """An index does not match what queries it (dimension, model identity) or is damaged."""


class StorageError(ThinkfastError):
    """A storage location (local directory or ``s3://`` URI) cannot be read or written:
    unreachable endpoint, missing bucket, denied access, a full disk. The message names
    the URI (never credentials) and the cause in one line."""
