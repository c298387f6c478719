"""Turns at writing one SQLite file, taken by the serving processes' batch writers.

SQLite lets one connection write at a time. When two uvicorn workers' writers want to
commit together, the loser does not wait for the lock to be released: SQLite's busy
handler polls, sleeping 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms between tries.
The lock is held for a millisecond or two, but the waiting writer sleeps on, and every
request of its batch (and of the batch collecting behind it) waits with it. Measured at 16
requests in flight on 2 workers (50 candidates, 1 slot): one worker slept in that handler
114 times in 4 s (~740 ms, half of it in 10-25 ms naps), and p99 was 180-860 ms for a p50
of 7-11 ms.

So the writers take turns through an advisory ``flock`` on a file next to the database
before they begin a transaction: a blocked ``flock`` is woken by the kernel the moment the
holder lets go, so a turn costs the other writer's commit and nothing more. The lock
orders only the writers that take it; everything else (the trainer, the CLI, catalog and
privacy writes) still meets SQLite's own lock and busy timeout, as before, and a process
killed while holding the turn loses it with its file descriptor. Nothing about
durability changes: each batch still commits (fsync) before any of its requests is
answered.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Engine

log = logging.getLogger(__name__)

LOCK_SUFFIX = "-writer.lock"


def lock_path(engine: Engine) -> Path | None:
    """The turn file of a SQLite database file, or None when there is nothing to share:
    another backend (PostgreSQL orders its writers itself, without polling) or an
    in-memory database (one process only)."""
    url = engine.url
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):  # a URI filename: the path, without the query
        database = database[len("file:") :].split("?", 1)[0]
        if not database or database == ":memory:":
            return None
    return Path(database + LOCK_SUFFIX)


class WriteTurns:
    """An exclusive ``flock`` shared by every process that writes through a
    :class:`~bandit_service.store.writer.BatchWriter` to the same SQLite file.

    Taken by the writer thread only (``flock`` blocks without holding the GIL), so the
    event loop never waits on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._warned = False

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        try:
            fd = self._open()
        except OSError as exc:
            # Turns only make waits shorter: without the file (a read-only folder, say)
            # the writer meets SQLite's lock and busy timeout, as it did before turns.
            if not self._warned:
                self._warned = True
                log.warning("cannot open %s (%s); SQLite writers will poll", self.path, exc)
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _open(self) -> int:
        if self._fd is None:
            # Opened once and kept: the file is never written, only locked.
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def write_turns(engine: Engine) -> WriteTurns | None:
    """Turns for ``engine``'s writers, or None when they need none (see :func:`lock_path`)."""
    path = lock_path(engine)
    return WriteTurns(path) if path is not None else None
