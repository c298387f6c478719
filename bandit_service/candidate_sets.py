"""Kept candidate sets: what a decision derives from its candidates, computed once per set.

A product page sends the same candidates (say 50 items with 10 features each) with every
request and only the context changes. Per decision, the service used to decode and
type-check the ~500 feature values again, build the ``Candidate`` tuple, the logged
``[{"id", "features"}]`` list, its compact-log key (JSON text and BLAKE2b hash), the
identifier scan, the id -> position map and each candidate's VW text: together about 40% of
a decision's CPU (issue 8), all of it a pure function of the candidates.

:class:`KeptCandidates` holds those results; whoever can recognise a repeated set reuses
one. Two sources do:

* catalog selections (``bandit_service/catalog.py``, :class:`CatalogCandidates`), kept
  per catalog version;
* inline ``candidates`` arrays, kept by their raw JSON bytes in a :class:`KeptSetCache`
  (``api/fast_body.py``): the same bytes always decode to the same candidates.

Only what depends on the candidates alone is kept. Everything that depends on the request
or the policy (the candidate limits, the key's per-candidate feature limit, whether the
policy allows identifier features, the raw ``user_id`` check, duplicate ids) is still
decided per request, from kept facts where that is cheaper (e.g. the largest feature count).

**Shared, never mutated.** The feature dicts of a kept set are shared by every decision
over it (and by the logged form written to the store). Nothing on the decision path
writes to them: the engine, rules, VW rendering, identifier scan and logging only read
(``tests/integration/test_kept_candidates.py`` checks a kept set is unchanged after
decisions under rules, caps, filters and explanations).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, Self

from bandit_service.domain import Candidate
from bandit_service.identifiers import CandidatesScan
from bandit_service.learners.vw_text import action_line
from bandit_service.store import compact


def feature_count(features: Mapping[str, Any]) -> int:
    """Features as ``check_features`` and ``api/auth.count_features`` count them: a
    namespace counts its members."""
    return sum(len(v) if isinstance(v, dict) else 1 for v in features.values())


class LoggedCandidates(list[dict[str, Any]]):
    """The logged form of a candidate set (``[{"id", "features"}, ...]``) with its
    compact-log candidate-set ``(key, JSON text)`` (see ``store/compact.candidate_set``)
    and ids (``store/compact.candidate_ids``, with their positions) computed once.
    Shared by every decision over the set: never mutated."""

    content_key: tuple[str, str]
    ids: compact.CandidateIds

    def __init__(self, items: Iterable[dict[str, Any]]) -> None:
        super().__init__(items)
        self.content_key = compact.candidate_set(self)
        self.ids = compact.CandidateIds(c["id"] for c in self)


class KeptCandidates(tuple[Candidate, ...]):
    """Candidates, in request order, with what decisions derive from them. Behaves as a
    plain tuple of :class:`Candidate` everywhere else.

    ``logged`` (with its content key), ``features`` and ``max_features`` are computed at
    construction: every decision needs them, and the content key is read by the store's
    writer thread, so it must not be computed lazily there. The identifier scan and the
    VW lines are computed at first use (on the event loop), as not every policy needs them.
    """

    logged: LoggedCandidates
    features: tuple[Mapping[str, Any], ...]  # per candidate, for ``admit_candidates``
    max_features: int  # the largest feature count of a candidate (0 when there are none)
    _scan: CandidatesScan | None
    _lines: tuple[str, ...] | None

    def __new__(cls, candidates: Iterable[Candidate]) -> Self:
        self = super().__new__(cls, candidates)
        self.logged = LoggedCandidates([{"id": c.id, "features": c.features} for c in self])
        self.features = tuple([c.features for c in self])
        self.max_features = max(map(feature_count, self.features), default=0)
        self._scan = None
        self._lines = None
        return self

    def identifier_scan(self) -> CandidatesScan:
        """The identifier scan of these candidates (``identifiers.CandidatesScan``), made at
        first use; ``find_identifier`` uses it for the candidates' part of a request.
        Whether a hit refuses the request is the policy's call, per request, and the raw
        ``user_id`` check depends on the request: neither is kept."""
        scan = self._scan
        if scan is None:
            scan = self._scan = CandidatesScan(tuple(self), self.logged.content_key[1])
        return scan

    @property
    def action_lines(self) -> tuple[str, ...]:
        """Each candidate's VW action line (``vw_text.action_line``), rendered once. The
        same text the learner's own ``ActionLineCache`` would give, so the same scores."""
        lines = self._lines
        if lines is None:
            lines = self._lines = tuple([action_line(c.id, c.features) for c in self])
        return lines


# What a kept set holds, estimated from its raw JSON and candidate count: the raw key
# itself, the decoded strings, numbers and dicts, the logged JSON text, the scan's JSON and
# the VW lines grow with the raw bytes (5-17 bytes per raw byte measured with tracemalloc
# over feature shapes from long strings to lists of one-letter strings); the Candidate,
# logged dict, id and position entries with the candidates (about 600 bytes each).
# tests/unit/test_candidate_sets.py checks that the estimate is never below the real size.
BYTES_PER_RAW_BYTE = 20
BYTES_PER_CANDIDATE = 640
ENTRY_OVERHEAD = 2048
# :meth:`KeptSetCache.find_at` finds a kept set by its first PREFIX bytes, then compares
# the whole set; at most PER_PREFIX sets share a prefix there (others are found by
# ``get`` only), so a look-up compares at most that many byte strings.
PREFIX = 64
PER_PREFIX = 4


class KeptSetCache:
    """Kept sets by the raw JSON bytes of an inline ``candidates`` array, least recently
    used first out.

    Bounded twice: by entries and by an estimate of the memory held (:meth:`cost`); a set
    larger than an eighth of the memory bound is not kept at all (it is still built and
    used for its own request). The default bound, 64 MB, keeps ~400 sets of 50 x 10
    features or ~40 of 500 x 5. One per process (each uvicorn worker has its own); the
    event loop is its only user in the service, and a lock makes it safe for any other
    caller.

    Two look-ups: :meth:`get` by the raw bytes themselves (which hashes all of them:
    ~1.5 µs for a 50 x 10 set of ~6.5 kB), and :meth:`find_at` by the bytes found at a
    position of a request body, which finds a kept set without knowing where its JSON ends
    (``api/fast_body.py`` then need not parse that JSON to find its end either).
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024, max_entries: int = 4096) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes_held = 0
        self.hits = 0
        self.misses = 0
        self._sets: OrderedDict[bytes, KeptCandidates] = OrderedDict()
        # (raw, kept) by the raw's first PREFIX bytes; sets shorter than that are not here.
        self._by_prefix: dict[bytes, list[tuple[bytes, KeptCandidates]]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sets)

    @staticmethod
    def cost(raw: bytes, kept: KeptCandidates) -> int:
        """The memory a kept set is assumed to hold (an upper estimate)."""
        return BYTES_PER_RAW_BYTE * len(raw) + BYTES_PER_CANDIDATE * len(kept) + ENTRY_OVERHEAD

    def get(self, raw: bytes) -> KeptCandidates | None:
        with self._lock:
            found = self._sets.get(raw)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._sets.move_to_end(raw)
            return found

    def find_at(self, data: bytes, start: int) -> tuple[bytes, KeptCandidates] | None:
        """A kept set whose raw JSON ``data`` holds at ``start`` (``data[start:start +
        len(raw)] == raw``), with that raw, or None. Counts a hit when found, nothing when
        not (the caller then asks :meth:`get`, which counts). At most one kept set can
        match: each raw is one complete JSON value, which ends where its first bracket
        closes, so none is a longer one's beginning."""
        with self._lock:
            bucket = self._by_prefix.get(data[start : start + PREFIX])
            if bucket is None:
                return None
            for raw, kept in bucket:
                if data.startswith(raw, start):
                    self.hits += 1
                    self._sets.move_to_end(raw)  # the key object itself: its hash is cached
                    return raw, kept
            return None

    def put(self, raw: bytes, kept: KeptCandidates) -> None:
        cost = self.cost(raw, kept)
        if cost > self.max_bytes // 8:
            return
        with self._lock:
            if raw in self._sets:
                return
            self._sets[raw] = kept
            if len(raw) >= PREFIX:
                bucket = self._by_prefix.setdefault(raw[:PREFIX], [])
                if len(bucket) < PER_PREFIX:
                    bucket.append((raw, kept))
            self.bytes_held += cost
            while self.bytes_held > self.max_bytes or len(self._sets) > self.max_entries:
                old, evicted = self._sets.popitem(last=False)
                self.bytes_held -= self.cost(old, evicted)
                self._unindex(old)

    def _unindex(self, raw: bytes) -> None:
        bucket = self._by_prefix.get(raw[:PREFIX])
        if bucket is not None:
            bucket[:] = [entry for entry in bucket if entry[0] is not raw]
            if not bucket:
                del self._by_prefix[raw[:PREFIX]]

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()
            self._by_prefix.clear()
            self.bytes_held = 0
