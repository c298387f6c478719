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


class _Recorder:
    """A transport that records what is written and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


_DEFAULTS = [(b"date", b"Mon, 23 Nov 2026 14:00:00 GMT"), (b"server", b"uvicorn")]
_BODY = b'{"ok":true}'
_LENGTH = (b"content-length", str(len(_BODY)).encode())
# name: (method, status, headers, body, keep_alive, default headers, answered whole)
ANSWERS: dict[str, tuple[str, int, list[tuple[bytes, bytes]], bytes, bool, Any, bool]] = {
    "plain": ("POST", 200, [_LENGTH, (b"content-type", b"application/json")], _BODY, True,
              _DEFAULTS, True),
    "not kept alive": ("POST", 201, [_LENGTH], _BODY, False, _DEFAULTS, True),
    "mixed-case names": ("POST", 200, [(b"Content-Length", _LENGTH[1]), (b"X-Thing", b"A b")],
                         _BODY, True, _DEFAULTS, True),
    "a status without a phrase": ("POST", 299, [_LENGTH], _BODY, True, _DEFAULTS, True),
    "no default headers": ("POST", 200, [_LENGTH], _BODY, True, [], True),
    "configured headers": ("POST", 200, [_LENGTH], _BODY, True,
                           [*_DEFAULTS, (b"X-Custom", b"yes")], True),
    "two lengths": ("POST", 200, [_LENGTH, (b"content-length", b"99")], _BODY, True,
                    _DEFAULTS, True),
    "a large body": ("POST", 200, [(b"content-length", b"70000")], b"x" * 70000, True,
                     _DEFAULTS, True),
    "empty body": ("POST", 200, [(b"content-length", b"0")], b"", True, _DEFAULTS, True),
    "HEAD": ("HEAD", 200, [_LENGTH], _BODY, True, _DEFAULTS, False),
    "no length": ("POST", 200, [(b"content-type", b"text/plain")], _BODY, True, _DEFAULTS,
                  False),
    "length too short": ("POST", 200, [(b"content-length", b"3")], _BODY, True, _DEFAULTS,
                         False),
    "length not a number": ("POST", 200, [(b"content-length", b"x")], _BODY, True, _DEFAULTS,
                            False),
    "chunked": ("POST", 200, [(b"transfer-encoding", b"chunked")], _BODY, True, _DEFAULTS,
                False),
    "connection close": ("POST", 200, [_LENGTH, (b"connection", b"close")], _BODY, True,
                         _DEFAULTS, False),
    "bad header value": ("POST", 200, [_LENGTH, (b"x-bad", b"a\r\nb")], _BODY, True,
                         _DEFAULTS, False),
    "bad header name": ("POST", 200, [_LENGTH, (b"x bad", b"a")], _BODY, True, _DEFAULTS,
                        False),
    "bad default header": ("POST", 200, [_LENGTH], _BODY, True, [(b"x-bad", b"\x01")], False),
    "a length among the defaults": ("POST", 200, [_LENGTH], _BODY, True,
                                    [(b"content-length", b"11")], False),
}  # fmt: skip


def _cycle(
    kind: type, method: str, keep_alive: bool, defaults: Any, access_log: bool = False
) -> tuple[Any, Any, list]:
    import logging

    from uvicorn.protocols.http.flow_control import FlowControl

    transport = _Recorder()
    done: list[int] = []
    scope = {"type": "http", "method": method, "http_version": "1.1", "path": "/p",
             "query_string": b"a=1", "root_path": "", "client": ("10.0.0.1", 5)}  # fmt: skip
    cycle = kind(
        scope=scope,
        transport=transport,
        flow=FlowControl(transport),
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=access_log,
        default_headers=defaults,
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: done.append(1),
    )
    cycle._loop = asyncio.get_running_loop()
    return cycle, transport, done


def _state(cycle: Any, transport: _Recorder, done: list) -> tuple[Any, ...]:
    return (
        b"".join(transport.writes), transport.closed, len(done), cycle.response_started,
        cycle.response_complete, cycle.keep_alive, cycle.message_event.is_set(),
        cycle.waiting_for_100_continue, cycle.expected_content_length, cycle.chunked_encoding,
    )  # fmt: skip


@pytest.mark.parametrize("name", list(ANSWERS))
def test_a_whole_answer_is_what_send_would_write(name: str) -> None:
    """``_CoalescingCycle.answer`` (the direct routes' one write) leaves the same bytes and
    the same cycle state as uvicorn's ``send`` given the two messages, or does nothing."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    method, status, headers, body, keep_alive, defaults, whole = ANSWERS[name]

    async def compare() -> None:
        stock, stock_transport, stock_done = _cycle(
            RequestResponseCycle, method, keep_alive, defaults
        )
        raised = None
        try:
            await stock.send({"type": "http.response.start", "status": status,
                              "headers": list(headers)})  # fmt: skip
            await stock.send({"type": "http.response.body", "body": body})
        except (RuntimeError, ValueError) as exc:
            raised = type(exc)
        ours, transport, done = _cycle(protocol._CoalescingCycle, method, keep_alive, defaults)
        before = _state(ours, transport, done)
        answered = ours.answer(status, list(headers), body)
        assert answered == whole
        if not answered:
            assert _state(ours, transport, done) == before  # nothing done
            return
        assert raised is None
        assert _state(ours, transport, done) == _state(stock, stock_transport, stock_done)
        assert len(transport.writes) == (2 if len(body) > 64 * 1024 else 1)

    asyncio.run(compare())


def test_a_whole_answer_waits_for_nothing() -> None:
    """While writing is paused, or the peer has gone, ``answer`` leaves it to ``send``."""

    async def check() -> None:
        paused, transport, _ = _cycle(protocol._CoalescingCycle, "POST", True, _DEFAULTS)
        paused.flow.pause_writing()
        assert not paused.answer(200, [_LENGTH], _BODY) and not transport.writes
        gone, transport, _ = _cycle(protocol._CoalescingCycle, "POST", True, _DEFAULTS)
        gone.disconnected = True
        assert not gone.answer(200, [_LENGTH], _BODY) and not transport.writes
        started, transport, _ = _cycle(protocol._CoalescingCycle, "POST", True, _DEFAULTS)
        assert started.answer(200, [_LENGTH], _BODY)
        assert not started.answer(200, [_LENGTH], _BODY) and len(transport.writes) == 1

    asyncio.run(check())


def test_a_whole_answer_logs_uvicorns_access_line(caplog: pytest.LogCaptureFixture) -> None:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    async def both() -> None:
        stock, _, _ = _cycle(RequestResponseCycle, "POST", True, _DEFAULTS, access_log=True)
        await stock.send({"type": "http.response.start", "status": 200, "headers": [_LENGTH]})
        await stock.send({"type": "http.response.body", "body": _BODY})
        ours, _, _ = _cycle(protocol._CoalescingCycle, "POST", True, _DEFAULTS, access_log=True)
        assert ours.answer(200, [_LENGTH], _BODY)

    with caplog.at_level("INFO", logger="test.access"):
        asyncio.run(both())
    lines = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("test.access", "INFO", '10.0.0.1:5 - "POST /p?a=1 HTTP/1.1" 200')] * 2
