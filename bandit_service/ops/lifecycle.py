"""Graceful shutdown: on SIGTERM, drain, stop accepting, finish in-flight requests, flush.

uvicorn already does most of it: on SIGTERM it closes the listening sockets, lets every
in-flight request finish (up to ``timeout_graceful_shutdown``) and then runs the lifespan
shutdown, where :meth:`DecisionService.close` flushes the group-commit writer and stops
the trainer after its current step (a step commits its checkpoint before it returns, so
nothing learned is ever held only in memory). What uvicorn cannot know is that a load
balancer should stop sending traffic *before* the sockets close. So this module chains a
handler in front of uvicorn's: it marks the service draining (``/readyz`` answers 503
from then on) and, with ``BANDIT_DRAIN_SECONDS`` > 0, keeps serving that long before
handing the signal on. A second SIGTERM during the drain stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

SignalHandler = Callable[[int, FrameType | None], Any]


class DrainOnSigterm:
    """Installed by the app's lifespan when it runs under a server that handles SIGTERM."""

    def __init__(self, mark_draining: Callable[[], None], drain_seconds: float) -> None:
        self._mark_draining = mark_draining
        self._drain_seconds = drain_seconds
        self._previous: SignalHandler | None = None
        self._signalled = False
        self._timer: threading.Timer | None = None

    def install(self) -> bool:
        """Chain in front of the current SIGTERM handler; False when there is none to chain
        to (not the main thread, or no server handler: e.g. inside a test process)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return False
        self._previous = previous
        signal.signal(signal.SIGTERM, self._on_sigterm)
        return True

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if (
            self._previous is not None
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == self._on_sigterm
        ):
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        assert self._previous is not None
        first = not self._signalled
        self._signalled = True
        self._mark_draining()
        if first and self._drain_seconds > 0:
            log.info(
                "SIGTERM: draining for %.1fs before refusing new connections",
                self._drain_seconds,
                extra={"event": "shutdown", "phase": "draining"},
            )
            self._timer = threading.Timer(self._drain_seconds, self._previous, (sig, None))
            self._timer.daemon = True
            self._timer.start()
            return
        if self._timer is not None:
            self._timer.cancel()
        log.info(
            "SIGTERM: refusing new connections, finishing in-flight requests",
            extra={"event": "shutdown", "phase": "stopping"},
        )
        self._previous(sig, frame)


def exit_cleanly_on_sigterm() -> None:
    """For ``serve``: SIGTERM means "stop", which is success, not death by signal.

    uvicorn restores the handler it found and re-raises the signal after its graceful
    shutdown; with this one in place the process then exits 0 instead of -15. Before the
    server starts, SIGTERM also exits 0 at once (nothing was acknowledged yet).
    """

    def _exit(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
