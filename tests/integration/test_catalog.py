"""The candidate catalog on SQLite and PostgreSQL: several serving processes on one store,
the version watermark, the logged candidate sets, and training on catalog decisions."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from bandit_service import catalog as catalog_module
from bandit_service.catalog import Catalog, CatalogCandidates
from bandit_service.config import Settings
from bandit_service.domain import Candidate, DecisionRequest, slot_list
from bandit_service.policy import load_policies
from bandit_service.service import DecisionService
from bandit_service.store import catalog as store
from bandit_service.store.compact import candidate_set
from bandit_service.store.database import downgrade, make_engine, upgrade
from bandit_service.store.models import CandidateSetRow, DecisionRow, ModelCheckpointRow
from bandit_service.training import Trainer, TrainerOptions

ITEMS = [Candidate(f"item-{i:02d}", {"topic": f"t{i % 5}", "price": i / 2}) for i in range(12)]


def ids(snapshot: Any) -> list[str]:
    return list(snapshot.items)


def test_versions_removals_and_full_reloads(database_url: str) -> None:
    """A second process follows the first by reading only what changed since the version
    it knows, removals included; one that fell behind purged tombstones reloads."""
    db = make_engine(database_url)
    writer, reader = Catalog(db), Catalog(db)
    try:
        assert writer.upsert("default", ITEMS[:5], allow_identifiers=False)["version"] == 1
        assert ids(writer.snapshot("default")) == [c.id for c in ITEMS[:5]]  # at once
        assert len(reader.snapshot("default")) == 0  # not before its refresh
        assert reader.refresh() == ["default"]
        assert reader.snapshot("default").items == writer.snapshot("default").items
        assert reader.refresh() == []  # nothing changed: nothing re-read

        writer.upsert("default", [Candidate("item-01", {"topic": "new"})], allow_identifiers=False)
        writer.remove("default", "item-02")
        writer.upsert("bounded", ITEMS[:1], allow_identifiers=False)
        assert reader.refresh() == ["bounded", "default"]
        snapshot = reader.snapshot("default")
        assert snapshot.version == 3
        assert ids(snapshot) == ["item-00", "item-01", "item-03", "item-04"]
        assert snapshot.items["item-01"].features == {"topic": "new"}
        assert ids(reader.snapshot("bounded")) == ["item-00"]

        # Replace, then purge the tombstones as a day later: a reader that missed those
        # versions must not keep the removed items.
        writer.replace("default", ITEMS[6:8], allow_identifiers=False)
        with Session(db) as session, session.begin():
            store.purge_tombstones(session, "default", time.time() + 1)
        writer.upsert("default", ITEMS[8:9], allow_identifiers=False)
        assert reader.refresh() == ["default"]
        assert ids(reader.snapshot("default")) == ["item-06", "item-07", "item-08"]
        assert reader.snapshot("default").items == writer.snapshot("default").items
    finally:
        db.dispose()


def test_a_failed_change_changes_nothing(database_url: str, monkeypatch: Any) -> None:
    db = make_engine(database_url)
    try:
        catalog = Catalog(db)
        catalog.upsert("default", ITEMS[:2], allow_identifiers=False)
        monkeypatch.setattr(catalog_module, "MAX_CATALOG_ITEMS", 3)
        with pytest.raises(Exception, match="more than the limit of 3"):
            catalog.upsert("default", ITEMS[2:4], allow_identifiers=False)
        other = Catalog(db)
        other.refresh()
        assert other.snapshot("default").version == 1
        assert ids(other.snapshot("default")) == ["item-00", "item-01"]
    finally:
        db.dispose()


def test_another_process_serves_a_change_within_the_reload_period(settings: Settings) -> None:
    """Two services (each with its own memory, as uvicorn's workers) on one store."""
    fast = settings.model_copy(update={"trainer": "off", "model_reload_seconds": 0.1})
    policies = load_policies(settings.policies_dir)

    async def run() -> None:
        first, second = DecisionService(fast, policies), DecisionService(fast, policies)
        await first.start()
        await second.start()
        try:
            await asyncio.to_thread(
                first.catalog.upsert, "default", ITEMS[:3], allow_identifiers=False
            )
            # The reload loop (every 0.1 s here) picks it up; polled, never timed.
            for _ in range(400):
                if second.catalog.snapshot("default").version == 1:
                    break
                await asyncio.sleep(0.05)
            assert ids(second.catalog.snapshot("default")) == [c.id for c in ITEMS[:3]]
            request = DecisionRequest(
                event_id="by-second",
                policy="default",
                candidates=second.catalog.snapshot("default").select(["item-02", "item-00"]),
                slots=slot_list(1),
            )
            row = await second.decide(request)
            assert row["candidates"] == [
                {"id": "item-02", "features": ITEMS[2].features},
                {"id": "item-00", "features": ITEMS[0].features},
            ]
        finally:
            await first.close()
            await second.close()

    asyncio.run(run())


def test_selections_are_logged_once_per_catalog_version(database_url: str) -> None:
    """A repeated selection reuses its logged form and candidate-set key; a new version
    makes new ones; the stored set is the same text an inline request would store."""
    db = make_engine(database_url)
    try:
        catalog = Catalog(db)
        catalog.upsert("default", ITEMS, allow_identifiers=False)
        snapshot = catalog.snapshot("default")
        chosen = ["item-03", "item-01", "item-07"]
        first = snapshot.select(chosen)
        assert snapshot.select(chosen) is first
        assert isinstance(first, CatalogCandidates)
        assert snapshot.everything() is snapshot.everything()
        inline = [{"id": c.id, "features": dict(c.features)} for c in first]
        assert first.logged.content_key == candidate_set(inline)
        catalog.upsert("default", [Candidate("item-01", {"topic": "x"})], allow_identifiers=False)
        again = catalog.snapshot("default").select(chosen)
        assert again.logged.content_key != first.logged.content_key
    finally:
        db.dispose()


def _decide_all(settings: Settings, use_catalog: bool) -> None:
    async def run() -> None:
        service = DecisionService(
            settings.model_copy(update={"trainer": "off"}), load_policies(settings.policies_dir)
        )
        await service.start()
        try:
            if use_catalog:
                await asyncio.to_thread(
                    service.catalog.upsert, "default", ITEMS, allow_identifiers=False
                )
            for n in range(60):
                chosen = [ITEMS[(n + k) % len(ITEMS)].id for k in range(6)]
                candidates = (
                    service.catalog.snapshot("default").select(chosen)
                    if use_catalog
                    else tuple(Candidate(c, ITEMS[int(c[-2:])].features) for c in chosen)
                )
                request = DecisionRequest(
                    event_id=f"evt-{n:03d}",
                    policy="default",
                    candidates=candidates,
                    slots=slot_list(1),
                    context={"segment": f"s{n % 3}"},
                )
                row = await service.decide(request)
                shown = row["slots"][0]["id"]
                reward = 1.0 if int(shown[-2:]) % 5 == n % 3 else 0.0
                await service.reward(f"evt-{n:03d}", reward, 0, None)
        finally:
            await service.close()

    asyncio.run(run())


def _train(url: str, settings: Settings) -> tuple[bytes, int, list[str]]:
    db = make_engine(url)
    try:
        results = Trainer(
            db, load_policies(settings.policies_dir), TrainerOptions(commit_grace_seconds=0),
            clock=lambda: time.time() + 7200,  # every reward window has closed
        ).run_once()  # fmt: skip
        assert results["default"].active
        with Session(db) as session:
            model = session.scalars(
                select(ModelCheckpointRow)
                .where(ModelCheckpointRow.policy == "default")
                .order_by(ModelCheckpointRow.model_version.desc())
            ).first()
            keys = list(session.scalars(select(DecisionRow.candidate_set).order_by("position")))
        assert model is not None
        return model.model, model.learned_events, keys
    finally:
        db.dispose()


def test_catalog_decisions_are_learned_like_inline_ones(settings: Settings, tmp_path: Path) -> None:
    """The same 60 decisions, by catalog on this store and inline on a reference store:
    the same candidate sets are logged and the trainer learns byte-identical models."""
    _decide_all(settings, use_catalog=True)
    reference_url = f"sqlite:///{tmp_path / 'inline.db'}"
    upgrade(reference_url)
    _decide_all(settings.model_copy(update={"database_url": reference_url}), use_catalog=False)
    by_catalog = _train(settings.database_url, settings)
    inline = _train(reference_url, settings)
    assert by_catalog[1] == inline[1] == 60
    assert by_catalog[2] == inline[2]  # the same candidate-set keys, decision by decision
    assert by_catalog[0] == inline[0]
    db = make_engine(settings.database_url)
    with Session(db) as session:  # 12 distinct selections of 6, each stored once
        assert len(session.scalars(select(CandidateSetRow.key)).all()) == 12
    db.dispose()


def test_migration_downgrade_removes_the_catalog(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    db = make_engine(empty_database_url)
    try:
        serving = Catalog(db)
        serving.upsert("default", ITEMS[:2], allow_identifiers=False)
        downgrade(empty_database_url, "0007_shared_lines")
        assert not {"catalog_items", "catalog_versions"} & set(inspect(db).get_table_names())
        upgrade(empty_database_url)
        assert serving.refresh() == ["default"]  # a process that served it forgets it
        assert len(serving.snapshot("default")) == 0
        catalog = Catalog(db)
        assert catalog.refresh() == []  # empty again, and usable
        catalog.upsert("default", ITEMS[:1], allow_identifiers=False)
        assert catalog.snapshot("default").version == 1
    finally:
        db.dispose()


def test_the_selection_cache_is_bounded(monkeypatch: Any) -> None:
    """Cached selections hold at most SELECTION_CACHE_CANDIDATES candidates in all; an
    evicted selection is rebuilt equal (same items, same candidate-set key)."""
    monkeypatch.setattr(catalog_module, "SELECTION_CACHE_CANDIDATES", 5)
    snapshot = catalog_module.CatalogSnapshot("p", 1, None, {c.id: c for c in ITEMS})
    first = snapshot.select(["item-00", "item-01", "item-02"])
    assert snapshot.select(["item-00", "item-01", "item-02"]) is first
    snapshot.select(["item-03", "item-04", "item-05"])  # 6 > 5: the cache was emptied first
    again = snapshot.select(["item-00", "item-01", "item-02"])
    assert again is not first and again == first
    assert again.logged.content_key == first.logged.content_key


def test_incremental_refreshes_during_concurrent_changes_miss_nothing(database_url: str) -> None:
    """Two writers change one catalog at once while a reader refreshes incrementally; the
    reader ends with exactly what a fresh full load sees (versions commit in order)."""
    db = make_engine(database_url)
    try:
        reader = Catalog(db)
        errors: list[BaseException] = []

        def write(who: int) -> None:
            writer = Catalog(db)
            try:
                for n in range(15):
                    item = Candidate(f"w{who}-{n % 4}", {"n": n, "who": who})
                    writer.upsert("default", [item], allow_identifiers=False)
                    if n % 5 == 4:
                        writer.remove("default", f"w{who}-{n % 4}")
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(who,)) for who in (1, 2)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            reader.refresh()
        for thread in threads:
            thread.join()
        assert not errors, errors
        reader.refresh()
        fresh = Catalog(db)
        fresh.refresh()
        assert reader.snapshot("default").version == fresh.snapshot("default").version == 36
        assert reader.snapshot("default").items == fresh.snapshot("default").items
        assert len(fresh.snapshot("default")) == 6  # items 0, 1 and 3 of each: 2 was removed last
    finally:
        db.dispose()
