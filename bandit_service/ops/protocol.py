"""uvicorn's httptools protocol, writing a response's head and body in one system call.

uvicorn's ``RequestResponseCycle.send`` writes the status line and headers to the socket
when the app sends ``http.response.start``, and the body when it sends
``http.response.body``: uvloop writes each at once, so every answer costs two ``write``
calls and goes out as two TCP segments (``strace`` of a serving worker: 174 bytes, then
234), which the client's kernel and event loop then handle twice as well. Here the head
is held back until the body comes (the app sends both in the same step: Starlette's
``Response`` awaits nothing in between) and the two are written together; every byte
on the wire is the same, in the same order, only one ``write`` and one segment fewer.

The head never waits longer than that step: if no body follows at once (a streaming
answer), a callback queued when it was held writes it before anything else happens on
the loop; and whatever writes to or closes the connection first (the body, a close after
an error, a ``HEAD`` answer that has no body) writes the held head before it. While
uvicorn's flow control has paused writing, nothing is held.

Everything else is uvicorn's own code: :class:`CoalescingHttpToolsProtocol` only gives
each request's cycle the ``send`` below (:data:`AVAILABLE` is False, and ``serve`` keeps
uvicorn's default protocol, when the uvicorn installed does not have the pieces this
relies on). ``tests/e2e/test_request_protocol.py`` compares raw answers byte for byte
with uvicorn's own protocol.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:  # uvicorn's httptools protocol needs httptools (an optional dependency of uvicorn)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
except ImportError:  # pragma: no cover - serve then keeps uvicorn's choice
    AVAILABLE = False
else:
    AVAILABLE = all(
        hasattr(RequestResponseCycle, name) for name in ("send", "run_asgi", "receive")
    ) and hasattr(HttpToolsProtocol, "_start_asgi_task")

PROTOCOL = "bandit_service.ops.protocol:CoalescingHttpToolsProtocol"
# Bodies above this are written after the head instead of being copied behind it.
_JOIN_LIMIT = 64 * 1024


def http_protocol() -> str:
    """What ``serve`` passes to uvicorn as ``http``."""
    return PROTOCOL if AVAILABLE else "auto"


class _Capture:
    """Stands in for the transport while uvicorn formats a response head: keeps it."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None

    def write(self, data: bytes) -> None:
        self.data = data if self.data is None else self.data + data


class _HeldHead:
    """The cycle's transport while its response head is held: the first write or close
    sends the head first (with the data, in one write), then the real transport is back."""

    __slots__ = ("_cycle", "_flush", "_transport")

    def __init__(self, cycle: Any, transport: asyncio.Transport, flush: asyncio.Handle) -> None:
        self._cycle = cycle
        self._transport = transport
        self._flush = flush

    def take(self) -> bytes:
        """The held head (once), the real transport back in place."""
        cycle = self._cycle
        head: bytes = cycle._held
        cycle._held = None
        cycle.transport = self._transport
        self._flush.cancel()
        return head

    def write(self, data: bytes) -> None:
        head = self.take()
        if len(data) <= _JOIN_LIMIT:
            self._transport.write(head + data)
        else:
            self._transport.write(head)
            self._transport.write(data)

    def flush(self) -> None:
        head = self.take()
        if not self._transport.is_closing():  # the peer is gone: nothing to send to
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


if AVAILABLE:

    class _CoalescingCycle(RequestResponseCycle):
        """uvicorn's cycle; ``send`` holds the response head for the body (see above)."""

        _held: bytes | None = None
        _loop: asyncio.AbstractEventLoop

        async def send(self, message: Any) -> None:
            if (
                message["type"] == "http.response.start"
                and not self.response_started
                and not self.flow.write_paused  # so uvicorn's send awaits nothing
                and not self.disconnected
            ):
                transport = self.transport
                capture = _Capture()
                self.transport = capture  # type: ignore[assignment]
                try:
                    await super().send(message)
                finally:
                    self.transport = transport
                if capture.data is not None:
                    self._held = capture.data
                    flush = self._loop.call_soon(self._flush_head)
                    self.transport = _HeldHead(self, transport, flush)  # type: ignore[assignment]
                return
            await super().send(message)
            if self._held is not None and self.response_complete:
                self._flush_head()  # an answer without body bytes (HEAD, 204, empty)

        def _flush_head(self) -> None:
            held = self.transport
            if isinstance(held, _HeldHead):
                held.flush()

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol whose requests answer through
        :class:`_CoalescingCycle`."""

        def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
            # The cycle was made by uvicorn's own ``on_headers_complete``; its class is a
            # plain one, and the subclass adds only methods and class attributes.
            cycle.__class__ = _CoalescingCycle
            cycle._loop = self.loop  # type: ignore[attr-defined]
            super()._start_asgi_task(cycle, app)
