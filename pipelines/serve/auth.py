"""Who may query: an optional access token in front of every route but ``/healthz``.

Off unless configured. When a token is configured, ``/search``, ``/media/*``, the page and
the API docs answer 401 (``WWW-Authenticate: Bearer``, a JSON ``detail``) unless the request
carries it as ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``. ``/healthz``
stays open so load balancers and Kubernetes probes need no secret.

Browsers cannot put a header on an ``<img src>`` thumbnail or a typed-in URL, so the page
signs in once: ``GET /`` without credentials answers a small password form (still 401),
``POST /login`` checks the token and sets an ``HttpOnly; SameSite=Strict`` session cookie
scoped to the app's route prefix. The cookie holds ``HMAC-SHA256(token, label)``, not the
token: it is worthless to another service with another token, and rotating the token
ends every session. ``SameSite=Strict`` keeps other sites from riding on it (no CSRF).

Where the secret comes from, and why never from ServeArgs or a Ray runtime env (Ray writes
both into its logs, docs/OPERATIONS.md "Secrets"): the replica reads it itself, from the
file at ``ServeArgs.api_token_file`` (a mounted Kubernetes Secret; the *path* is not
secret), else from ``THINKFAST_API_TOKEN`` in its own environment (inherited from the
raylet on a local cluster, or set on the pod from a Secret). The file is re-read when it
changes, so a rotated Secret takes effect without a restart. Every comparison is
``hmac.compare_digest`` on bytes; the token is never logged nor echoed.

Pure ASGI (no BaseHTTPMiddleware): nothing is buffered, and a refused request never
reaches a route, a handle or a model.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import html
import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any, Callable

from thinkfast.errors import ThinkfastError

logger = logging.getLogger(__name__)

TOKEN_ENV = "THINKFAST_API_TOKEN"
MIN_TOKEN_CHARS = 16  # a guessable token is a configuration error, not a weak lock
COOKIE = "thinkfast_session"
OPEN_PATHS = frozenset({"/healthz", "/login"})  # relative to the app's route prefix
MAX_LOGIN_BODY_BYTES = 4096
_SESSION_LABEL = b"thinkfast-session-v1"
_WWW_AUTHENTICATE = 'Bearer realm="thinkfast"'
_DETAIL = "this service needs an access token: send 'Authorization: Bearer <token>' or 'X-API-Key: <token>'"


class AuthConfigError(ThinkfastError):
    """The configured access token cannot be used (missing file, empty, too short)."""


def _validated(token: str, where: str) -> bytes:
    """The token as header bytes, or an error naming ``where`` (never the token)."""
    token = token.strip()
    if not token:
        raise AuthConfigError(f"access token from {where} is empty")
    if not all("!" <= c <= "~" for c in token):
        raise AuthConfigError(f"access token from {where} must be visible ASCII without spaces (it travels in a header)")
    if len(token) < MIN_TOKEN_CHARS:
        raise AuthConfigError(
            f"access token from {where} must have at least {MIN_TOKEN_CHARS} characters"
            " (make one with: openssl rand -hex 32)"
        )
    return token.encode("ascii")


class AccessToken:
    """The secret a request must present: a fixed value, or a file re-read when it changes."""

    def __init__(self, token: bytes, path: str | None = None, stamp: tuple | None = None) -> None:
        self._token = token
        self._path = path
        self._stamp = stamp
        self._lock = threading.Lock()

    @classmethod
    def from_value(cls, token: str, where: str = "a value") -> "AccessToken":
        return cls(_validated(token, where))

    @classmethod
    def from_file(cls, path: str) -> "AccessToken":
        stamp, token = cls._read(path)
        return cls(token, path, stamp)

    @classmethod
    def from_config(cls, token_file: str | None, environ: Mapping[str, str] | None = None) -> "AccessToken | None":
        """The file if one is configured (it wins over the environment), else the
        ``THINKFAST_API_TOKEN`` variable, else ``None``: no token, the service is open."""
        environ = os.environ if environ is None else environ
        if token_file:
            if not os.path.isabs(token_file):  # a replica's working directory is not the caller's
                raise AuthConfigError(f"access token file {token_file} must be an absolute path")
            source = cls.from_file(token_file)
            logger.info("access token required for search, media and the page (from the file %s)", token_file)
            if environ.get(TOKEN_ENV):
                logger.info("%s is also set; the token file wins", TOKEN_ENV)
            return source
        value = environ.get(TOKEN_ENV, "")
        if value.strip():
            logger.info("access token required for search, media and the page (from $%s)", TOKEN_ENV)
            return cls.from_value(value, f"${TOKEN_ENV}")
        logger.info("no access token configured: anyone who can reach the HTTP port may search (see %s)", TOKEN_ENV)
        return None

    @staticmethod
    def _read(path: str) -> tuple[tuple, bytes]:
        try:
            st = os.stat(path)
            with open(path, encoding="utf-8") as fh:
                text = fh.read(64 * 1024)
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"access token file {path} cannot be read ({type(exc).__name__})") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size), _validated(text, f"the file {path}")

    def current(self) -> bytes:
        """The token now; a changed file is re-read (a rotated Kubernetes Secret). If the new
        content is unusable the previous token stays in force: never open, never crash."""
        if self._path is None:
            return self._token
        try:
            st = os.stat(self._path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            return self._token
        if stamp != self._stamp:
            with self._lock:
                try:
                    self._stamp, self._token = self._read(self._path)
                    logger.info("access token file %s changed: the new token is in force", self._path)
                except AuthConfigError as exc:
                    self._stamp = stamp  # report once per change, keep the previous token
                    logger.error("%s; the previous token stays in force", exc)
        return self._token

    def matches(self, presented: bytes) -> bool:
        return hmac.compare_digest(presented, self.current())

    def session_value(self) -> bytes:
        """The cookie value of a signed-in browser: derived from the token, not the token."""
        return hmac.new(self.current(), _SESSION_LABEL, hashlib.sha256).hexdigest().encode("ascii")

    def session_matches(self, presented: bytes) -> bool:
        return hmac.compare_digest(presented, self.session_value())


class _Source(enum.Enum):
    """Sentinels that survive pickling as themselves (an ``object()`` would not: Serve
    cloudpickles the app, middleware arguments included, into every replica)."""

    PROCESS = "the one configure() set in this process"
    UNSET = "configure() not called yet"


_UNSET = _Source.UNSET
PROCESS = _Source.PROCESS
_process_source: Any = _UNSET  # what configure() set in this process (one Ingress replica per process)


def configure(token_file: str | None) -> AccessToken | None:
    """Called by the Ingress replica with ``ServeArgs.api_token_file``: reads the token
    there (file or environment) and arms every middleware installed without a source.
    Raises :class:`AuthConfigError` so a replica with an unusable token never starts."""
    global _process_source
    _process_source = AccessToken.from_config(token_file)
    return _process_source


def _current_process_source() -> AccessToken | None:
    global _process_source
    if _process_source is _UNSET:  # installed but never configured: the environment alone decides
        _process_source = AccessToken.from_config(None)
    return _process_source


def _headers(scope: Mapping[str, Any]) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in scope.get("headers", [])}


def _cookie(header: bytes, name: str) -> bytes | None:
    for part in header.split(b";"):
        key, sep, value = part.strip().partition(b"=")
        if sep and key == name.encode("ascii"):
            return value.strip().strip(b'"')
    return None


def _presented_ok(source: AccessToken, headers: Mapping[bytes, bytes]) -> bool:
    """Any one valid credential admits the request; each check is constant-time."""
    auth = headers.get(b"authorization")
    if auth is not None:
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer" and value.strip() and source.matches(value.strip()):
            return True
    key = headers.get(b"x-api-key")
    if key is not None and source.matches(key.strip()):
        return True
    cookie_header = headers.get(b"cookie")
    if cookie_header is not None:
        session = _cookie(cookie_header, COOKIE)
        if session is not None and source.session_matches(session):
            return True
    return False


def _prefix(scope: Mapping[str, Any]) -> str:
    return scope.get("root_path", "") or ""


def _relative_path(scope: Mapping[str, Any]) -> str:
    path, root = scope.get("path", ""), _prefix(scope)
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


def _wants_html(headers: Mapping[bytes, bytes]) -> bool:
    return b"text/html" in headers.get(b"accept", b"")


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>thinkfast: sign in</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 1.5rem; }} .error {{ color: #b00020; }}</style></head>
<body><h1>thinkfast</h1>
<p>This search service needs its access token.</p>{message}
<form method="post" action="login" autocomplete="off">
<label>access token <input type="password" name="token" required autofocus></label>
<button type="submit">Sign in</button></form>
</body></html>
"""


async def _send(send: Callable, status: int, body: bytes, content_type: str, extra: list | None = None) -> None:
    headers = [
        (b"content-type", content_type.encode("ascii")),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"cache-control", b"no-store"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse(send: Callable, html_page: bool, message: str = "") -> None:
    extra = [(b"www-authenticate", _WWW_AUTHENTICATE.encode("ascii"))]
    if html_page:
        note = f'<p class="error">{html.escape(message)}</p>' if message else ""
        await _send(send, 401, LOGIN_PAGE.format(message=note).encode("utf-8"), "text/html; charset=utf-8", extra)
    else:
        body = json.dumps({"detail": message or _DETAIL}).encode("utf-8")
        await _send(send, 401, body, "application/json", extra)


async def _error(send: Callable, status: int, detail: str, extra: list | None = None) -> None:
    await _send(send, status, json.dumps({"detail": detail}).encode("utf-8"), "application/json", extra)


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The body, or ``None`` once it passes ``limit`` bytes (the rest is not read)."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def login(scope: Mapping[str, Any], receive: Callable, send: Callable, source: AccessToken | None) -> None:
    """``POST /login`` with a form field ``token``: 303 to the page with the session cookie,
    or 401 with the form again. Without a configured token there is nothing to sign in to,
    and the page is open: straight back to it."""
    root = _prefix(scope)
    page = (root.rstrip("/") + "/").encode("latin-1")
    if scope.get("method") != "POST":
        await _error(send, 405, "Method Not Allowed", [(b"allow", b"POST")])
        return
    headers = _headers(scope)
    media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if media != b"application/x-www-form-urlencoded":
        await _error(send, 415, "send the token as an application/x-www-form-urlencoded form field 'token'")
        return
    body = await _read_body(receive, MAX_LOGIN_BODY_BYTES)
    if body is None:
        await _error(send, 413, f"login body exceeds {MAX_LOGIN_BODY_BYTES} bytes")
        return
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8", errors="strict"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        await _error(send, 400, "login body is not a UTF-8 form")
        return
    if source is None:
        await _send(send, 303, b"", "text/plain", [(b"location", page)])
        return
    presented = (fields.get("token") or [""])[0].strip().encode("utf-8")
    if not presented or not source.matches(presented):
        logger.debug("sign-in refused for %s", (scope.get("client") or ("?",))[0])
        await _refuse(send, _wants_html(headers), "that is not the access token")
        return
    secure = scope.get("scheme") == "https" or headers.get(b"x-forwarded-proto", b"").lower() == b"https"
    cookie = (
        COOKIE.encode("ascii") + b"=" + source.session_value() + b"; Path=" + page
        + b"; HttpOnly; SameSite=Strict" + (b"; Secure" if secure else b"")
    )
    await _send(send, 303, b"", "text/plain", [(b"location", page), (b"set-cookie", cookie)])


class TokenAuthMiddleware:
    """ASGI middleware: every HTTP request but ``OPEN_PATHS`` needs a valid credential.

    ``source``: an :class:`AccessToken`, ``None`` (open), or left out to use what
    :func:`configure` set in this process (how the Serve ingress uses it: the middleware
    must be installed before Serve freezes the app at import, the token is only known in
    the replica)."""

    def __init__(self, app: Callable, source: Any = PROCESS) -> None:
        self.app = app
        self._source = source

    def source(self) -> AccessToken | None:
        return _current_process_source() if self._source is PROCESS else self._source

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        source = self.source()
        path = _relative_path(scope)
        if path == "/login":
            await login(scope, receive, send, source)
            return
        if source is None or path in OPEN_PATHS or _presented_ok(source, _headers(scope)):
            await self.app(scope, receive, send)
            return
        await _refuse(send, html_page=path == "/" and _wants_html(_headers(scope)))


def install(app: Any, source: Any = PROCESS) -> None:
    """Put the token check in front of ``app`` (a FastAPI app) and make its OpenAPI
    document what the service answers: every route's error statuses
    (``http_api.document_errors``), ``POST /login``, and the two security schemes
    when a token is configured (so a client generator, or schemathesis, knows)."""
    from thinkfast_pipelines.serve.http_api import document_errors

    app.add_middleware(TokenAuthMiddleware, source=source)
    openapi_of_routes = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = openapi_of_routes()
            middleware = TokenAuthMiddleware(None, source)
            document_errors(spec, protected=middleware.source() is not None, open_paths=OPEN_PATHS)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
