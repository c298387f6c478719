"""Random ids in ``uuid.uuid4()``'s formats, from the same source, with less work per id.

Every decision takes two fresh ids (its event id, and the request id when the caller sent
none), every reward one. ``uuid.uuid4().hex`` costs ~3.4 µs each: a ``getrandom`` system
call for 16 bytes, a ``UUID`` object, an int, and formatting. Here the bytes come from
``os.urandom`` too (the kernel's CSPRNG, as for ``uuid4``), but 256 ids' worth per call,
turned into the 32-hex-digit text with the version (4) and variant (10xx) bits set exactly
as ``uuid4`` sets them, all at once in C (``bytes.translate`` and ``bytes.hex``); an id is
then a ``list.pop`` (~0.1 µs). Same format, same 122 random bits, same source;
``tests/unit/test_request_ids.py`` checks each id parses as a version-4 UUID with the
same text.

Ids are never shared across processes: a forked child drops the ids its parent had drawn
(``os.register_at_fork``), so two workers can never hand out the same pending ids.
``list.pop`` is atomic, so threads may share the pool; a refill by two threads at once
only draws more bytes.
"""

from __future__ import annotations

import os

_BATCH = 256
# uuid4: byte 6's high nibble is the version (0100), byte 8's two high bits the variant (10).
_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))
_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))

_pool: list[str] = []


def _refill() -> list[str]:
    raw = bytearray(os.urandom(16 * _BATCH))
    raw[6::16] = raw[6::16].translate(_VERSION)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    text = raw.hex()
    return [text[i : i + 32] for i in range(0, 32 * _BATCH, 32)]


def random_hex() -> str:
    """What ``uuid.uuid4().hex`` returns: 32 lower-case hex digits of a random version-4
    UUID (not the UUID object)."""
    try:
        return _pool.pop()
    except IndexError:
        _pool.extend(_refill())
        return _pool.pop()


def random_uuid() -> str:
    """What ``str(uuid.uuid4())`` returns: a random version-4 UUID, hyphenated."""
    h = random_hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _forget() -> None:
    _pool.clear()


os.register_at_fork(after_in_child=_forget)
