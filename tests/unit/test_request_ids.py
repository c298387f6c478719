"""Ids from ``ops/ids.py`` have ``uuid.uuid4()``'s exact formats and bits, never repeat,
and a forked child never hands out ids its parent had already drawn."""

from __future__ import annotations

import os
import re
import uuid

import pytest

from bandit_service.ops import ids
from bandit_service.service import new_event_id

HEX = re.compile(r"\A[0-9a-f]{32}\Z")


def test_random_hex_is_a_uuid4_hex() -> None:
    seen = set()
    for _ in range(3 * 256 + 7):  # across refills
        text = ids.random_hex()
        assert HEX.match(text)
        parsed = uuid.UUID(hex=text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert parsed.hex == text  # what uuid.uuid4().hex would print for those bits
        seen.add(text)
    assert len(seen) == 3 * 256 + 7


def test_random_uuid_is_str_of_a_uuid4() -> None:
    for _ in range(300):
        text = ids.random_uuid()
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4


def test_every_random_bit_varies() -> None:
    """122 bits are random, as in uuid4; the 6 fixed ones are the version and variant."""
    values = [int(ids.random_hex(), 16) for _ in range(2000)]
    ones = [sum(v >> bit & 1 for v in values) for bit in range(128)]
    fixed = {bit for bit, n in enumerate(ones) if n in (0, len(values))}
    # version 0100 at bits 76-79, variant 10 at bits 62-63 (from the least significant)
    assert fixed == {76, 77, 78, 79, 62, 63}


def test_event_ids_use_the_same_format() -> None:
    assert HEX.match(new_event_id())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_reuse_the_parents_pending_ids() -> None:
    ids.random_hex()  # the pool now holds ids drawn in this process
    pending = set(ids._pool)
    assert pending
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once
        try:
            os.write(write, ",".join(ids.random_hex() for _ in range(300)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split(","))
    os.waitpid(pid, 0)
    assert len(child) == 300 and not child & pending
