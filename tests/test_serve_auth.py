"""The optional access token (pipelines/serve/auth.py) on a plain FastAPI app with
Starlette's TestClient: no Ray, no models. What a live service does with the same
middleware is checked once in tests/test_serve.py (``test_access_token_end_to_end``)."""

from __future__ import annotations

import logging
import os

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response
from fastapi.testclient import TestClient

from thinkfast.errors import ThinkfastError
from thinkfast_pipelines.serve import auth
from thinkfast_pipelines.serve.auth import AccessToken, AuthConfigError, TOKEN_ENV, install

TOKEN = "s3cr3t-token-0123456789abcdef"
OTHER = "another-token-0123456789abcdef"


def make_app(source: AccessToken | None) -> FastAPI:
    """The ingress' route shapes (page, healthz, search, media) behind ``install``."""
    app = FastAPI()
    install(app, source=source)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse("<html>the search page</html>")

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/search")
    async def search() -> dict:
        return {"results": []}

    @app.get("/media/{key:path}")
    async def media(key: str) -> Response:
        return Response(b"\x89PNG" + key.encode(), media_type="image/png")

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(make_app(AccessToken.from_value(TOKEN)))


def _assert_401(resp) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert resp.json()["detail"]
    assert TOKEN not in resp.text


def test_without_a_token_everything_is_open() -> None:
    assert AccessToken.from_config(None, environ={}) is None
    assert AccessToken.from_config(None, environ={TOKEN_ENV: ""}) is None  # empty = unset
    open_client = TestClient(make_app(None))
    assert open_client.post("/search").status_code == 200
    assert open_client.get("/media/a/b.png").status_code == 200
    assert open_client.get("/").status_code == 200


def test_healthz_stays_open_and_everything_else_needs_the_token(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    for method, path in [("POST", "/search"), ("GET", "/media/a.png"), ("GET", "/"), ("GET", "/openapi.json"),
                         ("GET", "/docs"), ("GET", "/no-such-route"), ("POST", "/healthz/../search")]:
        _assert_401(client.request(method, path, headers={"Accept": "application/json"}))


def test_bearer_and_api_key_are_accepted(client) -> None:
    assert client.post("/search", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.post("/search", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert client.post("/search", headers={"X-API-Key": TOKEN}).status_code == 200
    media = client.get("/media/k/1.png", headers={"X-API-Key": TOKEN})
    assert media.status_code == 200 and media.content == b"\x89PNGk/1.png"
    assert client.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).text == "<html>the search page</html>"


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {OTHER}"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},  # a prefix
    {"Authorization": f"Bearer {TOKEN}x"},  # a superset
    {"Authorization": f"Basic {TOKEN}"},  # another scheme
    {"Authorization": TOKEN},  # no scheme
    {"Authorization": "Bearer"},
    {"X-API-Key": ""},
    {"X-API-Key": TOKEN.upper()},
    {"Cookie": f"{auth.COOKIE}={TOKEN}"},  # the cookie holds a derived value, never the token
])
def test_wrong_credentials_are_401(client, headers) -> None:
    _assert_401(client.post("/search", headers=headers))
    _assert_401(client.get("/media/a.png", headers=headers))


def test_comparison_is_constant_time(client, monkeypatch) -> None:
    calls: list[tuple] = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert client.post("/search", headers={"X-API-Key": TOKEN}).status_code == 200
    assert client.post("/search", headers={"X-API-Key": OTHER}).status_code == 401
    assert len(calls) >= 2 and all(a is bytes and b is bytes for a, b in calls)


def test_browser_login_sets_a_strict_httponly_cookie(client) -> None:
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert page.headers["www-authenticate"].startswith("Bearer")
    assert '<form method="post" action="login"' in page.text and 'type="password"' in page.text
    wrong = client.post("/login", data={"token": OTHER}, follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    ok = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie
    # the client now holds the cookie: the page, thumbnails and search work without headers
    assert client.get("/").status_code == 200
    assert client.get("/media/x.png").status_code == 200
    assert client.post("/search").status_code == 200
    # a session of another token does not open this service
    other = TestClient(make_app(AccessToken.from_value(OTHER)))
    assert other.post("/login", data={"token": OTHER}, follow_redirects=False).status_code == 303
    _assert_401(client.post("/search", cookies=dict(other.cookies)))


def test_login_refuses_bad_bodies(client) -> None:
    assert client.post("/login", content=b"token=" + b"x" * 20_000,
                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 413
    assert client.post("/login", json={"token": TOKEN}).status_code == 415
    assert client.post("/login", content=b"token=\xff\xfe",
                       headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 400
    assert client.get("/login").status_code == 405


def test_cookie_is_scoped_to_the_route_prefix() -> None:
    outer = FastAPI()
    outer.mount("/search-app", make_app(AccessToken.from_value(TOKEN)))
    client = TestClient(outer)
    ok = client.post("/search-app/login", data={"token": TOKEN}, follow_redirects=False)
    assert ok.status_code == 303 and ok.headers["location"] == "/search-app/"
    assert "Path=/search-app/" in ok.headers["set-cookie"]
    assert client.get("/search-app/healthz").status_code == 200
    assert client.post("/search-app/search").status_code == 200


def test_token_file_is_read_and_rotation_is_picked_up(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    source = AccessToken.from_config(str(path), environ={TOKEN_ENV: OTHER})  # the file wins over the env
    client = TestClient(make_app(source))
    assert client.post("/search", headers={"X-API-Key": TOKEN}).status_code == 200
    assert client.post("/search", headers={"X-API-Key": OTHER}).status_code == 401
    path.write_text(OTHER)  # a Kubernetes Secret update swaps the mounted file
    os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
    assert client.post("/search", headers={"X-API-Key": OTHER}).status_code == 200
    assert client.post("/search", headers={"X-API-Key": TOKEN}).status_code == 401


def test_token_from_the_environment() -> None:
    source = AccessToken.from_config(None, environ={TOKEN_ENV: TOKEN})
    client = TestClient(make_app(source))
    assert client.post("/search", headers={"X-API-Key": TOKEN}).status_code == 200
    _assert_401(client.post("/search"))


@pytest.mark.parametrize("content, reason", [
    (None, "cannot be read"), ("", "empty"), ("short", "at least"), ("two words here-0123456789", "visible ASCII"),
])
def test_bad_token_configs_fail_closed_with_one_clear_error(tmp_path, content, reason) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(AuthConfigError, match=reason) as info:
        AccessToken.from_config(str(path), environ={})
    assert isinstance(info.value, ThinkfastError) and str(path) in str(info.value)
    if content:
        assert content not in str(info.value)  # the secret (or a typo of it) is never echoed
    with pytest.raises(AuthConfigError, match="at least"):
        AccessToken.from_config(None, environ={TOKEN_ENV: "short"})
    with pytest.raises(AuthConfigError, match="absolute path"):
        AccessToken.from_config("token", environ={})  # relative to which replica's directory?


def test_the_token_is_never_logged(tmp_path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "token"
    path.write_text(TOKEN)
    client = TestClient(make_app(AccessToken.from_config(str(path), environ={TOKEN_ENV: OTHER})))
    client.post("/search", headers={"X-API-Key": TOKEN})
    client.post("/search", headers={"X-API-Key": OTHER})
    client.post("/login", data={"token": OTHER})
    client.post("/login", data={"token": TOKEN})
    assert caplog.records  # configuration is logged (where the token comes from) ...
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in text and OTHER not in text  # ... but never the token


def test_configure_sets_the_process_source_the_installed_middleware_reads(tmp_path, monkeypatch) -> None:
    """The ingress installs the middleware at import (before Serve freezes the app) and
    configures it in the replica from ServeArgs.api_token_file."""
    monkeypatch.setattr(auth, "_process_source", auth._UNSET)
    from ray import cloudpickle
    from ray._common.serialization import pickle_dumps
    from ray.serve._private.utils import ensure_serialization_context

    app = FastAPI()
    install(app)  # no source: the process-wide one

    @app.post("/search")
    async def search() -> dict:
        return {}

    ensure_serialization_context()
    app = cloudpickle.loads(pickle_dumps(app, error_msg="app"))  # what @serve.ingress does to the app

    monkeypatch.setenv(TOKEN_ENV, "")
    path = tmp_path / "token"
    path.write_text(TOKEN)
    auth.configure(str(path))
    client = TestClient(app)
    _assert_401(client.post("/search"))
    assert client.post("/search", headers={"X-API-Key": TOKEN}).status_code == 200
    auth.configure(None)
    assert client.post("/search").status_code == 200


def test_openapi_declares_the_schemes_only_when_configured() -> None:
    spec = TestClient(make_app(AccessToken.from_value(TOKEN))).get(
        "/openapi.json", headers={"X-API-Key": TOKEN}).json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert spec["paths"]["/search"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "401" in spec["paths"]["/search"]["post"]["responses"]
    open_spec = TestClient(make_app(None)).get("/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert "security" not in open_spec["paths"]["/search"]["post"]


def test_the_ingress_installs_the_middleware() -> None:
    from thinkfast_pipelines.serve.ingress import app

    assert any(m.cls is auth.TokenAuthMiddleware for m in app.user_middleware)
    assert "post" in app.openapi()["paths"]["/login"]
