"""Serving processes' writers take turns at a SQLite file (store/write_turns.py) instead of
polling SQLite's lock: the turn must exclude every other writer holding it, be given back
after a failed batch too, cost nothing where there is nothing to share, and never stop a
write from being stored."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bandit_service.store import writer as writer_module
from bandit_service.store.database import make_engine, upgrade
from bandit_service.store.models import DecisionRow
from bandit_service.store.write_turns import WriteTurns, lock_path, write_turns
from bandit_service.store.writer import BatchWriter
from tests.integration.test_retention import decision


def held_elsewhere(path: Path) -> bool:
    """Is the turn held? (A second open file description conflicts even in this process.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also lets go of a lock just taken
    return False


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:////data/bandit.db", "/data/bandit.db-writer.lock"),
        ("sqlite:///relative/bandit.db", "relative/bandit.db-writer.lock"),
        ("sqlite:///file:/data/b.db?uri=true&mode=rwc", "/data/b.db-writer.lock"),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:mem?mode=memory&uri=true", None),
        ("postgresql+psycopg://postgres@127.0.0.1/db", None),
    ],
)
def test_turns_exist_only_for_a_sqlite_file(url: str, expected: str | None) -> None:
    engine = make_engine(url)
    try:
        path = lock_path(engine)
        assert (str(path) if path else None) == expected
        assert (write_turns(engine) is None) == (expected is None)
    finally:
        engine.dispose()


def test_a_turn_excludes_other_writers_and_is_given_back_after_a_failure(tmp_path: Path) -> None:
    turns = WriteTurns(tmp_path / "db-writer.lock")
    with turns.turn():
        assert held_elsewhere(turns.path)
    assert not held_elsewhere(turns.path)
    with pytest.raises(RuntimeError), turns.turn():
        raise RuntimeError("the batch failed")
    assert not held_elsewhere(turns.path)  # a failed batch does not keep the others out
    turns.close()


def test_without_a_turn_file_the_writer_still_writes(tmp_path: Path) -> None:
    turns = WriteTurns(tmp_path / "missing-folder" / "db-writer.lock")  # cannot be created
    entered = False
    with turns.turn():
        entered = True
    assert entered


def test_writers_sharing_a_file_take_turns_and_store_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers on two engines: what two uvicorn workers do on one SQLite file."""
    url = f"sqlite:///{tmp_path / 'bandit.db'}"
    upgrade(url)
    engines = [make_engine(url, background_checkpoints=True) for _ in range(2)]
    lock = Path(f"{tmp_path / 'bandit.db'}-writer.lock")
    held_in_transaction: list[bool] = []
    apply = writer_module._apply

    def observed_apply(*args: Any) -> Any:
        held_in_transaction.append(held_elsewhere(lock))
        return apply(*args)

    monkeypatch.setattr(writer_module, "_apply", observed_apply)
    seen_held: list[bool] = []

    async def run() -> None:
        writers = [BatchWriter(engine) for engine in engines]
        for w in writers:
            w.start()
        tasks = [
            asyncio.ensure_future(writers[i % 2].write_decision(decision(f"e{i}", "p", 1.0 + i)))
            for i in range(300)
        ]
        await asyncio.gather(*tasks)
        seen_held.append(held_elsewhere(Path(f"{tmp_path / 'bandit.db'}-writer.lock")))
        for w in writers:
            await w.close()
        assert all(t.result().created for t in tasks)

    asyncio.run(run())
    assert held_in_transaction and all(held_in_transaction)  # every batch in its turn
    assert seen_held == [False]  # idle writers hold no turn
    with Session(engines[0]) as session:
        assert session.scalar(select(func.count()).select_from(DecisionRow)) == 300
    for engine in engines:
        engine.dispose()
