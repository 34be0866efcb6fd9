"""One place that turns a URI (local path, ``file://`` or ``s3://``) into a filesystem.

S3 options come from the standard AWS environment variables (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``...) or from an
explicit ``s3_endpoint`` argument (the CLI's ``--s3-endpoint``); never from code.
Secrets are never logged.

Every S3 client made here has bounded patience, so an unreachable, slow or erroring endpoint
ends in a clear error instead of a hang or minutes of hidden retries:

* ``THINKFAST_S3_MAX_ATTEMPTS`` (default 3): attempts per request, first one included,
  with the AWS "standard" jittered exponential backoff between them (botocore for s3fs,
  ``AwsStandardS3RetryStrategy`` for pyarrow). s3fs's own outer retry loop is set to one
  pass so the two never multiply.
* ``THINKFAST_S3_CONNECT_TIMEOUT_S`` (default 5): TCP connect timeout per attempt.
* ``THINKFAST_S3_TIMEOUT_S`` (default 30): socket read / request timeout per attempt.

:func:`check_writable` and :func:`check_readable` are the pre-flights that entry points run
before any work, so a bad output location fails in seconds with one line
(:class:`~thinkfast.errors.StorageError`) rather than after the compute, inside Ray.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import posixpath
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs

from thinkfast.errors import StorageError

logger = logging.getLogger(__name__)

DEFAULT_S3_MAX_ATTEMPTS = 3
DEFAULT_S3_CONNECT_TIMEOUT_S = 5.0
DEFAULT_S3_TIMEOUT_S = 30.0


def _env_number(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise StorageError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def s3_max_attempts() -> int:
    """Attempts per S3 request (first included): ``THINKFAST_S3_MAX_ATTEMPTS``, default 3."""
    return int(_env_number("THINKFAST_S3_MAX_ATTEMPTS", DEFAULT_S3_MAX_ATTEMPTS, 1))


def s3_connect_timeout_s() -> float:
    """TCP connect timeout per attempt: ``THINKFAST_S3_CONNECT_TIMEOUT_S``, default 5 s."""
    return _env_number("THINKFAST_S3_CONNECT_TIMEOUT_S", DEFAULT_S3_CONNECT_TIMEOUT_S, 0.1)


def s3_timeout_s() -> float:
    """Socket read / request timeout per attempt: ``THINKFAST_S3_TIMEOUT_S``, default 30 s."""
    return _env_number("THINKFAST_S3_TIMEOUT_S", DEFAULT_S3_TIMEOUT_S, 0.1)


def botocore_config_kwargs() -> dict[str, Any]:
    """``botocore.config.Config`` arguments of every S3 client made here (s3fs and probes)."""
    return {
        "connect_timeout": s3_connect_timeout_s(),
        "read_timeout": s3_timeout_s(),
        # total_max_attempts counts the first request (botocore's max_attempts would not)
        "retries": {"total_max_attempts": s3_max_attempts(), "mode": "standard"},
    }


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


_resolve_endpoint = s3_endpoint  # for functions whose ``s3_endpoint`` parameter shadows it


def fsspec_fs(uri: str, s3_endpoint_url: str | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (s3fs for S3, local otherwise)."""
    if is_s3(uri):
        endpoint = s3_endpoint(s3_endpoint_url)
        kwargs: dict[str, Any] = {"config_kwargs": botocore_config_kwargs()}
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        filesystem = fsspec.filesystem("s3", **kwargs)
        # botocore already retried each request (bounded, with backoff); s3fs's own loop
        # around it would multiply the attempts and the wait
        filesystem.retries = 1
        return filesystem
    return fsspec.filesystem("file")


def arrow_fs(uri: str, s3_endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the scheme-less path for ``uri``."""
    if is_s3(uri):
        endpoint = s3_endpoint(s3_endpoint_url)
        kwargs: dict[str, Any] = {
            "connect_timeout": s3_connect_timeout_s(),
            "request_timeout": s3_timeout_s(),
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts()),
        }
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


# ---------------------------------------------------------------------------------------
# pre-flights and one-line causes

_PROBE_PREFIX = ".thinkfast-write-probe-"


def _safe_endpoint(endpoint: str | None) -> str:
    """The endpoint as it may be printed: without any ``user:password@`` part."""
    if not endpoint:
        return "the S3 endpoint"
    parsed = urlparse(endpoint)
    if parsed.username or parsed.password:
        netloc = parsed.hostname or ""
        if parsed.port:
            netloc += f":{parsed.port}"
        return "S3 endpoint " + parsed._replace(netloc=netloc).geturl()
    return "S3 endpoint " + endpoint


def _bucket_key(uri: str) -> tuple[str, str]:
    path = strip_scheme(uri)
    bucket, _, key = path.partition("/")
    return bucket, key.strip("/")


def _s3_client(endpoint: str | None):
    """A plain botocore S3 client with the same credentials, endpoint and patience as s3fs
    (the probes want exact error codes, which s3fs folds into ``OSError``)."""
    import botocore.config
    import botocore.session

    session = botocore.session.get_session()
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return session.create_client("s3", endpoint_url=endpoint, region_name=region,
                                 config=botocore.config.Config(**botocore_config_kwargs()))


def describe_storage_failure(exc: BaseException, endpoint: str | None = None) -> str | None:
    """A short human cause for a storage exception (botocore, s3fs, pyarrow, OS), or
    ``None`` when ``exc`` is not one. Never contains credentials."""
    where = _safe_endpoint(endpoint)
    name = type(exc).__name__
    text = str(exc)
    try:
        import botocore.exceptions as bce
    except ImportError:  # pragma: no cover - botocore is a dependency
        bce = None
    if bce is not None:
        if isinstance(exc, bce.NoCredentialsError):
            return "no AWS credentials found (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile or a role)"
        if isinstance(exc, (bce.ConnectTimeoutError,)):
            return f"cannot reach {where} (connect timed out after {s3_max_attempts()} attempts)"
        if isinstance(exc, bce.ReadTimeoutError):
            return f"{where} did not answer within {s3_timeout_s():g} s ({s3_max_attempts()} attempts)"
        if isinstance(exc, bce.EndpointConnectionError):
            detail = f"{text} {getattr(exc, 'kwargs', {}).get('error', '')} {exc.__context__ or ''}".lower()
            if "refused" in detail or "connect call failed" in detail:
                cause = "connection refused"
            elif "name or service not known" in detail or "nodename nor servname" in detail or "getaddrinfo" in detail:
                cause = "host name not found"
            else:
                cause = "connection failed"
            return f"cannot reach {where} ({cause})"
        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {}) if hasattr(exc, "response") else {}
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") if hasattr(exc, "response") else None
            return _client_error_cause(code, status, where)
        if isinstance(exc, bce.BotoCoreError):
            return f"S3 request to {where} failed ({name})"
    lowered = text.lower()
    # s3fs and pyarrow fold botocore/AWS SDK errors into OSError subclasses with messages
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "specified bucket does not exist" in lowered:
        return "the bucket does not exist"
    if isinstance(exc, PermissionError) or "accessdenied" in lowered or "access denied" in lowered or "forbidden" in lowered:
        return "access denied"
    if ("could not connect" in lowered or "connection refused" in lowered or "connect call failed" in lowered
            or "curlcode: 7" in lowered or "couldn't connect" in lowered):
        return f"cannot reach {where} (connection refused)"
    if "timed out" in lowered or "timeout" in lowered:
        return f"{where} timed out"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return "no space left on the device"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if exc.errno == errno.ENOENT:
            return f"no such file or directory: {exc.filename}" if exc.filename else "no such file or directory"
        if exc.errno in (errno.EROFS,):
            return "read-only file system"
        if exc.errno in (errno.EEXIST, errno.ENOTDIR):
            return "a file is in the way of the directory"
        first = text.strip().splitlines()[0] if text.strip() else name
        return f"{name}: {first[:300]}"
    return None


def _client_error_cause(code: str, status: int | None, where: str) -> str:
    if code in ("NoSuchBucket",):
        return "the bucket does not exist"
    if code in ("AccessDenied", "AllAccessDisabled", "AccountProblem") or status == 403 and not code.startswith("Invalid"):
        return "access denied"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return f"the S3 credentials were rejected ({code})"
    if status is not None and status >= 500:
        return f"{where} answered HTTP {status}{' ' + code if code else ''} after {s3_max_attempts()} attempts"
    return f"S3 answered {code or 'an error'}{f' (HTTP {status})' if status else ''}"


def check_writable(uri: str, s3_endpoint: str | None = None) -> None:
    """Prove that ``uri`` (a directory or prefix) accepts writes, before any work.

    S3: put then delete a tiny probe object under the prefix; locally: create the
    directory and a probe file in it. Bounded by the S3 attempt/timeout settings (about
    ``attempts * (connect + read timeout)`` plus the backoff, at most 1 + 2 + 4... s, at
    worst; a missing bucket or denied access fails at once, a refused connection after the
    retries, about 2 s with the defaults). Raises :class:`StorageError` with one
    line naming ``uri`` and the cause."""
    uri = str(uri)
    started = time.monotonic()
    if is_s3(uri):
        endpoint = _resolve_endpoint(s3_endpoint)
        bucket, prefix = _bucket_key(uri)
        if not bucket:
            raise StorageError(f"cannot write to {uri}: no bucket in the URI")
        key = posixpath.join(prefix, _PROBE_PREFIX + uuid.uuid4().hex) if prefix else _PROBE_PREFIX + uuid.uuid4().hex
        try:
            client = _s3_client(endpoint)
            client.put_object(Bucket=bucket, Key=key, Body=b"")
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - every cause becomes one line
            cause = describe_storage_failure(exc, endpoint) or f"{type(exc).__name__}: {exc}"
            if cause == "the bucket does not exist":
                cause = f"bucket {bucket!r} does not exist"
            logger.info("write probe of %s failed after %.1f s", uri, time.monotonic() - started, exc_info=True)
            raise StorageError(f"cannot write to {uri}: {cause}") from exc
        logger.info("write probe of %s ok (%.2f s)", uri, time.monotonic() - started)
        return
    path = os.path.abspath(strip_scheme(uri))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, _PROBE_PREFIX + uuid.uuid4().hex)
        with open(probe, "wb") as f:
            f.write(b"probe")
        os.remove(probe)
    except OSError as exc:
        cause = describe_storage_failure(exc) or str(exc)
        if isinstance(exc, PermissionError):
            cause = "permission denied"
        raise StorageError(f"cannot write to {uri}: {cause}") from exc


def check_readable(uri: str, s3_endpoint: str | None = None) -> None:
    """Prove that ``uri`` (a file, directory or prefix) exists and can be listed or read,
    before any work; same bounds as :func:`check_writable`. Raises :class:`StorageError`."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = _resolve_endpoint(s3_endpoint)
        bucket, prefix = _bucket_key(uri)
        if not bucket:
            raise StorageError(f"cannot read {uri}: no bucket in the URI")
        try:
            client = _s3_client(endpoint)
            listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001
            cause = describe_storage_failure(exc, endpoint) or f"{type(exc).__name__}: {exc}"
            if cause == "the bucket does not exist":
                cause = f"bucket {bucket!r} does not exist"
            raise StorageError(f"cannot read {uri}: {cause}") from exc
        if not listed.get("KeyCount") and not listed.get("Contents"):
            raise StorageError(f"cannot read {uri}: nothing there")
        return
    path = os.path.abspath(strip_scheme(uri))
    if not os.path.exists(path):
        raise StorageError(f"cannot read {uri}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise StorageError(f"cannot read {uri}: permission denied")


# Ray Data retries reads and writes whose pyarrow error text matches
# ``DataContext.retried_io_errors`` itself, up to 10 times with backoff up to 32 s, on top
# of the client's own retries: a write to a refused port took 181 s to fail (measured,
# Ray 2.60). Throttling deserves that patience; an endpoint that is down or answers 5xx
# does not, and the client's bounded retries (THINKFAST_S3_MAX_ATTEMPTS) covered it.
RAY_DATA_RETRIED_IO_ERRORS: tuple[str, ...] = ("AWS Error SLOW_DOWN",)


def bound_ray_data_retries(ctx: Any) -> tuple[str, ...]:
    """Limit Ray Data's own I/O retries (``ctx``: a ``ray.data.DataContext``) to throttling;
    returns the previous setting so a caller can restore it."""
    previous = tuple(ctx.retried_io_errors)
    ctx.retried_io_errors = list(RAY_DATA_RETRIED_IO_ERRORS)
    return previous
