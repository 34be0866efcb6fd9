"""``thinkfast.Client`` on the wire: what it sends and how it reads the service's answers,
against a recording HTTP server on 127.0.0.1 (the running service is queried through it in
tests/test_serve.py)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thinkfast import Client
from thinkfast.errors import ThinkfastError

ANSWER = {"query": "a zebra", "k": 2, "rerank": 5, "results": [
    {"key": "zebra", "score": 1.5, "fast_score": 0.5, "slow_score": -1.0, "caption": "A zebra."}],
    "timings_ms": {"encode": 1.0}}


class _Recorder(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def _answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
        if self.path == "/healthz":
            self._answer(200, b'{"status": "ok", "shards": 2}')
        elif self.path == "/media/a%2Fb.png":
            self._answer(200, b"\x89PNG-bytes", "image/png")
        else:
            self._answer(404, b'{"detail": "no such key"}')

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        kind = self.headers.get("Content-Type", "")
        self.seen.append({"method": "POST", "path": self.path, "type": kind, "body": body,
                          "auth": self.headers.get("Authorization")})
        if kind.startswith("application/json") and json.loads(body).get("k") == 0:
            self._answer(422, json.dumps({"detail": [{"loc": ["body", "k"], "msg": "must be >= 1"}]}).encode())
        elif self.headers.get("Authorization") == "Bearer wrong":
            self._answer(401, b'{"detail": "bad token"}')
        else:
            self._answer(200, json.dumps(ANSWER).encode())


@pytest.fixture()
def server():
    _Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_text_query_is_one_json_post_with_the_options(server, monkeypatch):
    monkeypatch.delenv("THINKFAST_API_TOKEN", raising=False)
    with Client(server + "/") as client:
        assert client.search("a zebra", k=2, rerank=5, beta=3.0, explain=True) == ANSWER
        assert client.health() == {"status": "ok", "shards": 2}
    (post, get) = _Recorder.seen
    assert post["path"] == "/search" and post["type"].startswith("application/json")
    assert json.loads(post["body"]) == {"query": "a zebra", "k": 2, "rerank": 5, "beta": 3.0, "explain": True}
    assert post["auth"] is None and get["path"] == "/healthz"


def test_image_query_is_multipart_with_the_raw_bytes(server, tmp_path):
    path = tmp_path / "q.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n-not-base64")
    Client(server).search(image=str(path), k=3, explain=True)
    (post,) = _Recorder.seen
    assert post["type"].startswith("multipart/form-data")
    assert b"\x89PNG\r\n\x1a\n-not-base64" in post["body"] and b'filename="q.png"' in post["body"]
    assert b'name="explain"\r\n\r\ntrue' in post["body"] and b'name="k"\r\n\r\n3' in post["body"]


def test_token_from_the_environment_is_sent_and_never_shown(server, monkeypatch):
    monkeypatch.setenv("THINKFAST_API_TOKEN", "s3cret-token")
    client = Client(server)
    client.search("x")
    assert _Recorder.seen[-1]["auth"] == "Bearer s3cret-token"
    assert "s3cret" not in repr(client)
    with pytest.raises(ThinkfastError, match=r"HTTP 401\): the token was refused") as err:
        Client(server, token="wrong").search("x")
    assert "wrong" not in str(err.value)


def test_refusals_and_failures_are_one_line(server, tmp_path):
    client = Client(server)
    with pytest.raises(ThinkfastError, match=r"HTTP 422\): body.k: must be >= 1"):
        client.search("x", k=0)
    with pytest.raises(ThinkfastError, match="exactly one"):
        client.search("x", image=b"png")
    with pytest.raises(ThinkfastError, match="cannot read the query image"):
        client.search(image=str(tmp_path / "missing.png"))
    assert client.media("a/b.png") == b"\x89PNG-bytes"
    with pytest.raises(ThinkfastError, match=r"HTTP 404\): no such key"):
        client.media("other")
    with pytest.raises(ThinkfastError, match="no search service reachable at http://127.0.0.1:9/search"):
        Client("http://127.0.0.1:9", timeout_s=5).search("x")
