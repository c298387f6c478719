"""The protocol's direct route (``ops/protocol.py``, ``api/hot_routes.DirectRoute``) must
answer exactly as the app does through ASGI: the same status, headers and body, the same
request-id handling, the same metrics, the same connection handling, over real sockets.

Two servers run the service's app, each on its own fresh store: one with the service's
protocol (hot requests served directly), one with uvicorn's own httptools protocol (every
request through the app's ASGI stack). They get the same requests in the same order (draws
are seeded by event id, so with explicit event ids the decisions are identical), and a spy
counts the requests the direct route really served, so the comparison cannot pass by
never taking that path.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from bandit_service.api import hot_routes
from bandit_service.app import BanditApp
from bandit_service.ops import metrics, protocol
from tests.e2e.test_hot_routes import JSON, TABLE, _answer, _app, _counted, _decision
from tests.e2e.test_request_protocol import SERVERS, serving

pytestmark = pytest.mark.skipif(not protocol.AVAILABLE, reason="uvicorn's httptools protocol")


class _Spy:
    """Counts the requests ``DirectRoute.serve`` answered (not those it declined), and
    the answers the protocol wrote whole (``_CoalescingCycle.answer``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.served = 0
        self.answered = 0
        real = hot_routes.DirectRoute.serve
        real_answer = protocol._CoalescingCycle.answer

        async def serve(route: hot_routes.DirectRoute, *args: Any) -> bool:
            done = await real(route, *args)
            self.served += done
            return done

        def answer(cycle: Any, *args: Any) -> bool:
            done = real_answer(cycle, *args)
            self.answered += done
            return done

        monkeypatch.setattr(hot_routes.DirectRoute, "serve", serve)
        monkeypatch.setattr(protocol._CoalescingCycle, "answer", answer)


def _serving(app: BanditApp, http: Any, **config: Any) -> Any:
    """The service's app under uvicorn in a thread, started (its lifespan on)."""
    return serving(http, app, lifespan="on", **config)


@contextmanager
def _servers(tmp_path: Path, policies_dir: Path) -> Iterator[tuple[list[BanditApp], int, int]]:
    """(apps, the direct server's port, the ASGI server's port)."""
    direct = _app(tmp_path, policies_dir, "direct")
    plain = _app(tmp_path, policies_dir, "plain")
    with ExitStack() as stack:
        ports = [
            stack.enter_context(_serving(direct, protocol.PROTOCOL)),
            stack.enter_context(_serving(plain, "httptools")),
        ]
        assert direct.hot_routes is not None and plain.hot_routes is not None
        yield [direct, plain], ports[0], ports[1]


def _send(client: httpx.Client, port: int, request: Any) -> httpx.Response:
    method, path, headers, body = request
    url = f"http://127.0.0.1:{port}{path}"
    if isinstance(body, bytes):
        return client.request(method, url, content=body, headers=headers)
    return client.request(method, url, headers=headers)


def _masked(response: httpx.Response, port: int) -> tuple[int, dict[str, str], Any]:
    """``test_hot_routes._answer``, the date and the server's own port masked too."""
    status, headers, text = _answer(response)
    headers["date"] = "-"
    if "location" in headers:
        headers["location"] = headers["location"].replace(f":{port}/", ":<port>/")
    return status, headers, text


def test_direct_and_asgi_answers_are_the_same(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Spy(monkeypatch)
    with _servers(tmp_path, policies_dir) as (_apps, direct, plain), httpx.Client() as client:
        for request in TABLE:
            if "content-length" in request[2]:
                continue  # a false length: sent raw below ("length over the limit")
            method = request[0]
            before = _counted(method)
            ours = _send(client, direct, request)
            middle = _counted(method)
            theirs = _send(client, plain, request)
            after = _counted(method)
            assert _masked(ours, direct) == _masked(theirs, plain), (request, ours.text)
            ours_delta = {k: v - before.get(k, 0) for k, v in middle.items() if v != before.get(k)}
            theirs_delta = {k: v - middle.get(k, 0) for k, v in after.items() if v != middle.get(k)}
            assert ours_delta == theirs_delta, (request, ours_delta, theirs_delta)
    # Most of the table's hot requests are served directly; the rest were declined (bad
    # bodies, content types, queries: FastAPI's answers) or never matched. Every direct
    # answer is a plain response: written whole, in one step.
    assert spy.served >= 15, spy.served
    assert spy.answered == spy.served


def _exchange(port: int, parts: list[bytes], pause: float = 0.0) -> bytes:
    """Send ``parts`` (with ``pause`` between them), read until the server closes or goes
    quiet; ids, times and dates that differ between the stores are masked."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for n, part in enumerate(parts):
            if n and pause:
                time.sleep(pause)
            conn.sendall(part)
        conn.settimeout(1.0)
        chunks = []
        while True:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                chunks.append(b"<closed>")
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    raw = re.sub(rb"date: [^\r]*\r\n", b"date: -\r\n", raw)
    raw = re.sub(rb"x-request-id: [0-9a-f]{32}\r\n", b"x-request-id: <fresh>\r\n", raw)
    raw = re.sub(rb'"(\w+_at|user_key)":"[^"]+"', rb'"\1":"-"', raw)
    raw = re.sub(rb"incident [0-9a-f]{12}", b"incident -", raw)
    return re.sub(rb"content-length: \d+\r\n", b"content-length: -\r\n", raw)


def _post(path: str, body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (
        f"POST {path} HTTP/{version}\r\nHost: test\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _chunked(path: str, body: bytes) -> bytes:
    return (
        (
            f"POST {path} HTTP/1.1\r\nHost: test\r\ncontent-type: application/json\r\n"
            f"transfer-encoding: chunked\r\n\r\n{len(body):x}\r\n"
        ).encode()
        + body
        + b"\r\n0\r\n\r\n"
    )


def _exchanges() -> dict[str, tuple[list[bytes], float, bool]]:
    """name: (parts, pause between them, whether the direct route serves it)."""
    one = _decision(event_id="x-1")
    return {
        "decision": ([_post("/v1/decisions", one)], 0.0, True),
        "reward": (
            [_post("/v1/decisions/x-1/rewards", b'{"value": 1, "reward_id": "r"}')],
            0.0,
            True,
        ),
        "pipelined": (
            [
                _post("/v1/decisions", _decision(event_id="x-2"))
                + _post("/v1/decisions/x-2/rewards", b'{"value": 1}')
                + _post("/v1/decisions", _decision(event_id="x-3"))
            ],
            0.0,
            True,
        ),
        "connection close": (
            [_post("/v1/decisions", _decision(event_id="x-4"), "Connection: close\r\n")],
            0.0,
            True,
        ),
        "http/1.0": ([_post("/v1/decisions", _decision(event_id="x-5"), version="1.0")], 0.0, True),
        "chunked": ([_chunked("/v1/decisions", _decision(event_id="x-6"))], 0.0, True),
        "body in two parts": (
            [
                _post("/v1/decisions", _decision(event_id="x-7"))[:-10],
                _post("/v1/decisions", _decision(event_id="x-7"))[-10:],
            ],
            0.2,
            True,
        ),
        "expect 100-continue": (
            [_post("/v1/decisions", _decision(event_id="x-8"), "Expect: 100-continue\r\n")],
            0.0,
            False,
        ),
        # A forwarded client is not on loopback: with no keys configured it is refused.
        "forwarded for": (
            [_post("/v1/decisions", _decision(event_id="x-9"), "X-Forwarded-For: 203.0.113.9\r\n")],
            0.0,
            False,
        ),
        "over the limit": ([_post("/v1/decisions", b" " * (65 * 1024))], 0.0, False),
        "length over the limit": (
            [
                b"POST /v1/decisions HTTP/1.1\r\nHost: test\r\ncontent-type: application/json"
                b"\r\ncontent-length: 999999\r\n\r\n{"
            ],
            0.0,
            False,
        ),
        "chunked over the limit": ([_chunked("/v1/decisions", b" " * (65 * 1024))], 0.0, False),
        "declined": ([_post("/v1/decisions", b'{"candidates": [')], 0.0, False),
        "request id": (
            [_post("/v1/decisions", _decision(event_id="x-10"), "X-Request-ID: trace-7\r\n")],
            0.0,
            True,
        ),
    }


def test_connections_are_handled_as_uvicorn_does(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelining, closing, HTTP/1.0, chunked and split bodies, 100-continue, forwarded
    clients, the body limit: byte for byte the ASGI path's answers (dates and fresh ids
    masked), and the direct route serves exactly the requests it should (a body that
    comes in parts too: it waits for the rest, as the app would)."""
    spy = _Spy(monkeypatch)
    with _servers(tmp_path, policies_dir) as (_apps, direct, plain):
        for name, (parts, pause, served) in _exchanges().items():
            before = spy.served
            answered = spy.answered
            ours = _exchange(direct, parts, pause)
            theirs = _exchange(plain, parts, pause)
            assert ours == theirs, name
            assert ours.startswith(b"HTTP/1."), (name, ours)
            requests = parts[0].count(b"POST ")
            assert spy.served - before == (requests if served else 0), name
            assert spy.answered - answered == spy.served - before, name  # each in one write


def test_a_failure_is_answered_and_logged_as_through_the_app(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected error: the app's 500 (incident id, the request's id), then the
    connection closed, and uvicorn's error line, whichever path served it."""
    spy = _Spy(monkeypatch)
    with _servers(tmp_path, policies_dir) as (apps, direct, plain):
        for app in apps:

            async def fail(*_args: Any, **_kwargs: Any) -> Any:
                raise RuntimeError("boom")

            app.state.service.decide = fail
        answers = []
        logger = logging.getLogger("uvicorn.error")  # uvicorn's: it does not propagate
        for port in (direct, plain):
            records: list[logging.LogRecord] = []
            handler = logging.Handler(logging.ERROR)
            handler.emit = records.append  # type: ignore[method-assign]
            logger.addHandler(handler)
            level, logger.level = logger.level, logging.ERROR
            try:
                raw = _exchange(
                    port, [_post("/v1/decisions", _decision(), "X-Request-ID: r-5\r\n")]
                )
            finally:
                logger.removeHandler(handler)
                logger.level = level
            answers.append((raw, [r.getMessage() for r in records]))
        assert answers[0] == answers[1]
        raw, logged = answers[0]
        assert raw.startswith(b"HTTP/1.1 500 ") and b"x-request-id: r-5" in raw, raw
        assert raw.endswith(b"<closed>") and b'"internal"' in raw, raw
        assert any("Exception in ASGI application" in line for line in logged), logged
    assert spy.served == 0  # the failure propagated: not counted as served


def test_json_header_table_entries_are_hot() -> None:
    """The table above really posts JSON to the hot routes (a guard for the spy's count)."""
    assert sum(1 for r in TABLE if r[2] is JSON and r[1].startswith("/v1/decisions")) >= 15


def _seconds(route: str = "/v1/decisions") -> tuple[float, float]:
    """(count, sum) of the request-latency histogram for POST ``route``."""
    count = total = 0.0
    for family in metrics.REQUEST_SECONDS.collect():
        for sample in family.samples:
            if sample.labels.get("route") != route or sample.labels["method"] != "POST":
                continue
            if sample.name.endswith("_count"):
                count += sample.value
            elif sample.name.endswith("_sum"):
                total += sample.value
    return count, total


@pytest.mark.parametrize("then_close", [False, True])
def test_latency_counts_the_time_the_body_took_to_arrive(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch, then_close: bool
) -> None:
    """A body that comes in two parts 0.4 s apart (or whose client leaves after its first
    part): the request is timed from its start on both paths, as the request context
    times it through ASGI."""
    spy = _Spy(monkeypatch)
    body = _post("/v1/decisions", _decision(event_id="slow-1"))
    parts = [body[:-10]] if then_close else [body[:-10], body[-10:]]
    with _servers(tmp_path, policies_dir) as (_apps, direct, plain):
        for port in (direct, plain):
            count, total = _seconds()
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(parts[0])
                time.sleep(0.4)
                if not then_close:
                    conn.sendall(parts[1])
                    assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
            deadline = time.monotonic() + 5
            while _seconds()[0] == count:  # a closed client's request ends a bit later
                assert time.monotonic() < deadline
                time.sleep(0.01)
            after_count, after_total = _seconds()
            assert after_count == count + 1
            # The request's clock starts when the server has parsed the first part, which
            # a loaded machine may do a scheduling slice late (0.388 s was seen at load
            # average 10), so the pause itself is not a lower bound. What is tested is
            # that the body's time counts at all: leaving it out records ~1 ms, counting
            # it ~0.4 s; half the pause tells the two apart with 0.2 s to spare either way.
            assert after_total - total >= 0.2, (port == direct, after_total - total)
    assert spy.served == (0 if then_close else 1)


def test_a_request_cut_off_by_shutdown_is_counted_as_through_the_app(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown's deadline cancels a request whose body never completes: a 500, counted
    under its route, on both paths."""
    body = _post("/v1/decisions", _decision(event_id="cut-1"))
    deltas = []
    for name, http in (("direct", protocol.PROTOCOL), ("plain", "httptools")):
        app = _app(tmp_path, policies_dir, name)
        before = _counted("POST")
        with _serving(app, http, timeout_graceful_shutdown=1) as port:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(body[:-10])
            time.sleep(0.3)
            SERVERS[port].should_exit = True
            time.sleep(2.0)
            conn.close()
        after = _counted("POST")
        deltas.append({k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k)})
    assert deltas[0] == deltas[1] == {("/v1/decisions", "500"): 1.0}, deltas


def test_a_declined_request_runs_the_fast_path_once(
    tmp_path: Path, policies_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body the fast path declines goes to FastAPI's validation without being decoded by
    the fast path a second time."""
    from bandit_service.api import routes

    decoded: list[bytes] = []
    real = routes.decode_decision

    def counting(body: bytes) -> Any:
        decoded.append(body)
        return real(body)

    monkeypatch.setattr(routes, "decode_decision", counting)
    with _servers(tmp_path, policies_dir) as (_apps, direct, plain):
        for port in (direct, plain):
            decoded.clear()
            raw = _exchange(port, [_post("/v1/decisions", b'{"candidates": [')])
            assert raw.startswith(b"HTTP/1.1 400 "), raw
            assert len(decoded) == 1, (port == direct, len(decoded))
