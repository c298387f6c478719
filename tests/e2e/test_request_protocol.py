"""``ops/protocol.py``: the coalescing protocol answers byte for byte as uvicorn's own
httptools protocol, over real sockets, for plain, empty, HEAD, streamed, failing,
closing and pipelined exchanges; and a plain answer leaves in one write."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bandit_service.ops import protocol

pytestmark = pytest.mark.skipif(not protocol.AVAILABLE, reason="uvicorn's httptools protocol")

Message = dict[str, Any]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    while (await receive()).get("more_body"):
        pass
    if path == "/stream":  # the head, then chunks with waits between them
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
        for part in (b"one", b"two", b""):
            await asyncio.sleep(0.02)
            await send({"type": "http.response.body", "body": part, "more_body": bool(part)})
        return
    if path == "/head-then-wait":  # the head alone for a while: it must not wait
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"4")]})  # fmt: skip
        await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"done"})
        return
    if path == "/fail-after-start":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})  # fmt: skip
        raise RuntimeError("failed after the head")
    if path == "/too-long":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"four"})
        return
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    body = b'{"ok":true,"path":"' + path.encode() + b'"}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


SERVERS: dict[int, Any] = {}  # port: the uvicorn server on it (a test may stop one)


@contextmanager
def serving(http: Any, served: Any = app, **config: Any) -> Iterator[int]:
    """``served`` (this module's raw app by default) under uvicorn in a thread, with the
    protocol ``http`` and any other uvicorn ``config``, on a free port (yielded)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    options = {"log_level": "critical", "lifespan": "off", **config}
    server = uvicorn.Server(uvicorn.Config(served, http=http, **options))
    SERVERS[port] = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()
        del SERVERS[port]


def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw`` (one or more requests), read until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(raw)
        conn.settimeout(1.0)
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return re.sub(rb"date: [^\r]*\r\n", b"date: -\r\n", b"".join(chunks))


def get(path: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: test\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


EXCHANGES = {
    "plain": get("/plain"),
    "post": post("/v1/decisions", b'{"candidates":[]}'),
    "head": get("/plain", "HEAD"),
    "empty": get("/empty"),
    "stream": get("/stream"),
    "fail after start": get("/fail-after-start"),
    "too long": get("/too-long"),
    "connection close": get("/plain", extra="Connection: close\r\n"),
    "http/1.0": b"GET /plain HTTP/1.0\r\nHost: test\r\n\r\n",
    "pipelined": get("/a") + post("/b", b"{}") + get("/c", "HEAD") + get("/d"),
    "bad request": b"NOT HTTP AT ALL\r\n\r\n",
}


def test_answers_are_byte_for_byte_uvicorns() -> None:
    with serving("httptools") as stock, serving(protocol.PROTOCOL) as ours:
        for name, raw in EXCHANGES.items():
            expected = exchange(stock, raw)
            assert expected, name
            assert exchange(ours, raw) == expected, name


def test_a_held_head_is_not_kept_waiting_for_a_slow_body() -> None:
    with serving(protocol.PROTOCOL) as port, socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(get("/head-then-wait"))
        conn.settimeout(0.2)  # the body comes after 0.3 s; the head must come before
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")


def test_a_plain_answer_is_one_write() -> None:
    """One segment: the head and the body arrive together, in a single recv."""
    with serving(protocol.PROTOCOL) as port, socket.create_connection(("127.0.0.1", port)) as conn:
        for _ in range(5):
            conn.sendall(get("/plain"))
            conn.settimeout(2)
            first = conn.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 OK") and first.endswith(b'"/plain"}'), first
