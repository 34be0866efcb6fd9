"""One place that turns a URI (local path, ``file://`` or ``s3://``) into a filesystem.

S3 options come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...) or from an
explicit ``s3_endpoint`` argument (the CLI's ``--s3-endpoint``); never from code.
Secrets are never logged.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def strip_scheme(uri: str) -> str:
    """Path as the filesystem object wants it: ``bucket/key`` for S3, plain path locally."""
    uri = str(uri)
    if is_s3(uri):
        return uri.split("://", 1)[1]
    if uri.startswith("file://"):
        return urlparse(uri).path
    return uri


def s3_endpoint(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def fsspec_fs(uri: str, s3_endpoint_url: str | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (s3fs for S3, local otherwise)."""
    if is_s3(uri):
        endpoint = s3_endpoint(s3_endpoint_url)
        kwargs: dict[str, Any] = {}
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        return fsspec.filesystem("s3", **kwargs)
    return fsspec.filesystem("file")


def arrow_fs(uri: str, s3_endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the scheme-less path for ``uri``."""
    if is_s3(uri):
        endpoint = s3_endpoint(s3_endpoint_url)
        kwargs: dict[str, Any] = {}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or endpoint
            kwargs["scheme"] = parsed.scheme or "https"
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), strip_scheme(uri)
    return pafs.LocalFileSystem(), os.path.abspath(strip_scheme(uri))


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri) or "://" in uri:
        return uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
    return os.path.join(uri, *parts)


def exists(uri: str, s3_endpoint_url: str | None = None) -> bool:
    return fsspec_fs(uri, s3_endpoint_url).exists(strip_scheme(uri))


def makedirs(uri: str, s3_endpoint_url: str | None = None) -> None:
    if not is_s3(uri):
        os.makedirs(strip_scheme(uri), exist_ok=True)


def read_bytes(uri: str, s3_endpoint_url: str | None = None) -> bytes:
    fs = fsspec_fs(uri, s3_endpoint_url)
    with fs.open(strip_scheme(uri), "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, s3_endpoint_url: str | None = None) -> None:
    fs = fsspec_fs(uri, s3_endpoint_url)
    path = strip_scheme(uri)
    if not is_s3(uri):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_json(uri: str, s3_endpoint_url: str | None = None) -> Any:
    return json.loads(read_bytes(uri, s3_endpoint_url).decode("utf-8"))


def write_json(uri: str, obj: Any, s3_endpoint_url: str | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"), s3_endpoint_url)


def download_dir(uri: str, local_dir: str, s3_endpoint_url: str | None = None) -> str:
    """Copy a directory URI to ``local_dir`` (no-op for local paths: returns the path)."""
    if not is_s3(uri):
        return strip_scheme(uri)
    fs = fsspec_fs(uri, s3_endpoint_url)
    fs.get(strip_scheme(uri).rstrip("/") + "/", local_dir.rstrip("/") + "/", recursive=True)
    return local_dir


def upload_dir(local_dir: str, uri: str, s3_endpoint_url: str | None = None) -> None:
    """Copy a local directory's files to ``uri`` (local copy when ``uri`` is a path)."""
    fs = fsspec_fs(uri, s3_endpoint_url)
    dest = strip_scheme(uri).rstrip("/")
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            target = posixpath.join(dest, rel)
            if not is_s3(uri):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(src, target)
