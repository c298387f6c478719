"""PostgreSQL: the decision and reward logs partitioned by policy and time (issue 10).

Retention removes a policy's rows older than its ``retention_days``. A ``DELETE`` of
millions of rows costs minutes of I/O, WAL and later vacuum; dropping a partition that holds
exactly those rows costs milliseconds, whatever it holds. So on PostgreSQL (migration
``0008_partitioned_log``)::

    decisions                      PARTITION BY LIST (policy)
      decisions_p_<tag>            one per policy, PARTITION BY RANGE (created_at)
        decisions_p_<tag>_<from>_<to>   one per time range (UTC days, see partition_days)
        decisions_p_<tag>_default       anything outside the ranges (a safety net)
      decisions_default            policies without a partition yet (a safety net)

``rewards`` has the same shape, keyed by the *decision's* policy and time (the reward row
carries both: ``policy``, ``decision_created_at``), so a range's decisions and their
rewards are dropped together. SQLite keeps plain tables and the batched delete.

Partitions are created ahead of time (today and the next :data:`AHEAD_DAYS` days) when a
serving process starts, when a policy is applied and at every retention run, only for
policies with a retention (the others keep everything in their default partition, which
costs nothing and keeps look-ups across partitions few). A row outside every range lands in
a default partition, so an insert never fails; retention removes such rows with the batched
delete. Creating a range whose rows already sit in the default partition moves them first
(an ``ATTACH`` would otherwise fail its check of the default partition).

Locks. ``ATTACH`` locks the default partition and ``DROP`` the policy's partition
exclusively; a queued exclusive lock would hold every later reader and writer of the policy
behind any long transaction. Both therefore wait at most :data:`LOCK_TIMEOUT_MS` per
attempt and retry a few times; a drop that still cannot get its locks falls back to the
batched delete (retention is a promise), a creation is tried again at the next run
(partitions are made days ahead).

Uniqueness. A unique index on a partitioned table must contain the partition key, so
``event_id`` is unique by the writer instead (an advisory lock per client-given event id,
:func:`~bandit_service.store.repository.lock_event_ids`), and a reward's decision is
checked by :func:`~bandit_service.store.repository.insert_rewards` (``FOR KEY SHARE``, what a
foreign key does internally).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc

log = logging.getLogger(__name__)

DAY = 86400.0
AHEAD_DAYS = 2  # partitions exist for today and the next two days
# Ranges per retention period. A look-up by event id (a decide retry, every reward) cannot
# be pruned and visits every partition (~30-50 us each, measured: docs/performance.md);
# whole-partition retention keeps a row up to one range width too long. Ten balances both.
RANGES_PER_RETENTION = 10
LOCK_TIMEOUT_MS = 200  # longest wait for a lock that queues others behind it
LOCK_ATTEMPTS = 10  # then give up for this run (about 2.5 s in all)
LOCK_PAUSE = 0.05
# One maintainer of the partition layout at a time, across processes.
_LAYOUT_LOCK = 0x62616E646974_01

# (table, the column its time ranges are on)
TABLES = (("decisions", "created_at"), ("rewards", "decision_created_at"))


def is_partitioned(bind: Engine | Connection) -> bool:
    """The log is partitioned on every PostgreSQL store at head (0008_partitioned_log)."""
    return bind.dialect.name == "postgresql"


def partition_days(retention_days: float) -> int:
    """Width of a policy's time ranges: a tenth of its retention, at least a day, so that
    a policy keeps about :data:`RANGES_PER_RETENTION` of them (plus those made ahead)."""
    return max(1, math.ceil(retention_days / RANGES_PER_RETENTION))


def policy_partition(table: str, policy: str) -> str:
    """``<table>_p_<readable part of the name>_<hash>``: deterministic, at most 45
    characters (PostgreSQL names stop at 63), distinct for distinct policy names."""
    readable = re.sub(r"[^a-z0-9]", "_", policy.lower())[:16]
    digest = hashlib.blake2b(policy.encode(), digest_size=4).hexdigest()
    return f"{table}_p_{readable}_{digest}"


def range_partition(table: str, policy: str, first_day: int, end_day: int) -> str:
    """``<policy partition>_<first day>_<end day>`` (UTC ``YYYYMMDD``, end exclusive)."""
    return f"{policy_partition(table, policy)}_{_date(first_day)}_{_date(end_day)}"


def _date(day: int) -> str:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).strftime("%Y%m%d")


def _day(date: str) -> int:
    return (dt.datetime.strptime(date, "%Y%m%d").date() - dt.date(1970, 1, 1)).days


_RANGE_SUFFIX = re.compile(r"_(\d{8})_(\d{8})$")


@dataclass(frozen=True)
class Range:
    """One time-range partition of a policy: days ``[first_day, end_day)`` since 1970."""

    first_day: int
    end_day: int

    @property
    def start(self) -> float:
        return self.first_day * DAY

    @property
    def end(self) -> float:
        return self.end_day * DAY


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _exists(connection: Connection, name: str) -> bool:
    return connection.scalar(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}) is True


def ranges(connection: Connection, table: str, policy: str) -> list[Range]:
    """The time ranges of a policy's partitions of ``table``, oldest first."""
    parent = policy_partition(table, policy)
    if not _exists(connection, parent):
        return []
    names = connection.scalars(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = CAST(:parent AS regclass)"
        ),
        {"parent": parent},
    )
    found = []
    for name in names:
        match = _RANGE_SUFFIX.search(name)
        if match and name.startswith(parent):
            found.append(Range(_day(match[1]), _day(match[2])))
    return sorted(found, key=lambda r: r.first_day)


def _lock(connection: Connection, tables: Iterable[str], mode: str) -> bool:
    """Lock ``tables`` (each ``ONLY``) in ``mode``, waiting at most :data:`LOCK_TIMEOUT_MS`
    per attempt: a queued exclusive lock stalls every later reader and writer of the
    table, so the wait is short and retried (:data:`LOCK_ATTEMPTS` times) rather than long.
    False if every attempt timed out."""
    names = ", ".join(f"ONLY {t}" for t in tables)
    for attempt in range(LOCK_ATTEMPTS):
        try:
            with connection.begin_nested():
                connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_MS}ms'"))
                connection.execute(text(f"LOCK TABLE {names} IN {mode} MODE"))
                connection.execute(text("SET LOCAL lock_timeout = 0"))
            return True
        except sa_exc.OperationalError:  # lock_not_available (the timeout)
            if attempt + 1 < LOCK_ATTEMPTS:
                time.sleep(LOCK_PAUSE)
    return False


def _attach(
    connection: Connection, parent: str, child: str, bound: str, where: str, sub_key: str | None
) -> None:
    """Create ``child`` for ``bound`` under ``parent``, moving the rows matching ``where``
    out of the parent's default partition first. ``sub_key``: make the child itself
    partitioned by range on that column, with its own default partition."""
    default = f"{parent}_default"
    by = f" PARTITION BY RANGE ({sub_key})" if sub_key else ""
    connection.execute(text(f"CREATE TABLE {child} (LIKE {parent} INCLUDING DEFAULTS){by}"))
    if sub_key:
        connection.execute(text(f"CREATE TABLE {child}_default PARTITION OF {child} DEFAULT"))
    connection.execute(
        text(
            f"WITH moved AS (DELETE FROM {default} WHERE {where} RETURNING *) "
            f"INSERT INTO {child} SELECT * FROM moved"
        )
    )
    connection.execute(text(f"ALTER TABLE {parent} ATTACH PARTITION {child} {bound}"))


def _create_policy_partitions(connection: Connection, policy: str) -> bool:
    """The policy's partition of each table (with its default), in one transaction."""
    if all(_exists(connection, policy_partition(t, policy)) for t, _ in TABLES):
        return True
    if not _lock(connection, [f"{t}_default" for t, _ in TABLES], "ACCESS EXCLUSIVE"):
        return False
    for table, key in TABLES:
        child = policy_partition(table, policy)
        if not _exists(connection, child):
            where = f"policy = {_literal(policy)}"
            _attach(connection, table, child, f"FOR VALUES IN ({_literal(policy)})", where, key)
    return True


def _create_range(connection: Connection, policy: str, wanted: Range) -> bool:
    """A decisions partition and a rewards partition for one time range, together."""
    parents = [policy_partition(t, policy) for t, _ in TABLES]
    if not _lock(connection, [f"{p}_default" for p in parents], "ACCESS EXCLUSIVE"):
        return False
    for (table, key), parent in zip(TABLES, parents, strict=True):
        child = range_partition(table, policy, wanted.first_day, wanted.end_day)
        bound = f"FOR VALUES FROM ({wanted.start!r}) TO ({wanted.end!r})"
        where = f"{key} >= {wanted.start!r} AND {key} < {wanted.end!r}"
        _attach(connection, parent, child, bound, where, None)
    return True


def wanted_ranges(existing: list[Range], today: int, width: int) -> list[Range]:
    """Ranges to create so that days ``today .. today + AHEAD_DAYS`` are covered: aligned to
    multiples of ``width`` days, clipped so as never to overlap an existing range (whose
    width may differ if the retention changed)."""
    covered = list(existing)
    out: list[Range] = []
    for day in range(today, today + AHEAD_DAYS + 1):
        if any(r.first_day <= day < r.end_day for r in covered):
            continue
        first = max([day - day % width] + [r.end_day for r in covered if r.end_day <= day])
        end = min([day - day % width + width] + [r.first_day for r in covered if r.first_day > day])
        new = Range(first, end)
        covered.append(new)
        out.append(new)
    return out


def ensure(engine: Engine, policies: Iterable[tuple[str, float]], now: float | None = None) -> int:
    """Create the partitions each ``(policy, retention_days)`` needs from now on; returns
    how many were created. Never raises for a lock that could not be had (the default
    partitions catch every row meanwhile) -- only logs."""
    if not is_partitioned(engine):
        return 0
    today = int((time.time() if now is None else now) // DAY)
    created = 0
    for policy, retention_days in policies:
        try:
            created += _ensure_policy(engine, policy, retention_days, today)
        except sa_exc.SQLAlchemyError:
            log.warning("could not create partitions of policy %s; will retry", policy,
                        exc_info=True)  # fmt: skip
    return created


def _ensure_policy(engine: Engine, policy: str, retention_days: float, today: int) -> int:
    created = 0
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LAYOUT_LOCK})
        if not all(_exists(connection, policy_partition(t, policy)) for t, _ in TABLES):
            if not _create_policy_partitions(connection, policy):
                log.info("partitions of policy %s: default partition busy; later", policy)
                return 0
            created += 1
    if retention_days <= 0:
        return created  # everything stays in the policy's default partition
    width = partition_days(retention_days)
    with engine.connect() as connection:
        existing = ranges(connection, "decisions", policy)
    for wanted in wanted_ranges(existing, today, width):
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LAYOUT_LOCK})
            if wanted in ranges(connection, "decisions", policy):
                continue  # another process made it meanwhile
            if not _create_range(connection, policy, wanted):
                log.info("partition %s: default partition busy; later", wanted)
                return created
            created += 1
    return created


@dataclass
class Dropped:
    """What dropping one range removed: rows counted under the lock, so exact."""

    decisions: int
    rewards: int
    candidate_sets: list[str]
    exclusive_seconds: float = 0.0  # how long the policy's log was locked for the drop


def expired_ranges(connection: Connection, policy: str, cutoff: float) -> list[Range]:
    """Ranges of the policy (in either table) whose every row is older than ``cutoff``."""
    found = {r for table, _ in TABLES for r in ranges(connection, table, policy)}
    return sorted((r for r in found if r.end <= cutoff), key=lambda r: r.first_day)


def drop_range(engine: Engine, policy: str, expired: Range) -> Dropped | None:
    """Drop one expired range of decisions and their rewards in one short transaction;
    None if the locks could not be had now (the caller deletes the rows instead).

    The range's partitions are first locked against writes only (``SHARE``) while their
    rows are counted and their candidate sets listed; the policy's partitions are locked
    exclusively only for the ``DROP`` itself, so readers and writers of the policy wait
    milliseconds, not the length of a scan. If the range had no reward partition, its
    rewards are in the default partition and are deleted there, so no reward outlives its
    decision."""
    decisions = range_partition("decisions", policy, expired.first_day, expired.end_day)
    rewards = range_partition("rewards", policy, expired.first_day, expired.end_day)
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LAYOUT_LOCK})
        present = [t for t in (decisions, rewards) if _exists(connection, t)]
        result = Dropped(0, 0, [])
        if not present:
            return result  # another process dropped it meanwhile
        if not _lock(connection, present, "SHARE"):
            return None
        if decisions in present:
            for key, count in connection.execute(
                text(f"SELECT candidate_set, count(*) FROM {decisions} GROUP BY candidate_set")
            ):
                result.candidate_sets.append(key)
                result.decisions += int(count)
        if rewards in present:
            result.rewards += int(connection.scalar(text(f"SELECT count(*) FROM {rewards}")) or 0)
        if not _lock(connection, [policy_partition(t, policy) for t, _ in TABLES],
                     "ACCESS EXCLUSIVE"):  # fmt: skip
            return None
        locked = time.perf_counter()
        for table in present:
            connection.execute(text(f"DROP TABLE {table}"))
        if rewards not in present:
            stray = connection.execute(
                text(
                    "DELETE FROM rewards WHERE policy = :p "
                    "AND decision_created_at >= :start AND decision_created_at < :end"
                ),
                {"p": policy, "start": expired.start, "end": expired.end},
            )
            result.rewards += int(stray.rowcount)
    result.exclusive_seconds = time.perf_counter() - locked  # the commit included
    return result
